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
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import bpe
import gpt_numpy as gn
from errors import FileFormatError, UserError
from lib import chat_template as chat
from lib.tokenizer_files import from_gguf_fields

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
        raise FileFormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_fields(reader):
    """{key: plain Python value} of every metadata field (strings, numbers, lists)."""
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception as e:
            raise FileFormatError(f"GGUF field {k} is unreadable ({e})") from None
    return out


def config_from_gguf(meta, tensors, path):
    """The GPTConfig of a llama GGUF's metadata; FileFormatError naming the key that does not fit."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise FileFormatError(f"{path}: general.architecture = {arch!r} is not supported: only llama imports "
                              f"(Llama, SmolLM2, TinyLlama, ...)")

    def get(key, default=None):
        v = meta.get(f"llama.{key}", default)
        if v is None:
            raise FileFormatError(f"{path}: llama.{key} is missing")
        return v

    if get("expert_count", 0):
        raise FileFormatError(f"{path}: llama.expert_count = {get('expert_count')} is not supported: "
                              f"mixture-of-experts feed-forwards are not implemented here")
    C, nh = int(get("embedding_length")), int(get("attention.head_count"))
    hs = C // nh if nh else 0
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{key}", hs) != hs:
            raise FileFormatError(f"{path}: llama.{key} = {meta[f'llama.{key}']} is not supported: it must be the "
                                  f"head size embedding_length / head_count = {hs} (RoPE on the whole head)")
    scaling = None
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif kind != "none":
        raise FileFormatError(f"{path}: llama.rope.scaling.type = {kind!r} is not supported: only linear and "
                              f"Llama 3's (rope_freqs.weight) are implemented")
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise FileFormatError(f"{path}: both llama.rope.scaling.type and rope_freqs.weight")
        scaling = llama3_scaling(dequantize(tensors["rope_freqs.weight"]), hs, float(get("rope.freq_base", 10000.0)), path)
    V = int(meta.get("llama.vocab_size") or tensors["token_embd.weight"].shape[1])
    try:
        return gn.GPTConfig(
            vocab_size=V, n_layer=int(get("block_count")), n_head=nh, n_kv_head=int(get("attention.head_count_kv", nh)),
            d_model=C, d_ff=int(get("feed_forward_length")), max_seq_len=int(get("context_length")), norm="rmsnorm",
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling, tie_embeddings="output.weight" not in tensors)
    except ValueError as e:
        raise FileFormatError(f"{path}: {e}") from None


def llama3_scaling(divisors, hs, theta, path):
    """The llama3 rope_scaling whose frequencies are inv_freq / divisors (rope_freqs.weight, as llama.cpp's
    converter computes it), or FileFormatError if no Llama 3 parameters give them."""
    divisors = np.asarray(divisors, np.float64).ravel()
    cand = {"type": "llama3", "factor": float(divisors.max()), "low_freq_factor": LLAMA3_LOW,
            "high_freq_factor": LLAMA3_HIGH, "original_max_position_embeddings": LLAMA3_CONTEXT}
    base = gn.rope_inv_freq(hs, theta)
    if divisors.shape != base.shape or not np.allclose(base / divisors, gn.rope_inv_freq(hs, theta, cand), rtol=1e-5):
        raise FileFormatError(f"{path}: rope_freqs.weight is not Llama 3's RoPE scaling (factor {cand['factor']:g}, "
                              f"low/high frequency factors 1 and 4, original context 8192)")
    return cand


def dequantize(t):
    """A GGUF tensor as a float32 NumPy array of its NumPy shape (reversed GGUF shape), in memory."""
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
    return np.array(w.reshape(want), dtype=np.float32)      # a copy: F32 and F16 come back as views of the file


def read_gguf(path, progress=False):
    """A llama GGUF file -> Imported(params, cfg, tok, chat). FileFormatError (one line) for a file that is
    not GGUF, truncated, of another architecture, or holds tensors that do not fit its metadata.
    progress: a tqdm bar over the tensors on a terminal (none when stderr is not one)."""
    with tqdm(desc=f"import {Path(path).name}", unit="tensor", disable=None if progress else True) as bar:
        return _read_gguf(path, bar)


def _read_gguf(path, bar):
    reader = open_gguf(path)
    bar.total = len(reader.tensors)
    meta = gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    if len(tensors) != len(reader.tensors):
        raise FileFormatError(f"{path}: a tensor name appears twice")
    cfg = config_from_gguf(meta, tensors, path)
    tok = from_gguf_fields(meta)
    if tok.vocab_size > cfg.vocab_size:
        raise FileFormatError(f"{path}: the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    expected = gn.param_shapes(cfg)

    def take(name, ours, transposed):
        if name not in tensors:
            raise FileFormatError(f"{path}: tensor {name} is missing")
        w = dequantize(tensors.pop(name))
        bar.update()
        w = np.ascontiguousarray(w.T) if transposed else w
        if w.shape != expected[ours]:
            raise FileFormatError(f"{path}: tensor {name} has shape {w.shape[::-1] if transposed else w.shape}, "
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
                raise FileFormatError(f"{path}: tensor {key} is missing")
            w = dequantize(tensors.pop(key))
            bar.update()
            if w.shape != (heads * hs, C):
                raise FileFormatError(f"{path}: tensor {key} has shape {w.shape}, expected {(heads * hs, C)}")
            if name != "attn_v.weight":
                w = unpermute_rows(w, heads)
            qkv[:, col:col + heads * hs] = w.T
            col += heads * hs
        params[f"blocks.{i}.attn.qkv"] = qkv
    if tensors:
        extra = sorted(tensors)
        raise FileFormatError(f"{path}: unexpected tensors (not a plain Llama, e.g. biases?): {', '.join(extra[:3])}"
                              + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    params = {k: params[k] for k in expected}               # gpt_numpy's order
    info = gguf_chat_info(meta, tok, path)
    return Imported(params, cfg, tok, info)


def gguf_chat_info(meta, tok, path):
    """chat.chat_info from the file's template and special token ids (None where the file has none)."""
    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is None:
            return None
        if not 0 <= int(i) < tok.vocab_size:
            raise FileFormatError(f"{path}: tokenizer.ggml.{key}_token_id = {i} is not a token id")
        return int(i)

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:                             # llama.cpp's default: Llama 3's pre-tokenizer adds one
        add_bos = meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3")
    return chat.chat_info(meta.get("tokenizer.chat_template"), tok, bos_id=token("bos"), eos_id=token("eos"),
                          add_bos=bool(add_bos))
