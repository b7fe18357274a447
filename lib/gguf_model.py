"""
lib/gguf_model.py: a model stored by llama.cpp (a GGUF file) as our parameters, config, tokenizer and chat
template, and back.

    imp = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")     # Imported(params, cfg, tok, chat)
    logits = gpt_numpy.forward(imp.params, ids, imp.cfg)
    write_gguf("model.gguf", params, cfg, tok, chat, "q8_0")  # our model for llama.cpp (f32, f16 or q8_0)

`python export.py --import-gguf FILE --out RUN` writes it as a checkpoint, `python export.py --ckpt RUN
--gguf FILE` the other way (docs/pretrained.md). The file is read and written with the `gguf` package,
the reader, writer and quantizers that live in llama.cpp's own tree; only the mapping is ours, the same
table both ways:

    GGUF                                    ours
    general.architecture                    must be "llama" (others are refused by name)
    llama.block_count, .embedding_length,   n_layer, d_model, d_ff, n_head, n_kv_head, max_seq_len,
      .feed_forward_length, .context_length,  rope_theta, norm_eps
      .attention.head_count(_kv),
      .rope.freq_base, .attention.layer_norm_rms_epsilon
    llama.rope.scaling.type/.factor         rope_scaling linear; Llama 3's scaling arrives as the tensor
                                            rope_freqs.weight, matched to gpt_numpy's llama3 formula
    token_embd.weight      (V, C)           tok_emb, as is
    blk.i.attn_norm/ffn_norm.weight         blocks.i.norm1/norm2.weight
    blk.i.attn_q, attn_k, attn_v.weight     blocks.i.attn.qkv = [q.T | k.T | v.T], q and k unpermuted (below)
    blk.i.attn_output, ffn_gate, ffn_up,    blocks.i.attn.proj, ffn.w_gate, ffn.w_up, ffn.w_down, each .T
      ffn_down.weight
    output_norm.weight                      norm_f.weight
    output.weight          (V, C)           lm_head = .T; absent: tied embeddings
    tokenizer.ggml.*                        tokenizer_files.from_gguf_fields (byte-level BPE)
    tokenizer.chat_template, bos/eos ids    chat.chat_info, for sample.py --chat

A GGUF tensor's shape lists the fastest-varying axis first, so a matrix of shape [in, out] there is the
NumPy array (out, in): torch's Linear layout, transposed to ours as Hugging Face's are (lib/hf.py).
Quantized tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, ... and F16, BF16) are widened to float32 with
gguf.quants.dequantize, one tensor at a time, so memory stays near the float32 model's size.

subtle: the q/k row permutation. llama.cpp rotates interleaved pairs (x[2j], x[2j+1]) where Hugging Face's
Llama and ours rotate the halves (x[j], x[j + hs/2]). Its converter (convert_hf_to_gguf.py, LlamaModel.permute)
reorders the rows of q and k inside each head, w.reshape(nh, 2, hs/2, C).swapaxes(1, 2), so the same weights
give the same model under its convention. unpermute_rows undoes that: reshape(nh, hs/2, 2, C).swapaxes(1, 2);
permute_rows, on export, does it.

A file is refused (FileFormatError, one line naming it once and the key or tensor) unless every value has
the type its key needs (no coercion: 2.5 layers are not 2, "false" is not false), the layer count matches
the tensors (checked before any per-layer table is built), the tensors' data ranges are aligned, disjoint
and inside the file, and every weight is finite.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import bpe
import gpt_numpy as gn
from errors import FileFormatError, UserError
from lib import chat_template as chat
from lib.checkpoint import check_layer_count
from lib.memory import LONGEST_CONTEXT
from lib.tokenizer_files import from_gguf_fields, preview, to_gguf_fields

BLOCK_NAMES = {                                 # GGUF's names in block i -> ours, and transposed?
    "attn_norm.weight": ("norm1.weight", False),
    "attn_output.weight": ("attn.proj", True),
    "ffn_norm.weight": ("norm2.weight", False),
    "ffn_gate.weight": ("ffn.w_gate", True),
    "ffn_up.weight": ("ffn.w_up", True),
    "ffn_down.weight": ("ffn.w_down", True),
}
TOP = {"token_embd.weight": ("tok_emb", False), "output_norm.weight": ("norm_f.weight", False),
       "output.weight": ("lm_head", True)}
QKV = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
# Llama 3.1 and 3.2 files (convert_hf_to_gguf.py stores their scaling as per-frequency divisors, without the
# parameters): the factor is the largest divisor; the rest are Llama 3's published values
LLAMA3_LOW, LLAMA3_HIGH, LLAMA3_CONTEXT = 1.0, 4.0, 8192


@dataclass
class Imported:
    params: dict                # our names and layouts, float32, gpt_numpy's key order
    cfg: gn.GPTConfig
    tok: bpe.Tokenizer
    chat: dict                  # chat.chat_info's dict (template may be None), for the checkpoint's metadata


def unpermute_rows(w, n_head):
    """Undo llama.cpp's converter permutation of the rows of a q or k projection (out, in) with n_head heads:
    within each head, rows in pair order (0, hs/2, 1, hs/2 + 1, ...) go back to half order (0, 1, ...).

    >>> unpermute_rows(np.array([[0], [2], [1], [3]]), 1)[:, 0]      # one head of 4: pairs (0, 2), (1, 3)
    array([0, 1, 2, 3])
    """
    out, cols = w.shape
    hs = out // n_head
    return w.reshape(n_head, hs // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def open_gguf(path):
    """gguf.GGUFReader on the file (memory-mapped; nothing is read until used), or FileFormatError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no GGUF file at {path}")
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as e:                      # a bad magic, a truncated header or tensor table, ...
        raise FileFormatError(f"not a readable GGUF file ({type(e).__name__}: "
                              f"{str(e).replace(str(path), 'the file')})") from None


def gguf_fields(reader):
    """{key: plain Python value} of every metadata field (strings, numbers, booleans, lists)."""
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception as e:
            raise FileFormatError(f"GGUF field {k} is unreadable ({e})") from None
    return out


def check_tensor_ranges(reader):
    """Refuse tensors whose data is misaligned, runs past the end of the file, or overlaps another
    tensor's: llama.cpp refuses such a file, and a tensor read across its neighbours (a type id changed
    from Q4_1 to F32 reads 6.4 times its bytes) would import as garbage."""
    size, align = int(reader.data.size), int(getattr(reader, "alignment", 32) or 32)
    end, last = int(reader.data_offset), None
    for t in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        begin, stop = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if (begin - int(reader.data_offset)) % align:
            raise FileFormatError(f"tensor {t.name}'s data offset {begin - int(reader.data_offset)} is not a "
                                  f"multiple of the file's alignment {align}")
        if begin < end:
            raise FileFormatError(f"tensor {t.name}'s data (bytes {begin:,} to {stop:,}) overlaps "
                                  f"{'tensor ' + last if last else 'the header'}'s (up to byte {end:,})")
        if stop > size:
            raise FileFormatError(f"tensor {t.name}'s data (bytes {begin:,} to {stop:,}) runs past the end of "
                                  f"the file ({size:,} bytes)")
        end, last = stop, t.name


def typed(meta, key, kind, default=None):
    """meta[key] (or default when absent), checked to be of `kind`: "count" (a positive integer), "number"
    (a positive finite number), "flag" (a boolean), "string", "id" (a token id, 0 or more); a value of
    another type (2.5 layers, "false", an array) is FileFormatError naming the key, never coerced."""
    v = meta.get(key, default)
    ok, what = {
        "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
        "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                   "a positive finite number"),
        "flag": (lambda v: isinstance(v, bool), "a boolean"),
        "string": (lambda v: isinstance(v, str), "a string"),
        "id": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a token id (an integer)"),
    }[kind]
    if v is None:
        raise FileFormatError(f"{key} is missing")
    if not ok(v):
        raise FileFormatError(f"{key} must be {what}, got {preview(v)}")
    return v


def config_from_gguf(meta, tensors, max_seq_len=None):
    """The GPTConfig of a llama GGUF's metadata; FileFormatError naming the key that does not fit.
    max_seq_len: the context to use instead of llama.context_length (export.py --block-size)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise FileFormatError(f"general.architecture = {arch!r} is not supported: only llama imports "
                              f"(Llama, SmolLM2, TinyLlama, ...)")

    def get(key, kind, default=None):
        return typed(meta, f"llama.{key}", kind, default)

    if meta.get("llama.expert_count", 0) != 0:
        raise FileFormatError(f"llama.expert_count = {preview(meta['llama.expert_count'])} is not supported: "
                              f"mixture-of-experts feed-forwards are not implemented here")
    C, nh = get("embedding_length", "count"), get("attention.head_count", "count")
    hs = C // nh
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, "count", hs) != hs:
            raise FileFormatError(f"llama.{key} = {meta[f'llama.{key}']} is not supported: it must be the "
                                  f"head size embedding_length / head_count = {hs} (RoPE on the whole head)")
    theta = float(get("rope.freq_base", "number", 10000.0))
    scaling = None
    kind = get("rope.scaling.type", "string", "none")
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(get("rope.scaling.factor", "number"))}
    elif kind != "none":
        raise FileFormatError(f"llama.rope.scaling.type = {kind!r} is not supported: only linear and "
                              f"Llama 3's (rope_freqs.weight) are implemented")
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise FileFormatError("both llama.rope.scaling.type and rope_freqs.weight")
        scaling = llama3_scaling(dequantize(tensors["rope_freqs.weight"]), hs, theta)
    if "llama.vocab_size" in meta:
        V = get("vocab_size", "count")
    elif "token_embd.weight" in tensors and len(tensors["token_embd.weight"].shape) == 2:
        V = int(tensors["token_embd.weight"].shape[1])
    else:
        raise FileFormatError("llama.vocab_size is missing, and there is no token_embd.weight to count it")
    if max_seq_len is None:
        max_seq_len = get("context_length", "count")
        if max_seq_len > LONGEST_CONTEXT:
            raise FileFormatError(f"llama.context_length = {max_seq_len:,} is not supported: beyond any context "
                                  f"this code runs (at most {LONGEST_CONTEXT:,}); import with a shorter --block-size")
    try:
        return gn.GPTConfig(
            vocab_size=V, n_layer=get("block_count", "count"), n_head=nh,
            n_kv_head=get("attention.head_count_kv", "count", nh), d_model=C, d_ff=get("feed_forward_length", "count"),
            max_seq_len=max_seq_len, norm="rmsnorm",
            norm_eps=float(get("attention.layer_norm_rms_epsilon", "number", 1e-5)), rope_theta=theta,
            rope_scaling=scaling, tie_embeddings="output.weight" not in tensors)
    except ValueError as e:
        raise FileFormatError(str(e)) from None


def llama3_scaling(divisors, hs, theta):
    """The llama3 rope_scaling whose frequencies are inv_freq / divisors (rope_freqs.weight, as llama.cpp's
    converter computes it), or FileFormatError if no Llama 3 parameters give them."""
    divisors = np.asarray(divisors, np.float64).ravel()
    cand = {"type": "llama3", "factor": float(divisors.max()), "low_freq_factor": LLAMA3_LOW,
            "high_freq_factor": LLAMA3_HIGH, "original_max_position_embeddings": LLAMA3_CONTEXT}
    base = gn.rope_inv_freq(hs, theta)
    if divisors.shape != base.shape or not np.allclose(base / divisors, gn.rope_inv_freq(hs, theta, cand), rtol=1e-5):
        raise FileFormatError(f"rope_freqs.weight is not Llama 3's RoPE scaling (factor {cand['factor']:g}, "
                              f"low/high frequency factors 1 and 4, original context 8192)")
    return cand


def dequantize(t):
    """A GGUF tensor as a float32 NumPy array of its NumPy shape (reversed GGUF shape), in memory; every
    value finite (a NaN, or a float16 that overflowed to inf, is refused as every loader refuses it)."""
    import gguf
    want = tuple(int(n) for n in reversed(t.shape))
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise FileFormatError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot "
                              f"widen to float32") from None
    except Exception as e:                      # data shorter than the shape says, ...
        raise FileFormatError(f"GGUF tensor {t.name} ({t.tensor_type.name}) is unreadable ({e})") from None
    if w.dtype.kind != "f":
        raise FileFormatError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, not a float or quantized "
                              f"float type")
    if w.size != int(np.prod(want)):
        raise FileFormatError(f"GGUF tensor {t.name} holds {w.size} numbers, its shape {list(want)} says "
                              f"{int(np.prod(want))}")
    w = np.array(w.reshape(want), dtype=np.float32)      # a copy: F32 and F16 come back as views of the file
    if not np.isfinite(w).all():
        bad = int(w.size - np.count_nonzero(np.isfinite(w)))
        raise FileFormatError(f"GGUF tensor {t.name} holds {bad:,} NaN or infinite values "
                              f"({t.tensor_type.name}); it was not imported")
    return w


def read_gguf(path, progress=False, max_seq_len=None):
    """A llama GGUF file -> Imported(params, cfg, tok, chat). FileFormatError (one line, naming the file
    once and the key or tensor) for a file that is not GGUF, truncated, of another architecture, with
    metadata of the wrong types, tensors that overlap or do not fit its metadata, or values that no loader
    here accepts (NaN weights, a context beyond memory.LONGEST_CONTEXT, an empty special token).
    max_seq_len: the context length to use (default: the file's llama.context_length).
    progress: a tqdm bar over the tensors on a terminal (none when stderr is not one)."""
    with tqdm(desc=f"import {Path(path).name}", unit="tensor", disable=None if progress else True) as bar:
        try:
            return _read_gguf(path, bar, max_seq_len)
        except FileFormatError as e:
            raise FileFormatError(f"{path}: {e}") from None


def _read_gguf(path, bar, max_seq_len):
    reader = open_gguf(path)
    bar.total = len(reader.tensors)
    check_tensor_ranges(reader)
    meta = gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    if len(tensors) != len(reader.tensors):
        raise FileFormatError("a tensor name appears twice")
    cfg = config_from_gguf(meta, tensors, max_seq_len)
    check_layer_count(cfg.n_layer, tensors, r"blk\.(\d+)\.", None, "llama.block_count")
    tok = from_gguf_fields(meta)
    if tok.vocab_size > cfg.vocab_size:
        raise FileFormatError(f"the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    expected = gn.param_shapes(cfg)

    def take(name, ours, transposed):
        if name not in tensors:
            raise FileFormatError(f"tensor {name} is missing")
        w = dequantize(tensors.pop(name))
        bar.update()
        w = np.ascontiguousarray(w.T) if transposed else w
        if w.shape != expected[ours]:
            raise FileFormatError(f"tensor {name} has shape {w.shape[::-1] if transposed else w.shape}, "
                                  f"expected {expected[ours][::-1] if transposed else expected[ours]} for this config")
        return w

    params = {}
    for name, (ours, transposed) in TOP.items():
        if ours in expected:
            params[ours] = take(name, ours, transposed)
    tensors.pop("rope_freqs.weight", None)          # read by config_from_gguf
    C, hs, nh, nkv = cfg.d_model, cfg.head_size, cfg.n_head, cfg.n_kv_head
    for i in range(cfg.n_layer):
        for name, (ours, transposed) in BLOCK_NAMES.items():
            params[f"blocks.{i}.{ours}"] = take(f"blk.{i}.{name}", f"blocks.{i}.{ours}", transposed)
        # q, k (unpermuted) and v, each (out, in), into one (C, (nh + 2 nkv) hs) matrix
        qkv = np.empty((C, cfg.qkv_size), np.float32)
        col = 0
        for name, heads in zip(QKV, (nh, nkv, nkv)):
            key = f"blk.{i}.{name}"
            if key not in tensors:
                raise FileFormatError(f"tensor {key} is missing")
            w = dequantize(tensors.pop(key))
            bar.update()
            if w.shape != (heads * hs, C):
                raise FileFormatError(f"tensor {key} has shape {w.shape}, expected {(heads * hs, C)}")
            if name != "attn_v.weight":
                w = unpermute_rows(w, heads)
            qkv[:, col:col + heads * hs] = w.T
            col += heads * hs
        params[f"blocks.{i}.attn.qkv"] = qkv
    if tensors:
        extra = sorted(tensors)
        raise FileFormatError(f"unexpected tensors (not a plain Llama, e.g. biases?): {', '.join(extra[:3])}"
                              + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    params = {k: params[k] for k in expected}               # gpt_numpy's order
    info = gguf_chat_info(meta, tok)
    return Imported(params, cfg, tok, info)


def gguf_chat_info(meta, tok):
    """chat.chat_info from the file's template and special token ids (None where the file has none)."""
    def token(key):
        key = f"tokenizer.ggml.{key}_token_id"
        if key not in meta:
            return None
        i = typed(meta, key, "id")
        if i >= tok.vocab_size:
            raise FileFormatError(f"{key} = {i} is not a token id (the vocabulary has {tok.vocab_size})")
        return i

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:                             # llama.cpp's default: Llama 3's pre-tokenizer adds one
        add_bos = meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3")
    add_bos = typed({"tokenizer.ggml.add_bos_token": add_bos}, "tokenizer.ggml.add_bos_token", "flag")
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        typed(meta, "tokenizer.chat_template", "string")
    return chat.chat_info(template, tok, bos_id=token("bos"), eos_id=token("eos"), add_bos=add_bos)


# ----------------------------------------------------------------------------------------------------
# Export: our model as a GGUF file that llama.cpp (and the tools built on it: llama-cli, llama-server,
# Ollama, LM Studio, llama-cpp-python) runs: `python export.py --ckpt RUN --gguf FILE --type q8_0`.
# The mapping is read_gguf's, backwards: the same tables, q and k rows permuted (permute_rows), the
# tokenizer as llama.cpp's byte-level BPE ('gpt2', tokenizer_files.to_gguf_fields), the chat template
# and special tokens as llama.cpp's converter writes them.

GGUF_TYPES = ("f32", "f16", "q8_0")     # --type: the matrices' storage; 1-D tensors (norms) stay F32


def permute_rows(w, n_head):
    """llama.cpp's converter permutation (convert_hf_to_gguf.py, LlamaModel.permute) of the rows of a q or
    k projection (out, in): within each head, rows in half order (0, 1, ..., hs - 1) go to pair order
    (0, hs/2, 1, hs/2 + 1, ...). The inverse of unpermute_rows.

    >>> permute_rows(np.array([[0], [1], [2], [3]]), 1)[:, 0]      # one head of 4: pairs (0, 2), (1, 3)
    array([0, 2, 1, 3])
    """
    out, cols = w.shape
    hs = out // n_head
    return w.reshape(n_head, 2, hs // 2, cols).swapaxes(1, 2).reshape(out, cols)


def gguf_tensors(params, cfg):
    """[(GGUF name, NumPy shape in GGUF's layout, make)] of every tensor of the file: make() builds the
    float32 array (out, in) when it is written, so that memory holds one tensor beyond the model."""
    host = lambda k: np.asarray(gn.to_host(params[k]), dtype=np.float32)        # noqa: E731
    C, hs, nh, nkv = cfg.d_model, cfg.head_size, cfg.n_head, cfg.n_kv_head

    def plain(ours, transposed):
        shape = tuple(np.shape(params[ours]))
        return (shape[::-1] if transposed else shape,
                lambda: np.ascontiguousarray(host(ours).T if transposed else host(ours)))

    def projection(i, begin, heads, permuted):         # a slice of attn.qkv's columns, as (out, in)
        def make():
            w = host(f"blocks.{i}.attn.qkv")[:, begin:begin + heads * hs].T
            return np.ascontiguousarray(permute_rows(w, heads) if permuted else w)
        return (heads * hs, C), make

    out = [("token_embd.weight", *plain("tok_emb", False))]
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3":      # per-frequency divisors, as the converter
        base = gn.rope_inv_freq(hs, cfg.rope_theta)
        divisors = (base / gn.rope_inv_freq(hs, cfg.rope_theta, cfg.rope_scaling)).astype(np.float32)
        out.append(("rope_freqs.weight", divisors.shape, lambda: divisors))
    for i in range(cfg.n_layer):
        for name, (ours, transposed) in BLOCK_NAMES.items():
            out.append((f"blk.{i}.{name}", *plain(f"blocks.{i}.{ours}", transposed)))
        for name, begin, heads, permuted in zip(QKV, (0, nh * hs, (nh + nkv) * hs), (nh, nkv, nkv), (True, True, False)):
            out.append((f"blk.{i}.{name}", *projection(i, begin, heads, permuted)))
    out.append(("output_norm.weight", *plain("norm_f.weight", False)))
    if not cfg.tie_embeddings:
        out.append(("output.weight", *plain("lm_head", True)))
    return out


def storage_type(shape, qtype):
    """The GGML type a tensor of this NumPy shape is stored in for --type qtype: 1-D tensors F32 (as
    llama.cpp's converter keeps them), matrices qtype; a Q8_0 matrix whose rows are not a multiple of its
    32-number blocks falls back to F16, as the converter does."""
    import gguf
    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or qtype == "f32":
        return T.F32
    if qtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


def write_gguf(path, params, cfg, tok, chat=None, qtype="f32", name=None, progress=False):
    """Write our model (params on any backend, its GPTConfig, its tokenizer, the checkpoint's chat
    metadata) as a llama GGUF file at `path`, atomically (a temporary file renamed over it: a crash
    leaves the old file or the new one). qtype: "f32", "f16" or "q8_0" (GGUF_TYPES). UserError for what
    llama.cpp cannot hold: a LayerNorm model, a character tokenizer, a split pattern it has no name for.
    Returns {GGML type name: number of tensors}."""
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF files needs the gguf package: pip install gguf") from None
    from lib.files import fsync_dir, naming_errors, remove_stale_temp_files
    from lib.hf import special_roles
    if qtype not in GGUF_TYPES:
        raise UserError(f"--type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    if cfg.norm != "rmsnorm":
        raise UserError(f"only RMSNorm models map to llama.cpp's llama; this model uses norm={cfg.norm!r}")
    for key in ("rope_theta", "norm_eps"):
        if not math.isfinite(getattr(cfg, key)):
            raise UserError(f"the model config's {key} is {getattr(cfg, key)}, not a finite number (a damaged checkpoint?)")
    fields = to_gguf_fields(tok, cfg.vocab_size)        # refuses a char tokenizer
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    plan = gguf_tensors(params, cfg)
    types = {n: storage_type(shape, qtype) for n, shape, _ in plan}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, f".{path.name}.tmp-*")     # of a killed export
    w = gguf.GGUFWriter(None, "llama")
    # the model: what config_from_gguf reads
    w.add_name(name or path.stem)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    if qtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    # the tokenizer, its special tokens and the chat template: what from_gguf_fields and gguf_chat_info read
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_token_merges(fields["tokenizer.ggml.merges"])
    bos, eos, _ = special_roles(tok, chat)
    if bos is not None:
        w.add_bos_token_id(tok.special_tokens[bos])
    if eos is not None:
        w.add_eos_token_id(tok.special_tokens[eos])
    eot = [i for i in (chat or {}).get("stop_ids") or [] if eos is None or i != tok.special_tokens[eos]]
    if eot:                                             # the template's end of turn, e.g. <|im_end|>
        w.add_eot_token_id(eot[0])
    w.add_add_bos_token(bool((chat or {}).get("add_bos")))
    if (chat or {}).get("template"):
        w.add_chat_template(chat["template"])
    for n, shape, _ in plan:
        block, size = gguf.GGML_QUANT_SIZES[types[n]]  # numbers per block, bytes per block: F32 1, 4; Q8_0 32, 34
        w.add_tensor_info(n, shape, np.dtype(np.float32), int(np.prod(shape)) // block * size, raw_dtype=types[n])
    try:
        with naming_errors(path), tqdm(total=len(plan), desc=f"write {path.name}", unit="tensor",
                                       disable=None if progress else True) as bar:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for n, _, make in plan:                     # one tensor in memory at a time
                w.write_tensor_data(gguf.quants.quantize(make(), types[n]))
                bar.update()
            w.flush()
            os.fsync(w.fout[0].fileno())
            w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    counts = {}
    for t in types.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    return counts
