"""
export.py: our models to Hugging Face and back.

Export writes a directory that `transformers` loads with no code of ours, as a LlamaForCausalLM:

    python export.py --ckpt out/stdlib-bpe2048 --out export/stdlib-bpe2048

    from transformers import AutoModelForCausalLM, AutoTokenizer     # then in Python, with transformers
    model = AutoModelForCausalLM.from_pretrained("export/stdlib-bpe2048")
    tok = AutoTokenizer.from_pretrained("export/stdlib-bpe2048")

Import reads a local Hugging Face Llama-architecture directory (config.json, model.safetensors or its
shards, tokenizer.json of the byte-level BPE kind) into our parameter dict, config and tokenizer
(`params, cfg, tok = import_hf(dir)`, ready for gpt_numpy's forward, loss_and_grads and generate), and
the command line writes them as one of our checkpoints, which sample.py reads:

    python export.py --import-hf path/to/hf-llama --out out/imported
    python sample.py --ckpt out/imported --prompt "Once upon a time"

Why this is exact: SPEC.md's model is Llama's. RMSNorm, SwiGLU, no biases, and RoPE in the same
half-split convention as Hugging Face's `rotate_half`, with q, k and v heads taken by reshaping the
projection's output to (nh, hs). So q_proj.weight is simply W_q transposed (torch's Linear stores
(out, in); we store (in, out)), with no permutation of rows. (Meta's original checkpoints and GGUF files
rotate interleaved pairs instead, and their converters permute the rows of q and k; Hugging Face's files
and ours need none of that.)

The mapping, for block i (ours -> Hugging Face's, `.T` meaning transposed):

    tok_emb                  -> model.embed_tokens.weight                        (V, C), as is
    blocks.i.norm1.weight    -> model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv        -> model.layers.i.self_attn.{q,k,v}_proj.weight     each (C, C) slice .T
    blocks.i.attn.proj       -> model.layers.i.self_attn.o_proj.weight           .T
    blocks.i.norm2.weight    -> model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.w_gate/w_up -> model.layers.i.mlp.gate_proj/up_proj.weight      .T
    blocks.i.ffn.w_down      -> model.layers.i.mlp.down_proj.weight              .T
    norm_f.weight            -> model.norm.weight
    lm_head                  -> lm_head.weight (untied only; tied models leave it out)  .T

What does not map: LayerNorm models (Llama has no LayerNorm, no biases), and on import grouped-query
attention, biases, RoPE scaling, activations other than SiLU and tokenizers other than byte-level BPE:
each is refused with an error naming the field. Weights are written in float32; bfloat16 and float16
files are read and widened to float32.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import regex
from safetensors import SafetensorError, deserialize, safe_open
from safetensors.numpy import load_file, save_file

import bpe
import gpt_numpy as gn


class InteropError(ValueError):
    """A user-facing problem (a file, a field, an unsupported feature): the CLI prints it in one line."""


# ----------------------------------------------------------------------------------------------------
# Names: ours <-> Hugging Face's Llama. Each row is (our suffix, their suffix, transposed?); q, k, v
# are the one exception (our fused qkv is three of their matrices) and are handled beside the table.

BLOCK_NAMES = [
    ("norm1.weight", "input_layernorm.weight", False),
    ("attn.proj", "self_attn.o_proj.weight", True),
    ("norm2.weight", "post_attention_layernorm.weight", False),
    ("ffn.w_gate", "mlp.gate_proj.weight", True),
    ("ffn.w_up", "mlp.up_proj.weight", True),
    ("ffn.w_down", "mlp.down_proj.weight", True),
]
TOP_NAMES = [
    ("tok_emb", "model.embed_tokens.weight", False),  # an embedding is a lookup table: (V, C) in both
    ("norm_f.weight", "model.norm.weight", False),
    ("lm_head", "lm_head.weight", True),              # untied models only
]


def name_pairs(cfg):
    """Every (ours, theirs, transposed?) for this config except the q, k, v projections."""
    pairs = [(o, h, t) for o, h, t in TOP_NAMES if o != "lm_head" or not cfg.tie_embeddings]
    for i in range(cfg.n_layer):
        pairs += [(f"blocks.{i}.{o}", f"model.layers.{i}.{h}", t) for o, h, t in BLOCK_NAMES]
    return pairs


def check_params(params, cfg):
    """Raise InteropError unless params has exactly the keys and shapes of param_shapes(cfg)."""
    shapes = gn.param_shapes(cfg)
    missing = [k for k in shapes if k not in params]
    extra = [k for k in params if k not in shapes]
    if missing or extra:
        raise InteropError(f"parameters do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in shapes.items():
        if tuple(params[k].shape) != shape:
            raise InteropError(f"parameter {k} has shape {tuple(params[k].shape)}, the config says {shape}")


def to_hf_tensors(params, cfg):
    """Our params -> {Hugging Face name: float32 array in torch's Linear layout (out, in)}.

    Example: blocks.0.attn.qkv (C, 3C) -> model.layers.0.self_attn.q_proj.weight = qkv[:, :C].T (C, C).
    """
    check_params(params, cfg)
    host = {k: gn.to_host(v) for k, v in params.items()}
    C = cfg.d_model
    out = {}
    for ours, theirs, transposed in name_pairs(cfg):
        w = host[ours].T if transposed else host[ours]
        out[theirs] = np.ascontiguousarray(w, dtype=np.float32)   # safetensors needs contiguous data
    for i in range(cfg.n_layer):
        qkv = host[f"blocks.{i}.attn.qkv"]                        # (C, 3C): q, k, v along the last axis
        for j, n in enumerate("qkv"):
            # heads are the (nh, hs) reshape of each C-wide slice in both libraries: no permutation
            out[f"model.layers.{i}.self_attn.{n}_proj.weight"] = np.ascontiguousarray(
                qkv[:, j * C:(j + 1) * C].T, dtype=np.float32)    # (C, C), (out, in)
    return out


def from_hf_tensors(tensors, cfg):
    """{Hugging Face name: array} -> our params (float32, (in, out)). The inverse of to_hf_tensors."""
    expected = {h for _, h, _ in name_pairs(cfg)}
    expected |= {f"model.layers.{i}.self_attn.{n}_proj.weight" for i in range(cfg.n_layer) for n in "qkv"}
    # tied models may still carry a copy of the head; old checkpoints carry RoPE's inv_freq buffers
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(expected - tensors.keys())
    extra = sorted(k for k in tensors.keys() - expected - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise InteropError(f"weights missing from the checkpoint: {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if extra:
        raise InteropError(f"unexpected weights (not a plain Llama, e.g. biases?): {', '.join(extra[:3])}"
                           + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    params = {}
    for ours, theirs, transposed in name_pairs(cfg):
        w = tensors[theirs]
        params[ours] = np.ascontiguousarray(w.T if transposed else w, dtype=np.float32)
    for i in range(cfg.n_layer):
        q, k, v = (tensors[f"model.layers.{i}.self_attn.{n}_proj.weight"] for n in "qkv")   # 3 x (C, C)
        params[f"blocks.{i}.attn.qkv"] = np.concatenate([q.T, k.T, v.T], axis=1).astype(np.float32)  # (C, 3C)
    params = {k: params[k] for k in gn.param_shapes(cfg)}        # our canonical order
    for k, shape in gn.param_shapes(cfg).items():
        if params[k].shape != shape:
            raise InteropError(f"weight for {k} has shape {params[k].shape}, config.json implies {shape}")
    return params


# ----------------------------------------------------------------------------------------------------
# Config: GPTConfig <-> config.json of a LlamaForCausalLM.

def hf_config(cfg, bos_id=None, eos_id=None):
    """config.json for LlamaForCausalLM. Written for both transformers 4.x (torch_dtype, rope_theta,
    rope_scaling) and 5.x (dtype, rope_parameters); each version ignores the other's keys."""
    if cfg.norm != "rmsnorm":
        raise InteropError(f"only RMSNorm models map to Hugging Face's Llama; this model uses "
                           f"norm={cfg.norm!r} (LayerNorm has a bias and subtracts the mean)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,          # plain multi-head attention
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def config_from_hf(hf, max_seq_len=None):
    """config.json (a dict) -> GPTConfig, refusing every feature our model does not have.

    max_seq_len: the context length to use here instead of max_position_embeddings (generation allocates
    its KV cache at full length, and some models say 131072).
    """
    def need(field, ok, why):
        if not ok:
            raise InteropError(f"config.json: {field} = {json.dumps(hf.get(field))} is not supported: {why}")

    need("model_type", hf.get("model_type") == "llama", "only Llama-architecture models import")
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(f), int):
            raise InteropError(f"config.json: {f} is missing or not an integer")
    nh = hf["num_attention_heads"]
    C = hf["hidden_size"]
    need("num_key_value_heads", hf.get("num_key_value_heads") in (None, nh),
         f"grouped-query attention (num_key_value_heads != num_attention_heads = {nh})")
    need("head_dim", hf.get("head_dim") in (None, C // nh), "head_dim must be hidden_size / num_attention_heads")
    need("attention_bias", not hf.get("attention_bias", False), "our attention has no biases")
    need("mlp_bias", not hf.get("mlp_bias", False), "our feed-forward has no biases")
    need("hidden_act", hf.get("hidden_act", "silu") in ("silu", "swish"), "SwiGLU here uses SiLU")
    # RoPE: transformers 4.x writes rope_theta + rope_scaling, 5.x writes rope_parameters
    theta = hf.get("rope_theta", 10000.0)
    rs = hf.get("rope_scaling")
    need("rope_scaling", rs is None or isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default",
         "scaled RoPE (llama3, linear, dynamic, yarn...) is not implemented here")
    rp = hf.get("rope_parameters")
    if rp is not None:
        need("rope_parameters", isinstance(rp, dict) and rp.get("rope_type", "default") == "default"
             and rp.get("partial_rotary_factor", 1.0) == 1.0,
             "only default RoPE on the whole head (no scaling, no per-layer RoPE) is implemented here")
        theta = rp.get("rope_theta", theta)
    try:
        return gn.GPTConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=nh, d_model=C,
            d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048) if max_seq_len is None else max_seq_len,
            norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))   # LlamaConfig's default
    except ValueError as e:
        raise InteropError(f"config.json: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Reading safetensors files, bfloat16 included.
# subtle: safetensors 0.8's NumPy API (load_file, safe_open(framework="numpy").get_tensor) raises
# "data type 'bfloat16' not understood" because NumPy has no bfloat16. safetensors.deserialize(bytes)
# still parses the file and hands back each tensor's raw bytes and dtype name, so only the bf16 -> f32
# widening is ours: a bfloat16 is the top 16 bits of a float32, so shift left by 16 and reinterpret.

def bf16_to_f32(raw, shape):
    """Little-endian bfloat16 bytes -> float32 array, exactly. Example: b'\\x80\\x3f' -> [1.0]."""
    u16 = np.frombuffer(raw, dtype="<u2")
    return (u16.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def read_safetensors(path):
    """{name: float32 array} from one .safetensors file (F32, F16, BF16 or F64 tensors)."""
    try:
        with safe_open(path, framework="numpy") as f:
            has_bf16 = any(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
        if not has_bf16:
            return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(path).items()}
        out = {}
        for name, t in deserialize(Path(path).read_bytes()):      # [(name, {dtype, shape, data})]
            if t["dtype"] == "BF16":
                out[name] = bf16_to_f32(t["data"], t["shape"])
            elif t["dtype"] in ("F16", "F32", "F64"):
                dt = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[t["dtype"]]
                out[name] = np.frombuffer(t["data"], dtype=dt).astype(np.float32).reshape(t["shape"])
            else:
                raise InteropError(f"{path}: tensor {name} has dtype {t['dtype']}, expected a float type")
        return out
    except SafetensorError as e:
        raise InteropError(f"{path}: not a readable safetensors file ({e})") from None


def read_hf_weights(d):
    """All tensors of a Hugging Face directory: model.safetensors, or the shards its index names."""
    d = Path(d)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise InteropError(f"{index}: no weight_map")
        tensors = {}
        for s in shards:
            if not (d / s).exists():
                raise InteropError(f"{index} names shard {s}, which is not in {d}")
            tensors.update(read_safetensors(d / s))
        return tensors
    if (d / "pytorch_model.bin").exists() or (d / "pytorch_model.bin.index.json").exists():
        raise InteropError(f"{d} has only pytorch_model.bin weights: re-save them as safetensors "
                           f"(model.save_pretrained(dir, safe_serialization=True)) and import that")
    raise InteropError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InteropError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}: invalid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------
# The two directions.

def export_hf(params, cfg, tok, out_dir):
    """Write a Hugging Face LlamaForCausalLM directory: config.json, generation_config.json,
    model.safetensors and, if tok is not None, tokenizer.json and tokenizer_config.json."""
    bos, eos, _ = special_roles(tok)
    config = hf_config(cfg, *(tok.special_tokens[t] if t else None for t in (bos, eos)))  # refuses LayerNorm
    tensors = to_hf_tensors(params, cfg)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise InteropError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers refuses a safetensors file whose metadata lacks format=pt ("save with save_pretrained")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", config)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}   # generate() stops at eos
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tok is not None:
        write_tokenizer_files(tok, cfg, out)
    return out


def import_hf(hf_dir, max_seq_len=None):
    """A local Hugging Face Llama directory -> (params, cfg, tok). tok is None if there is no
    tokenizer.json. max_seq_len: the context length (default: the config's max_position_embeddings)."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise InteropError(f"{d} is not a directory")
    cfg = config_from_hf(read_json(d / "config.json"), max_seq_len)
    params = from_hf_tensors(read_hf_weights(d), cfg)
    tok = tokenizer_from_hf(read_json(d / "tokenizer.json")) if (d / "tokenizer.json").exists() else None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise InteropError(f"tokenizer.json has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    return params, cfg, tok


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Tokenizers. bpe.py writes its own tokenizer.json (Tokenizer.to_hf_json); train.py's character
# tokenizer becomes a WordLevel model over single characters. On export we add the tokenizer_config.json
# that AutoTokenizer reads; on import we check that a tokenizer.json is one of those two kinds.

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|bos|>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|eos|>", "<|endoftext|>")
UNK_NAMES = ("<unk>", "<|unk|>")
ANY_CHAR = r"[\s\S]"             # the split regex of a character tokenizer: every code point alone


def special_roles(tok):
    """(bos, eos, unk) special-token strings of tok, None where it has none.
    Example: special_tokens {'<|endoftext|>': 512} -> ('<|endoftext|>', '<|endoftext|>', None)."""
    sp = tok.special_tokens if tok is not None else {}
    return tuple(next((n for n in names if n in sp), None) for names in (BOS_NAMES, EOS_NAMES, UNK_NAMES))


def hf_tokenizer_json(tok):
    """tokenizer.json (a dict) for a bpe.Tokenizer or for train.py's CharTokenizer."""
    if hasattr(tok, "to_hf_json"):
        return tok.to_hf_json()
    if hasattr(tok, "chars"):
        # one id per character in code point order; an unknown character fails to encode in both
        # libraries (unk_token names no token in the vocab), and Fuse joins the pieces back without spaces
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": {"type": "Split", "pattern": {"Regex": ANY_CHAR}, "behavior": "Isolated",
                                  "invert": False},
                "post_processor": None, "decoder": {"type": "Fuse"},
                "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tok.chars)},
                          "unk_token": "<unk>"}}
    raise InteropError(f"cannot export a tokenizer of type {type(tok).__name__}")


def write_tokenizer_files(tok, cfg, out):
    """tokenizer.json and tokenizer_config.json (AutoTokenizer -> PreTrainedTokenizerFast)."""
    write_json(out / "tokenizer.json", hf_tokenizer_json(tok))
    bos, eos, unk = special_roles(tok)
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
          "clean_up_tokenization_spaces": False}     # True would rewrite " ." as "." when decoding
    tc.update({k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)) if v})
    write_json(out / "tokenizer_config.json", tc)


def tokenizer_from_hf(obj):
    """tokenizer.json (a dict) -> a bpe.Tokenizer (byte-level BPE) or train.py's CharTokenizer."""
    model = obj.get("model") or {}
    if model.get("type") == "WordLevel":
        return char_tokenizer_from_hf(obj)
    if model.get("type") != "BPE":
        raise InteropError(f"tokenizer.json: model.type = {model.get('type')!r} is not supported: "
                           f"only byte-level BPE tokenizers import")
    return bpe_tokenizer_from_hf(obj)


def bpe_pattern_from_hf(pre):
    """The split regex of a byte-level pre_tokenizer: ByteLevel(use_regex=true) alone is GPT-2's;
    Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)] is the Split's (bpe.py's, GPT-4's)."""
    def bad(why):
        raise InteropError(f"tokenizer.json: pre_tokenizer is not supported: {why}")

    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    last = steps[-1] if steps else None
    if not last or last.get("type") != "ByteLevel":
        bad("not byte-level BPE (the last pre-tokenizer must be ByteLevel)")
    if last.get("add_prefix_space", False):
        bad("add_prefix_space is true (our tokenizer does not insert a leading space)")
    if len(steps) == 1:
        if not last.get("use_regex", True):
            bad("ByteLevel with use_regex false and no Split before it")
        return bpe.GPT2_PATTERN          # the possessive form of ByteLevel's regex: the same chunks
    split = steps[0]
    if (len(steps) != 2 or split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {})
            or split.get("behavior") != "Isolated" or split.get("invert", False) or last.get("use_regex", True)):
        bad("only Split(Regex, Isolated) then ByteLevel(use_regex=false) is understood")
    # bpe.py rewrites GPT-4's possessive "\p{N}{1,3}+" for Oniguruma (which reads it otherwise): map its
    # own spellings back, so that an export round trip gives the same tok.pattern
    for pattern in bpe.PATTERNS.values():
        if split == bpe.Tokenizer(pattern, []).to_hf_json()["pre_tokenizer"]["pretokenizers"][0]:
            return pattern
    return split["pattern"]["Regex"]


def bpe_tokenizer_from_hf(obj):
    """A byte-level BPE tokenizer.json -> bpe.Tokenizer(pattern, merges, specials, byte_ids), whose layout
    it must have (GPT-2's): the 256 byte tokens are ids 0..255 in any order, merge i makes id 256 + i,
    the special tokens come after. Example: vocab {'Ġthe': 262}, merges ['Ġt he'] -> token 262 = b' the'.
    subtle: bpe.py merges by rank like tiktoken (and skips the merges when a chunk is a whole token,
    like ignore_merges); for merges in id order, as BPE training writes them, that is the same result."""
    model = obj["model"]

    def need(field, ok, why):
        if not ok:
            raise InteropError(f"tokenizer.json: {field} is not supported: {why}")

    need("normalizer", obj.get("normalizer") is None, "byte-level BPE works on the raw text (no normalizer)")
    need("decoder", (obj.get("decoder") or {}).get("type") == "ByteLevel", "byte-level BPE decodes with ByteLevel")
    for f in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        need(f"model.{f}", not model.get(f), "not a plain byte-level BPE")
    need("model.byte_fallback", not model.get("byte_fallback"), "a SentencePiece-style BPE, not byte-level")
    pattern = bpe_pattern_from_hf(obj.get("pre_tokenizer"))
    specials = {t["content"]: t["id"] for t in obj.get("added_tokens", []) if t.get("special")}
    ordinary = {t["content"] for t in obj.get("added_tokens", []) if not t.get("special")}
    # vocab strings spell bytes in GPT-2's printable alphabet (special tokens may be listed in the vocab
    # as well, as GPT-2's <|endoftext|> is; they are not byte strings). bpe.Tokenizer rebuilds each
    # token's bytes from byte_ids and the merges, so the spellings only need to match up here.
    b2u = bpe.bytes_to_unicode()
    alphabet = set(b2u.values())
    vocab = {s: i for s, i in model.get("vocab", {}).items() if i not in specials.values()}
    need("model.vocab", all(c in alphabet for s in vocab for c in s), "not in the byte-level alphabet")
    need("added_tokens", ordinary <= vocab.keys(), f"non-special added tokens {sorted(ordinary - vocab.keys())[:3]}")
    byte_ids = [vocab.get(b2u[b]) for b in range(256)]
    need("model.vocab", sorted(i for i in byte_ids if i is not None) == list(range(256)),
         "bpe.py needs the 256 single-byte tokens at ids 0..255")
    merges = []
    for n, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ") if isinstance(m, str) else m   # "a b" (older files) or ["a", "b"]
        if a not in vocab or b not in vocab or vocab.get(a + b) != 256 + n:
            raise InteropError(f"tokenizer.json: model.merges is not supported: merge {n} ({a!r}, {b!r}) "
                               f"must make id {256 + n} (bpe.py's layout: merge i is token 256 + i)")
        merges.append((vocab[a], vocab[b]))
    need("model.vocab", len(vocab) == 256 + len(merges), f"{len(vocab) - 256 - len(merges)} tokens no merge makes")
    try:
        return bpe.Tokenizer(pattern, merges, specials, byte_ids)
    except (ValueError, regex.error) as e:
        raise InteropError(f"tokenizer.json: {e}") from None


def char_tokenizer_from_hf(obj):
    """Our own character tokenizer.json (see hf_tokenizer_json) -> train.py's CharTokenizer."""
    from train import CharTokenizer
    vocab = obj["model"].get("vocab", {})
    chars = "".join(sorted(vocab, key=vocab.get))
    pre = obj.get("pre_tokenizer") or {}
    if (pre.get("type") != "Split" or (pre.get("pattern") or {}).get("Regex") != ANY_CHAR or obj.get("added_tokens")
            or not all(len(c) == 1 for c in vocab) or sorted(vocab.values()) != list(range(len(vocab)))
            or chars != "".join(sorted(chars))):
        raise InteropError("tokenizer.json: model.type = 'WordLevel' is only understood as the character "
                           "tokenizer export.py writes (one id per character, in code point order)")
    return CharTokenizer(chars)


# ----------------------------------------------------------------------------------------------------
# Training checkpoints (checkpoint.py's file, with train.py's metadata) and the command line.

def read_checkpoint(path):
    """(params, cfg, tok) from a training checkpoint (a ckpt.safetensors or its folder), read by
    sample.py's loader: checkpoint.py's file, train.py's model_config and tokenizer metadata."""
    from checkpoint import CheckpointError
    from sample import load_model
    from train import UserError
    try:
        return load_model(path, gn)                 # gpt_numpy as the backend: arrays stay NumPy
    except (CheckpointError, UserError) as e:
        raise InteropError(str(e)) from None


def write_checkpoint(path, params, cfg, tok, source):
    """A checkpoint for sample.py and fine-tuning: step 0, zero AdamW moments, the model config and the
    tokenizer in train.py's metadata layout. path: a .safetensors file, or a folder for ckpt.safetensors."""
    from checkpoint import save_checkpoint
    from train import tokenizer_kind, tokenizer_text
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "ckpt.safetensors"
    text = tokenizer_text(tok)
    meta = {"step": 0, "adam_t": 0, "model_config": cfg.to_dict(), "imported_from": str(source),
            "tokenizer": {"kind": tokenizer_kind(tok), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                          "text": text}}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    save_checkpoint(path, params, zeros, zeros, meta)
    return path


EPILOG = """examples:
  python export.py --ckpt out/stdlib-bpe2048 --out export/stdlib-bpe2048      # -> transformers
  python export.py --import-hf path/to/llama-dir --out out/imported --max-seq-len 1024
  python sample.py --ckpt out/imported --prompt "Once upon a time"

Then, in Python with transformers installed:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("export/stdlib-bpe2048")
  tok = AutoTokenizer.from_pretrained("export/stdlib-bpe2048")
"""


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="export.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Convert between our training checkpoints and Hugging Face Llama directories\n"
                    "(config.json, model.safetensors, tokenizer.json).")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--ckpt", metavar="PATH",
                     help="export this checkpoint (a ckpt.safetensors or its folder) to the folder --out")
    way.add_argument("--import-hf", metavar="DIR",
                     help="import this Hugging Face Llama folder into the checkpoint --out")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="export: the folder to write; import: a .safetensors file or a folder for ckpt.safetensors")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="import: context length to use (default: the model's max_position_embeddings)")
    args = p.parse_args(argv)
    try:
        if args.ckpt:
            if args.max_seq_len is not None:
                raise InteropError("--max-seq-len applies to --import-hf only")
            params, cfg, tok = read_checkpoint(args.ckpt)
            export_hf(params, cfg, tok, args.out)
            print(f"wrote {args.out}: LlamaForCausalLM with {gn.num_params(params):,} parameters"
                  + ("" if tok is not None else " (the checkpoint has no tokenizer: none written)"), file=sys.stderr)
        else:
            params, cfg, tok = import_hf(args.import_hf, args.max_seq_len)
            if tok is None:
                raise InteropError(f"{args.import_hf} has no tokenizer.json, and a checkpoint carries its tokenizer")
            path = write_checkpoint(args.out, params, cfg, tok, args.import_hf)
            print(f"wrote {path}: {gn.num_params(params):,} parameters, context {cfg.max_seq_len}", file=sys.stderr)
    except (ValueError, OSError) as e:              # InteropError is a ValueError
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
