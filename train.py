"""
train.py: train the GPT of gpt_numpy.py on a text corpus: raw text in, a checkpoint and a sample out.

nanoGPT-shaped: a config with commented defaults, named presets, plainly named helpers (get_batch,
estimate_loss, get_lr) and one flat training loop. On the way it finds the corpus (by default the Python
standard library's own .py sources, which every machine with Python has), trains a BPE tokenizer on it
(bpe.py) or reads a character vocabulary off it, and writes the token ids once to memory-mapped files
under data/<name>/. Each of those steps is cached and redone only when its inputs change.

    pip install -r requirements.txt && python train.py     # the default job: stdlib sources, BPE, ~2 min on 2 cores
    python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare.txt   # nanoGPT's CPU run
    python train.py --preset shakespeare-char              # the same, downloading Tiny Shakespeare
    python train.py --preset tiny --data notes.txt         # seconds: a smoke test on any text
    python train.py --data ~/books/ --tokenizer char       # a folder (or a file, or a glob "src/**/*.py")
    python train.py --resume                               # continue the run in its out dir (same flags)
    python train.py --init-from out/imported --data notes.txt --lr 3e-4   # fine-tune a checkpoint on new text
    python train.py --help                                 # every flag and preset
    python sample.py --ckpt out/stdlib-bpe2048 --prompt "def "   # stream text from a checkpoint

Run with OPENBLAS_NUM_THREADS=1 (or 2) on a small shared machine: oversubscribed BLAS threads are slow.

Outputs in --out-dir (default out/<data>-<tokenizer>): ckpt.safetensors (the latest checkpoint; format in
checkpoint.py) and log.jsonl (one JSON object per log line and per evaluation). Ctrl-C saves a checkpoint
and exits; `--resume` continues it, and a resumed run ends with the same weights, bit for bit, as one that
was never interrupted (given the same machine, backend and thread count).

Fine-tuning: `--init-from CKPT` (a ckpt.safetensors or its folder: an earlier run's, or one that
`export.py --import-hf` wrote) starts a new run from that checkpoint's weights, architecture and tokenizer;
the optimizer, the step counter and the batch sampler start afresh, and the training settings come from the
flags and --preset as usual. Its out dir (default out/<data>-from-<checkpoint>) also holds the tokenizer
file the data cache is keyed by, and the run resumes like any other (`--resume out/<data>-from-<checkpoint>`).
"""

import argparse
import codecs
import glob
import hashlib
import json
import math
import os
import re
import signal
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, asdict, fields, replace
from pathlib import Path

import numpy as np

import gpt_numpy
from checkpoint import CheckpointError, atomic_write, fsync_dir, load_checkpoint, read_meta, save_checkpoint

ROOT = Path(__file__).resolve().parent
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
EOT = "<|endoftext|>"                   # the BPE special token written between documents (files)


# ----------------------------------------------------------------------------------------------------
# Config: the defaults are the default job (stdlib + BPE); a preset overrides some; flags override both.

@dataclass
class TrainConfig:
    # data
    data: str = "stdlib"            # "stdlib" (Python's own .py sources), "shakespeare", a file, a folder or a glob
    name: str = ""                  # cache name under data/ (default: from --data, e.g. "stdlib", "tinyshakespeare")
    tokenizer: str = "bpe"          # "bpe" (bpe.py, trained on the corpus and cached), "char", or a saved tokenizer file
    vocab_size: int = 2048          # BPE vocabulary: 256 bytes + merges + 1 special token, e.g. 512 .. 8192
    bpe_sample_mb: float = 20.0     # train the BPE on an evenly spread sample of at most this many MB (0: all)
    val_fraction: float = 0.1       # the last 10% of the tokens are the validation split (nanoGPT's 90/10)
    # model (gpt_numpy.GPTConfig)
    init_from: str = ""             # fine-tune: this checkpoint's weights, model and tokenizer ("": a new model)
    n_layer: int = 4                # L: transformer blocks
    n_head: int = 4                 # nh: attention heads (d_model / n_head must be even, for RoPE)
    d_model: int = 128              # C: residual stream width
    d_ff: int = 344                 # F: SwiGLU hidden width; 344 ~ 8/3 * 128 keeps params near a GELU MLP's 4 * 128
    block_size: int = 128           # T: context length in tokens (the model's max_seq_len)
    norm: str = "rmsnorm"           # "rmsnorm" (Llama) or "layernorm" (GPT-2)
    dropout: float = 0.0            # dropout in training, e.g. 0.0 (small data: 0.1 .. 0.2)
    checkpoint_activations: bool = False  # recompute each block in the backward pass: less memory, ~1.3x time
    mixed_precision: bool = False   # float16 compute, float32 master weights, dynamic loss scaling (for GPUs)
    # optimisation: AdamW, linear warmup then cosine decay to min_lr
    batch_size: int = 16            # B: sequences per micro-batch
    grad_accum: int = 1             # micro-batches per step (gradients averaged): effective batch B * grad_accum
    max_iters: int = 600            # optimizer steps in all
    lr: float = 2e-3                # peak learning rate
    min_lr: float = 2e-4            # final learning rate, ~ lr / 10
    warmup_iters: int = 50          # linear warmup steps
    lr_decay_iters: int = 0         # cosine decay ends here (0: at max_iters)
    beta1: float = 0.9              # AdamW first-moment decay
    beta2: float = 0.99             # AdamW second-moment decay (0.99 for small batches, 0.95 for large)
    eps: float = 1e-8               # AdamW epsilon
    weight_decay: float = 0.1       # decoupled weight decay on matrices (not on norm weights)
    grad_clip: float = 1.0          # clip the global gradient norm to this (0: off)
    # evaluation, logging, checkpoints
    eval_interval: int = 150        # evaluate (train and val loss, val bits per byte, a sample) every N steps
    eval_iters: int = 20            # batches per split in each evaluation
    log_interval: int = 50          # print a log line every N steps
    ckpt_interval: int = 150        # write a checkpoint every N steps (0: only at the end and on Ctrl-C)
    sample_tokens: int = 100        # tokens sampled at each evaluation (the final sample is 4x; 0: none)
    sample_prompt: str = "\n"       # prompt of those samples
    # run
    seed: int = 1337                # seeds the weights, the batch sampler and the dropout masks
    backend: str = "numpy"          # "numpy" (CPU) or "cupy" (NVIDIA GPU, through gpt_cupy.py)
    out_dir: str = ""               # checkpoint and log folder (default: out/<data>-<tokenizer>)
    data_dir: str = "data"          # root of the data caches
    skip_nonfinite: bool = False    # skip a step whose loss or gradient is nan/inf instead of stopping


PRESETS = {
    "default": ("the default job: BPE (vocab 2048) on Python's standard library, 600 steps; ~2 min on 2 cores, ~3.5 on 1",
                {}),
    "shakespeare-char": ("nanoGPT's shakespeare_char CPU run (val loss ~1.71 here, nanoGPT 1.88); ~1.7 min on 2 cores",
                         dict(data="shakespeare", tokenizer="char", n_layer=4, n_head=4, d_model=128, d_ff=344,
                              block_size=64, batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4,
                              warmup_iters=100, lr_decay_iters=2000, beta2=0.99, weight_decay=0.1,
                              grad_clip=1.0, dropout=0.0, eval_interval=250, eval_iters=20, log_interval=50,
                              ckpt_interval=500, sample_tokens=200)),
    "shakespeare-char-gpu": ("nanoGPT's full shakespeare_char GPU run (nanoGPT: val 1.4697 on an A100); use --backend cupy",
                             dict(data="shakespeare", tokenizer="char", n_layer=6, n_head=6, d_model=384, d_ff=1024,
                                  block_size=256, batch_size=64, max_iters=5000, lr=1e-3, min_lr=1e-4,
                                  warmup_iters=100, lr_decay_iters=5000, beta2=0.99, weight_decay=0.1,
                                  grad_clip=1.0, dropout=0.2, eval_interval=250, eval_iters=200,
                                  log_interval=50, ckpt_interval=1000, sample_tokens=200)),
    "tiny": ("seconds: a 1-layer model for smoke tests (pass --data)",
             dict(tokenizer="char", n_layer=1, n_head=2, d_model=16, d_ff=32, block_size=16, batch_size=4,
                  max_iters=20, lr=1e-2, min_lr=1e-3, warmup_iters=2, eval_interval=10, eval_iters=2,
                  log_interval=5, ckpt_interval=10, sample_tokens=16)),
}

# Flags that a resumed run may change; every other setting must match the checkpoint's. (--data may name
# the corpus by another path: what must match is the corpus hash, file names and contents, checked later.)
RESUME_MAY_CHANGE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
                     "sample_tokens", "sample_prompt", "backend", "out_dir", "data_dir", "skip_nonfinite",
                     "data", "name"}

# What a fine-tuning run (--init-from) takes from its checkpoint instead of from the preset and flags, with
# the tokenizer; an explicit flag that differs is an error. (block_size is a flag, up to its max_seq_len.)
FROM_CHECKPOINT = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "norm")


class UserError(Exception):
    """A problem the user can fix (bad path, empty corpus, ...): main() prints it in one line, no traceback."""


def _keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS. Call it once
    at the start of a CPU training script; returns False (and does nothing) off glibc.

    Every step allocates and frees the same activations again. By default glibc unmaps big freed
    blocks and trims the top of its heap, so the next step page-faults the memory back in and the
    kernel zeroes each page (on a 2-core machine: 63 -> 47 ms per cpu-small step, 2 threads). Raising
    the mmap and trim thresholds keeps the blocks in the heap, where the next step reuses them; the
    process then holds on to its peak memory. Process-wide; host memory only (no effect on CuPy).
    (A private copy until it moves to its own module.)
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                   # from glibc's malloc.h
    mmap_ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def load_backend(name):
    """The model module for a backend: gpt_numpy, or gpt_cupy (the same functions on the GPU)."""
    if name == "numpy":
        _keep_freed_memory()                   # reuse the activations' memory step after step
        return gpt_numpy
    if name == "cupy":
        try:
            import gpt_cupy
        except RuntimeError as e:                       # no CuPy or no GPU: gpt_cupy says which
            raise UserError(str(e)) from None
        return gpt_cupy
    raise UserError(f"unknown backend {name!r}: choose numpy or cupy")


# ----------------------------------------------------------------------------------------------------
# The corpus: a sorted list of files, each read in bounded pieces.

TEST_DIRS = {"test", "tests", "idle_test"}              # stdlib test suites (test/, idlelib/idle_test/, ...)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_sources():
    """The standard library's own .py files, tests and site-packages left out, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in TEST_DIRS | SKIP_DIRS and not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_text_file(path):
    """A regular file without NUL bytes in its first 8 KiB (so images and archives in a folder are skipped)."""
    try:
        with open(path, "rb") as f:
            return b"\0" not in f.read(8192)
    except OSError:
        return False


def fetch_shakespeare(data_dir):
    """Tiny Shakespeare (1.1 MB), downloaded once into data/shakespeare/input.txt."""
    path = Path(data_dir) / "shakespeare" / "input.txt"
    if path.is_file():
        return path
    import urllib.request
    try:
        print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL} ...")
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=10) as r:
            text = r.read()
    except Exception as e:
        local = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"     # this project's shared copy
        example = os.path.relpath(local) if local.is_file() else "path/to/tinyshakespeare.txt"
        raise UserError(f"could not download Tiny Shakespeare ({e.__class__.__name__}: {e}); point --data at "
                        f"a local copy instead (any path), e.g. --data {example}") from None
    atomic_write(path, text)
    return path


def data_name(data):
    """The cache name of --data: "stdlib", "shakespeare", a file's stem, a folder's name, or a glob made safe."""
    if data in ("stdlib", "shakespeare"):
        return data
    p = Path(data).expanduser()
    if p.is_file():
        return safe_name(p.stem)
    if p.is_dir():
        return safe_name(p.resolve().name)
    return safe_name(data) + "-" + hashlib.sha256(data.encode()).hexdigest()[:6]


def find_sources(data, data_dir):
    """--data -> (root, files): the folder the paths are named relative to, and the files in sorted order."""
    if data == "stdlib":
        return stdlib_sources()
    if data == "shakespeare":
        path = fetch_shakespeare(data_dir)
        return path.parent, [path]
    path = Path(data).expanduser()
    if path.is_file():
        if not is_text_file(path):
            raise UserError(f"--data {data!r} is not a text file (it holds NUL bytes: a binary file?)")
        return path.parent, [path]
    if path.is_dir():
        files = [p for p in path.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        files = sorted((p for p in files if is_text_file(p)), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UserError(f"empty corpus: the folder {data} holds no text files")
        return path, files
    if glob.has_magic(data):
        files = sorted(Path(p).resolve() for p in glob.glob(os.path.expanduser(data), recursive=True)
                       if os.path.isfile(p))
        if not files:
            raise UserError(f"no files match --data {data!r}")
        return Path(os.path.commonpath([p.parent for p in files])), files
    raise UserError(f"--data {data!r}: no such file or folder (expected a text file, a folder, a glob, "
                    f"'stdlib' or 'shakespeare')")


def safe_name(s):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_.")[:48] or "data"


def read_pieces(path, piece_bytes=1 << 20, hasher=None, cut=None, errors="replace"):
    """Yield (text, nbytes) for consecutive pieces of a file, reading piece_bytes at a time, so memory stays
    bounded for any file size; nbytes counts the bytes read since the previous piece (for progress bars).
    cut(text, start) -> index says where a piece may end (bpe.safe_cut: where BPE's chunking is unchanged;
    default: anywhere). `hasher` sees the raw bytes as they pass. errors: how invalid UTF-8 is decoded.

    Example: a 3 MB file, 1 MB reads -> three pieces of ~1 MB.
    """
    dec = codecs.getincrementaldecoder("utf-8")(errors)    # a character split across reads survives
    tail, nbytes = "", 0
    with open(path, "rb") as f:
        while b := f.read(piece_bytes):
            if hasher is not None:
                hasher.update(b)
            nbytes += len(b)
            text = tail + dec.decode(b)
            i = cut(text, len(tail) - 1) if cut else len(text)   # the carried tail held no cut
            if i:
                yield text[:i], nbytes
                nbytes = 0
            tail = text[i:]
    tail += dec.decode(b"", final=True)
    if tail or nbytes:
        yield tail, nbytes


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def digest_sources(root, files, cache_path):
    """sha256 of every source and of the whole corpus (names and contents). A file whose size and
    mtime match data/<name>/sources.json is not read again; any other is hashed afresh.

    Returns {"sha256": corpus hash, "bytes": total size, "files": [{"path", "bytes", "mtime_ns", "sha256"}]}.
    """
    cache_path = Path(cache_path)
    known = {}
    if cache_path.is_file():
        try:
            known = {f["path"]: f for f in json.loads(cache_path.read_text())["files"]}
        except (ValueError, KeyError, TypeError):
            known = {}
    entries, h = [], hashlib.sha256()
    for p in files:
        rel = Path(os.path.relpath(p, root)).as_posix()
        st = p.stat()
        k = known.get(rel)
        if k and k["bytes"] == st.st_size and k["mtime_ns"] == st.st_mtime_ns:
            sha = k["sha256"]
        else:
            sha = file_sha256(p)
        entries.append({"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
        h.update(f"{rel}\0{st.st_size}\0{sha}\n".encode())
    info = {"sha256": h.hexdigest(), "bytes": sum(e["bytes"] for e in entries), "files": entries}
    if not known or [known.get(e["path"]) for e in entries] != entries:
        write_text_atomic(cache_path, json.dumps(info))
    return info


def write_text_atomic(path, text):
    atomic_write(path, text.encode("utf-8"))            # tmp file, fsync, rename (checkpoint.py)


# ----------------------------------------------------------------------------------------------------
# Tokenizers: characters (nanoGPT's shakespeare_char) or byte-level BPE (bpe.py). Both give train.py
# vocab_size, encode_ordinary(text) -> ids, decode(ids) -> str and decode_bytes(ids) -> bytes, and a text
# form (`to_text`) that the data cache hashes and every checkpoint embeds.

class CharTokenizer:
    """One id per character of the corpus, in code point order: "hello" -> vocab "ehlo", ids [1, 0, 2, 2, 3]."""

    special_tokens = {}

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)   # sorted

    def encode_ordinary(self, text):
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self.codepoints, cp)                   # binary search per character
        bad = (ids >= self.vocab_size) | (self.codepoints[np.minimum(ids, self.vocab_size - 1)] != cp)
        if bad.any():
            missing = sorted(set(chr(c) for c in cp[bad]))[:10]
            raise UserError(f"characters not in the char vocabulary: {''.join(missing)!r}")
        return ids

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def to_text(self):
        return json.dumps({"type": "char", "version": 1, "chars": self.chars}, ensure_ascii=False) + "\n"

    @classmethod
    def from_text(cls, text):
        return cls(json.loads(text)["chars"])


def import_bpe():
    try:
        import bpe
    except ImportError as e:
        raise UserError(f"the BPE tokenizer needs bpe.py next to train.py ({e}); or use --tokenizer char") from None
    return bpe


def tokenizer_from_text(kind, text):
    """Rebuild a tokenizer from its text form (as the data cache and the checkpoints keep it)."""
    try:
        if kind == "char":
            return CharTokenizer.from_text(text)
        if kind == "bpe":
            bpe = import_bpe()
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "tokenizer.bpe"
                p.write_text(text, encoding="utf-8")
                return bpe.Tokenizer.load(str(p))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"unreadable {kind} tokenizer ({e})") from None
    raise UserError(f"unknown tokenizer kind {kind!r}")


def tokenizer_text(tok):
    """The text form of a tokenizer: its saved file's content."""
    if isinstance(tok, CharTokenizer):
        return tok.to_text()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "tokenizer.bpe"
        tok.save(str(p))
        return p.read_text(encoding="utf-8")


def tokenizer_kind(tok):
    return "char" if isinstance(tok, CharTokenizer) else "bpe"


def encode_text(tok, text):
    """Plain text -> ids (special-token strings in the text are treated as ordinary text)."""
    return np.asarray(tok.encode_ordinary(text), dtype=np.int64)


def piece_options(tok):
    """How read_pieces feeds a tokenizer: BPE gets exact bytes (invalid UTF-8 kept as surrogates, which
    bpe.py turns back into the same bytes) and pieces cut only where its chunking is unchanged, so the ids
    equal those of the whole file; characters may be cut anywhere (invalid UTF-8 becomes U+FFFD)."""
    if isinstance(tok, CharTokenizer):
        return {"cut": None, "errors": "replace"}
    return {"cut": import_bpe().safe_cut, "errors": "surrogateescape"}


def eot_id(tok):
    return tok.special_tokens.get(EOT) if tok.special_tokens else None


def spread_sample(root, files, total_bytes, limit):
    """An evenly spread, deterministic sample of about `limit` bytes: the first share of every file, cut at a
    line break, each file's share proportional to its size. Example: limit = 10% of the corpus -> the first
    10% of the lines of every file."""
    frac = min(1.0, limit / max(1, total_bytes))
    texts = []
    for p in files:
        want = int(p.stat().st_size * frac)
        if want == 0:
            continue
        with open(p, "rb") as f:
            b = f.read(want)
            if not b.endswith(b"\n"):
                b += f.readline(4096)
        text = b.decode("utf-8", "surrogateescape")
        if any(c.isspace() for c in text):     # subtle: bpe.py takes a str without whitespace for a file path
            texts.append(text)
    return texts


def get_tokenizer(cfg, name, root, files, sources, log=print):
    """The tokenizer --tokenizer asks for: a character vocabulary of the corpus (cached), a BPE trained on
    the corpus by bpe.py (cached in data/<name>/bpe<V>.tok, retrained when the corpus or settings change),
    or a saved tokenizer file."""
    cache = Path(cfg.data_dir) / name
    if cfg.tokenizer == "char":
        path = cache / "char.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("sources_sha256") == sources["sha256"]:
                return CharTokenizer(saved["chars"])
        chars = set()
        for p in files:                                        # one pass to collect the character set
            for text, _ in read_pieces(p):
                chars.update(text)
        if not chars:
            raise UserError(f"empty corpus: {cfg.data} holds no text")
        tok = CharTokenizer(chars)
        write_text_atomic(path, json.dumps({"sources_sha256": sources["sha256"], "chars": tok.chars},
                                           ensure_ascii=False))
        return tok
    if cfg.tokenizer == "bpe":
        bpe = import_bpe()
        path, info_path = cache / f"bpe{cfg.vocab_size}.tok", cache / f"bpe{cfg.vocab_size}.json"
        sample_bytes = int(cfg.bpe_sample_mb * 1e6)
        ident = {"sources_sha256": sources["sha256"], "vocab_size": cfg.vocab_size, "pattern": "gpt4",
                 "special_tokens": [EOT], "sample_bytes": sample_bytes}
        if path.is_file() and info_path.is_file():
            try:
                info = json.loads(info_path.read_text())
            except ValueError:
                info = {}
            if info.get("ident") == ident and info.get("sha256") == file_sha256(path):
                return bpe.Tokenizer.load(str(path))
        if sources["bytes"] == 0:
            raise UserError(f"empty corpus: {cfg.data} holds no text")
        if sample_bytes and sample_bytes < sources["bytes"]:
            texts = spread_sample(root, files, sources["bytes"], sample_bytes)
            what = f"an evenly spread {sum(len(t) for t in texts) / 1e6:.1f} MB sample of the corpus"
        else:
            texts = list(files)                        # Path objects: bpe.py streams the files itself
            what = "the whole corpus"
        log(f"training a BPE tokenizer (vocab {cfg.vocab_size}) on {what} ...")
        t0 = time.time()
        try:
            tok = train_bpe(bpe, texts, cfg.vocab_size)
        except ValueError as e:                        # bpe.py's errors are one-line messages
            raise UserError(f"BPE training failed: {e}") from None
        log(f"BPE tokenizer trained in {time.time() - t0:.1f} s; cached in {path}")
        write_text_atomic(path, tokenizer_text(tok))
        write_text_atomic(info_path, json.dumps({"ident": ident, "sha256": file_sha256(path)}))
        return tok
    return load_tokenizer_file(cfg.tokenizer)


def load_tokenizer_file(name):
    """A saved tokenizer: bpe.py's file, or a character vocabulary (CharTokenizer.to_text's JSON, as a
    fine-tuning run writes it to its out dir)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"--tokenizer {name!r}: expected 'char', 'bpe' or a saved tokenizer file")
    try:
        with open(path, "rb") as f:
            is_char = f.read(1) == b"{"                 # JSON; bpe.py's files start with their format line
        if is_char:
            return CharTokenizer.from_text(path.read_text(encoding="utf-8"))
        return import_bpe().Tokenizer.load(str(path))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load the tokenizer {path}: {e}") from None


def train_bpe(bpe, texts, vocab_size):
    """bpe.py's trainer (GPT-4's split pattern); the document separator <|endoftext|> takes the last id."""
    return bpe.Tokenizer.train(texts, vocab_size, pattern="gpt4", special_tokens=[EOT], progress=sys.stderr.isatty())


def tokenizer_tag(cfg):
    """A short name for the tokenizer setting, used in cache folder and run names."""
    if cfg.tokenizer == "char":
        return "char"
    if cfg.tokenizer == "bpe":
        return f"bpe{cfg.vocab_size}"
    p = Path(cfg.tokenizer).expanduser()
    return "tok-" + (file_sha256(p)[:8] if p.is_file() else safe_name(p.stem))


# ----------------------------------------------------------------------------------------------------
# Data preparation: token ids written once to data/<name>/<tokenizer>/{train,val}.bin (uint16, or uint32
# for vocabularies over 65536), plus meta.json. meta.json is written last and removed first, so a cache
# whose preparation was killed is never trusted.

DATA_FORMAT = 1


def prepare_data(cfg, name, root, files, sources, tok, log=print):
    """Tokenize the corpus into the cache (or reuse it) and return {"train": memmap, "val": memmap, "meta": ...}.

    Memory stays bounded: files are read in ~1 MB pieces, ids are appended to a file as they come, the
    split copies the tail in chunks, and the sources are hashed while they stream.
    """
    tok_text = tokenizer_text(tok)
    tok_sha = hashlib.sha256(tok_text.encode()).hexdigest()
    key = {"format": DATA_FORMAT, "sources_sha256": sources["sha256"], "tokenizer_sha256": tok_sha,
           "val_fraction": cfg.val_fraction}
    cache = Path(cfg.data_dir) / name / tokenizer_tag(cfg)
    meta_path = cache / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("key") == key and cache_files_ok(cache, meta):
            log(f"data: reusing {cache} ({meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens)")
            return open_data(cache, meta)
    if sources["bytes"] == 0:
        raise UserError(f"empty corpus: {cfg.data} holds no text")

    # (re)build: distrust the old cache first, then write every file under a temporary name
    cache.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    for stale in cache.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    eot = eot_id(tok)
    all_tmp, val_tmp = cache / f".train.bin.tmp-{os.getpid()}", cache / f".val.bin.tmp-{os.getpid()}"
    n = 0
    t0 = time.time()
    from tqdm import tqdm
    try:
        with open(all_tmp, "wb") as out, tqdm(total=sources["bytes"], unit="B", unit_scale=True,
                                              desc=f"tokenizing {name}", dynamic_ncols=True, disable=None) as bar:
            for p, entry in zip(files, sources["files"]):
                h = hashlib.sha256()
                for text, nbytes in read_pieces(p, hasher=h, **piece_options(tok)):
                    ids = np.asarray(tok.encode_ordinary(text), dtype=dtype)
                    out.write(ids.tobytes())
                    n += ids.size
                    bar.update(nbytes)
                if eot is not None:                                  # documents are separated by <|endoftext|>
                    out.write(np.array([eot], dtype).tobytes())
                    n += 1
                if h.hexdigest() != entry["sha256"]:
                    raise UserError(f"{p} changed while the data was being prepared; run again")
        # split: the first (1 - val_fraction) of the tokens train, the rest val (copied in chunks)
        n_train = int(n * (1.0 - cfg.val_fraction))
        size = np.dtype(dtype).itemsize
        with open(all_tmp, "r+b") as f, open(val_tmp, "wb") as v:
            f.seek(n_train * size)
            for b in iter(lambda: f.read(1 << 24), b""):
                v.write(b)
            f.truncate(n_train * size)
            f.flush()
            os.fsync(f.fileno())
            v.flush()
            os.fsync(v.fileno())
        os.replace(all_tmp, cache / "train.bin")
        os.replace(val_tmp, cache / "val.bin")
        fsync_dir(cache)
    except BaseException:
        all_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
        raise

    # bytes per token, per split: the UTF-8 length of every token, summed (special tokens count 0 bytes)
    nbytes_of = token_byte_lengths(tok)
    meta = {"key": key, "name": name, "data": cfg.data, "root": str(root), "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size, "tokenizer": {"kind": tokenizer_kind(tok), "sha256": tok_sha},
            "sources_sha256": sources["sha256"], "num_files": len(files), "source_bytes": sources["bytes"],
            "train_tokens": n_train, "val_tokens": n - n_train, "prep_seconds": round(time.time() - t0, 2),
            "sources": [{k: e[k] for k in ("path", "bytes", "sha256")} for e in sources["files"]]}
    data = open_data(cache, meta)
    for split in ("train", "val"):
        b = sum(int(nbytes_of[data[split][i:i + (1 << 22)]].sum()) for i in range(0, len(data[split]), 1 << 22))
        meta[f"{split}_bytes"] = b
        meta[f"{split}_bytes_per_token"] = b / max(1, len(data[split]))
    write_text_atomic(meta_path, json.dumps(meta, indent=1))
    log(f"data: {len(files)} files, {sources['bytes'] / 1e6:.1f} MB -> {n:,} tokens "
        f"({meta['train_bytes_per_token']:.2f} bytes/token) in {time.time() - t0:.1f} s; cached in {cache}")
    data["meta"] = meta
    return data


def token_byte_lengths(tok):
    """UTF-8 byte length of every token id, special tokens 0."""
    lengths = np.array([len(tok.decode_bytes([i])) for i in range(tok.vocab_size)], dtype=np.int64)
    for i in (tok.special_tokens or {}).values():
        lengths[i] = 0
    return lengths


def cache_files_ok(cache, meta):
    size = np.dtype(meta["dtype"]).itemsize
    return all((cache / f"{s}.bin").is_file() and (cache / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * size
               for s in ("train", "val"))


def open_data(cache, meta):
    """The cached splits as read-only memmaps (the OS pages them in; nothing is loaded up front)."""
    out = {"meta": meta}
    for s in ("train", "val"):
        n = meta[f"{s}_tokens"]
        out[s] = (np.memmap(cache / f"{s}.bin", dtype=meta["dtype"], mode="r", shape=(n,)) if n
                  else np.zeros(0, dtype=meta["dtype"]))
    return out


# ----------------------------------------------------------------------------------------------------
# Training helpers

def get_batch(data, batch_size, block_size, rng):
    """batch_size random windows of block_size + 1 tokens: inputs x and targets y = x shifted by one.

    Example: data = [5, 6, 7, 8], block_size 2, a window at 1 -> x = [[6, 7]], y = [[7, 8]].
    """
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    b = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)   # (B, T+1)
    return b[:, :-1], b[:, 1:]                                                  # (B, T), (B, T)


def estimate_loss(gm, params, data, cfg, mcfg):
    """Mean loss over eval_iters batches of each split, without dropout. The batches come from a fixed
    seed, so every evaluation of a run sees the same windows and the curve is not sampling noise."""
    out = {}
    for k, split in enumerate(("train", "val")):
        rng = np.random.default_rng([cfg.seed, 1, k])
        losses = [gm.loss_fn(params, *get_batch(data[split], cfg.batch_size, cfg.block_size, rng), mcfg)
                  for _ in range(cfg.eval_iters)]
        out[split] = float(np.mean(losses))
    return out


def get_lr(step, cfg):
    """Linear warmup to lr over warmup_iters, cosine decay to min_lr at lr_decay_iters (then flat)."""
    decay = cfg.lr_decay_iters or cfg.max_iters
    return gpt_numpy.lr_schedule(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay)


def step_seed(seed, step, micro):
    """The dropout seed of one micro-step, a function of (run seed, step, micro-step) only, so a resumed
    run draws exactly the masks the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def encode_prompt(tok, prompt):
    """Prompt text -> ids; an empty prompt starts from <|endoftext|> (BPE) or a newline (or id 0 when a
    char vocabulary has no newline). The default prompt "\n" falls back the same way; any other prompt
    that the tokenizer cannot encode is an error (UserError)."""
    if prompt:
        try:
            ids = encode_text(tok, prompt)
        except UserError:
            if prompt != "\n":
                raise
            ids = []
        if len(ids):
            return [int(i) for i in ids]
    eot = eot_id(tok)
    if eot is not None:
        return [eot]
    try:
        return [int(i) for i in encode_text(tok, "\n")]
    except UserError:
        return [0]


def sample_text(gm, params, mcfg, tok, prompt, n, seed, temperature=0.8, top_k=200):
    """The prompt and n sampled tokens, as text (KV-cache generation)."""
    ids = encode_prompt(tok, prompt)
    new = list(gm.generate_stream(params, ids, mcfg, n, temperature=temperature, top_k=top_k, seed=seed))
    return tok.decode_bytes(ids + new).decode("utf-8", "replace")


def model_config(cfg, vocab_size, base=None):
    """The run's GPTConfig: from the flags, or (base: a checkpoint's model_config, when resuming or
    fine-tuning) the checkpoint's model, whose norm eps, RoPE theta, tied head and max_seq_len no flag sets,
    with this run's dropout and gradient checkpointing."""
    try:
        if base is not None:
            known = {f.name for f in fields(gpt_numpy.GPTConfig)}
            return gpt_numpy.GPTConfig(**{**{k: v for k, v in base.items() if k in known},
                                          "dropout": cfg.dropout, "checkpoint": cfg.checkpoint_activations})
        return gpt_numpy.GPTConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                   d_model=cfg.d_model, d_ff=cfg.d_ff, max_seq_len=cfg.block_size,
                                   norm=cfg.norm, dropout=cfg.dropout, checkpoint=cfg.checkpoint_activations)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config: {e}") from None


def load_params(gm, p_host, mcfg):
    """A checkpoint's weights -> gm's arrays, checked against mcfg's shapes."""
    shapes = gm.param_shapes(mcfg)
    for k, shape in shapes.items():
        if k not in p_host or tuple(p_host[k].shape) != tuple(shape):
            raise UserError(f"the checkpoint does not fit this model (parameter {k}: "
                            f"{p_host[k].shape if k in p_host else 'missing'} vs {shape})")
    # subtle: keep gpt_numpy's key order; clip_grad_norm sums the squares in dict order, so another
    # order would change the norm in its last bits and a resumed run would drift from the original.
    return {k: gm.to_device(p_host[k]) for k in shapes}


def kill_hook(kind, step):
    """For the tests, through the environment: TRAIN_TEST_KILL="step:K" SIGKILLs this process when it
    reaches step K (after that step's checkpoint, if one is due); "save:K" SIGKILLs it inside the checkpoint
    write at step K, when the temporary file is complete but has not replaced the last good checkpoint;
    "sigint:K" sends it a SIGINT (Ctrl-C) at step K."""
    want = os.environ.get("TRAIN_TEST_KILL", "")
    if want == f"{kind}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "step" and want == f"sigint:{step}":
        os.kill(os.getpid(), signal.SIGINT)


# ----------------------------------------------------------------------------------------------------
# The training loop

def train(cfg, data, tok, gm, resume=None, log=print, init=None):
    """Train (or continue `resume` = load_checkpoint(...)'s tuple) and return a summary dict. `init`
    (load_checkpoint's tuple too) fine-tunes: its weights and model config, a fresh optimizer and step 0.

    Each step: grad_accum micro-batches from the seeded sampler -> averaged gradients -> finite check ->
    clip -> AdamW at get_lr(step). Every eval_interval steps: train/val loss, val bits per byte, a sample.
    Every ckpt_interval steps, at the end and on Ctrl-C: an atomic checkpoint.
    """
    from tqdm import tqdm
    meta_d = data["meta"]
    source = resume or init                                            # the checkpoint the model comes from
    mcfg = model_config(cfg, tok.vocab_size, source[3]["model_config"] if source else None)
    for split in ("train", "val"):
        if len(data[split]) < cfg.block_size + 1:
            raise UserError(f"corpus too short: the {split} split has {len(data[split])} tokens, and one "
                            f"sequence needs block_size + 1 = {cfg.block_size + 1}; use more text or a "
                            f"smaller --block-size")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "ckpt.safetensors"
    log_path = out_dir / "log.jsonl"
    for stale in out_dir.glob(".ckpt.safetensors.tmp-*"):             # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    tok_text = tokenizer_text(tok)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    val_bpt = meta_d["val_bytes_per_token"]

    # state: weights, AdamW moments, the batch sampler (a seeded generator whose state is checkpointed)
    rng = np.random.default_rng(cfg.seed)
    if resume is None:
        if init is None:
            params = gm.init_params(mcfg, seed=cfg.seed)
        else:                                           # fine-tuning: the weights only; all else starts afresh
            params = load_params(gm, init[0], mcfg)
            log(f"initialized from {init[3].get('_path', 'a checkpoint')} (its step {init[3].get('step', '?')}): "
                f"its weights, architecture and tokenizer; a fresh optimizer from step 0")
        opt = gm.adamw_init(params)
        scaler = gm.loss_scaler_init()
        step, elapsed, tokens_seen, best_val = 0, 0.0, 0, None
        log_path.write_text("")                                       # a fresh run starts a fresh log
    else:
        p_host, m_host, v_host, meta = resume
        if not m_host or "rng" not in meta:
            raise UserError("cannot resume: the checkpoint holds weights only (no optimizer or sampler state)")
        params = load_params(gm, p_host, mcfg)
        opt = {"t": int(meta["adam_t"]), "m": {k: gm.to_device(m_host[k]) for k in params},
               "v": {k: gm.to_device(v_host[k]) for k in params}}
        rng.bit_generator.state = meta["rng"]["batch"]
        scaler = dict(meta.get("loss_scaler") or gm.loss_scaler_init())
        step = int(meta["step"])
        p = meta["progress"]
        elapsed, tokens_seen, best_val = p["elapsed_s"], p["tokens_seen"], p["best_val_loss"]
        log(f"resumed from {meta.get('_path', 'a checkpoint')} at step {step}")
        # drop what the interrupted run logged after its checkpoint: those steps are about to be redone
        kept = [line for line in (log_path.read_text().splitlines() if log_path.is_file() else [])
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(log_path, "".join(line + "\n" for line in kept))
        append_jsonl(log_path, {"event": "resume", "step": step})
    start_step = step
    n_params = gm.num_params(params)
    log(f"model: {n_params:,} parameters ({mcfg.n_layer} layers, d_model {mcfg.d_model}, {mcfg.n_head} heads, "
        f"d_ff {mcfg.d_ff}, vocab {mcfg.vocab_size}, context {mcfg.max_seq_len}); backend {cfg.backend}"
        + ("; mixed precision: float16 compute, float32 weights, loss scale "
           f"{scaler['scale']:g}" if cfg.mixed_precision else ""))
    if cfg.mixed_precision and cfg.backend == "numpy":
        log("note: --mixed-precision on the CPU is slow (NumPy has no float16 matrix multiply); it is meant "
            "for --backend cupy")
    log(f"training: {cfg.max_iters} steps of {tokens_per_step:,} tokens (batch {cfg.batch_size} x "
        f"grad_accum {cfg.grad_accum} x {cfg.block_size}); out dir {out_dir}")

    def checkpoint_meta():
        return {"step": step, "adam_t": opt["t"], "model_config": mcfg.to_dict(), "train_config": asdict(cfg),
                "rng": {"batch": rng.bit_generator.state}, "loss_scaler": scaler,
                "sampler": {"kind": "uniform random windows", "train_tokens": len(data["train"]),
                            "batch_size": cfg.batch_size, "block_size": cfg.block_size},
                "tokenizer": {"kind": tokenizer_kind(tok), "sha256": hashlib.sha256(tok_text.encode()).hexdigest(),
                              "text": tok_text},
                "data": {"name": meta_d["name"], "key": meta_d["key"], "train_tokens": meta_d["train_tokens"],
                         "val_tokens": meta_d["val_tokens"], "val_bytes_per_token": val_bpt},
                "progress": {"elapsed_s": elapsed_now(), "tokens_seen": tokens_seen, "best_val_loss": best_val,
                             "last_eval": last_eval}}

    ours = {"ckpt": resume is not None}     # does ckpt_path hold this run's state (not an older run's)?

    def save():
        hook = (lambda tmp: kill_hook("save", step)) if os.environ.get("TRAIN_TEST_KILL") else None
        save_checkpoint(ckpt_path, {k: gm.to_host(v) for k, v in params.items()},
                        {k: gm.to_host(v) for k, v in opt["m"].items()},
                        {k: gm.to_host(v) for k, v in opt["v"].items()}, checkpoint_meta(), before_replace=hook)
        ours["ckpt"] = True

    # Ctrl-C: finish the step, save, exit. A second Ctrl-C stops at once.
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to quit without saving)")

    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, on_sigint)

    t_start = time.time()
    elapsed_now = lambda: round(elapsed + time.time() - t_start, 3)
    last_eval = resume[3]["progress"].get("last_eval") if resume else None
    bar = tqdm(total=cfg.max_iters, initial=step, unit="step", dynamic_ncols=True, disable=None,
               desc="training")
    write = tqdm.write if not bar.disable else log
    t_steps, step_log, loss_log = 0.0, step, []                          # since the last log line
    result = {"status": "done"}
    try:
        while True:
            # evaluate: train and val loss, val bits per byte, a short sample
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                if not (resume is not None and step == start_step):     # done before the checkpoint was saved
                    t0 = time.time()
                    losses = estimate_loss(gm, params, data, cfg, mcfg)
                    bpb = losses["val"] / val_bpt / math.log(2)
                    best_val = losses["val"] if best_val is None else min(best_val, losses["val"])
                    last_eval = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "val_bpb": bpb}
                    write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                          f"val {bpb:.3f} bits/byte ({time.time() - t0:.1f} s)")
                    append_jsonl(log_path, {"event": "eval", **last_eval, "lr": get_lr(step, cfg),
                                            "time_s": elapsed_now(), "tokens_seen": tokens_seen})
                    if cfg.sample_tokens and step < cfg.max_iters:
                        text = sample_text(gm, params, mcfg, tok, cfg.sample_prompt, cfg.sample_tokens,
                                           seed=cfg.seed + step)
                        write("--- sample ---\n" + text.strip("\n") + "\n--------------")
            # checkpoint
            saved = False
            if step != start_step and (step == cfg.max_iters or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0)):
                save()
                saved = True
            kill_hook("step", step)
            if stop["requested"]:                                     # Ctrl-C: save (once) and leave
                if step == start_step:
                    write(f"interrupted at step {step}, before any step: nothing new to save")
                else:
                    if not saved:
                        save()
                    write(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; continue with "
                          f"--resume {out_dir}")
                result["status"] = "interrupted"
                break
            if step >= cfg.max_iters:
                break

            # one optimizer step: grad_accum micro-batches, gradients averaged
            t0 = time.time()
            lr = get_lr(step, cfg)
            grads, loss, overflow = None, 0.0, False
            for micro in range(cfg.grad_accum):
                x, y = get_batch(data["train"], cfg.batch_size, cfg.block_size, rng)
                if overflow:
                    continue                    # the step is skipped: draw its batches (the sampler stays in step), no work
                seed = step_seed(cfg.seed, step, micro)
                if cfg.mixed_precision:                                 # grads None: float16 overflowed
                    l, g = gm.loss_and_grads_mixed(params, x, y, mcfg, scaler["scale"], seed=seed)
                    overflow = g is None
                else:
                    l, g = gm.loss_and_grads(params, x, y, mcfg, seed=seed)
                loss += l / cfg.grad_accum
                if overflow:
                    continue
                if grads is None:
                    grads = g
                else:
                    for k in grads:
                        grads[k] += g[k]
            norm = math.nan
            if not overflow:
                if cfg.grad_accum > 1:
                    for g in grads.values():
                        g *= 1.0 / cfg.grad_accum
                norm = gm.clip_grad_norm(grads, cfg.grad_clip)
            if cfg.mixed_precision:
                gm.loss_scaler_update(scaler, not overflow)
            if overflow and math.isfinite(loss):
                # the loss scale was too large for float16: the step is skipped and the scale halved
                append_jsonl(log_path, {"event": "overflow", "step": step, "scale": scaler["scale"]})
                if scaler["scale"] < 2.0 ** -24:
                    raise UserError(f"mixed precision: gradients overflow float16 at every loss scale (now "
                                    f"{scaler['scale']:.1e}) at step {step}; train without --mixed-precision")
            elif not (math.isfinite(loss) and math.isfinite(norm)):
                what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} " \
                       f"(loss {loss}, grad norm {norm}) at step {step}"
                if not cfg.skip_nonfinite:
                    kept = (f"the last good checkpoint {ckpt_path} (step {read_meta(ckpt_path)['step']}) is kept"
                            if ours["ckpt"] and read_meta(ckpt_path) else "no checkpoint of this run was written")
                    raise UserError(f"{what}: stopping; {kept}. Lower --lr, or pass --skip-nonfinite")
                write(f"warning: {what}: step skipped (--skip-nonfinite)")
                append_jsonl(log_path, {"event": "skip", "step": step, "loss": loss, "grad_norm": norm})
            else:
                gm.adamw_step(params, grads, opt, lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
            del grads
            step += 1
            tokens_seen += tokens_per_step
            dt = time.time() - t0
            t_steps += dt                                               # step time only, not evals or saves
            if math.isfinite(loss) and not overflow:                    # a skipped step's loss is partial
                loss_log.append(loss)
            bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_step / dt:,.0f} tok/s", refresh=False)
            bar.update(1)

            # log line
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                dt_avg = t_steps / max(1, step - step_log)
                rec = {"event": "train", "step": step, "loss": float(np.mean(loss_log)) if loss_log else math.nan,
                       "lr": lr, "grad_norm": norm, "ms_per_step": 1000 * dt_avg,
                       "tokens_per_s": tokens_per_step / dt_avg, "time_s": elapsed_now()}
                write(f"step {step}/{cfg.max_iters}: loss {rec['loss']:.4f}, lr {lr:.2e}, "
                      f"{rec['ms_per_step']:.0f} ms/step, {rec['tokens_per_s']:,.0f} tok/s, "
                      f"{rec['time_s']:.0f} s")
                append_jsonl(log_path, rec)
                t_steps, step_log, loss_log = 0.0, step, []
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    result.update(step=step, time_s=elapsed_now(), tokens_seen=tokens_seen, best_val_loss=best_val,
                  last_eval=last_eval, ckpt=str(ckpt_path),
                  params={k: gm.to_host(v) for k, v in params.items()})
    if result["status"] == "done" and cfg.sample_tokens:
        text = sample_text(gm, params, mcfg, tok, cfg.sample_prompt, 4 * cfg.sample_tokens, seed=cfg.seed)
        result["sample"] = text
        log("--- sample ---\n" + text.strip("\n") + "\n--------------")
    if last_eval:
        log(f"done: step {step}, val loss {last_eval['val_loss']:.4f}, {last_eval['val_bpb']:.3f} bits/byte, "
            f"{elapsed_now():.0f} s of training; checkpoint {ckpt_path}")
    return result


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------
# Command line

FLAG_HELP = {
    "data": "corpus: 'stdlib' (Python's own .py sources), 'shakespeare' (downloaded once), a text file, "
            "a folder of text files, or a glob such as 'src/**/*.py'",
    "name": "cache name under --data-dir (default: from --data)",
    "tokenizer": "'bpe' (train bpe.py on the corpus, cached), 'char' (one id per character, as nanoGPT's "
                 "shakespeare_char), or the path of a saved tokenizer (a bpe.py file, or the tokenizer file "
                 "in a fine-tuning run's out dir)",
    "vocab_size": "BPE vocabulary size (256 bytes + merges + 1 special token)",
    "bpe_sample_mb": "train the BPE on an evenly spread sample of this many MB of the corpus (0: all of it)",
    "val_fraction": "fraction of the tokens (the last ones) held out for validation",
    "n_layer": "transformer blocks", "n_head": "attention heads", "d_model": "model width",
    "d_ff": "SwiGLU hidden width (~8/3 d_model)", "block_size": "context length in tokens",
    "norm": "rmsnorm or layernorm", "dropout": "dropout rate in training",
    "checkpoint_activations": "gradient checkpointing: recompute activations in the backward pass (less memory)",
    "mixed_precision": "float16 forward and backward on a copy of the float32 weights, with dynamic loss "
                       "scaling (overflowing steps are skipped); for --backend cupy: NumPy has no float16 BLAS",
    "batch_size": "sequences per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "max_iters": "optimizer steps", "lr": "peak learning rate", "min_lr": "final learning rate",
    "warmup_iters": "linear warmup steps", "lr_decay_iters": "steps of the cosine decay (0: max_iters)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "eps": "AdamW epsilon",
    "weight_decay": "AdamW weight decay (matrices only)", "grad_clip": "global gradient-norm clip (0: off)",
    "eval_interval": "evaluate every N steps", "eval_iters": "batches per split in an evaluation",
    "log_interval": "print a log line every N steps",
    "ckpt_interval": "checkpoint every N steps (0: only at the end and on Ctrl-C)",
    "sample_tokens": "tokens sampled at each evaluation; the final sample is 4x (0: none)",
    "sample_prompt": "prompt of the samples", "seed": "seed of the weights, batches and dropout masks",
    "backend": "numpy (CPU) or cupy (NVIDIA GPU)", "out_dir": "checkpoint and log folder (default: out/<name>-<tokenizer>)",
    "data_dir": "root folder of the data caches",
    "skip_nonfinite": "skip a step with a nan/inf loss or gradient instead of stopping",
    "init_from": "fine-tune: start a new run from this checkpoint (a ckpt.safetensors or its folder, e.g. "
                 "from an earlier run or export.py --import-hf): its weights, model and tokenizer; the "
                 "optimizer, step and sampler start afresh, the training settings come from the flags and "
                 "--preset (--block-size at most the model's context; model flags must match it)",
}
CHOICES = {"backend": ["numpy", "cupy"], "norm": ["rmsnorm", "layernorm"]}
METAVARS = {"init_from": "CKPT"}


def build_parser():
    presets = "\n".join(f"  {k:<18}{desc}\n" + textwrap.fill(" ".join(f"{n}={v}" for n, v in values.items()) or
                                                           "the defaults above", 100, initial_indent=" " * 20,
                                                           subsequent_indent=" " * 20)
                        for k, (desc, values) in PRESETS.items())
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the NumPy GPT of gpt_numpy.py on a text corpus (default: the Python standard "
                    "library's sources, with a BPE tokenizer).",
        epilog=f"presets (--preset NAME; explicit flags override the preset's values):\n{presets}\n\n"
               "examples:\n  python train.py\n"
               "  python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare.txt\n"
               "  python train.py --preset tiny --data notes.txt --out-dir out/tiny\n"
               "  python train.py --resume\n\n"
               "fine-tuning (--init-from: the weights, model and tokenizer of a checkpoint; a fresh optimizer):\n"
               "  python export.py --import-hf path/to/hf-llama --out out/imported --max-seq-len 256\n"
               "  python train.py --init-from out/imported --data notes.txt --lr 3e-4 --min-lr 3e-5 \\\n"
               "      --warmup-iters 20 --max-iters 200      # writes out/notes-from-imported\n"
               "  python train.py --resume out/notes-from-imported      # continue it after Ctrl-C\n"
               "  python sample.py --ckpt out/notes-from-imported --prompt \"Once\"")
    p.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                   help="start from a named configuration (listed below)")
    p.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, metavar="CKPT",
                   help="continue from --out-dir's ckpt.safetensors, or from the checkpoint file CKPT")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_ = FLAG_HELP[f.name] + (f" (default: {default!r})" if default != "" else "")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            metavar = None if f.name in CHOICES else METAVARS.get(f.name) or {int: "N", float: "X"}.get(
                typ, f.name.split("_")[-1].upper())
            p.add_argument(flag, type=typ, choices=CHOICES.get(f.name), default=argparse.SUPPRESS,
                           metavar=metavar, help=help_)
    return p


def parse_config(argv):
    """argv -> (cfg, explicit, flags, resume): the config (defaults <- preset <- flags), the names of the
    settings the user chose (through a preset or a flag), of those given as flags, and the --resume
    argument (or None)."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset", "default")
    resume = args.pop("resume", None)
    values = dict(PRESETS[preset][1])
    values.update(args)
    return TrainConfig(**{**asdict(TrainConfig()), **values}), set(values), set(args), resume


def check_config(cfg):
    for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "block_size", "batch_size", "grad_accum",
                 "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval", "sample_tokens"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if not (cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be > 0 and finite, and 0 <= --min-lr <= --lr; got lr {cfg.lr}, min-lr {cfg.min_lr}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not (cfg.eps > 0 and math.isfinite(cfg.eps)):
        raise UserError(f"--eps must be > 0, got {cfg.eps}")
    for name in ("weight_decay", "grad_clip", "bpe_sample_mb"):
        v = getattr(cfg, name)
        if not (v >= 0 and math.isfinite(v)):
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 and finite, got {v}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.seed < 0:
        raise UserError(f"--seed must be >= 0, got {cfg.seed}")
    if 0 < cfg.lr_decay_iters < cfg.warmup_iters:
        raise UserError(f"--lr-decay-iters ({cfg.lr_decay_iters}) must not end before --warmup-iters ({cfg.warmup_iters})")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        raise UserError(f"--vocab-size must be at least 257 for BPE (256 bytes + 1 special token), got {cfg.vocab_size}")
    if cfg.backend not in ("numpy", "cupy"):
        raise UserError(f"unknown backend {cfg.backend!r}: choose numpy or cupy")


def resume_config(cfg, explicit, flags, meta):
    """The checkpoint's config, with the flags that may change on resume applied; any other explicit flag
    that differs from the checkpoint is an error (it would silently make the run a different one)."""
    known = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{**asdict(TrainConfig()), **{k: v for k, v in meta["train_config"].items() if k in known}})
    if saved.init_from:         # a fine-tuning run took its model and tokenizer from a checkpoint, not a preset
        explicit = (explicit - {*FROM_CHECKPOINT, "tokenizer"}) | (explicit & flags)
    clash = [k for k in sorted(explicit - RESUME_MAY_CHANGE) if getattr(cfg, k) != getattr(saved, k)]
    if clash:
        k = clash[0]
        raise UserError(f"cannot resume with a different config: --{k.replace('_', '-')} is "
                        f"{getattr(cfg, k)!r} here but {getattr(saved, k)!r} in the checkpoint"
                        + (f" (and {len(clash) - 1} more)" if len(clash) > 1 else "")
                        + "; drop the flag or start a new run in another --out-dir")
    for k in explicit & RESUME_MAY_CHANGE:
        setattr(saved, k, getattr(cfg, k))
    return saved


def init_config(cfg, flags, meta, path):
    """A fine-tuning run's config and tokenizer: the checkpoint's model (FROM_CHECKPOINT) and tokenizer
    with this run's training settings. A flag that contradicts the checkpoint is an error; a preset's
    model settings simply give way."""
    try:
        mc = gpt_numpy.GPTConfig(**meta["model_config"])
        t = meta["tokenizer"]
        kind, text = t["kind"], t["text"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot fine-tune from {path}: it has no usable model config and tokenizer ({e}); "
                        f"expected a checkpoint of train.py or export.py --import-hf") from None
    tok = tokenizer_from_text(kind, text)
    for k in FROM_CHECKPOINT:
        if k in flags and getattr(cfg, k) != getattr(mc, k):
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)} conflicts with --init-from {path}, whose "
                            f"model has {k} {getattr(mc, k)}: a fine-tuned model keeps its architecture; drop the flag")
    if "tokenizer" in flags:
        same = (cfg.tokenizer == kind if cfg.tokenizer in ("char", "bpe")
                else tokenizer_text(load_tokenizer_file(cfg.tokenizer)) == tokenizer_text(tok))
        if not same:
            raise UserError(f"--tokenizer {cfg.tokenizer} conflicts with --init-from {path}, whose model comes "
                            f"with its own {kind} tokenizer; drop the flag")
    if cfg.block_size > mc.max_seq_len:
        raise UserError(f"--block-size {cfg.block_size}{'' if 'block_size' in flags else ' (the preset or default)'}"
                        f" exceeds the context of --init-from {path} (max_seq_len {mc.max_seq_len}); pass "
                        f"--block-size {mc.max_seq_len} or less")
    if tok.vocab_size > mc.vocab_size:
        raise UserError(f"cannot fine-tune from {path}: its tokenizer has {tok.vocab_size} ids, its model {mc.vocab_size}")
    return replace(cfg, **{k: getattr(mc, k) for k in FROM_CHECKPOINT}), tok


def run(argv=None, log=print):
    """Everything main() does, raising UserError / CheckpointError instead of exiting. Returns train()'s
    summary plus the data metadata."""
    cfg, explicit, flags, resume = parse_config(argv)
    check_config(cfg)
    gm = load_backend(cfg.backend)                      # fail early on a missing GPU
    ckpt = init = tok = None
    if resume is not None and cfg.init_from:
        raise UserError("--init-from starts a new run from a checkpoint's weights and --resume continues a run: "
                        "pass one of them (a fine-tuning run resumes with --resume alone)")
    if resume is not None:
        path = Path(cfg.out_dir or default_out_dir(cfg)) if resume == "latest" else Path(resume)
        if path.is_dir():
            path = path / "ckpt.safetensors"
        ckpt = load_checkpoint(path)
        if "train_config" not in ckpt[3]:
            raise UserError(f"cannot resume from {path}: it holds weights only, no training state")
        ckpt[3]["_path"] = str(path)
        cfg = resume_config(cfg, explicit, flags, ckpt[3])
        if "out_dir" not in explicit:
            cfg.out_dir = str(path.parent)
        check_config(cfg)
        gm = load_backend(cfg.backend)
    elif cfg.init_from:
        path = Path(cfg.init_from).expanduser()
        if path.is_dir():
            path = path / "ckpt.safetensors"
        try:
            init = load_checkpoint(path)
        except CheckpointError as e:                    # missing, truncated or corrupt
            raise CheckpointError(f"--init-from: {e}") from None
        init[3]["_path"] = str(path)
        cfg, tok = init_config(cfg, flags, init[3], path)
    if not cfg.lr_decay_iters:
        cfg.lr_decay_iters = cfg.max_iters              # fixed now, so a longer resumed run keeps the schedule
    if ckpt is None and init is None:
        model_config(cfg, max(cfg.vocab_size, 256))     # a bad model shape fails now, before data preparation
    cfg.name = name = cfg.name or data_name(cfg.data)
    cfg.out_dir = cfg.out_dir or default_out_dir(cfg)
    for flag, folder in (("--out-dir", cfg.out_dir), ("--data-dir", cfg.data_dir)):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag} {folder!r} cannot be used as a folder: {e.strerror or e}") from None
    root, files = find_sources(cfg.data, cfg.data_dir)
    sources = digest_sources(root, files, Path(cfg.data_dir) / name / "sources.json")
    if sources["bytes"] == 0:
        raise UserError(f"empty corpus: {cfg.data} holds no text")
    log(f"data: {cfg.data} -> {len(files)} file(s), {sources['bytes'] / 1e6:.2f} MB (name {name!r})")
    if ckpt is not None:                                # the checkpoint carries its tokenizer
        t = ckpt[3]["tokenizer"]
        tok = tokenizer_from_text(t["kind"], t["text"])
    elif init is not None:
        # fine-tuning: the init checkpoint's tokenizer, saved in the out dir as a --tokenizer file, which
        # keys the data cache (data/<name>/tok-<sha>) and names the tokenizer in the saved config
        cfg.tokenizer = str(Path(cfg.out_dir) / f"tokenizer.{tokenizer_kind(tok)}")
        write_text_atomic(cfg.tokenizer, tokenizer_text(tok))
    else:
        tok = get_tokenizer(cfg, name, root, files, sources, log)
    data = prepare_data(cfg, name, root, files, sources, tok, log)
    if ckpt is not None and data["meta"]["key"] != ckpt[3]["data"]["key"]:
        raise UserError("cannot resume: the corpus (or its tokenization) differs from the checkpoint's "
                        f"(sources sha256 {data['meta']['sources_sha256'][:12]} now); restore the data or "
                        "start a new run")
    if ckpt is None and (Path(cfg.out_dir) / "ckpt.safetensors").is_file():
        old = read_meta(Path(cfg.out_dir) / "ckpt.safetensors")
        log(f"note: starting afresh; {cfg.out_dir}/ckpt.safetensors (step {old['step'] if old else '?'}) will "
            f"be overwritten (use --resume to continue it instead)")
    if cfg.sample_tokens:
        encode_prompt(tok, cfg.sample_prompt)           # an unencodable --sample-prompt fails now, not mid-run
    result = train(cfg, data, tok, gm, resume=ckpt, log=log, init=init)
    result["data_meta"] = data["meta"]
    return result


def default_out_dir(cfg):
    """out/<data>-<tokenizer>, or for a fine-tuning run out/<data>-from-<the checkpoint's folder or name>."""
    name = cfg.name or data_name(cfg.data)
    if cfg.init_from:
        src = Path(cfg.init_from).expanduser().resolve()
        src = src.parent if src.name == "ckpt.safetensors" else src
        return str(Path("out") / f"{name}-from-{safe_name(src.name.removesuffix('.safetensors'))}")
    return str(Path("out") / f"{name}-{tokenizer_tag(cfg)}")


def main(argv=None):
    """Command-line entry: exit status 0 on success, 1 on a user error (one line, no traceback), 2 on bad flags."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)     # log lines show up at once, also in a file or a pipe
    try:
        run(argv)
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except OSError as e:                                # disk full, permissions, a path that is not a folder
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
