"""
lib/data.py: everything between a corpus on disk and the batches of a training step, shared by the programs.

    root, files = find_sources("shakespeare", "data")         # --data: stdlib, shakespeare, a file, folder, glob
    sources = digest_sources(root, files, "data/x/sources.json")   # sha256 of each file and of the corpus
    tok = get_tokenizer(cfg, "x", root, files, sources)        # char vocabulary or BPE, cached under data/x/
    d = prepare_data(cfg, "x", root, files, sources, tok)      # {"train": memmap, "val": memmap, "meta": {...}}
    x, y = get_batch(d["train"], batch_size, block_size, rng)  # (B, T) inputs, (B, T) targets

Sections, in data-flow order: the corpus (finding its files), its formats (documents read from plain text,
JSON Lines or Parquet), the tokenizer cache (a character vocabulary or a BPE trained by bpe.py, built from
the corpus once), the token cache (memory-mapped .bin files) and the batch sampler. Every file is read in
bounded pieces (read_documents: text files through bpe.read_text_blocks, JSONL line by line, Parquet by
batches of rows), so memory does not grow with the corpus. The tokenizers themselves are in
lib/tokenizer.py, the safe writes in lib/files.py.

Corpus formats, by file name: *.jsonl and *.jsonl.gz (one JSON object a line, its text in the field
--text-field, "text" by default), *.parquet (a string column of that name, as FineWeb ships; needs the
optional pyarrow), anything else that is text (no NUL byte in its first 8 KiB). A text file is one
document, a JSONL line or a Parquet row is one; documents are separated by <|endoftext|> where the
tokenizer has it, so a folder of text files and a JSONL file with one record per file give the same ids.
"""

import codecs
import glob
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

import bpe
from errors import FileFormatError, UserError
from lib.files import (OUTPUT_MARK, fetch_once, file_sha256, fsync_dir, naming_errors, remove_stale_temp_files,
                       text_sha256, write_text_atomic)
from lib.tokenizer import EOT, CharTokenizer, eot_id, load_tokenizer_file, token_byte_lengths, tokenizer_from_text

ROOT = Path(__file__).resolve().parents[1]              # the repository root
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------------------------------
# The corpus: --data -> a sorted list of files

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
    local = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"     # this project's shared copy
    example = os.path.relpath(local) if local.is_file() else "path/to/tinyshakespeare.txt"
    return fetch_once(SHAKESPEARE_URL, Path(data_dir) / "shakespeare" / "input.txt", "Tiny Shakespeare",
                      f"point --data at a local copy instead (any path), e.g. --data {example}")


def safe_name(s):
    """A string made safe as a folder name: "my notes/*.md" -> "my_notes_.md"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_.")[:48] or "data"


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


def is_output_folder(folder, skip=()):
    """A folder this project writes (marked by mark_output_folder, or one of `skip`: resolved paths)."""
    return (Path(folder) / OUTPUT_MARK).is_file() or Path(folder).resolve() in skip


def in_output_folder(path, root, skip, seen):
    """Does a file lie in an output folder at or below root? (seen: a cache of folder -> bool)"""
    for folder in Path(path).parents:
        if folder not in seen:
            seen[folder] = is_output_folder(folder, skip)
        if seen[folder]:
            return True
        if folder == root:
            return False
    return False


def find_sources(data, data_dir, skip=(), log=print):
    """--data -> (root, files): the folder the paths are named relative to, and the files in sorted order.
    A folder or glob leaves out hidden files and the project's own output folders: data_dir, the folders
    in `skip` (a run's out dir) and any folder marked by mark_output_folder; the files it finds that are in
    no corpus format (skip_reason) are left out too, each named in one log line (the first 10)."""
    if data == "stdlib":
        return stdlib_sources()
    if data == "shakespeare":
        path = fetch_shakespeare(data_dir)
        return path.parent, [path]
    path = Path(data).expanduser()
    if path.is_file():
        why = skip_reason(path)
        if why:
            raise UserError(f"--data {data!r} is not a text file, nor JSONL or Parquet: {why}")
        check_readers([path])
        return path.parent, [path]
    skip = {Path(p).expanduser().resolve() for p in (data_dir, *skip) if p}
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and not is_output_folder(Path(dirpath) / d, skip))
            found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
        root = path
        found = sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        files = keep_corpus_files(found, root, log)
        if not files:
            raise UserError(f"empty corpus: the folder {data} holds no text, JSONL or Parquet files")
    elif glob.has_magic(data):
        found = sorted(Path(p).resolve() for p in glob.glob(os.path.expanduser(data), recursive=True)
                       if os.path.isfile(p))
        matched, seen = len(found), {}
        if found:
            root = Path(os.path.commonpath([p.parent for p in found]))
            found = [p for p in found if not in_output_folder(p, root, skip, seen)]
        files = keep_corpus_files(found, Path(os.path.commonpath([p.parent for p in found])) if found else None, log)
        if not files:
            raise UserError(f"no files match --data {data!r}" + (" outside the output folders" if matched else "")
                            + (" in a corpus format (text, JSONL, Parquet)" if found else ""))
        root = Path(os.path.commonpath([p.parent for p in files]))
    else:
        raise UserError(f"--data {data!r}: no such file or folder (expected a text file, a .jsonl, .jsonl.gz or "
                        f".parquet file, a folder, a glob, 'stdlib' or 'shakespeare')")
    check_readers(files)
    return root, files


def keep_corpus_files(found, root, log, show=10):
    """The files of `found` in a corpus format; each other one is named in a log line with the reason
    (the first `show` of them, then how many more)."""
    files, skipped = [], []
    for p in found:
        why = skip_reason(p)
        if why:
            skipped.append((p, why))
        else:
            files.append(p)
    for p, why in skipped[:show]:
        log(f"data: skipped {Path(os.path.relpath(p, root)).as_posix()}: {why}")
    if len(skipped) > show:
        log(f"data: ... and {len(skipped) - show} more files skipped (not text, JSONL or Parquet)")
    return files


def digest_sources(root, files, cache_path, text_field="text"):
    """sha256 of every source and of the whole corpus (names and contents, and the --text-field read from
    its JSONL and Parquet files: another field is another corpus). A file whose size and mtime match
    data/<name>/sources.json is not read again; any other is hashed afresh.

    Returns {"sha256": corpus hash, "bytes": total size, "files": [{"path", "bytes", "mtime_ns", "sha256"}]}
    (plus "text_field" when some file is JSONL or Parquet).
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
    info = {"bytes": sum(e["bytes"] for e in entries), "files": entries}
    if any(corpus_format(p) != "text" for p in files):  # (a corpus of text files keeps the hash it had)
        h.update(f"text_field\0{text_field}\n".encode())
        info["text_field"] = text_field
    info["sha256"] = h.hexdigest()
    if not known or [known.get(e["path"]) for e in entries] != entries:
        write_text_atomic(cache_path, json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------------
# Corpus formats: every file as a stream of documents, in bounded pieces

MAX_RECORD_BYTES = 64 << 20             # a longer JSONL line is refused (a file with no line breaks?)
PARQUET_BATCH_ROWS = 1024               # rows read at a time from a Parquet file


def corpus_format(path):
    """How a file is read, by its name: "jsonl" (*.jsonl), "jsonl.gz", "parquet" or "text" (anything else)."""
    name = Path(path).name.lower()
    for fmt in ("jsonl.gz", "jsonl", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    return "text"


def skip_reason(path):
    """Why a file is not read as part of a corpus, or None if it is: JSONL and Parquet by their names,
    any other file if it is text (no NUL byte in its first 8 KiB)."""
    if corpus_format(path) != "text":
        return None
    if is_text_file(path):
        return None
    if Path(path).name.lower().endswith((".gz", ".zst", ".bz2", ".xz", ".zip")):
        return "compressed (only .jsonl.gz is read compressed; decompress it to read it as text)"
    return "not text (NUL bytes in its first 8 KiB: a binary file?)"


def pyarrow_parquet():
    """pyarrow.parquet, the optional dependency that reads Parquet; UserError naming it when missing."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading .parquet files needs pyarrow, an optional dependency: pip install pyarrow "
                        "(or convert the corpus to .jsonl)") from None
    return pyarrow.parquet


def check_readers(files):
    """Refuse, before any work, a corpus whose reader is missing (Parquet without pyarrow)."""
    if any(corpus_format(p) == "parquet" for p in files):
        pyarrow_parquet()


def read_documents(path, text_field="text", block_size=1 << 20, cut=bpe.safe_cut, errors="surrogateescape",
                   hasher=None):
    """Yield (text, nbytes, end) for the documents of a corpus file, each in pieces of about block_size
    characters cut where `cut` allows (a tokenizer's cut: encoded apart, the pieces give the ids of the
    whole), end=True after a document's last piece. nbytes: the file's bytes read since the previous
    piece (they sum to its size, for progress bars); hasher (a hashlib object) sees the file's bytes.

    - text: the file is one document, read by bpe.read_text_blocks (errors: how invalid UTF-8 decodes).
    - jsonl, jsonl.gz: one document per line, the string in field text_field; blank lines skipped.
    - parquet: one document per row of the string column text_field, read PARQUET_BATCH_ROWS at a time.
    A record without that field, or with a value that is not a string, is a FileFormatError naming it.
    """
    fmt = corpus_format(path)
    if fmt == "text":
        for text, nbytes in bpe.read_text_blocks(path, block_size, cut=cut, errors=errors, hasher=hasher):
            yield text, nbytes, False
        yield "", 0, True
        return
    docs = parquet_texts(path, text_field, hasher) if fmt == "parquet" else jsonl_texts(path, text_field, errors, hasher)
    for text, nbytes in docs:
        if text is None:                                # no document: the file's last bytes, for progress
            yield "", nbytes, False
            continue
        pieces = list(text_pieces(text, block_size, cut))
        for k, piece in enumerate(pieces):
            yield piece, nbytes if k == 0 else 0, k == len(pieces) - 1


def text_pieces(text, size, cut):
    """A long in-memory text in pieces of about `size` characters, each ending where cut(piece) allows
    (0: nowhere, then the rest goes whole), as bpe.read_text_blocks cuts a file."""
    start = 0
    while cut and len(text) - start > size:
        i = cut(text[start:start + size])
        if not i:
            break
        yield text[start:start + i]
        start += i
    yield text[start:]


class _CountingReader:
    """A binary file that counts (and hashes) the bytes read from it: gzip reads the compressed file
    through it, so progress and the file's hash follow the bytes on disk."""

    def __init__(self, f, hasher=None):
        self.f, self.hasher, self.count = f, hasher, 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.count += len(b)
        if self.hasher is not None:
            self.hasher.update(b)
        return b


def jsonl_texts(path, text_field, errors="surrogateescape", hasher=None):
    """(document, nbytes) of a .jsonl or .jsonl.gz file, line by line (see read_documents); a document None
    carries the bytes read after the last one."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    with f:
        raw = _CountingReader(f, hasher)
        lines = gzip.GzipFile(fileobj=raw, mode="rb") if corpus_format(path) == "jsonl.gz" else raw.f
        shown, n = 0, 0
        try:
            while line := lines.readline(MAX_RECORD_BYTES + 1):
                n += 1
                if lines is raw.f:                      # plain JSONL: count and hash the line itself
                    raw.count += len(line)
                    if hasher is not None:
                        hasher.update(line)
                if len(line) > MAX_RECORD_BYTES:
                    raise FileFormatError(f"{path}, line {n}: longer than {MAX_RECORD_BYTES >> 20} MB (not JSON "
                                          f"Lines? one record a line)")
                if line.strip():
                    yield record_text(line.decode("utf-8", errors), text_field, f"{path}, line {n}"), raw.count - shown
                    shown = raw.count
            while raw.read(1 << 20):                    # the gzip file's last bytes (for the hash and progress)
                pass
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise FileFormatError(f"{path}: not a readable gzip file ({e})") from None
        if raw.count > shown:
            yield None, raw.count - shown               # no document: the bytes read after the last one


def record_text(line, text_field, where):
    """The text of one JSONL record; FileFormatError naming `where` if it has none."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise FileFormatError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise FileFormatError(f"{where}: not usable JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise FileFormatError(f"{where}: expected a JSON object with a {text_field!r} field, got "
                              f"{type(record).__name__}")
    if text_field not in record:
        names = ", ".join(list(record)[:8]) or "none"
        raise FileFormatError(f"{where}: no {text_field!r} field (its fields: {names}); name the field that "
                              f"holds the text with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise FileFormatError(f"{where}: the {text_field!r} field is {type(text).__name__}, not a string")
    return text


def parquet_texts(path, text_field, hasher=None):
    """(document, nbytes) of a .parquet file, PARQUET_BATCH_ROWS rows at a time (see read_documents);
    nbytes shares the file's size among the rows."""
    pq = pyarrow_parquet()
    import pyarrow as pa
    try:
        f = pq.ParquetFile(path)
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except (pa.ArrowException, ValueError) as e:
        raise FileFormatError(f"{path}: not a readable Parquet file ({e})") from None
    with f:
        names = f.schema_arrow.names
        if text_field not in names:
            raise FileFormatError(f"{path}: no column {text_field!r} (its columns: {', '.join(names[:8])}); name "
                                  f"the column that holds the text with --text-field")
        kind = f.schema_arrow.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise FileFormatError(f"{path}: the column {text_field!r} holds {kind}, not strings")
        size, rows, done, shown = os.path.getsize(path), max(1, f.metadata.num_rows), 0, 0
        try:
            for batch in f.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    done += 1
                    if text is None:
                        raise FileFormatError(f"{path}, row {done}: the {text_field!r} column is null")
                    nbytes = size * done // rows - shown
                    shown += nbytes
                    yield text, nbytes
        except (pa.ArrowException, OSError) as e:
            raise FileFormatError(f"{path}: not a readable Parquet file ({e})") from None
    if hasher is not None:                  # Parquet is read by columns, not in order: hash it on its own
        with open(path, "rb") as g:
            for b in iter(lambda: g.read(1 << 20), b""):
                hasher.update(b)
    if size > shown:
        yield None, size - shown


def corpus_texts(files, text_field, block_chars=1 << 20):
    """The corpus as bpe.Tokenizer.train reads it: a text file as its Path (bpe.py streams it), the
    documents of a JSONL or Parquet file joined into texts of about block_chars, each document followed by
    <|endoftext|> (a special token of the training: it splits the text, so no merge spans two documents,
    as none spans two files; and a text ending in it is never taken for a file name)."""
    for p in files:
        if corpus_format(p) == "text":
            yield p
            continue
        parts, size = [], 0
        for text, _, end in read_documents(p, text_field, cut=None):
            parts.append(text + (EOT if end else ""))
            size += len(text)
            if size >= block_chars and end:
                yield "".join(parts)
                parts, size = [], 0
        if parts:
            yield "".join(parts)


# ----------------------------------------------------------------------------------------------------
# The tokenizer cache: --tokenizer char / bpe, built from the corpus once, under data/<name>/

def spread_sample(root, files, total_bytes, limit, text_field="text"):
    """An evenly spread, deterministic sample of about `limit` bytes: the first share of every file, cut at a
    line break (a JSONL or Parquet file: its first documents, each followed by <|endoftext|>), each file's
    share proportional to its size. Example: limit = 10% of the corpus -> the first 10% of the lines of
    every file."""
    frac = min(1.0, limit / max(1, total_bytes))
    texts = []
    for p in files:
        want = int(p.stat().st_size * frac)
        if want == 0:
            continue
        if corpus_format(p) != "text":
            texts.append(first_documents(p, text_field, want))
            continue
        with open(p, "rb") as f:
            b = f.read(want)
            if not b.endswith(b"\n"):
                b += f.readline(4096)
        text = b.decode("utf-8", "surrogateescape")
        if any(c.isspace() for c in text):     # subtle: bpe.py takes a str without whitespace for a file path
            texts.append(text)
    return texts


def first_documents(path, text_field, want):
    """The first documents of a JSONL or Parquet file, about `want` bytes of it, each followed by
    <|endoftext|> (spread_sample's share of the file)."""
    parts, read = [], 0
    for text, nbytes, end in read_documents(path, text_field, cut=None):
        parts.append(text + (EOT if end else ""))
        read += nbytes
        if read >= want and end:
            break
    return "".join(parts)


def get_tokenizer(cfg, name, root, files, sources, log=print):
    """The tokenizer cfg.tokenizer asks for: a character vocabulary of the corpus (cached), a BPE trained on
    the corpus by bpe.py (cached in data/<name>/bpe<V>.tok, retrained when the corpus or settings change),
    or a saved tokenizer file. cfg: train.TrainConfig (tokenizer, vocab_size, bpe_sample_mb, data, data_dir,
    text_field)."""
    if cfg.tokenizer == "char":
        return char_tokenizer(cfg, Path(cfg.data_dir) / name / "char.json", files, sources)
    if cfg.tokenizer == "bpe":
        return bpe_tokenizer(cfg, Path(cfg.data_dir) / name, root, files, sources, log)
    return load_tokenizer_file(cfg.tokenizer)


def char_tokenizer(cfg, path, files, sources):
    """The corpus's character set, cached in path (keyed by the corpus hash)."""
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("sources_sha256") == sources["sha256"]:
            return CharTokenizer(saved["chars"])
    chars = set()
    for p in files:                                        # one pass to collect the character set
        for text, _, _ in read_documents(p, text_field(cfg), 1 << 20, cut=CharTokenizer.cut, errors="replace"):
            chars.update(text)
    if not chars:
        raise UserError(f"empty corpus: {cfg.data} holds no text")
    tok = CharTokenizer(chars)
    write_text_atomic(path, json.dumps({"sources_sha256": sources["sha256"], "chars": tok.chars}, ensure_ascii=False))
    return tok


def bpe_tokenizer(cfg, cache, root, files, sources, log):
    """bpe.py's tokenizer trained on the corpus (or an evenly spread sample of it), cached in cache."""
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
        texts = spread_sample(root, files, sources["bytes"], sample_bytes, text_field(cfg))
        what = f"an evenly spread {sum(len(t) for t in texts) / 1e6:.1f} MB sample of the corpus"
    else:
        texts = corpus_texts(files, text_field(cfg))    # text files as Paths: bpe.py streams them itself
        what = "the whole corpus"
    log(f"training a BPE tokenizer (vocab {cfg.vocab_size}) on {what} ...")
    t0 = time.time()
    try:
        tok = bpe.Tokenizer.train(texts, cfg.vocab_size, pattern="gpt4", special_tokens=[EOT],
                                  progress=sys.stderr.isatty())   # <|endoftext|> takes the last id
    except ValueError as e:                        # bpe.py's errors are one-line messages
        raise UserError(f"BPE training failed: {e}") from None
    log(f"BPE tokenizer trained in {time.time() - t0:.1f} s; cached in {path}")
    write_text_atomic(path, tok.to_text())
    write_text_atomic(info_path, json.dumps({"ident": ident, "sha256": file_sha256(path)}))
    return tok


def text_field(cfg):
    """--text-field: the field of a JSONL record, the column of a Parquet file, that holds the text."""
    return getattr(cfg, "text_field", "text")


def tokenizer_tag(cfg):
    """A short name for the tokenizer setting, used in cache folder and run names."""
    if cfg.tokenizer == "char":
        return "char"
    if cfg.tokenizer == "bpe":
        return f"bpe{cfg.vocab_size}"
    p = Path(cfg.tokenizer).expanduser()
    return "tok-" + (file_sha256(p)[:8] if p.is_file() else safe_name(p.stem))


# ----------------------------------------------------------------------------------------------------
# The token cache: ids written once to data/<name>/<tokenizer>/{train,val}.bin (tok.dtype: uint16, or
# uint32 for vocabularies over 65536), plus meta.json. meta.json is written last and removed first, so a
# cache whose preparation was killed is never trusted.

DATA_FORMAT = 1


def data_key(cfg, sources, tok):
    """What a token cache is keyed by (and a checkpoint records): the corpus, the tokenizer, the split."""
    return {"format": DATA_FORMAT, "sources_sha256": sources["sha256"], "tokenizer_sha256": text_sha256(tok.to_text()),
            "val_fraction": cfg.val_fraction}


def prepare_data(cfg, name, root, files, sources, tok, log=print):
    """Tokenize the corpus into the cache (or reuse it) and return {"train": memmap, "val": memmap, "meta": ...}.

    Memory stays bounded: files are read in ~1 MB pieces, ids are appended to a file as they come, the
    split copies the tail in chunks, and the sources are hashed while they stream.
    """
    key = data_key(cfg, sources, tok)
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
    remove_stale_temp_files(cache, ".*.tmp-*")         # never another live run's work in progress
    t0 = time.time()
    all_tmp, val_tmp = cache / f".train.bin.tmp-{os.getpid()}", cache / f".val.bin.tmp-{os.getpid()}"
    try:
        n = tokenize_files(files, sources, tok, all_tmp, desc=f"tokenizing {name}", log=log,
                           workers=encode_workers(sources["bytes"]), text_field=text_field(cfg))
        n_train = int(n * (1.0 - cfg.val_fraction))
        split_tail(all_tmp, val_tmp, n_train * np.dtype(tok.dtype).itemsize)
        os.replace(all_tmp, cache / "train.bin")
        os.replace(val_tmp, cache / "val.bin")
        fsync_dir(cache)
    except BaseException:
        all_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
        raise

    meta = {"key": key, "name": name, "data": cfg.data, "root": str(root), "dtype": np.dtype(tok.dtype).name,
            "vocab_size": tok.vocab_size, "tokenizer": {"kind": tok.kind, "sha256": key["tokenizer_sha256"]},
            "sources_sha256": sources["sha256"], "num_files": len(files), "source_bytes": sources["bytes"],
            "train_tokens": n_train, "val_tokens": n - n_train, "prep_seconds": round(time.time() - t0, 2),
            "sources": [{k: e[k] for k in ("path", "bytes", "sha256")} for e in sources["files"]]}
    data = open_data(cache, meta)
    # bytes per token, per split: the UTF-8 length of every token, summed (special tokens count 0 bytes)
    nbytes_of = token_byte_lengths(tok)
    for split in ("train", "val"):
        b = sum(int(nbytes_of[data[split][i:i + (1 << 22)]].sum()) for i in range(0, len(data[split]), 1 << 22))
        meta[f"{split}_bytes"] = b
        meta[f"{split}_bytes_per_token"] = b / max(1, len(data[split]))
    write_text_atomic(meta_path, json.dumps(meta, indent=1))
    log(f"data: {len(files)} files, {sources['bytes'] / 1e6:.1f} MB -> {n:,} tokens "
        f"({meta['train_bytes_per_token']:.2f} bytes/token) in {time.time() - t0:.1f} s; cached in {cache}")
    return data


def tokenize_files(files, sources, tok, out_path, desc, log=print, workers=1, block_bytes=1 << 20, text_field="text"):
    """Append every file's ids (tok.dtype) to out_path, documents (read_documents: a text file, a JSONL
    line, a Parquet row) each followed by <|endoftext|> where the tokenizer has it, checking each file
    against its digest as it streams. Returns the number of ids. A file whose bytes are not all UTF-8
    under a tokenizer that replaces them (char) gets a warning.

    The pieces of text go to the encoder in jobs of about block_bytes characters (many small documents
    make one job). workers > 1: the jobs are encoded by a pool of that many processes, at most
    2 x workers jobs in flight, and written in file order: the same ids as workers=1, which encodes them
    here, one after another. (Decoding, and so the count of replaced bytes, stays in this process.)"""
    from collections import deque
    from tqdm import tqdm
    n = 0
    errors = COUNTING_REPLACE if tok.file_errors == "replace" else tok.file_errors
    pool = encoding_pool(tok, workers) if workers > 1 else None
    pending = deque()                                   # (ids, or the pool's promise of them; bytes read)
    try:
        with naming_errors(out_path), open(out_path, "wb") as out, tqdm(
                total=sources["bytes"], unit="B", unit_scale=True, desc=desc, dynamic_ncols=True,
                disable=None) as bar:
            def write(keep):                            # the oldest jobs' ids, in order, until `keep` are left
                nonlocal n
                while len(pending) > keep:
                    ids, nbytes = pending.popleft()
                    ids = ids if isinstance(ids, np.ndarray) else ids.get()
                    out.write(ids.tobytes())
                    n += ids.size
                    bar.update(nbytes)

            def submit(job, nbytes):                    # job: [(text, ends a document?)]
                pending.append((pool.apply_async(encode_in_worker, (job,)) if pool else encode_job(tok, job),
                                nbytes))
                write(keep=2 * workers)

            for p, entry in zip(files, sources["files"]):
                h = hashlib.sha256()
                invalid_before = _replaced[0]
                job, size, nbytes = [], 0, 0
                for text, read, end in read_documents(p, text_field, block_bytes, cut=tok.cut, errors=errors,
                                                      hasher=h):
                    job.append((text, end))
                    size, nbytes = size + len(text), nbytes + read
                    if size >= block_bytes:
                        submit(job, nbytes)
                        job, size, nbytes = [], 0, 0
                if job:
                    submit(job, nbytes)
                if h.hexdigest() != entry["sha256"]:
                    raise UserError(f"{p} changed while the data was being prepared; run again")
                if _replaced[0] > invalid_before:
                    log(f"warning: {p}: {_replaced[0] - invalid_before:,} bytes are not UTF-8 and were read as "
                        f"U+FFFD (the {tok.kind} tokenizer reads text; a BPE tokenizer keeps every byte)")
            write(keep=0)
    finally:
        if pool is not None:
            pool.terminate()
    return n


# The "replace" error handler (invalid UTF-8 -> U+FFFD, exactly as errors="replace" decodes), counting
# the bytes it replaces in _replaced[0], so tokenize_files can say how many there were in each file.
COUNTING_REPLACE = "gpt-numpy-counting-replace"
_replaced = [0]


def _counting_replace(e):
    _replaced[0] += e.end - e.start
    return codecs.replace_errors(e)


codecs.register_error(COUNTING_REPLACE, _counting_replace)


def encode_ids(tok, text):
    """One block of text -> its ids as a tok.dtype array."""
    return np.asarray(tok.encode_ordinary(text), dtype=tok.dtype)


def encode_job(tok, job):
    """A job of tokenize_files, [(text, ends a document?)], -> its ids as one tok.dtype array: each text's
    ids, and <|endoftext|> after each document where the tokenizer has it."""
    eot, parts = eot_id(tok), []
    for text, end in job:
        if text:
            parts.append(encode_ids(tok, text))
        if end and eot is not None:
            parts.append(np.array([eot], tok.dtype))
    return np.concatenate(parts) if parts else np.zeros(0, tok.dtype)


def encode_workers(nbytes):
    """Processes for tokenizing a corpus of nbytes: one per core this process may use, but no more than
    one per 8 MB (starting a worker costs ~0.3 s); 1 means no pool."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, nbytes // (8 << 20)))


_worker_tok = None                                      # the tokenizer of a pool process (encoding_pool)


def encoding_pool(tok, workers):
    """A pool of fresh ("spawn") processes, each holding a copy of tok rebuilt from its text form. Spawned,
    not forked: the parent may be an MPI rank, whose state a fork would copy."""
    import multiprocessing
    return multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker,
                                                     initargs=(tok.kind, tok.to_text()))


def init_worker(kind, text):
    global _worker_tok
    _worker_tok = tokenizer_from_text(kind, text)


def encode_in_worker(job):
    return encode_job(_worker_tok, job)


def split_tail(path, tail_path, at):
    """Move the bytes of path from offset `at` on into tail_path (in 16 MB chunks), both fsynced."""
    with naming_errors(tail_path), open(path, "r+b") as f, open(tail_path, "wb") as v:
        f.seek(at)
        for b in iter(lambda: f.read(1 << 24), b""):
            v.write(b)
        f.truncate(at)
        f.flush()
        os.fsync(f.fileno())
        v.flush()
        os.fsync(v.fileno())


def cache_files_ok(cache, meta):
    size = np.dtype(meta["dtype"]).itemsize
    return all((cache / f"{s}.bin").is_file() and (cache / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * size
               for s in ("train", "val"))


def open_data(cache, meta):
    """The cached splits as read-only memmaps (the OS pages them in; nothing is loaded up front)."""
    out = {"meta": meta}
    for s in ("train", "val"):
        n = meta[f"{s}_tokens"]
        out[s] = (np.memmap(Path(cache) / f"{s}.bin", dtype=meta["dtype"], mode="r", shape=(n,)) if n
                  else np.zeros(0, dtype=meta["dtype"]))
    return out


# ----------------------------------------------------------------------------------------------------
# The batch sampler

def get_batch(data, batch_size, block_size, rng, read=True):
    """batch_size random windows of block_size + 1 tokens: inputs x and targets y = x shifted by one.
    read=False draws the windows (rng moves on exactly as it would) but reads nothing and returns None:
    under mpiexec a rank draws the other ranks' micro-batches too, so that every sampler stays equal.

    Example: data = [5, 6, 7, 8], block_size 2, a window at 1 -> x = [[6, 7]], y = [[7, 8]].
    """
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    if not read:
        return None
    b = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)   # (B, T+1)
    return b[:, :-1], b[:, 1:]                                                  # (B, T), (B, T)


# ----------------------------------------------------------------------------------------------------
# Process-level helpers for the programs
