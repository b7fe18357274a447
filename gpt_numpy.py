"""
gpt_numpy.py: a Llama-style transformer language model in NumPy, with every gradient written by hand.

What this is: one file you can read top to bottom. The main text is the model in its textbook form:
token embedding, RMSNorm or LayerNorm, RoPE, causal multi-head attention (grouped-query attention when
there are fewer key/value heads than query heads), a SwiGLU feed-forward, the LM head and softmax
cross-entropy, each forward with its backward right beside it; then the block and the model, gradient
checkpointing, AdamW, and the forward with a KV cache that generation runs. Appendices follow, add-ons
the main text calls by name: (A) LoRA adapters; (B) faster forms (blocked attention, the flat embedding
backward, the in-place AdamW) and the table of which one replaces which textbook form, and when; (C)
scaled RoPE for long contexts. Other add-ons are their own modules in lib/: the input checks the main
text calls (model_checks.py), the KV-cache forward's inference block that appendix B swaps in
(inference.py), sampling and the generation loop, LoRA's bookkeeping, the loss scaler of mixed precision.
The contract (parameter names, shapes, conventions) is docs/SPEC.md.

What it deliberately is not: no autograd, no framework, no classes where a function will do. The only
state is the parameter dict, the optimizer-state dict and the KV cache.

References: Llama (Touvron et al. 2023), RoFormer / RoPE (Su et al. 2021), GLU variants / SwiGLU
(Shazeer 2020), RMSNorm (Zhang & Sennrich 2019), grouped-query attention (Ainslie et al. 2023), AdamW
(Loshchilov & Hutter 2019), gradient checkpointing (Chen et al. 2016), LoRA (Hu et al. 2021), RoPE
position interpolation (Chen et al. 2023) and Llama 3.1's frequency scaling (Meta, 2024).

Legend: B batch, T time, C d_model, nh heads, nkv key/value heads, g = nh / nkv query heads per key/value
head, hs head size (C // nh), F d_ff, V vocab, L layers, r LoRA rank.
Convention: weights multiply from the right, y = x @ W with W shaped (in, out).
"""

from dataclasses import dataclass, asdict, replace
import functools
import math
import sys
from typing import NamedTuple

import numpy as np

from lib import inference                                # the inference block (appendix B swaps it in)
from lib.model_checks import check_config, check_ids, check_targets   # the input checks

# ----------------------------------------------------------------------------------------------------
# The backend switch. `xp` is the array namespace every function below uses: NumPy here; gpt_cupy.py
# loads this same file as a second module and sets `xp` to CuPy. Nothing else knows which one runs.

xp = np


def set_backend(module):
    """Make every function in this module compute with `module` (numpy or cupy)."""
    global xp
    xp = module
    causal_mask.cache_clear()                           # it holds arrays of the old backend


def to_device(a):
    """Host (NumPy) array -> array of the current backend. A no-op on NumPy."""
    return xp.asarray(a)


def to_host(a):
    """Backend array -> NumPy array (copies from the GPU on CuPy; synchronizes)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


# The swap rule: every function here calls the others by their module-global name, so rebinding a name
# (use_forms, appendix B) replaces that function for every caller. The main text is the textbook form of
# each; two tables swap in others:
#   FAST_FORMS (appendix B): attention_forward / attention_backward (blocked, from T >= 2 * ATT_BLOCK),
#       block_forward (with a KV cache, for inference: lib/inference.block_forward_cached),
#       embedding_backward (flat indices), adamw_step (in place)
#   gpt_cupy.py, on the GPU: embedding_backward always (a deterministic kernel: CuPy's add.at adds
#       atomically, in no fixed order), adamw_step with use_fused_kernels (train.py --fused-kernels)

# ----------------------------------------------------------------------------------------------------
# Config

@dataclass
class GPTConfig:
    vocab_size: int = 65          # V: number of token ids, e.g. 65 (characters) or 50304 (GPT-2 BPE)
    n_layer: int = 4              # L: transformer blocks, e.g. 4 .. 12
    n_head: int = 4               # nh: attention heads; head size hs = d_model // n_head must be even
    n_kv_head: int = None         # nkv: key/value heads, a divisor of n_head, e.g. 3 of 9 (grouped-query
                                  # attention); None: n_head (plain multi-head attention)
    d_model: int = 128            # C: width of the residual stream, e.g. 128 .. 768
    d_ff: int = 344               # F: SwiGLU hidden width, typically about 8/3 * d_model
    max_seq_len: int = 64         # longest sequence the model takes, e.g. 64 .. 1024
    norm: str = "rmsnorm"         # "rmsnorm" (Llama) or "layernorm" (GPT-2)
    norm_eps: float = 1e-5        # epsilon inside the norm's square root
    rope_theta: float = 10000.0   # RoPE base; inv_freq[j] = theta^(-2j/hs)
    rope_scaling: dict = None     # None, or a long-context scaling of RoPE: {"type": "linear", "factor": 4.0}
                                  # or {"type": "llama3", ...} (appendix C)
    tie_embeddings: bool = True   # LM head is tok_emb.T (True) or its own (C, V) matrix (False)
    dropout: float = 0.0          # dropout rate during training, e.g. 0.0 .. 0.2
    checkpoint: bool = False      # gradient checkpointing: recompute each block in the backward pass

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head                # plain multi-head attention
        check_config(self)                              # every field in range (lib/model_checks.py)

    @property
    def head_size(self):
        return self.d_model // self.n_head

    @property
    def qkv_size(self):
        """Width of attn.qkv's output: nh query heads, then nkv key and nkv value heads, each hs wide."""
        return (self.n_head + 2 * self.n_kv_head) * self.head_size

    def to_dict(self):
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Parameters

def param_shapes(cfg):
    """The weights table of SPEC.md: {name: shape}, in a fixed order."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    ln = cfg.norm == "layernorm"
    shapes = {"tok_emb": (V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        shapes[p + "norm1.weight"] = (C,)
        if ln:
            shapes[p + "norm1.bias"] = (C,)
        shapes[p + "attn.qkv"] = (C, cfg.qkv_size)          # (C, 3C) unless grouped-query
        shapes[p + "attn.proj"] = (C, C)
        shapes[p + "norm2.weight"] = (C,)
        if ln:
            shapes[p + "norm2.bias"] = (C,)
        shapes[p + "ffn.w_gate"] = (C, F)
        shapes[p + "ffn.w_up"] = (C, F)
        shapes[p + "ffn.w_down"] = (F, C)
    shapes["norm_f.weight"] = (C,)
    if ln:
        shapes["norm_f.bias"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (C, V)
    return shapes


def init_params(cfg, seed=0, dtype=np.float32):
    """Fresh weights: normal(0, 0.02) matrices, residual outputs scaled by 1/sqrt(2L), norms 1 and 0.

    The random numbers come from a host (NumPy) generator in float64, so CPU and GPU runs, and float32
    and float64 runs, start from the same weights.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".weight"):                    # norm gains
            w = np.ones(shape)
        elif name.endswith(".bias"):                    # layernorm shifts
            w = np.zeros(shape)
        elif name.endswith(("attn.proj", "ffn.w_down")):  # residual branch outputs (GPT-2's scaling)
            w = rng.normal(0.0, 0.02 / math.sqrt(2 * cfg.n_layer), shape)
        else:                                           # tok_emb, qkv, w_gate, w_up, lm_head
            w = rng.normal(0.0, 0.02, shape)
        params[name] = to_device(w.astype(dtype))
    return params


def num_params(params):
    return sum(int(p.size) for p in params.values())


# ----------------------------------------------------------------------------------------------------
# Layers. Each op: `out, cache = op_forward(...)` and `d_inputs... = op_backward(dout, cache)`.
# The caller adds gradients where paths merge (the residual stream, the tied embedding).

def upcast(a):
    """`a` in float32 or wider: a half-precision array is cast up (a copy), float32 and float64 pass
    through untouched (no copy, no pass)."""
    return a.astype(xp.promote_types(a.dtype, np.float32), copy=False)


# Embedding: out[b, t] = W[ids[b, t]]
def embedding_forward(ids, W):
    out = W[ids]                                        # (B, T) -> (B, T, C)
    return out, (ids, W.shape)


def embedding_backward(dout, cache):
    # forward was a row lookup, so each row of dW collects the gradients of every position using it.
    # subtle: an id can repeat in a batch; `dW[ids] += dout` would keep only one of the updates.
    # xp.add.at accumulates them all.
    # A frequent token collects thousands of terms: half-precision dout is summed in float32 (upcast).
    ids, shape = cache
    dout = upcast(dout)
    dW = xp.zeros(shape, dtype=dout.dtype)              # (V, C)
    xp.add.at(dW, ids, dout)                            # dW[ids[b, t]] += dout[b, t]
    return dW


# RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, over the last axis.
# The row sums of products below are einsums: they read both arrays once and write no (B, T, C)
# temporary, where `(x * x).mean(-1)` writes one and reads it back.
# subtle: in float16 (largest number 65504) the sum of C squares overflows once C * x^2 > 65504, e.g.
# |x| > 32 at C = 64: the statistics are taken in float32 (upcast), then rstd goes back to x's dtype.
def rmsnorm_forward(x, w, eps):
    C = x.shape[-1]
    xs = upcast(x)                                                      # x itself unless half
    ms = xp.einsum("...c,...c->...", xs, xs)[..., None] / C           # mean(x^2), (B, T, 1)
    rstd = (1.0 / xp.sqrt(ms + eps)).astype(x.dtype, copy=False)       # (B, T, 1)
    xhat = x * rstd                                                     # (B, T, C)
    return xhat * w, (xhat, rstd, w)


def column_dot(a, b):
    """sum over B, T of a * b: (B, T, C), (B, T, C) -> (C,), in float32 or wider.
    subtle: NumPy adds half-precision inputs in half precision (a 1e-2 error at B*T = 1024), so half
    inputs are cast up first (no copy for float32 and up)."""
    C = a.shape[-1]
    return xp.einsum("nc,nc->c", upcast(a).reshape(-1, C), upcast(b).reshape(-1, C))


def rmsnorm_backward(dout, cache):
    # forward: xhat = x * rstd, y = xhat * w. With g = dout * w, the gradient through rstd is
    # dx = rstd * (g - xhat * mean(g * xhat)).
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = column_dot(dout, xhat)                                         # (C,)
    g = dout * w                                                        # (B, T, C)
    gx = xp.einsum("...c,...c->...", g, xhat)[..., None] / C          # mean(g * xhat), (B, T, 1)
    dx = g - xhat * gx
    dx *= rstd                                                          # (B, T, C)
    return dx, dw


# LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b, population variance over the last axis.
# Statistics in float32 for half-precision x, as in RMSNorm.
def layernorm_forward(x, w, b, eps):
    C = x.shape[-1]
    xs = upcast(x)                                                      # x itself unless half
    mu = xs.mean(axis=-1, keepdims=True)                                # (B, T, 1)
    xc = xs - mu                                                        # centred x, (B, T, C)
    var = xp.einsum("...c,...c->...", xc, xc)[..., None] / C          # (B, T, 1)
    rstd = 1.0 / xp.sqrt(var + eps)                                     # (B, T, 1)
    xhat = (xc * rstd).astype(x.dtype, copy=False)                      # (B, T, C), half: back down
    rstd = rstd.astype(x.dtype, copy=False)
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    # as RMSNorm, plus the mean: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w.
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = column_dot(dout, xhat)                                         # (C,)
    db = upcast(dout).reshape(-1, C).sum(axis=0)                        # (C,)
    g = dout * w                                                        # (B, T, C)
    gx = xp.einsum("...c,...c->...", g, xhat)[..., None] / C          # mean(g * xhat), (B, T, 1)
    dx = (g - g.mean(axis=-1, keepdims=True) - xhat * gx) * rstd        # (B, T, C)
    return dx, dw, db


def norm_forward(x, params, prefix, cfg):
    """The block's norm by config: returns (y, cache)."""
    if cfg.norm == "rmsnorm":
        return rmsnorm_forward(x, params[prefix + ".weight"], cfg.norm_eps)
    return layernorm_forward(x, params[prefix + ".weight"], params[prefix + ".bias"], cfg.norm_eps)


def norm_backward(dout, cache, grads, prefix, cfg):
    """Backward of norm_forward: returns dx. Not (dout, cache) alone: it writes the weight (and bias)
    gradients into `grads` under the parameter names, so the block needs no norm-specific code."""
    if cfg.norm == "rmsnorm":
        dx, grads[prefix + ".weight"] = rmsnorm_backward(dout, cache)
    else:
        dx, grads[prefix + ".weight"], grads[prefix + ".bias"] = layernorm_backward(dout, cache)
    return dx


# Matmul: y = x @ W, (..., in) @ (in, out) -> (..., out).
# subtle: NumPy computes a 3-D (B, T, in) @ (in, out) as B separate (T, in) @ (in, out) products.
# Flattening batch and time first makes it one (B*T, in) @ (in, out) call, which the BLAS runs
# closer to its peak (reshape is free on a contiguous array).
# In a LoRA run a block's frozen weights reach the layers as Lora records (appendix A): the two lines
# marked LoRA hand them to lora_forward / lora_backward.
def matmul(x, W):
    return (x.reshape(-1, W.shape[0]) @ W).reshape(*x.shape[:-1], W.shape[1])


def matmul_forward(x, W, recompute=False):
    # recompute (checkpointing): only the cache is wanted, the product is skipped
    if isinstance(W, Lora):                                             # LoRA
        return lora_forward(x, W, recompute)
    return (None if recompute else matmul(x, W)), (x, W)


def matmul_backward(dout, cache):
    # forward was y = x @ W, so dx = dout @ W^T and dW = x^T @ dout, batch and time flattened into
    # one large (in, B*T) @ (B*T, out) matmul.
    x, W = cache[:2]
    if isinstance(W, Lora):                                             # LoRA: dx and the adapter's (dA, dB)
        return lora_backward(dout, cache)
    dout2 = dout.reshape(-1, W.shape[1])                                # (N, out), N = B * T
    dx = (dout2 @ W.T).reshape(x.shape)                                 # (N, out) @ (out, in) -> (B, T, in)
    dW = x.reshape(-1, W.shape[0]).T @ dout2                            # (in, N) @ (N, out) -> (in, out)
    return dx, dW


# Heads. Attention runs nh independent heads of size hs side by side in the C columns: head h owns
# columns h*hs .. (h+1)*hs - 1.
def split_heads(u, n_head):
    """(B, T, C) -> (B, nh, T, hs): reshape the last axis to (nh, hs), then put heads before time.
    A strided view, no copy."""
    B, T, C = u.shape
    return u.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)    # (B, nh, T, hs)


def merge_heads(y):
    """(B, nh, T, hs) -> (B, T, C): the inverse of split_heads (a copy, as the result is contiguous)."""
    B, nh, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)              # (B, T, nh, hs) -> (B, T, C)


# RoPE, half-split convention (Hugging Face Llama): u' = u * cos + rotate_half(u) * sin, where
# rotate_half(u) = concat(-u2, u1) for the halves u1, u2 of the head dimension, and the angles of
# position p are p * theta^(-2j/hs) for j < hs/2, repeated twice along the last axis. Pair (u1[j],
# u2[j]) is rotated by the angle p * inv_freq[j]: q'.k' then depends on the positions only through
# their difference.
def rope_inv_freq(hs, theta, scaling=None):
    """The hs/2 rotation frequencies inv_freq[j] = theta^(-2j/hs) (float64); scaled as cfg.rope_scaling
    says for a long context (appendix C)."""
    inv_freq = theta ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)   # (hs/2,)
    return inv_freq if scaling is None else rope_scaled(inv_freq, scaling)


def rope_tables(positions, hs, theta, dtype, scaling=None):
    """cos and sin of shape (T, hs) for the given positions (host math in float64, then cast)."""
    inv_freq = rope_inv_freq(hs, theta, scaling)                        # (hs/2,)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq   # (T, hs/2)
    angle = np.concatenate([angle, angle], axis=-1)                      # (T, hs)
    return to_device(np.cos(angle).astype(dtype)), to_device(np.sin(angle).astype(dtype))


def rotate_half(u):
    """concat(-u2, u1) of the halves u1, u2 of the last axis: (..., hs) -> (..., hs)."""
    h = u.shape[-1] // 2
    out = xp.empty_like(u)
    xp.negative(u[..., h:], out=out[..., :h])           # -u2 (written in place: no temporary)
    out[..., h:] = u[..., :h]                           # u1
    return out


def rope_forward(u, cos, sin):
    # u (B, nh, T, hs), cos and sin (T, hs) broadcast over batch and heads. Returns u' only: rope
    # keeps no activations, its backward needs just the tables.
    return u * cos + rotate_half(u) * sin                               # (B, nh, T, hs)


def rope_backward(dout, cos, sin):
    # Takes the tables rather than a cache: they are all the forward would have cached.
    # forward: u' = u * cos + R(u) * sin, R = rotate_half, a linear map: R(u) = P u with the matrix
    # P = [[0, -I], [I, 0]]. So du = dout * cos + P^T (dout * sin), and P^T = [[0, I], [-I, 0]] = -P:
    # du = dout * cos - R(dout * sin) = dout * cos - R(dout) * sin, since sin is the same in both
    # halves. That is rope with -sin: the rotation by the opposite angle, as the transpose of a
    # rotation is its inverse.
    du = dout * cos                                                     # (B, nh, T, hs)
    du -= rotate_half(dout) * sin                                       # (in place: one temporary fewer)
    return du


# Softmax over the last axis, in place (the caller's scores buffer becomes the probabilities).
# subtle: subtracting the row max first keeps exp() from overflowing; it cancels in the ratio.
def softmax_(a):
    a -= a.max(axis=-1, keepdims=True)
    xp.exp(a, out=a)
    a /= xp.einsum("...j->...", a)[..., None]       # row sums (einsum: ~4x faster than sum(-1) on short rows)
    return a


def softmax_backward_(dp, p, rowsum=None):
    # forward p = softmax(a): da = p * (dp - sum(dp * p)) along the row. Overwrites and returns dp.
    # Takes (dp, p), not a cache: the output p is all the softmax saves.
    # rowsum: sum(dp * p) when the caller has a cheaper way to it (attention does).
    if rowsum is None:
        rowsum = xp.einsum("...j,...j->...", dp, p)[..., None]
    dp -= rowsum
    dp *= p
    return dp


# Dropout with inverted scaling: out = x * keep / (1 - p), keep ~ Bernoulli(1 - p).
# Masks come from a generator seeded by (seed, layer, site), so the recomputation in gradient
# checkpointing draws exactly the same masks as the first forward did.
def dropout_mask(shape, p, key):
    """Boolean keep-mask, or None when p == 0. `key` is a tuple of ints naming the call site."""
    if p == 0.0:
        return None
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return xp.random.default_rng(seed).random(shape, dtype=np.float32) >= p


def dropout_forward(x, keep, p):
    if keep is None:
        return x
    out = x * keep
    out *= 1.0 / (1.0 - p)
    return out


def dropout_backward(dout, keep, p):
    # (dout, keep, p) rather than a cache: the mask and the rate are the whole cache.
    return dropout_forward(dout, keep, p)               # the same mask and scale, applied to dout


# Causal multi-head attention with RoPE:
#   q, k, v = split(x @ Wqkv); q, k = rope(q), rope(k)
#   att = softmax(q k^T / sqrt(hs) + causal mask); y = dropout(att) @ v; out = merge(y) @ Wproj
# Grouped-query attention (GQA, Ainslie et al. 2023): k and v have nkv <= nh heads, and each serves a
# group of g = nh / nkv query heads, query head h using key/value head h // g (Hugging Face's repeat_kv).
# The g query heads of a group stack into g*T rows against the same keys, so every product below is
# one matmul per key/value head; nkv = nh (g = 1) is plain multi-head attention, bit for bit.
# With a KV cache (generation), the new k, v are written at positions pos.. and q attends to all of
# the cache so far. Training calls it with kv=None, pos=0.
@functools.lru_cache(maxsize=16)   # every layer of a forward uses the same mask: built (and sent) once
def causal_mask(T, Tk, pos, dtype):
    """(T, Tk) additive mask: 0 where query pos+i may see key j (j <= pos+i), -inf elsewhere.
    Read-only: the cache hands the same array to every caller."""
    i = np.arange(T)[:, None] + pos
    j = np.arange(Tk)[None, :]
    return to_device(np.where(j <= i, 0.0, -np.inf).astype(dtype))


class AttentionCache(NamedTuple):
    """What attention_backward needs of attention_forward."""
    c_qkv: tuple                    # the qkv matmul's cache
    c_proj: tuple                   # the output projection's cache
    cos: object                     # RoPE tables, (T, hs)
    sin: object
    q: object                       # rope(q), (B, nh, T, hs)
    k: object                       # rope(k), (B, nkv, T, hs)
    v: object                       # (B, nkv, T, hs)
    att: object                     # softmax probabilities, (B, nkv, g*T, T), float32 or wider
    keep: object                    # att's dropout mask, or None
    att_d: object                   # dropout(att), in x's dtype
    y: object                       # the merged heads, (B, T, C)
    p_drop: float
    blocks: list = None             # attention_forward_blocked (appendix B): its query blocks, att and att_d
                                    # then being lists, block by block


def qkv_forward(x, Wqkv, cos, sin, n_head, kv=None, pos=0):
    """The attention's inputs: q (B, nh, T, hs), and k, v (B, nkv, Tk, hs) with the cache's earlier keys;
    and the cache of the qkv matmul for qkv_backward."""
    B, T, C = x.shape
    hs = C // n_head
    n_kv = (Wqkv.shape[1] // hs - n_head) // 2                       # nkv: Wqkv is (C, (nh + 2 nkv) hs)
    qkv, c_qkv = matmul_forward(x, Wqkv)                             # (B, T, C) @ (C, (nh+2nkv)hs) -> (B, T, (nh+2nkv)hs)
    # split heads: (B, T, (nh+2nkv)hs) -> (B, nh+2nkv, T, hs): the nh heads of q, then nkv of k, nkv of v
    heads = split_heads(qkv, n_head + 2 * n_kv)
    # rotate q and k by position: their heads sit side by side, so one call rotates both.
    # subtle: a contiguous copy first: rope's element-wise passes then run along whole (T, hs) planes
    # instead of hs-long rows of the strided view, ~1.5x faster at hs = 32, and each head of q and k
    # comes out as one contiguous (T, hs) plane.
    qk = rope_forward(xp.ascontiguousarray(heads[:, :n_head + n_kv]), cos, sin)   # (B, nh+nkv, T, hs)
    q, k, v = qk[:, :n_head], qk[:, n_head:], heads[:, n_head + n_kv:]   # (B, nh, T, hs), 2 x (B, nkv, T, hs)
    # v is still a view into qkv, whose q and k columns are not needed any more: a copy of v lets the
    # (B, T, (nh+2nkv)hs) buffer go instead of living in the cache until the backward
    v = xp.ascontiguousarray(v)                                      # (B, nkv, T, hs)
    if kv is not None:                                               # generation: append to the cache
        K, V = kv
        K[:, :, pos:pos + T], V[:, :, pos:pos + T] = k, v
        k, v = K[:, :, :pos + T], V[:, :, :pos + T]                  # (B, nkv, Tk, hs), Tk = pos + T
    return q, k, v, c_qkv


def qkv_backward(dq, dk, dv, cos, sin, c_qkv):
    """Reverse of qkv_forward (no cache) for dq (B, nh, T, hs) and dk, dv (B, nkv, T, hs): dx, dWqkv."""
    B, nh, T, hs = dq.shape
    n_kv = dk.shape[1]
    # forward: qkv was split into nh + 2 nkv heads; so merge heads, by writing each gradient into the
    # heads view of one buffer laid out as qkv
    dqkv = xp.empty((B, T, nh + 2 * n_kv, hs), dtype=dq.dtype)      # (B, T, nh+2nkv, hs)
    dheads = dqkv.transpose(0, 2, 1, 3)                              # (B, nh+2nkv, T, hs), a view
    # forward: q, k = rope(q), rope(k)
    dheads[:, :nh] = rope_backward(dq, cos, sin)
    dheads[:, nh:nh + n_kv] = rope_backward(dk, cos, sin)
    dheads[:, nh + n_kv:] = dv
    dqkv = dqkv.reshape(B, T, (nh + 2 * n_kv) * hs)                  # (B, T, (nh+2nkv)hs)
    return matmul_backward(dqkv, c_qkv)                              # dx (B, T, C), dWqkv


def attention_forward(x, Wqkv, Wproj, cos, sin, n_head, p_drop=0.0, key=(0,), kv=None, pos=0):
    B, T, C = x.shape
    hs = C // n_head
    q, k, v, c_qkv = qkv_forward(x, Wqkv, cos, sin, n_head, kv, pos)   # (B, nh, T, hs), 2 x (B, nkv, Tk, hs)
    n_kv, Tk = k.shape[1], k.shape[2]
    g = n_head // n_kv                                               # query heads per key/value head
    # group the query heads: head h = j*g + r is row block r of key/value head j (a view)
    qg = q.reshape(B, n_kv, g * T, hs)                               # (B, nkv, g*T, hs)
    # scores: each query against each key, scaled so their variance does not grow with hs
    att = qg @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)               # (B, nkv, g*T, hs) @ (B, nkv, hs, Tk) -> (B, nkv, g*T, Tk)
    # subtle: the causal mask is added before the softmax, so masked scores become exp(-inf) = 0.
    # Scores are softmaxed in float32 or wider even when the inputs are half precision.
    att = upcast(att)
    scores = att.reshape(B, n_kv, g, T, Tk)                          # a view: the mask broadcasts per query head
    scores += causal_mask(T, Tk, pos, att.dtype)
    softmax_(att)
    keep = dropout_mask(att.shape, p_drop, key)
    att_d = dropout_forward(att, keep, p_drop).astype(x.dtype, copy=False)
    y = att_d @ v                                                    # (B, nkv, g*T, Tk) @ (B, nkv, Tk, hs) -> (B, nkv, g*T, hs)
    y = merge_heads(y.reshape(B, n_head, T, hs))                     # merge heads: (B, nh, T, hs) -> (B, T, C)
    out, c_proj = matmul_forward(y, Wproj)                           # (B, T, C) @ (C, C) -> (B, T, C)
    return out, AttentionCache(c_qkv, c_proj, cos, sin, q, k, v, att, keep, att_d, y, p_drop)


def attention_backward(dout, cache):
    c_qkv, c_proj, cos, sin, q, k, v, att, keep, att_d, y, p_drop, _ = cache
    B, nh, T, hs = q.shape
    n_kv = k.shape[1]
    g = nh // n_kv
    # forward: out = y @ Wproj
    dy, dWproj = matmul_backward(dout, c_proj)                       # (B, T, C)
    # The softmax backward needs, per row i, sum_j datt_ij * att_ij. With datt = dropout'(dy @ v^T)
    # and y = att_d @ v, that sum is dy_i . y_i (head by head): a (B, T, C) product instead of a
    # (B, nh, T, T) one (the "D" of FlashAttention's backward).
    rowsum = xp.einsum("btnh,btnh->bnt", dy.reshape(B, T, nh, hs), y.reshape(B, T, nh, hs))
    rowsum = rowsum.reshape(B, n_kv, g * T, 1)                       # the rows of att
    dy = split_heads(dy, nh).reshape(B, n_kv, g * T, hs)            # (B, nkv, g*T, hs), grouped as qg
    # forward: y = att_d @ v, so datt_d = dy @ v^T and dv = att_d^T @ dy.
    # subtle: OpenBLAS multiplies small matrices (T = 64) about 1.3x slower when the right operand is a
    # transposed view (dy @ v.T) than when it is stored row by row; a contiguous copy of v^T costs less.
    vT = xp.ascontiguousarray(v.transpose(0, 1, 3, 2))               # (B, nkv, hs, T)
    datt = dy @ vT                                                   # (B, nkv, g*T, hs) @ (B, nkv, hs, T) -> (B, nkv, g*T, T)
    # dv sums over all g*T rows that read v: the g query heads of the group add up inside this matmul
    dv = att_d.transpose(0, 1, 3, 2) @ dy                            # (B, nkv, T, g*T) @ (B, nkv, g*T, hs) -> (B, nkv, T, hs)
    datt = dropout_backward(datt, keep, p_drop)
    # forward: att = softmax(scores); masked entries have att = 0, so they get no gradient
    dscores = softmax_backward_(datt, att, rowsum)                   # (B, nkv, g*T, T)
    # forward: scores = qg @ k^T / sqrt(hs), so dqg = dscores @ k / sqrt(hs), dk = dscores^T @ qg / sqrt(hs)
    dscores /= math.sqrt(hs)
    dq = (dscores @ k).reshape(B, nh, T, hs)                         # (B, nkv, g*T, T) @ (B, nkv, T, hs) -> (B, nh, T, hs)
    dk = dscores.transpose(0, 1, 3, 2) @ q.reshape(B, n_kv, g * T, hs)   # (B, nkv, T, hs), the group summed as dv
    dx, dWqkv = qkv_backward(dq, dk, dv, cos, sin, c_qkv)
    return dx, dWqkv, dWproj


# SwiGLU feed-forward: out = (silu(a) * b) @ Wd with a = x @ Wg, b = x @ Wu, silu(a) = a * sigmoid(a).
def swiglu_forward(x, Wg, Wu, Wd, recompute=False):
    a, c_g = matmul_forward(x, Wg)                       # (B, T, C) @ (C, F) -> (B, T, F)
    b, c_u = matmul_forward(x, Wu)                       # (B, T, F)
    sig = 1.0 / (1.0 + xp.exp(-a))                       # sigmoid(a), (B, T, F)
    silu = a                                             # a is not needed again: silu(a) overwrites it
    silu *= sig                                          # a * sigmoid(a)
    h = silu * b                                         # (B, T, F)
    # recompute (checkpointing): only the cache is wanted, so the down projection is skipped
    out, c_d = matmul_forward(h, Wd, recompute)          # (B, T, F) @ (F, C) -> (B, T, C)
    return out, (c_g, c_u, c_d, b, sig, silu)


def swiglu_backward(dout, cache):
    c_g, c_u, c_d, b, sig, silu = cache
    # forward: out = h @ Wd
    dh, dWd = matmul_backward(dout, c_d)                # (B, T, F)
    # forward: h = silu(a) * b, so db = dh * silu(a) and da = dh * b * silu'(a), with
    # silu'(a) = sig + a * sig * (1 - sig) = sig + silu * (1 - sig)
    db = dh * silu
    da = dh                                              # dh is not needed again: da overwrites it
    da *= b
    da *= sig + silu * (1.0 - sig)                       # silu'(a)
    # forward: a = x @ Wg and b = x @ Wu; both paths reach x
    dx, dWg = matmul_backward(da, c_g)
    dx_b, dWu = matmul_backward(db, c_u)
    dx += dx_b
    return dx, dWg, dWu, dWd


# Cross-entropy fused with softmax: loss = mean over positions with target != -1 of
# logsumexp(logits) - logits[target]; its gradient is (softmax(logits) - onehot(target)) / n.
def cross_entropy_forward(logits, targets, overwrite=False):
    # overwrite: the softmax is computed in the logits' buffer (the caller will not read them again),
    # which saves an (N, V) array at the step's peak memory (96 MiB at N = 512, V = 49152)
    V = logits.shape[-1]
    logits = logits.reshape(-1, V)                       # (N, V), N = B * T
    targets = targets.reshape(-1)                        # (N,)
    valid = targets >= 0                                 # subtle: -1 marks positions to ignore
    n = int(valid.sum())
    t = xp.where(valid, targets, 0)                      # a harmless index where ignored
    rows = xp.arange(logits.shape[0])
    if overwrite:
        probs = logits
        probs -= logits.max(axis=-1, keepdims=True)      # max-shifted in place, becomes the softmax
    else:
        probs = logits - logits.max(axis=-1, keepdims=True)   # max-shifted copy, becomes the softmax
    picked = probs[rows, t]                              # shifted logit of the target, (N,)
    xp.exp(probs, out=probs)
    sumexp = probs.sum(axis=-1)                          # (N,)
    nll = xp.log(sumexp) - picked                        # -log softmax[target], (N,)
    loss = float((nll * valid).sum()) / n
    probs *= (1.0 / sumexp)[:, None]
    return loss, (probs, t, valid, n, rows)


def cross_entropy_backward(dloss, cache):
    # dloss: the gradient arriving at the loss (1 for the loss itself, S under loss scaling).
    # Overwrites the cached probabilities: the cache is used once.
    probs, t, valid, n, rows = cache
    dlogits = probs
    dlogits[rows, t] -= 1.0
    dlogits *= (valid * (dloss / n)).astype(dlogits.dtype)[:, None]   # ignored rows -> 0
    return dlogits                                       # (N, V)


# ----------------------------------------------------------------------------------------------------
# Model: blocks, then the whole forward and backward, mirroring each other in reverse.

def trains(name, lora=None):
    """Does parameter `name` get a gradient? Every one does, except in a LoRA run (lora: a LoraConfig,
    appendix A), where the adapters alone train. The one rule for what trains: the backward skips the
    gradients of the others where that pays (a frozen matrix's dW, the LM head's, the embedding's); the
    norms' (C,) gradients cost nothing, and are computed and dropped."""
    return lora is None or name.endswith((".lora_A", ".lora_B"))


def block_forward(x, params, i, cfg, cos, sin, p_drop=0.0, seed=0, kv=None, pos=0, recompute=False, lora=None):
    """One pre-norm block: x + Attn(Norm1(x)), then + SwiGLU(Norm2(x)). Returns (out, cache).
    recompute=True (the checkpointed backward) wants only the cache: it returns (None, cache) and
    skips the last matmul, SwiGLU's down projection, whose output the backward does not need.
    lora (a LoraConfig): a LoRA run; the block's matrices are frozen and reach the layers as Lora records."""
    p = f"blocks.{i}."
    # a weight that trains is the array; a frozen one, a Lora record with its adapter (appendix A)
    w = lambda name: params[p + name] if trains(p + name, lora) else lora_record(params, i, name, lora, seed)  # noqa: E731
    h, c_n1 = norm_forward(x, params, p + "norm1", cfg)
    a, c_attn = attention_forward(h, w("attn.qkv"), w("attn.proj"), cos, sin, cfg.n_head, p_drop, (seed, i, 0), kv, pos)
    keep_a = dropout_mask(a.shape, p_drop, (seed, i, 1))
    x1 = x + dropout_forward(a, keep_a, p_drop)                       # residual, (B, T, C)
    h2, c_n2 = norm_forward(x1, params, p + "norm2", cfg)
    f, c_ffn = swiglu_forward(h2, w("ffn.w_gate"), w("ffn.w_up"), w("ffn.w_down"), recompute)
    keep_f = dropout_mask(x1.shape, p_drop, (seed, i, 2))
    cache = (c_n1, c_attn, keep_a, c_n2, c_ffn, keep_f, p_drop)
    if recompute:
        return None, cache
    out = x1 + dropout_forward(f, keep_f, p_drop)                     # residual, (B, T, C)
    return out, cache


def put_grad(grads, name, dW):
    """grads[name] = dW, as matmul_backward gives it. For a frozen weight (a Lora record, appendix A) dW
    is its adapter's pair (dA, dB), stored as name.lora_A and name.lora_B, or () without adapter."""
    if isinstance(dW, tuple):
        grads.update(zip((name + ".lora_A", name + ".lora_B"), dW))
    else:
        grads[name] = dW


def block_backward(dout, cache, grads, i, cfg):
    """Reverse of block_forward: writes this block's gradients into `grads` under their parameter
    names (hence grads, i and cfg beside (dout, cache)), returns dx."""
    c_n1, c_attn, keep_a, c_n2, c_ffn, keep_f, p_drop = cache
    p = f"blocks.{i}."
    # forward: out = x1 + dropout(ffn(norm2(x1))): the residual passes dout straight to x1
    df = dropout_backward(dout, keep_f, p_drop)
    dh2, dWg, dWu, dWd = swiglu_backward(df, c_ffn)
    for name, dW in (("ffn.w_gate", dWg), ("ffn.w_up", dWu), ("ffn.w_down", dWd)):
        put_grad(grads, p + name, dW)
    dx1 = dout + norm_backward(dh2, c_n2, grads, p + "norm2", cfg)
    # forward: x1 = x + dropout(attn(norm1(x)))
    da = dropout_backward(dx1, keep_a, p_drop)
    dh, dWqkv, dWproj = attention_backward(da, c_attn)
    put_grad(grads, p + "attn.qkv", dWqkv)
    put_grad(grads, p + "attn.proj", dWproj)
    dx = dx1 + norm_backward(dh, c_n1, grads, p + "norm1", cfg)
    return dx


def lm_head(params, cfg):
    """The (C, V) output matrix: tok_emb.T when tied (a view, no copy), else lm_head."""
    return params["tok_emb"].T if cfg.tie_embeddings else params["lm_head"]


def model_forward(params, ids, cfg, train=False, seed=0, lora=None):
    """Embedding, L blocks, final norm, LM head. Returns (logits (B, T, V), cache).

    With train=False: no dropout and nothing kept (cache is None). With train=True the cache keeps
    every block's activations, or, with cfg.checkpoint, only each block's input.
    lora (a LoraConfig): a LoRA run; params holds the base weights and the adapters (appendix A).
    """
    ids = to_device(ids)
    B, T = ids.shape
    cos, sin = rope_tables(np.arange(T), cfg.head_size, cfg.rope_theta, params["tok_emb"].dtype, cfg.rope_scaling)
    p_drop = cfg.dropout if train else 0.0
    if lora is not None and not train:
        lora = replace(lora, dropout=0.0)                               # no adapter dropout either
    x, c_emb = embedding_forward(ids, params["tok_emb"])                # (B, T, C)
    blocks = []
    for i in range(cfg.n_layer):
        x_in = x
        x, c = block_forward(x, params, i, cfg, cos, sin, p_drop, seed, lora=lora)
        # gradient checkpointing: keep the block's input (B*T*C numbers) instead of its activations
        # (about 10 B*T*C + 4 B*T*F + the (B, nh, T, T) attention: 25x as many at C=384, T=256), and
        # recompute them in the backward: one more forward of each block, about 1.3x the step time.
        blocks.append(x_in if cfg.checkpoint else c)
    xf, c_nf = norm_forward(x, params, "norm_f", cfg)                   # (B, T, C)
    logits = matmul(xf, lm_head(params, cfg))                           # (B, T, C) @ (C, V) -> (B, T, V)
    if not train:
        return logits, None
    return logits, (c_emb, blocks, c_nf, xf, cos, sin, p_drop, seed, lora)


def model_backward(dlogits, cache, params, cfg, ready=None):
    """Reverse of model_forward for dlogits (B*T, V). Returns grads with the keys and shapes of the
    parameters that train (trains(): all, or a LoRA run's adapters), in params' order. Takes params and
    cfg beside (dlogits, cache): the weights are read, not cached.
    ready(grads, names), if given, is called as soon as the gradients `names` are final: after the final
    norm, after each block (the last first), after the embedding. A data-parallel trainer sends them
    then, while the earlier layers' backward still runs (lib/dist.py)."""
    c_emb, blocks, c_nf, xf, cos, sin, p_drop, seed, lora = cache
    grads, reported = {}, set()

    def report():
        if ready is not None:
            new = [k for k in grads if k not in reported and trains(k, lora)]
            reported.update(new)
            ready(grads, new)

    C = cfg.d_model
    xf2 = xf.reshape(-1, C)                                             # (N, C)
    # forward: logits = xf @ W_head, so dxf = dlogits @ W_head^T and dW_head = xf^T @ dlogits
    W = lm_head(params, cfg)
    dxf = (dlogits @ W.T).reshape(xf.shape)                             # (N, V) @ (V, C) -> (B, T, C)
    if trains("tok_emb" if cfg.tie_embeddings else "lm_head", lora):
        if cfg.tie_embeddings:
            dW_emb_head = dlogits.T @ xf2                               # (V, N) @ (N, C) -> (V, C)
        else:
            grads["lm_head"] = xf2.T @ dlogits                          # (C, N) @ (N, V) -> (C, V)
    dx = norm_backward(dxf, c_nf, grads, "norm_f", cfg)
    report()
    for i in reversed(range(cfg.n_layer)):
        c = blocks[i]
        if cfg.checkpoint:                                              # recompute the activations
            _, c = block_forward(c, params, i, cfg, cos, sin, p_drop, seed, recompute=True, lora=lora)
        dx = block_backward(dx, c, grads, i, cfg)
        blocks[i] = None                                                # free as we go
        report()
    if trains("tok_emb", lora):
        dW_emb = embedding_backward(dx, c_emb)
        if cfg.tie_embeddings:
            dW_emb += dW_emb_head                                       # tied: both uses add up
        grads["tok_emb"] = dW_emb
        report()
    return {k: grads[k] for k in params if trains(k, lora)}            # params' key order


def forward(params, ids, cfg, lora=None):
    """Logits (B, T, V) for token ids (B, T), no dropout. lora: see model_forward."""
    check_ids(ids, cfg)
    return model_forward(params, ids, cfg, train=False, lora=lora)[0]


def loss_fn(params, ids, targets, cfg, lora=None):
    """Mean cross-entropy without dropout or gradients (evaluation)."""
    check_ids(ids, cfg)
    check_targets(targets, ids, cfg)
    logits, _ = model_forward(params, ids, cfg, train=False, lora=lora)
    return cross_entropy_forward(logits, to_device(targets))[0]


def loss_and_grads(params, ids, targets, cfg, seed=0, lora=None, ready=None):
    """Training loss (dropout on when cfg.dropout > 0, masks drawn from `seed`) and its gradients.
    lora (a LoraConfig): train the adapters in params only; grads then holds their keys alone.
    ready: model_backward's callback for gradients as they become final."""
    check_ids(ids, cfg)
    check_targets(targets, ids, cfg)
    logits, cache = model_forward(params, ids, cfg, train=True, seed=seed, lora=lora)
    loss, c_ce = cross_entropy_forward(logits, to_device(targets), overwrite=True)
    del logits                                                          # its buffer lives on in c_ce
    dlogits = cross_entropy_backward(1.0, c_ce)                         # d(loss) / d(loss) = 1
    return loss, model_backward(dlogits, cache, params, cfg, ready)


# ----------------------------------------------------------------------------------------------------
# Optimizer: AdamW (decoupled weight decay), gradient clipping, warmup + cosine schedule.
# The state is a dict of plain arrays plus the step count, so a checkpoint restores it exactly.

def adamw_init(params):
    return {"t": 0,
            "m": {k: xp.zeros_like(p) for k, p in params.items()},
            "v": {k: xp.zeros_like(p) for k, p in params.items()}}


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """One in-place AdamW update of every parameter, in the textbook's lines (p, m and v change in
    place, so the parameter and state dicts keep their arrays). The weight decay is decoupled: it is
    not added to g, so Adam's scaling leaves it alone. Matrices only: norm weights and biases are not
    decayed."""
    state["t"] += 1
    t = state["t"]
    for k, p in params.items():
        g, m, v = grads[k], state["m"][k], state["v"][k]
        m[...] = beta1 * m + (1 - beta1) * g             # first moment: running mean of g
        v[...] = beta2 * v + (1 - beta2) * g * g         # second moment: running mean of g^2
        mhat = m / (1 - beta1 ** t)                      # bias corrections: m and v start at 0
        vhat = v / (1 - beta2 ** t)
        update = mhat / (xp.sqrt(vhat) + eps)            # about +-1 per entry, whatever g's scale
        if weight_decay and p.ndim >= 2:
            update += weight_decay * p                   # decoupled weight decay, matrices only
        p -= lr * update


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm. Returns the norm
    before clipping (a host float; inf or nan if a gradient is not finite)."""
    norm = math.sqrt(sum(float(xp.vdot(g.ravel(), g.ravel())) for g in grads.values()))
    if max_norm and max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


def lr_schedule(step, max_lr, min_lr, warmup, total):
    """Linear warmup to max_lr over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    frac = (step - warmup) / max(1, total - warmup)      # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (max_lr - min_lr)


# ----------------------------------------------------------------------------------------------------
# Generation with a KV cache: each layer keeps the keys and the values of every position so far, so a
# new token costs one position's work instead of a full forward of the whole context.
# The cached keys are rope(k), unscaled (the 1/sqrt(hs) is applied to the scores), as in Hugging
# Face's past_key_values; the values are v as computed. With grouped-query attention the cache holds
# the nkv key/value heads only: nh / nkv times smaller than multi-head attention's.
# The sampling loop around forward_cached is lib/generation.py.

def kv_cache_init(cfg, dtype, batch=1, length=None):
    """Per layer, (K, V) arrays of shape (batch, nkv, length, hs), filled by forward_cached. length: the
    positions it can hold, at most (and by default) max_seq_len; generation asks for the prompt plus the
    new tokens, so a model with a long context (8192, 131072) does not allocate all of it."""
    length = cfg.max_seq_len if length is None else length
    if not 1 <= length <= cfg.max_seq_len:
        raise ValueError(f"KV cache length must be in [1, max_seq_len = {cfg.max_seq_len}], got {length}")
    shape = (batch, cfg.n_kv_head, length, cfg.head_size)
    return [(xp.zeros(shape, dtype=dtype), xp.zeros(shape, dtype=dtype)) for _ in range(cfg.n_layer)]


def forward_cached(params, ids, cfg, kv, pos, last_only=False, lora=None):
    """Logits (B, T, V) for new tokens ids (B, T) at positions pos .. pos+T-1, attending to the
    cache; writes their keys and values into `kv`. Equals forward() on the whole context so far.
    last_only: the logits of the last position alone, (B, 1, V): all that sampling needs (the LM head
    is the largest matmul of a prefill; 21% of its work on SmolLM2 at T = 512).
    lora: the LoraConfig of the adapters in params (see model_forward), or None."""
    check_ids(ids, cfg)
    T = ids.shape[1]
    length = kv[0][0].shape[2]                                          # the positions the cache holds
    if not 0 <= pos <= length - T:
        limit = f"max_seq_len {length}" if length == cfg.max_seq_len else f"the cache's length {length}"
        raise ValueError(f"positions {pos} .. {pos + T - 1} do not fit the KV cache: pos + T must be at most {limit}")
    ids = to_device(ids)
    cos, sin = rope_tables(np.arange(pos, pos + T), cfg.head_size, cfg.rope_theta, params["tok_emb"].dtype,
                           cfg.rope_scaling)
    x = params["tok_emb"][ids]                                          # (B, T, C)
    lora = lora and replace(lora, dropout=0.0)
    for i in range(cfg.n_layer):
        x, _ = block_forward(x, params, i, cfg, cos, sin, kv=kv[i], pos=pos, lora=lora)
    if last_only:
        x = x[:, -1:]                                                   # (B, 1, C)
    xf, _ = norm_forward(x, params, "norm_f", cfg)
    return matmul(xf, lm_head(params, cfg))                             # (B, T, V)


# ====================================================================================================
# Appendix A. LoRA adapters: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685).
# Fine-tuning moves a pretrained weight W (in, out) by some dW; LoRA bets that dW has a low rank r and
# learns it as a product A @ B:
#   y = x @ W + (alpha / r) * (dropout(x) @ A) @ B,      A (in, r), B (r, out), r << in, out.
# W stays frozen: no gradient, no optimizer state. Only A and B train: r (in + out) numbers instead of
# in * out (r = 8 on a (576, 1536) matrix: 17k instead of 885k). B starts at zero, so training starts
# from the pretrained model exactly; alpha / r keeps the update's size when r changes. Afterwards the
# update folds into the weight, W' = W + (alpha / r) A @ B, and inference costs what the base model costs.
# Where it hooks in: with lora=LoraConfig (lib/lora.py: the adapters' names, init, merge) only the adapters
# train (trains()); block_forward hands each frozen matrix to the layers as a Lora record (lora_record), and
# matmul_forward / matmul_backward pass such a record to lora_forward / lora_backward.

# The weights of a block that LoRA can adapt, by short name (in the order adapters are kept), with
# the dropout site of each adapter's input mask (sites 0-2 are the model's own dropouts).
LORA_TARGETS = {"qkv": ("attn.qkv", 3), "proj": ("attn.proj", 4), "gate": ("ffn.w_gate", 5),
                "up": ("ffn.w_up", 6), "down": ("ffn.w_down", 7)}
LORA_SITES = dict(LORA_TARGETS.values())                # "attn.qkv" -> 3, ...


class Lora(NamedTuple):
    """A frozen weight as the layers take it in a LoRA run: W with its adapter (A = B = None: none)."""
    W: object               # (in, out), frozen
    A: object               # (in, r), or None: no adapter on this weight
    B: object               # (r, out), or None
    scale: float            # alpha / r
    p_drop: float           # dropout on the adapter's input (0 outside training)
    key: tuple              # the key of that dropout's mask: (seed, layer, site)

    @property
    def shape(self):        # W's shape: the layers read sizes off either kind of weight
        return self.W.shape


def lora_record(params, i, name, lora, seed):
    """Block i's frozen weight `name` ("attn.qkv", ...) as a Lora record: the weight, its adapter
    params[... + ".lora_A"] and [... + ".lora_B"] if params holds one, and its dropout mask's key."""
    W = params[f"blocks.{i}.{name}"]
    A, B = (params.get(f"blocks.{i}.{name}.lora_{m}") for m in "AB")
    return Lora(W, A, B, lora.scale, lora.dropout, (seed, i, LORA_SITES[name]))


def lora_forward(x, w, recompute=False):
    # recompute (checkpointing): only the cache is wanted; the product with W is skipped
    W, A, B, scale, p, key = w
    y = None if recompute else matmul(x, W)                            # (B, T, in) @ (in, out) -> (B, T, out)
    if A is None:
        return y, (x, w, None, None, None)
    keep = dropout_mask(x.shape, p, key)
    xd = dropout_forward(x, keep, p)                                   # the adapter's input, (B, T, in)
    u = matmul(xd, A)                                                  # (B, T, in) @ (in, r) -> (B, T, r)
    if y is not None:
        y += matmul(u * scale, B)                                      # (B, T, r) @ (r, out) -> (B, T, out)
    return y, (x, w, xd, u, keep)


def lora_backward(dout, cache):
    # forward: y = x @ W + s * u @ B with u = xd @ A, xd = dropout(x), s = alpha / r. W is frozen, so
    # there is no dW = x^T @ dout (the largest matmul of a full backward, skipped); the rest, with
    # du = s * dout @ B^T:  dB = s * u^T @ dout,  dA = xd^T @ du,  dx = dout @ W^T + dropout'(du @ A^T).
    # Returns (dx, (dA, dB)), or (dx, ()) for a weight without adapter.
    x, w, xd, u, keep = cache
    W, A, B, scale, p, _ = w
    dout2 = dout.reshape(-1, W.shape[1])                               # (N, out), N = B * T
    dx = (dout2 @ W.T).reshape(x.shape)                                # (N, out) @ (out, in) -> (B, T, in)
    if A is None:
        return dx, ()
    u2 = u.reshape(-1, A.shape[1])                                     # (N, r)
    dB = (u2 * scale).T @ dout2                                        # (r, N) @ (N, out) -> (r, out)
    du = dout2 @ B.T                                                   # (N, out) @ (out, r) -> (N, r)
    du *= scale
    dA = xd.reshape(-1, A.shape[0]).T @ du                             # (in, N) @ (N, r) -> (in, r)
    dxd = (du @ A.T).reshape(x.shape)                                  # (N, r) @ (r, in) -> (B, T, in)
    dx += dropout_backward(dxd, keep, p)
    return dx, (dA, dB)


# ====================================================================================================
# Appendix B. Faster forms, each identical to a textbook form of the main text except for how it computes
# (a test holds the two equal). FAST_FORMS, at the end, says which replaces which and when (one of them,
# the KV-cache forward's inference block, is its own module: lib/inference.py); use_forms swaps them in by
# the swap rule (the top of this file); REFERENCE_FORMS keeps the textbook forms.

# Causal attention by query blocks: identical to attention_forward / attention_backward except that the
# queries go ATT_BLOCK rows at a time, each block against the keys it can see (0 .. pos + its last row),
# so the fully masked key columns to the right of the diagonal are never computed: at T = 256 that skips
# 3/8 of the score work, and of the att memory kept for the backward (7/16 at T = 512). (FlashAttention
# tiles keys too, with an online softmax, as lib/inference.py does; here a block's scores must stay for
# the backward.) Two passes over the scores are saved as well: the block's queries are scaled by
# 1/sqrt(hs) as they are gathered (a copy anyway), and the mask is added to the block's diagonal square
# only, the keys left of it being visible to every row. The dropout masks are the reference's, sliced.
# Training (and a forward without a KV cache) takes this form once T >= 2 blocks. 64 rows: 1-3% faster
# than 128 at T = 256, 32 no faster (gpt_cupy runs the same blocks; lib/memory.py counts them).
ATT_BLOCK = 64


def attends_by_blocks(T):
    """Does a forward of T query rows take the blocked form? From two blocks on (FAST_FORMS's rule)."""
    return T >= 2 * ATT_BLOCK


def attention_blocks(T, pos):
    """(i0, i1, n): query rows i0 .. i1-1 and the n = pos + i1 keys they see, block by block."""
    return [(i0, min(T, i0 + ATT_BLOCK), pos + min(T, i0 + ATT_BLOCK)) for i0 in range(0, T, ATT_BLOCK)]


def attention_forward_blocked(x, Wqkv, Wproj, cos, sin, n_head, p_drop=0.0, key=(0,), kv=None, pos=0):
    B, T, C = x.shape
    hs = C // n_head
    q, k, v, c_qkv = qkv_forward(x, Wqkv, cos, sin, n_head, kv, pos)   # (B, nh, T, hs), 2 x (B, nkv, Tk, hs)
    n_kv, Tk = k.shape[1], k.shape[2]
    g = n_head // n_kv
    q5 = q.reshape(B, n_kv, g, T, hs)                                # the query heads of each group, a view
    keep = dropout_mask((B, n_kv, g * T, Tk), p_drop, key)           # the reference's masks
    keep5 = None if keep is None else keep.reshape(B, n_kv, g, T, Tk)
    y = xp.empty((B, n_kv, g, T, hs), dtype=x.dtype)
    blocks, atts, atts_d = attention_blocks(T, pos), [], []          # per block: (B, nkv, g*rows, n)
    for i0, i1, n in blocks:
        rows = i1 - i0
        qb = q5[:, :, :, i0:i1] * (1.0 / math.sqrt(hs))              # the block's rows of the g heads, scaled
        qb = qb.reshape(B, n_kv, g * rows, hs)                       # (a view of that copy)
        a = upcast(qb @ k[:, :, :n].transpose(0, 1, 3, 2))           # (B, nkv, g*rows, hs) @ (B, nkv, hs, n)
        a.reshape(B, n_kv, g, rows, n)[..., n - rows:] += causal_mask(rows, rows, 0, a.dtype)   # the diagonal
        softmax_(a)
        kb = None if keep5 is None else keep5[:, :, :, i0:i1, :n].reshape(B, n_kv, g * rows, n)
        a_d = dropout_forward(a, kb, p_drop).astype(x.dtype, copy=False)
        y[:, :, :, i0:i1] = (a_d @ v[:, :, :n]).reshape(B, n_kv, g, rows, hs)   # (B, nkv, g*rows, n) @ (B, nkv, n, hs)
        atts.append(a)
        atts_d.append(a_d)
    y = merge_heads(y.reshape(B, n_head, T, hs))                     # (B, T, C)
    out, c_proj = matmul_forward(y, Wproj)
    return out, AttentionCache(c_qkv, c_proj, cos, sin, q, k, v, atts, keep, atts_d, y, p_drop, blocks)


def attention_backward_blocked(dout, cache):
    c_qkv, c_proj, cos, sin, q, k, v, atts, keep, atts_d, y, p_drop, blocks = cache
    B, nh, T, hs = q.shape
    n_kv = k.shape[1]
    g = nh // n_kv
    dy, dWproj = matmul_backward(dout, c_proj)                       # (B, T, C)
    rowsum = xp.einsum("btnh,btnh->bnt", dy.reshape(B, T, nh, hs), y.reshape(B, T, nh, hs))
    rowsum = rowsum.reshape(B, n_kv, g, T)
    dy = split_heads(dy, nh).reshape(B, n_kv, g, T, hs)             # a view, grouped as q5
    q5 = q.reshape(B, n_kv, g, T, hs)
    keep5 = None if keep is None else keep.reshape(B, n_kv, g, T, T)
    dq = xp.empty((B, n_kv, g, T, hs), dtype=q.dtype)
    dk, dv = xp.zeros_like(k), xp.zeros_like(v)                      # each key is seen by every later block
    for (i0, i1, n), a, a_d in zip(blocks, atts, atts_d):
        rows = i1 - i0
        dyb = dy[:, :, :, i0:i1].reshape(B, n_kv, g * rows, hs)      # as qb in the forward (a copy)
        qb = q5[:, :, :, i0:i1].reshape(B, n_kv, g * rows, hs)
        # forward: y = a_d @ v, so da_d = dy @ v^T and dv += a_d^T @ dy (the group summed in the matmul)
        datt = dyb @ v[:, :, :n].transpose(0, 1, 3, 2)               # (B, nkv, g*rows, n)
        dv[:, :, :n] += a_d.transpose(0, 1, 3, 2) @ dyb              # (B, nkv, n, hs)
        kb = None if keep5 is None else keep5[:, :, :, i0:i1, :n].reshape(B, n_kv, g * rows, n)
        datt = dropout_backward(datt, kb, p_drop)
        dscores = softmax_backward_(datt, a, rowsum[:, :, :, i0:i1].reshape(B, n_kv, g * rows, 1))
        dscores /= math.sqrt(hs)
        # forward: scores = (q / sqrt(hs)) @ k^T
        dq[:, :, :, i0:i1] = (dscores @ k[:, :, :n]).reshape(B, n_kv, g, rows, hs)
        dk[:, :, :n] += dscores.transpose(0, 1, 3, 2) @ qb           # (B, nkv, n, hs)
    dx, dWqkv = qkv_backward(dq.reshape(B, nh, T, hs), dk, dv, cos, sin, c_qkv)
    return dx, dWqkv, dWproj


def embedding_backward_flat(dout, cache):
    # identical to embedding_backward except that add.at runs on the flat (V*C,) view of dW, with one
    # index per number, idx = id * C + column: NumPy's add.at is several times faster on 1-D indices
    # than on rows (0.84 -> 0.17 ms on cpu-small, about 1% of its step).
    ids, shape = cache
    C = shape[1]
    dout = upcast(dout)
    dW = xp.zeros(shape, dtype=dout.dtype)              # (V, C)
    idx = ids.reshape(-1, 1) * C + xp.arange(C)         # (B*T, C): flat index of dW[id, c]
    xp.add.at(dW.reshape(-1), idx.reshape(-1), dout.reshape(-1))
    return dW


ADAMW_BLOCK = 1 << 15       # numbers in a block of adamw_step_inplace (NumPy): in cache through its passes


def adamw_step_inplace(params, grads, state, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """identical to adamw_step except that every pass writes into m, v, p or one scratch array u (no
    temporaries), that the bias corrections go into the scalars: mhat / (sqrt(vhat) + eps) = sqrt(bc2) /
    bc1 * m / (sqrt(v) + eps * sqrt(bc2)), that p - lr * (update + wd * p) is taken as p * (1 - lr * wd) -
    lr * update, and that on NumPy a parameter goes in blocks of rows of ~ADAMW_BLOCK numbers, which stay
    in cache through the twelve passes (cpu-mid's AdamW 38 -> 27 ms; the same bits; a GPU takes it whole)."""
    state["t"] += 1
    t = state["t"]
    bc1 = 1.0 - beta1 ** t                               # bias corrections
    bc2 = 1.0 - beta2 ** t
    for k, p in params.items():
        rows = max(1, ADAMW_BLOCK * len(p) // max(1, p.size) if xp is np else len(p))
        for i in range(0, len(p), rows):                 # blocks of rows: views, written in place
            p_, g, m, v = (a[i:i + rows] for a in (p, grads[k], state["m"][k], state["v"][k]))
            u = xp.multiply(g, 1.0 - beta1)              # the scratch array
            m *= beta1
            m += u                                       # first moment
            xp.multiply(g, g, out=u)
            u *= 1.0 - beta2
            v *= beta2
            v += u                                       # second moment
            if weight_decay and p.ndim >= 2:             # (p, the whole parameter: matrices only)
                p_ *= 1.0 - lr * weight_decay            # decoupled decay, before the Adam step
            xp.sqrt(v, out=u)
            u += eps * math.sqrt(bc2)                    # (sqrt(vhat) + eps) * sqrt(bc2)
            xp.divide(m, u, out=u)
            u *= lr * math.sqrt(bc2) / bc1               # lr * mhat / (sqrt(vhat) + eps)
            p_ -= u


# The dispatch table. {the name the model calls: (the fast form that replaces its textbook form, when it
# does: None for every call, or a test of the call's arguments)}
FAST_FORMS = {
    "attention_forward": (attention_forward_blocked, lambda x, *a, **k: attends_by_blocks(x.shape[1])),
    "attention_backward": (attention_backward_blocked, lambda dout, cache: cache.blocks is not None),   # as forward
    "embedding_backward": (embedding_backward_flat, None),
    "adamw_step": (adamw_step_inplace, None),
    # the KV-cache forward's block for inference (generation, scoring): its own module, lib/inference.py,
    # given this module (gpt_numpy, or gpt_cupy's copy) to compute with
    "block_forward": (functools.partial(inference.block_forward_cached, sys.modules[__name__]),
                      inference.uses_cached_block),
}


def use_forms(table):
    """Rebind each name of `table` ({name: (form, when)}) in this module: every caller takes `form`, or
    with a `when`, the calls for which when(*args) holds, the others keeping the name's old function.
    Returns {name: the function it had}. gpt_cupy swaps its kernels in with it."""
    old = {name: globals()[name] for name in table}
    for name, (form, when) in table.items():
        globals()[name] = form if when is None else functools.partial(_either, form, when, old[name])
    return old


def _either(form, when, other, *args, **kwargs):
    return (form if when(*args, **kwargs) else other)(*args, **kwargs)


REFERENCE_FORMS = use_forms(FAST_FORMS)                  # the textbook forms, kept for the tests that compare


# ====================================================================================================
# Appendix C. Scaled RoPE, for checkpoints stretched to a longer context than they were trained on
# (cfg.rope_scaling; rope_inv_freq calls rope_scaled):
# - linear, position interpolation (Chen et al. 2023, arXiv:2306.15595): inv_freq / factor, so position p
#   turns as position p / factor did in training.
# - llama3, Llama 3.1's scaling (Meta's reference `apply_scaling`; Hugging Face's
#   `_compute_llama3_parameters`): with each pair's wavelength w = 2 pi / inv_freq and the original
#   context L0, short waves (w < L0 / high_freq_factor) stay, long waves (w > L0 / low_freq_factor) are
#   divided by factor, and in between s = (L0 / w - low_freq_factor) / (high_freq_factor - low_freq_factor)
#   blends the two: inv_freq' = (1 - s) * inv_freq / factor + s * inv_freq.

def rope_scaled(inv_freq, scaling):
    """inv_freq (hs/2,) scaled as `scaling` (lib/model_checks.check_rope_scaling's form) says, float64."""
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return inv_freq / factor
    L0, lo, hi = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    w = 2 * math.pi / inv_freq                                          # wavelengths, in positions
    s = (L0 / w - lo) / (hi - lo)
    blend = (1 - s) * inv_freq / factor + s * inv_freq
    return np.where(w < L0 / hi, inv_freq, np.where(w > L0 / lo, inv_freq / factor, blend))


# ----------------------------------------------------------------------------------------------------
# A small demo: overfit one batch of random tokens, then generate from it.

if __name__ == "__main__":
    cfg = GPTConfig(vocab_size=32, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16)
    params = init_params(cfg, seed=0)
    state = adamw_init(params)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, cfg.max_seq_len + 1))
    ids, targets = data[:, :-1], data[:, 1:]
    for step in range(200):
        loss, grads = loss_and_grads(params, ids, targets, cfg, seed=step)
        clip_grad_norm(grads, 1.0)
        adamw_step(params, grads, state, lr_schedule(step, 1e-2, 1e-3, 10, 200), weight_decay=0.0)
        if step % 40 == 0 or step == 199:
            print(f"step {step:3d}  loss {loss:.4f}")
    # greedy decoding with the KV cache: the 4-token prompt once, then one new token per forward
    out = ids[0, :4].tolist()
    kv = kv_cache_init(cfg, np.float32)
    logits = forward_cached(params, np.asarray([out]), cfg, kv, pos=0)
    while len(out) < cfg.max_seq_len:
        out.append(int(logits[0, -1].argmax()))
        logits = forward_cached(params, np.asarray([out[-1:]]), cfg, kv, pos=len(out) - 1)
    print("memorised:", out)
    print("target:   ", data[0, :16].tolist())
