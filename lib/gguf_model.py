"""
lib/gguf_model.py: a model stored by llama.cpp (a GGUF file) as our parameters, config, tokenizer and chat
template.

    imp = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")     # Imported(params, cfg, tok, chat)
    logits = gpt_numpy.forward(imp.params, ids, imp.cfg)

`python export.py --import-gguf FILE --out RUN` writes it as a checkpoint (docs/pretrained.md). The file is
read with the `gguf` package, the reader that lives in llama.cpp's own tree; only the mapping is ours:

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
give the same model under its convention. unpermute_rows undoes that: reshape(nh, hs/2, 2, C).swapaxes(1, 2).

A file is refused (FileFormatError, one line naming it once and the key or tensor) unless every value has
the type its key needs (no coercion: 2.5 layers are not 2, "false" is not false), the layer count matches
the tensors (checked before any per-layer table is built), the tensors' data ranges are aligned, disjoint
and inside the file, and every weight is finite.
"""

import math
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
from lib.tokenizer_files import from_gguf_fields, preview

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

