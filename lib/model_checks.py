"""
lib/model_checks.py: the model's input checks. A wrong config, shape, dtype or id raises ValueError with a
message that names it, before any array work (CuPy would wrap a bad index silently). gpt_numpy calls them
by these names: GPTConfig calls check_config; forward, loss_fn, loss_and_grads and forward_cached call
check_ids (and check_targets). check_rope_scaling puts a long-context RoPE scaling (gpt_numpy appendix C)
in the one form the model reads; the Hugging Face import calls it too (lib/hf.py).
"""

import math

import numpy as np

NORMS = ("rmsnorm", "layernorm")


def host(a):
    """a as a NumPy array (a CuPy array is copied from the GPU)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def check_config(cfg):
    """Raise ValueError unless every field of cfg is in range; puts rope_scaling in its one form."""
    for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(cfg.n_kv_head, (int, np.integer)) or isinstance(cfg.n_kv_head, bool) \
            or cfg.n_kv_head < 1 or cfg.n_head % cfg.n_kv_head != 0:
        raise ValueError(f"n_kv_head must be a positive divisor of n_head ({cfg.n_head}), got {cfg.n_kv_head!r}")
    if cfg.d_model % cfg.n_head != 0:
        raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_head ({cfg.n_head})")
    if (cfg.d_model // cfg.n_head) % 2 != 0:
        raise ValueError(f"head size d_model / n_head = {cfg.d_model // cfg.n_head} must be even "
                         f"for RoPE (it rotates pairs of dimensions)")
    if cfg.norm not in NORMS:
        raise ValueError(f"unknown norm {cfg.norm!r}: choose one of {', '.join(NORMS)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not cfg.norm_eps > 0:
        raise ValueError(f"norm_eps must be > 0, got {cfg.norm_eps}")
    if not cfg.rope_theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {cfg.rope_theta}")
    if cfg.rope_scaling is not None:
        cfg.rope_scaling = check_rope_scaling(cfg.rope_scaling)


def check_ids(ids, cfg, what="ids"):
    """Raise ValueError unless ids is a (B, T) integer array with 1 <= T <= max_seq_len and every
    id in [0, vocab_size). Checked on the host: CuPy would wrap a bad index silently."""
    h = host(ids)
    if h.ndim != 2:
        raise ValueError(f"{what} must have shape (B, T), got shape {h.shape}")
    if not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {h.dtype}")
    B, T = h.shape
    if B < 1 or T < 1:
        raise ValueError(f"{what} must not be empty, got shape {h.shape}")
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds max_seq_len {cfg.max_seq_len}: "
                         f"T must be in [1, {cfg.max_seq_len}]")
    lo, hi = int(h.min()), int(h.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} out of range: ids must be in [0, {cfg.vocab_size})")


def check_targets(targets, ids, cfg):
    """Raise ValueError unless targets (ids' shape) are in [0, vocab_size) or -1 (ignored), not all -1."""
    h = host(targets)
    if h.shape != tuple(ids.shape):
        raise ValueError(f"targets shape {h.shape} differs from ids shape {tuple(ids.shape)}")
    if not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"targets must be integers, got dtype {h.dtype}")
    lo, hi = int(h.min()), int(h.max())
    if lo < -1 or hi >= cfg.vocab_size:
        bad = lo if lo < -1 else hi
        raise ValueError(f"target {bad} out of range: targets must be in [0, {cfg.vocab_size}) or -1 (ignored)")
    if hi < 0:
        raise ValueError("every target is -1: the loss needs at least one position to predict")


# The scalings real checkpoints use, with their required fields
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(rs):
    """A rope_scaling dict in the one form the model reads: {"type": name, field: number, ...}. Hugging
    Face's "rope_type" key is read as "type"; a type other than linear or llama3 (dynamic, yarn, longrope...)
    raises ValueError naming it.

    Example: {"rope_type": "linear", "factor": 2} -> {"type": "linear", "factor": 2.0}.
    """
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling must be None or a dict, got {rs!r}")
    kind = rs.get("type", rs.get("rope_type"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r} is not implemented: choose one of {', '.join(ROPE_SCALINGS)}")
    out = {"type": kind}
    for f in ROPE_SCALINGS[kind]:
        v = rs.get(f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ValueError(f"rope_scaling {kind}: {f} must be a positive number, got {v!r}")
        out[f] = int(v) if f == "original_max_position_embeddings" else float(v)
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError("rope_scaling llama3: high_freq_factor must exceed low_freq_factor")
    return out
