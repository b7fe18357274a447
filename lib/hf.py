"""
lib/hf.py: Hugging Face Llama folders, both ways. Export writes our parameters, config and tokenizer as a
folder that `transformers` loads with no code of ours, as a LlamaForCausalLM; import reads a local Llama
folder (config.json, model.safetensors or its shards, tokenizer.json of the byte-level BPE kind) back.

    export_hf(params, cfg, tok, "export/run")            # config.json, generation_config.json,
                                                         # model.safetensors, tokenizer(_config).json
    params, cfg, tok = import_hf("path/to/hf-llama")     # ready for gpt_numpy's forward, loss_and_grads, generate
    chat = hf_chat_info("path/to/hf-llama", tok)         # its chat template, for a checkpoint's metadata

export.py is the command line over this module, lib/peft_adapter.py and lib/gguf_model.py.

Why this is exact: SPEC.md's model is Llama's. RMSNorm, SwiGLU, no biases, and RoPE in the same
half-split convention as Hugging Face's `rotate_half`, with q, k and v heads taken by reshaping the
projection's output to (nh, hs) and (nkv, hs), query head h reading key/value head h // (nh / nkv) as
repeat_kv does. So q_proj.weight is simply W_q transposed (torch's Linear stores (out, in); we store
(in, out)), with no permutation of rows. (Meta's original checkpoints and GGUF files rotate interleaved
pairs instead, and their converters permute the rows of q and k; Hugging Face's files and ours need none
of that. lib/gguf_model.py undoes that permutation for GGUF files.)

The mapping, for block i (ours -> Hugging Face's, `.T` meaning transposed):

    tok_emb                  -> model.embed_tokens.weight                        (V, C), as is
    blocks.i.norm1.weight    -> model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv        -> model.layers.i.self_attn.{q,k,v}_proj.weight     slices (C, C), (C, nkv hs) x 2, .T
    blocks.i.attn.proj       -> model.layers.i.self_attn.o_proj.weight           .T
    blocks.i.norm2.weight    -> model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.w_gate/w_up -> model.layers.i.mlp.gate_proj/up_proj.weight      .T
    blocks.i.ffn.w_down      -> model.layers.i.mlp.down_proj.weight              .T
    norm_f.weight            -> model.norm.weight
    lm_head                  -> lm_head.weight (untied only; tied models leave it out)  .T

What does not map: LayerNorm models (Llama has no LayerNorm, no biases), and on import biases, RoPE
scalings other than linear and llama3, activations other than SiLU and tokenizers other than byte-level
BPE: each is refused with an error naming the field. Grouped-query attention (num_key_value_heads <
num_attention_heads) maps to n_kv_head. Weights are written in float32; bfloat16 and float16 files are
read and widened to float32.

The tokenizer.json itself is lib/tokenizer_files.py's (to_hf_json / from_hf_json); here the
tokenizer_config.json that AutoTokenizer reads beside it. The chat template (tokenizer_config.json's
chat_template, or chat_template.jinja) and the special tokens it uses go into the checkpoint's metadata
("chat", hf_chat_info), for `sample.py --chat` (lib/chat_template.py), and back into tokenizer_config.json
on export.
"""

import json
import math
import os
from pathlib import Path, PurePosixPath

import numpy as np
from safetensors import SafetensorError, deserialize, safe_open
from safetensors.numpy import load_file, save_file

import gpt_numpy as gn
from errors import FileFormatError, UserError
from lib.chat_template import chat_info
from lib.checkpoint import check_finite, check_layer_count, check_param_shapes
from lib.files import file_mode
from lib.memory import LONGEST_CONTEXT
from lib.model_checks import check_rope_scaling
from lib.tokenizer_files import from_hf_json, preview, to_hf_json


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


def to_hf_tensors(params, cfg):
    """Our params -> {Hugging Face name: float32 array in torch's Linear layout (out, in)}.

    Example: blocks.0.attn.qkv (C, 3C) -> model.layers.0.self_attn.q_proj.weight = qkv[:, :C].T (C, C).
    With grouped-query attention k_proj and v_proj are (nkv hs, C).
    """
    try:
        check_param_shapes(params, cfg)
    except ValueError as e:
        raise UserError(f"the parameters do not fit the config: {e}") from None
    host = {k: gn.to_host(v) for k, v in params.items()}
    out = {}
    for ours, theirs, transposed in name_pairs(cfg):
        w = host[ours].T if transposed else host[ours]
        out[theirs] = np.ascontiguousarray(w, dtype=np.float32)   # safetensors needs contiguous data
    for i in range(cfg.n_layer):
        qkv = host[f"blocks.{i}.attn.qkv"]                        # (C, (nh + 2 nkv) hs): q, k, v along the last axis
        for n, cols in zip("qkv", qkv_columns(cfg)):
            # heads are the (nh, hs) / (nkv, hs) reshape of each slice in both libraries: no permutation
            out[f"model.layers.{i}.self_attn.{n}_proj.weight"] = np.ascontiguousarray(
                qkv[:, cols].T, dtype=np.float32)                 # (out, in)
    return out


def qkv_columns(cfg):
    """The column slices of q, k and v in attn.qkv: C, then nkv * hs and nkv * hs.
    Example: C = 576, 3 key/value heads of 64 -> slice(0, 576), slice(576, 768), slice(768, 960)."""
    C, kv = cfg.d_model, cfg.n_kv_head * cfg.head_size
    return slice(0, C), slice(C, C + kv), slice(C + kv, C + 2 * kv)


def from_hf_tensors(tensors, cfg, source="the weights"):
    """{Hugging Face name: array} -> our params (float32, (in, out)). The inverse of to_hf_tensors.
    source: the folder, for the messages."""
    check_layer_count(cfg.n_layer, tensors, r"model\.layers\.(\d+)\.", source, "config.json's num_hidden_layers")
    expected = {h for _, h, _ in name_pairs(cfg)}
    expected |= {f"model.layers.{i}.self_attn.{n}_proj.weight" for i in range(cfg.n_layer) for n in "qkv"}
    # tied models may still carry a copy of the head; old checkpoints carry RoPE's inv_freq buffers
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(expected - tensors.keys())
    extra = sorted(k for k in tensors.keys() - expected - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise FileFormatError(f"weights missing from {source}: {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if extra:
        raise FileFormatError(f"{source}: unexpected weights (not a plain Llama, e.g. biases?): {', '.join(extra[:3])}"
                           + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    params = {}
    for ours, theirs, transposed in name_pairs(cfg):
        w = tensors[theirs]
        params[ours] = np.ascontiguousarray(w.T if transposed else w, dtype=np.float32)
    for i in range(cfg.n_layer):
        q, k, v = (tensors[f"model.layers.{i}.self_attn.{n}_proj.weight"] for n in "qkv")   # (C, C), 2 x (nkv hs, C)
        if q.ndim != 2 or k.shape != v.shape or k.ndim != 2 or q.shape[1] != k.shape[1]:
            raise FileFormatError(f"{source}: layer {i}: q, k, v projections of shapes {q.shape}, {k.shape}, {v.shape} "
                                  f"do not stack into one qkv matrix")
        params[f"blocks.{i}.attn.qkv"] = np.concatenate([q.T, k.T, v.T], axis=1).astype(np.float32)  # (C, (nh+2nkv)hs)
    try:
        check_param_shapes(params, cfg)
    except ValueError as e:
        raise FileFormatError(f"{source}: the weights do not fit config.json: {e}") from None
    return {k: params[k] for k in gn.param_shapes(cfg)}        # our canonical order


# ----------------------------------------------------------------------------------------------------
# Config: GPTConfig <-> config.json of a LlamaForCausalLM.

def hf_config(cfg, bos_id=None, eos_id=None):
    """config.json for LlamaForCausalLM. Written for both transformers 4.x (torch_dtype, rope_theta,
    rope_scaling) and 5.x (dtype, rope_parameters); each version ignores the other's keys."""
    if cfg.norm != "rmsnorm":
        raise UserError(f"only RMSNorm models map to Hugging Face's Llama; this model uses "
                           f"norm={cfg.norm!r} (LayerNorm has a bias and subtracts the mean)")
    for name in ("rope_theta", "norm_eps"):
        if not math.isfinite(getattr(cfg, name)):
            raise UserError(f"the model config's {name} is {getattr(cfg, name)}, not a finite number: it cannot be "
                            f"written to config.json (a damaged checkpoint?)")
    rs = cfg.rope_scaling and {("rope_type" if k == "type" else k): v for k, v in cfg.rope_scaling.items()}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,       # = num_attention_heads: plain multi-head attention
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rs or None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rs or {})},
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


def config_from_hf(hf, max_seq_len=None, name="config.json"):
    """config.json (the parsed JSON) -> GPTConfig, refusing every feature our model does not have, and
    every field of the wrong JSON type (a string "false" is not false, 2.5 layers are not 2).

    max_seq_len: the context length to use here instead of max_position_embeddings (e.g. to fine-tune
    on shorter blocks; generation sizes its KV cache to the text, not to this). name: the file, for the
    messages.
    """
    def need(field, ok, why):
        if not ok:
            raise FileFormatError(f"{name}: {field} = {preview(hf.get(field))} is not supported: {why}")

    def typed(field, ok, what, default):
        v = hf.get(field, default)
        if v is None and default is None:
            raise FileFormatError(f"{name}: {field} is missing (it must be {what})")
        if not ok(v):
            raise FileFormatError(f"{name}: {field} must be {what}, got {preview(v)}")
        return v

    count = lambda field, default=None: typed(field, is_count, "a positive integer", default)   # noqa: E731
    number = lambda field, default: typed(field, is_number, "a positive finite number", default)   # noqa: E731
    flag = lambda field, default: typed(field, lambda v: isinstance(v, bool), "true or false", default)   # noqa: E731

    if not isinstance(hf, dict):
        raise FileFormatError(f"{name} must hold a JSON object, got {preview(hf)}")
    need("model_type", hf.get("model_type") == "llama", "only Llama-architecture models import")
    C, F, L, nh, V = (count(f) for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "vocab_size"))
    nkv = count("num_key_value_heads", None) if hf.get("num_key_value_heads") is not None else nh
    need("num_key_value_heads", nh % nkv == 0, f"it must divide num_attention_heads = {nh}")
    need("head_dim", hf.get("head_dim") in (None, C // nh), "head_dim must be hidden_size / num_attention_heads")
    need("attention_bias", not flag("attention_bias", False), "our attention has no biases")
    need("mlp_bias", not flag("mlp_bias", False), "our feed-forward has no biases")
    need("hidden_act", hf.get("hidden_act", "silu") in ("silu", "swish"), "SwiGLU here uses SiLU")
    # RoPE: transformers 4.x writes rope_theta + rope_scaling, 5.x writes rope_parameters (theta and
    # scaling in one dict); the scaling types gpt_numpy implements are linear and llama3
    theta, scaling = number("rope_theta", 10000.0), None
    for field in ("rope_scaling", "rope_parameters"):
        rs = hf.get(field)
        if rs is None:
            continue
        need(field, isinstance(rs, dict) and rs.get("partial_rotary_factor", 1.0) == 1.0,
             "RoPE must turn the whole head (no partial_rotary_factor, no per-layer RoPE)")
        theta = rs.get("rope_theta", theta)
        need(field, is_number(theta), "its rope_theta must be a positive finite number")
        kind = rs.get("rope_type", rs.get("type", "default"))
        need(field, isinstance(kind, str), "its rope_type must be a string")
        if kind != "default":
            try:
                scaling = check_rope_scaling({**rs, "type": kind})
            except ValueError as e:
                need(field, False, str(e))
    if max_seq_len is None:
        max_seq_len = count("max_position_embeddings", 2048)
        need("max_position_embeddings", max_seq_len <= LONGEST_CONTEXT,
             f"beyond any context this code runs (at most {LONGEST_CONTEXT:,}); import with a shorter "
             f"--block-size")
    try:
        return gn.GPTConfig(
            vocab_size=V, n_layer=L, n_head=nh, n_kv_head=nkv, d_model=C, d_ff=F, max_seq_len=max_seq_len,
            norm="rmsnorm", norm_eps=float(number("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=scaling, tie_embeddings=flag("tie_word_embeddings", False))   # LlamaConfig's default
    except ValueError as e:
        raise FileFormatError(f"{name}: {e}") from None


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


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
    """{name: float32 array} from one .safetensors file (F32, F16, BF16 or F64 tensors), each finite."""
    check_regular_file(path)
    try:
        with safe_open(path, framework="numpy") as f:
            has_bf16 = any(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
        if not has_bf16:
            out = {k: np.asarray(v, dtype=np.float32) for k, v in load_file(path).items()}
        else:
            out = {}
            for name, t in deserialize(Path(path).read_bytes()):      # [(name, {dtype, shape, data})]
                if t["dtype"] == "BF16":
                    out[name] = bf16_to_f32(t["data"], t["shape"])
                elif t["dtype"] in ("F16", "F32", "F64"):
                    dt = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[t["dtype"]]
                    out[name] = np.frombuffer(t["data"], dtype=dt).astype(np.float32).reshape(t["shape"])
                else:
                    raise FileFormatError(f"{path}: tensor {name} has dtype {t['dtype']}, expected a float type")
    except SafetensorError as e:
        raise FileFormatError(f"{path}: not a readable safetensors file ({e})") from None
    for name, a in out.items():         # what every loader refuses (a float64 1e300 is inf in float32 too)
        check_finite(a, name, path, "it was not imported")
    return out


def read_hf_weights(d):
    """All tensors of a Hugging Face directory: model.safetensors, or the shards its index names (each a
    plain file name or a path below the folder, never outside it)."""
    d = Path(d)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        data = read_json(index)
        if not isinstance(data, dict):
            raise FileFormatError(f"{index} must hold a JSON object, got {preview(data)}")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FileFormatError(f"{index}: weight_map must be a non-empty object {{tensor: shard file}}, got "
                                  f"{preview(weight_map)}")
        bad = next((f for f in weight_map.values() if not is_inside_name(f)), None)
        if bad is not None:
            raise FileFormatError(f"{index}: weight_map names the shard {preview(bad)}, which is not a file name "
                                  f"inside {d}")
        tensors = {}
        for s in sorted(set(weight_map.values())):
            if not (d / s).exists():
                raise FileFormatError(f"{index} names shard {s}, which is not in {d}")
            tensors.update(read_safetensors(d / s))
        return tensors
    if (d / "pytorch_model.bin").exists() or (d / "pytorch_model.bin.index.json").exists():
        raise FileFormatError(f"{d} has only pytorch_model.bin weights: re-save them as safetensors "
                           f"(model.save_pretrained(dir, safe_serialization=True)) and import that")
    raise FileFormatError(f"{d}: no model.safetensors or model.safetensors.index.json")


def is_inside_name(name):
    """A shard name that stays inside its folder: a relative path without '..' ("model-00001-of-00002.
    safetensors", "weights/part1.safetensors"), not "/etc/passwd" or "../other/x.safetensors"."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and p.name not in ("", ".")


# The largest JSON or template file of a Hugging Face folder that is read (tokenizer.json of a 256k
# vocabulary is about 35 MB); larger, or a name that is not a regular file (a FIFO, /dev/zero), is refused
# before anything is read.
TEXT_LIMIT = 256 << 20


def check_regular_file(path):
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path} not found")
    if not path.is_file():
        raise FileFormatError(f"{path} is not a regular file (a device, a FIFO or a folder); it was not read")


def read_text(path, limit=None):
    """A UTF-8 text file of a Hugging Face folder, read whole up to `limit` bytes (default TEXT_LIMIT);
    FileFormatError naming the file for one that is not a regular file, larger, or not UTF-8."""
    limit = TEXT_LIMIT if limit is None else limit
    check_regular_file(path)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileFormatError(f"{path} is larger than {limit >> 20} MiB, more than any such file holds; it was not read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not UTF-8 text ({e})") from None


def read_json(path, limit=None):
    """The parsed JSON of a file of a Hugging Face folder (read_text's limits); FileFormatError naming the
    file for one that is not JSON or is nested too deeply to parse."""
    text = read_text(path, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:                              # e.g. 10^5 nested [
        raise FileFormatError(f"{path}: not usable JSON (nested too deeply)") from None


# ----------------------------------------------------------------------------------------------------
# The two directions.

def export_hf(params, cfg, tok, out_dir, chat=None):
    """Write a Hugging Face LlamaForCausalLM directory: config.json, generation_config.json,
    model.safetensors and, if tok is not None, tokenizer.json and tokenizer_config.json. chat: the
    checkpoint's chat metadata (chat_template.chat_info's dict) for an imported or fine-tuned chat model:
    its template, BOS/EOS and stop ids go into the files transformers reads."""
    bos, eos, _ = special_roles(tok, chat)
    config = hf_config(cfg, *(tok.special_tokens[t] if t else None for t in (bos, eos)))  # refuses LayerNorm
    tensors = to_hf_tensors(params, cfg)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers refuses a safetensors file whose metadata lacks format=pt ("save with save_pretrained")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", file_mode())    # safetensors creates it 0600; the rest are 0644
    write_json(out / "config.json", config)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}   # generate() stops at eos
    if chat and len(chat.get("stop_ids") or []) > 1:
        gen["eos_token_id"] = list(chat["stop_ids"])   # a chat model stops at its end of turn too
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tok is not None:
        write_tokenizer_files(tok, cfg, out, chat)
    return out


def import_hf(hf_dir, max_seq_len=None):
    """A local Hugging Face Llama directory -> (params, cfg, tok). tok is None if there is no
    tokenizer.json. max_seq_len: the context length (default: the config's max_position_embeddings)."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise UserError(f"{d} is not a directory")
    cfg = config_from_hf(read_json(d / "config.json"), max_seq_len, name=d / "config.json")
    params = from_hf_tensors(read_hf_weights(d), cfg, d)
    tok = None
    if (d / "tokenizer.json").exists():
        tok = from_hf_json(read_json(d / "tokenizer.json"), d / "tokenizer.json")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise FileFormatError(f"tokenizer.json has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    return params, cfg, tok


def write_json(path, obj):
    """obj as strict JSON (no NaN or Infinity, which no JSON reader accepts): UserError naming the file."""
    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise UserError(f"{path} cannot be written: {e} (a damaged model config?)") from None
    Path(path).write_text(text + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Tokenizers: tokenizer.json is lib/tokenizer_files.py's (to_hf_json / from_hf_json); here the
# tokenizer_config.json that AutoTokenizer reads beside it, and the chat template an imported model brings.

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|bos|>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|eos|>", "<|endoftext|>")
UNK_NAMES = ("<unk>", "<|unk|>")


def special_roles(tok, chat=None):
    """(bos, eos, unk) special-token strings of tok, None where it has none: the ones the chat metadata
    names (an imported model's own), else the first of the usual names that tok has.
    Example: special_tokens {'<|endoftext|>': 512} -> ('<|endoftext|>', '<|endoftext|>', None)."""
    sp = tok.special_tokens if tok is not None else {}
    found = [next((n for n in names if n in sp), None) for names in (BOS_NAMES, EOS_NAMES, UNK_NAMES)]
    for i, key in enumerate(("bos_token", "eos_token")):
        if chat and chat.get(key) in sp:
            found[i] = chat[key]
    return tuple(found)


def write_tokenizer_files(tok, cfg, out, chat=None):
    """tokenizer.json and tokenizer_config.json (AutoTokenizer -> PreTrainedTokenizerFast), with the chat
    template and add_bos_token of a chat model."""
    write_json(out / "tokenizer.json", to_hf_json(tok))
    bos, eos, unk = special_roles(tok, chat)
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
          "clean_up_tokenization_spaces": False}     # True would rewrite " ." as "." when decoding
    tc.update({k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)) if v})
    if chat and chat.get("template"):
        tc.update(chat_template=chat["template"], add_bos_token=bool(chat.get("add_bos")))
    write_json(out / "tokenizer_config.json", tc)


def hf_chat_info(hf_dir, tok):
    """chat_template.chat_info for a Hugging Face directory: tokenizer_config.json's chat_template (or the
    newer chat_template.jinja beside it) and its bos/eos tokens; template None where there is none.
    FileFormatError naming the file and key for a field of the wrong type."""
    d = Path(hf_dir)
    path = d / "tokenizer_config.json"
    conf = read_json(path) if path.exists() else {}
    if not isinstance(conf, dict):
        raise FileFormatError(f"{path} must hold a JSON object, got {preview(conf)}")

    def bad(key, what):
        raise FileFormatError(f"{path}: {key} must be {what}, got {preview(conf.get(key))}")

    template = conf.get("chat_template")
    if isinstance(template, list):                  # named templates: [{"name": "default", "template": ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            bad("chat_template", 'a string or a list of {"name", "template"} strings')
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    elif template is not None and not isinstance(template, str):
        bad("chat_template", 'a string or a list of {"name", "template"} strings')
    if (d / "chat_template.jinja").exists():
        template = read_text(d / "chat_template.jinja")

    def token(key):
        t = conf.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        if t is not None and not isinstance(t, str):
            bad(key, 'a token string or {"content": string}')
        return tok.special_tokens.get(t) if t else None

    add_bos = conf.get("add_bos_token", False)
    if not isinstance(add_bos, bool):
        bad("add_bos_token", "true or false")
    return chat_info(template, tok, bos_id=token("bos_token"), eos_id=token("eos_token"), add_bos=add_bos)
