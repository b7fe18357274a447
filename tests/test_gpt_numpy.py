"""Tests for gpt_numpy.py: every backward against central finite differences in float64, the whole
model, gradient checkpointing, the KV cache, AdamW, learning, and bad input. Most tests take the
`backend` fixture (conftest.py) and run twice: on NumPy, and on CuPy where there is a GPU."""

import math

import numpy as np
import pytest

import gpt_numpy as gn
from conftest import numeric_grad, rel_err, small_cfg, tiny_cfg
from lib import generation, mixed_precision

# ----------------------------------------------------------------------------------------------------
# helpers

TOL = 1e-6          # largest relative error a float64 gradient check may show
MAX_SEEN = {}       # largest relative error per check, printed at the end (pytest -s)


def record(name, err):
    MAX_SEEN[name] = max(MAX_SEEN.get(name, 0.0), err)
    return err


def rng():
    return np.random.default_rng(1234)


def normal(gm, *shape, scale=1.0, seed=1234):
    """A float64 standard-normal array on gm's backend."""
    return gm.to_device(scale * np.random.default_rng(seed).standard_normal(shape))


def check_layer(gm, name, fwd, bwd, inputs):
    """fwd(*inputs) -> (out, cache); bwd(dout, cache) -> grads for each input (tuple or single).
    The scalar is sum(out * dout) with a random dout (llm.c's per-layer check)."""
    out, cache = fwd(*inputs)
    dout = gm.to_device(rng().standard_normal(out.shape))
    grads = bwd(dout.copy(), cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    for k, (x, g) in enumerate(zip(inputs, grads)):
        num = numeric_grad(lambda: float((fwd(*inputs)[0] * dout).sum()), x)
        err = record(name, rel_err(g, num))
        assert err < TOL, f"{name}: input {k} relative error {err:.2e}"


def cache_arrays(cache):
    """Every array (NumPy or CuPy) reachable from a model_forward cache."""
    out, stack = [], [cache]
    while stack:
        o = stack.pop()
        if isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "dtype") and hasattr(o, "shape") and o.ndim > 0:
            out.append(o)
    return out


def model_of(gm):
    """The module whose globals the model's functions read (ATT_BLOCK, the swapped forms): gpt_numpy
    itself, or gpt_cupy's CuPy copy of it (gpt_cupy's own names are re-exports)."""
    return getattr(gm, "model", gm)


def host(gm, d):
    """{name: host array} of a dict of backend arrays."""
    return {k: gm.to_host(v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------------
# each layer's backward on its own

def test_embedding_backward_accumulates_repeated_ids(backend):
    gm = backend
    W = normal(gm, 7, 5)
    ids = gm.to_device(np.array([[1, 3, 1], [6, 1, 3]]))   # ids repeat: gradients must add up
    out, cache = gm.embedding_forward(ids, W)
    dout = normal(gm, *out.shape, seed=5)
    for bwd in (gm.REFERENCE_FORMS["embedding_backward"], gm.embedding_backward):
        dW = bwd(dout, cache)
        num = numeric_grad(lambda: float((gm.embedding_forward(ids, W)[0] * dout).sum()), W)
        assert record("embedding", rel_err(dW, num)) < TOL
        d = gm.to_host(dout)
        np.testing.assert_allclose(gm.to_host(dW)[1], d[0, 0] + d[0, 2] + d[1, 1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_fast_embedding_backward_equals_reference(backend, dtype):
    # the flat add.at of embedding_backward_flat (the form the model runs) against the textbook add.at on rows
    gm = backend
    r = rng()
    ids = gm.to_device(r.integers(0, 13, (4, 9)))
    dout = gm.to_device(r.standard_normal((4, 9, 6)).astype(dtype))
    cache = (ids, (13, 6))
    a, b = gm.embedding_backward_flat(dout, cache), gm.REFERENCE_FORMS["embedding_backward"](dout, cache)
    assert a.dtype == b.dtype == np.promote_types(dtype, np.float32)
    np.testing.assert_allclose(gm.to_host(a), gm.to_host(b), rtol=1e-6, atol=1e-6)


def test_rmsnorm_backward(backend):
    gm = backend
    x, w = normal(gm, 2, 3, 6), normal(gm, 6, seed=2)
    check_layer(gm, "rmsnorm", lambda x, w: gm.rmsnorm_forward(x, w, 1e-5), gm.rmsnorm_backward, [x, w])


def test_layernorm_backward(backend):
    gm = backend
    x, w, b = normal(gm, 2, 3, 6), normal(gm, 6, seed=2), normal(gm, 6, seed=3)
    check_layer(gm, "layernorm", lambda x, w, b: gm.layernorm_forward(x, w, b, 1e-5), gm.layernorm_backward,
                [x, w, b])


def test_matmul_backward(backend):
    gm = backend
    x, W = normal(gm, 2, 3, 4), normal(gm, 4, 5, seed=2)
    check_layer(gm, "matmul", gm.matmul_forward, gm.matmul_backward, [x, W])


def test_split_and_merge_heads(backend):
    gm = backend
    B, T, nh, hs = 2, 3, 4, 6
    u = gm.to_device(np.arange(B * T * nh * hs, dtype=np.float64).reshape(B, T, nh * hs))
    heads = gm.split_heads(u, nh)
    assert heads.shape == (B, nh, T, hs)
    h = gm.to_host(heads)
    np.testing.assert_array_equal(h[1, 2, 0], gm.to_host(u)[1, 0, 2 * hs:3 * hs])   # head 2 = its columns
    np.testing.assert_array_equal(gm.to_host(gm.merge_heads(heads)), gm.to_host(u))


def test_rope_backward_and_convention(backend):
    gm = backend
    T, hs = 5, 8
    cos, sin = gm.rope_tables(np.arange(T), hs, 10000.0, np.float64)
    u = normal(gm, 2, 3, T, hs)
    check_layer(gm, "rope", lambda u: (gm.rope_forward(u, cos, sin), None),
                lambda d, _: gm.rope_backward(d, cos, sin), [u])
    # the half-split convention of SPEC.md, written out the long way
    uh = gm.to_host(u)
    inv = 10000.0 ** (-np.arange(0, hs, 2) / hs)
    ang = np.arange(T)[:, None] * inv
    c, s = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-uh[..., hs // 2:], uh[..., :hs // 2]], -1)
    np.testing.assert_array_equal(gm.to_host(gm.rotate_half(u)), rot)
    np.testing.assert_allclose(gm.to_host(gm.rope_forward(u, cos, sin)), uh * c + rot * s, rtol=1e-12, atol=1e-12)
    # its backward is the rotation by the opposite angle: the inverse
    np.testing.assert_allclose(gm.to_host(gm.rope_backward(gm.rope_forward(u, cos, sin), cos, sin)), uh,
                               rtol=1e-12, atol=1e-12)


def test_softmax_backward(backend):
    gm = backend

    def fwd(a):
        p = gm.softmax_(a.copy())
        return p, p

    check_layer(gm, "softmax", fwd, lambda d, p: gm.softmax_backward_(d, p), [normal(gm, 2, 4, 5)])


def test_softmax_backward_with_given_rowsum(backend):
    # the fast form attention uses (the row sum handed in) equals the plain one
    gm = backend
    p = gm.softmax_(normal(gm, 2, 3, 4, 6))
    dp = normal(gm, *p.shape, seed=2)
    rowsum = (dp * p).sum(-1, keepdims=True)
    np.testing.assert_allclose(gm.to_host(gm.softmax_backward_(dp.copy(), p, rowsum)),
                               gm.to_host(gm.softmax_backward_(dp.copy(), p)), rtol=1e-12, atol=1e-14)


def test_dropout_backward(backend):
    gm = backend
    x = normal(gm, 3, 4, 5)
    keep = gm.dropout_mask(x.shape, 0.3, (7, 0, 1))
    assert keep.dtype == bool and 0 < float(keep.mean()) < 1
    check_layer(gm, "dropout", lambda x: (gm.dropout_forward(x, keep, 0.3), None),
                lambda d, _: gm.dropout_backward(d, keep, 0.3), [x])


@pytest.mark.parametrize("p_drop", [0.0, 0.25])
def test_attention_backward(backend, p_drop):
    gm = backend
    B, T, C, nh = 2, 5, 8, 2
    cos, sin = gm.rope_tables(np.arange(T), C // nh, 10000.0, np.float64)
    x = normal(gm, B, T, C)
    Wqkv, Wproj = normal(gm, C, 3 * C, scale=0.5, seed=2), normal(gm, C, C, scale=0.5, seed=3)
    fwd = lambda x, Wqkv, Wproj: gm.attention_forward(x, Wqkv, Wproj, cos, sin, nh, p_drop, (3, 1, 0))
    check_layer(gm, "attention", fwd, gm.attention_backward, [x, Wqkv, Wproj])


def test_attention_is_textbook(backend):
    # softmax(q k^T / sqrt(hs) + mask) v per head, from q, k, v = split(x @ Wqkv) and RoPE, written
    # out with loops over heads
    gm = backend
    B, T, C, nh = 2, 6, 12, 3
    hs = C // nh
    cos, sin = gm.rope_tables(np.arange(T), hs, 10000.0, np.float64)
    x, Wqkv, Wproj = normal(gm, B, T, C), normal(gm, C, 3 * C, seed=2), normal(gm, C, C, seed=3)
    out, cache = gm.attention_forward(x, Wqkv, Wproj, cos, sin, nh)
    xh, Wq, Wp, c, s = (gm.to_host(a) for a in (x, Wqkv, Wproj, cos, sin))
    qkv = xh @ Wq
    y = np.zeros((B, T, C))
    rot = lambda u: u * c + np.concatenate([-u[..., hs // 2:], u[..., :hs // 2]], -1) * s
    for h in range(nh):
        cols = slice(h * hs, (h + 1) * hs)
        q, k, v = qkv[..., cols], qkv[..., C:][..., cols], qkv[..., 2 * C:][..., cols]
        scores = rot(q) @ rot(k).transpose(0, 2, 1) / math.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        y[..., cols] = att / att.sum(-1, keepdims=True) @ v
    np.testing.assert_allclose(gm.to_host(out), y @ Wp, rtol=1e-10, atol=1e-12)


def test_attention_is_causal(backend):
    gm = backend
    B, T, C, nh = 1, 6, 8, 2
    cos, sin = gm.rope_tables(np.arange(T), C // nh, 10000.0, np.float64)
    x = rng().standard_normal((B, T, C))
    Wqkv, Wproj = normal(gm, C, 3 * C, seed=2), normal(gm, C, C, seed=3)
    out1 = gm.to_host(gm.attention_forward(gm.to_device(x), Wqkv, Wproj, cos, sin, nh)[0])
    x2 = x.copy()
    x2[:, 4:] = rng().standard_normal((B, 2, C))      # change the future: the past must not move
    out2 = gm.to_host(gm.attention_forward(gm.to_device(x2), Wqkv, Wproj, cos, sin, nh)[0])
    np.testing.assert_array_equal(out1[:, :4], out2[:, :4])
    assert not np.allclose(out1[:, 4:], out2[:, 4:])


def test_swiglu_backward(backend):
    gm = backend
    x = normal(gm, 2, 3, 4)
    Wg, Wu, Wd = normal(gm, 4, 6, seed=2), normal(gm, 4, 6, seed=3), normal(gm, 6, 4, seed=4)
    check_layer(gm, "swiglu", gm.swiglu_forward, gm.swiglu_backward, [x, Wg, Wu, Wd])


def test_cross_entropy_backward_with_ignored_targets(backend):
    gm = backend
    logits = normal(gm, 2, 4, 7)
    targets = np.array([[1, -1, 6, 0], [-1, 3, 3, 2]])
    t = gm.to_device(targets)
    loss, cache = gm.cross_entropy_forward(logits, t)
    dlogits = gm.to_host(gm.cross_entropy_backward(1.0, cache)).reshape(logits.shape)
    num = numeric_grad(lambda: gm.cross_entropy_forward(logits, t)[0], logits)
    assert record("cross_entropy", rel_err(dlogits, num)) < TOL
    assert np.all(dlogits[0, 1] == 0) and np.all(dlogits[1, 0] == 0)
    # the formula, directly
    lh = gm.to_host(logits)
    lse = np.log(np.exp(lh).sum(-1))
    valid = targets >= 0
    picked = np.take_along_axis(lh, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    assert loss == pytest.approx(((lse - picked) * valid).sum() / valid.sum(), rel=1e-12)


def test_cross_entropy_overwrite_equals_the_copy(backend):
    # overwrite=True computes the softmax in the logits' buffer: the same loss and gradient, bit for bit
    gm = backend
    logits = normal(gm, 3, 4, 9)
    t = gm.to_device(np.array([[1, -1, 6, 0], [2, 3, 8, 2], [-1, 0, 0, 5]]))
    l1, c1 = gm.cross_entropy_forward(logits.copy(), t)
    buf = logits.copy()
    l2, c2 = gm.cross_entropy_forward(buf, t, overwrite=True)
    assert l1 == l2 and c2[0].base is buf and c1[0].base is not buf     # the softmax is in buf's memory
    np.testing.assert_array_equal(gm.to_host(gm.cross_entropy_backward(1.0, c1)),
                                  gm.to_host(gm.cross_entropy_backward(1.0, c2)))


# ----------------------------------------------------------------------------------------------------
# the whole model in float64

def batch(cfg, B=2, T=5, seed=0, ignore=True):
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (B, T))
    ids[0, 1] = ids[0, 3] = ids[1, 0]                  # repeated ids in the embedding
    targets = r.integers(0, cfg.vocab_size, (B, T))
    if ignore:
        targets[0, 2] = targets[1, 4] = -1
    return ids, targets


def perturb(params, seed=5):
    """Random norm weights and biases (host arrays), so their gradients are not trivially symmetric."""
    r = np.random.default_rng(seed)
    for k, p in params.items():
        if p.ndim == 1:
            p += 0.3 * r.standard_normal(p.shape)
    return params


def scaled_params(gm, cfg, seed, mult, dtype=np.float64):
    """init_params with the matrices multiplied by `mult` (larger weights than the 0.02 init, so every
    path carries signal worth checking) and perturbed norms."""
    params = gn.init_params(cfg, seed=seed, dtype=dtype)
    for p in params.values():
        if p.ndim == 2:
            p *= mult
    return {k: gm.to_device(v) for k, v in perturb(params).items()}


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_gradients_every_entry(norm, tie, dropout):
    # NumPy only: every entry is many small forwards; the sampled check below runs on both backends
    cfg = tiny_cfg(norm=norm, tie_embeddings=tie, dropout=dropout)
    params = scaled_params(gn, cfg, seed=1, mult=10.0)
    ids, targets = batch(cfg)                          # B=2 > 1, T=5 < max_seq_len=7, targets with -1
    loss, grads = gn.loss_and_grads(params, ids, targets, cfg, seed=42)
    assert set(grads) == set(params)

    def train_loss():
        logits, _ = gn.model_forward(params, ids, cfg, train=True, seed=42)
        return gn.cross_entropy_forward(logits, targets)[0]

    assert train_loss() == loss
    for k, p in params.items():
        assert grads[k].shape == p.shape and grads[k].dtype == np.float64
        num = numeric_grad(train_loss, p)
        err = record("model", rel_err(grads[k], num))
        assert err < TOL, f"{k}: relative error {err:.2e}"


def test_model_gradients_sampled_larger_config(backend):
    # a config with more heads, layers and positions; a random sample of entries per tensor
    gm = backend
    cfg = gn.GPTConfig(vocab_size=23, n_layer=3, n_head=4, d_model=16, d_ff=40, max_seq_len=12,
                       dropout=0.1, tie_embeddings=False)
    params = scaled_params(gm, cfg, seed=3, mult=5.0)
    ids, targets = batch(cfg, B=3, T=12)
    loss, grads = gm.loss_and_grads(params, ids, targets, cfg, seed=9)
    t = gm.to_device(targets)
    f = lambda: gm.cross_entropy_forward(gm.model_forward(params, ids, cfg, True, 9)[0], t)[0]
    r = np.random.default_rng(0)
    for k, p in params.items():
        idx = r.choice(p.size, size=min(p.size, 12), replace=False)
        num = numeric_grad(f, p, idx=idx).reshape(-1)[idx]
        err = record("model", rel_err(gm.to_host(grads[k]).reshape(-1)[idx], num))
        assert err < TOL, f"{k}: relative error {err:.2e}"


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_is_bit_identical(backend, norm, dtype):
    gm = backend
    cfg = tiny_cfg(norm=norm, dropout=0.3, n_layer=3)
    ckpt = tiny_cfg(norm=norm, dropout=0.3, n_layer=3, checkpoint=True)
    params = gm.init_params(cfg, seed=0, dtype=dtype)
    ids, targets = batch(cfg)
    loss1, g1 = gm.loss_and_grads(params, ids, targets, cfg, seed=17)
    loss2, g2 = gm.loss_and_grads(params, ids, targets, ckpt, seed=17)
    assert loss1 == loss2
    for k in params:
        assert g1[k].dtype == dtype
        np.testing.assert_array_equal(gm.to_host(g1[k]), gm.to_host(g2[k]), err_msg=k)
    # and dropout is really on: another seed gives another loss
    assert gm.loss_and_grads(params, ids, targets, cfg, seed=18)[0] != loss1


def test_float32_by_default_and_float64_when_asked(backend):
    gm = backend
    cfg = tiny_cfg()
    p32, p64 = gm.init_params(cfg), gm.init_params(cfg, dtype=np.float64)
    ids, targets = batch(cfg)
    assert all(p.dtype == np.float32 for p in p32.values())
    _, g = gm.loss_and_grads(p32, ids, targets, cfg)
    assert all(v.dtype == np.float32 for v in g.values())
    assert gm.forward(p64, ids, cfg).dtype == np.float64
    np.testing.assert_allclose(gm.to_host(gm.forward(p32, ids, cfg)), gm.to_host(gm.forward(p64, ids, cfg)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_float32_training_never_upcasts(backend, checkpoint):
    # NumPy 2 keeps float32 with Python floats; a float64 array anywhere would double memory and time
    gm = backend
    cfg = tiny_cfg(dropout=0.2, checkpoint=checkpoint)
    params = gm.init_params(cfg)
    ids, targets = batch(cfg)
    _, cache = gm.model_forward(params, ids, cfg, train=True, seed=3)
    floats = [a for a in cache_arrays(cache) if a.dtype.kind == "f"]
    assert floats and all(a.dtype == np.float32 for a in floats), {a.dtype for a in floats}
    # and the recomputed block caches of a checkpointed backward
    cos, sin = gm.rope_tables(np.arange(ids.shape[1]), cfg.head_size, cfg.rope_theta, np.float32)
    x = params["tok_emb"][gm.to_device(ids)]
    _, c = gm.block_forward(x, params, 0, cfg, cos, sin, 0.2, 3, recompute=True)
    assert all(a.dtype == np.float32 for a in cache_arrays(c) if a.dtype.kind == "f")
    logits, _ = gm.model_forward(params, ids, cfg, train=True, seed=3)
    assert logits.dtype == np.float32
    _, grads = gm.loss_and_grads(params, ids, targets, cfg, seed=3)
    state = gm.adamw_init(params)
    gm.adamw_step(params, grads, state, 1e-3)
    gm.REFERENCE_FORMS["adamw_step"](params, grads, state, 1e-3)
    assert all(v.dtype == np.float32 for d in (params, state["m"], state["v"]) for v in d.values())


def test_recompute_gives_the_cache_of_the_first_forward(backend):
    gm = backend
    cfg = tiny_cfg(dropout=0.3)
    params = gm.init_params(cfg, dtype=np.float64)
    ids, _ = batch(cfg)
    cos, sin = gm.rope_tables(np.arange(ids.shape[1]), cfg.head_size, cfg.rope_theta, np.float64)
    x = params["tok_emb"][gm.to_device(ids)]
    out, c1 = gm.block_forward(x, params, 1, cfg, cos, sin, 0.3, 5)
    none, c2 = gm.block_forward(x, params, 1, cfg, cos, sin, 0.3, 5, recompute=True)
    assert none is None and out.shape == x.shape
    a1, a2 = cache_arrays(c1), cache_arrays(c2)
    assert len(a1) == len(a2)
    for u, v in zip(a1, a2):
        np.testing.assert_array_equal(gm.to_host(u), gm.to_host(v))


def test_init_matches_spec(backend):
    gm = backend
    cfg = gn.GPTConfig(vocab_size=50, n_layer=4, n_head=4, d_model=64, d_ff=172, max_seq_len=16,
                       norm="layernorm", tie_embeddings=False)
    params = host(gm, gm.init_params(cfg, seed=0))
    assert params["tok_emb"].shape == (50, 64) and params["lm_head"].shape == (64, 50)
    assert params["blocks.3.attn.qkv"].shape == (64, 192)
    assert params["blocks.0.ffn.w_down"].shape == (172, 64)
    assert np.all(params["blocks.1.norm2.weight"] == 1) and np.all(params["norm_f.bias"] == 0)
    assert params["blocks.0.attn.qkv"].std() == pytest.approx(0.02, rel=0.05)
    assert params["blocks.0.attn.proj"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert "lm_head" not in gm.init_params(tiny_cfg(), seed=0)
    # the same weights on every backend (drawn on the host)
    for k, p in gn.init_params(cfg, seed=0).items():
        np.testing.assert_array_equal(params[k], p)


# ----------------------------------------------------------------------------------------------------
# grouped-query attention: nkv key/value heads, each serving nh / nkv query heads

N_KV = [1, 2, 4]       # for nh = 4: one key/value head for all (multi-query), pairs, plain multi-head


@pytest.mark.parametrize("n_kv", N_KV)
@pytest.mark.parametrize("p_drop", [0.0, 0.25])
def test_gqa_attention_backward(backend, n_kv, p_drop):
    gm = backend
    B, T, C, nh = 2, 5, 16, 4
    hs = C // nh
    cos, sin = gm.rope_tables(np.arange(T), hs, 10000.0, np.float64)
    x = normal(gm, B, T, C)
    Wqkv = normal(gm, C, (nh + 2 * n_kv) * hs, scale=0.5, seed=2)     # (C, (nh + 2 nkv) hs)
    Wproj = normal(gm, C, C, scale=0.5, seed=3)
    fwd = lambda x, Wqkv, Wproj: gm.attention_forward(x, Wqkv, Wproj, cos, sin, nh, p_drop, (3, 1, 0))
    check_layer(gm, f"attention nkv={n_kv}", fwd, gm.attention_backward, [x, Wqkv, Wproj])


@pytest.mark.parametrize("n_kv", N_KV)
def test_gqa_attention_is_textbook(backend, n_kv):
    # per query head h: softmax(q_h k_j^T / sqrt(hs) + mask) v_j with j = h // (nh / nkv), the key/value
    # head it shares with its group (Hugging Face's repeat_kv), written out with a loop over heads
    gm = backend
    B, T, C, nh = 2, 6, 24, 4
    hs, g = C // nh, nh // n_kv
    cos, sin = gm.rope_tables(np.arange(T), hs, 10000.0, np.float64)
    x, Wqkv = normal(gm, B, T, C), normal(gm, C, (nh + 2 * n_kv) * hs, seed=2)
    Wproj = normal(gm, C, C, seed=3)
    out, cache = gm.attention_forward(x, Wqkv, Wproj, cos, sin, nh)
    xh, Wq, Wp, c, s = (gm.to_host(a) for a in (x, Wqkv, Wproj, cos, sin))
    qkv = xh @ Wq
    Q, K, V = qkv[..., :C], qkv[..., C:C + n_kv * hs], qkv[..., C + n_kv * hs:]
    rot = lambda u: u * c + np.concatenate([-u[..., hs // 2:], u[..., :hs // 2]], -1) * s
    y = np.zeros((B, T, C))
    for h in range(nh):
        j = h // g
        q, k, v = Q[..., h * hs:(h + 1) * hs], K[..., j * hs:(j + 1) * hs], V[..., j * hs:(j + 1) * hs]
        scores = rot(q) @ rot(k).transpose(0, 2, 1) / math.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        y[..., h * hs:(h + 1) * hs] = att / att.sum(-1, keepdims=True) @ v
    np.testing.assert_allclose(gm.to_host(out), y @ Wp, rtol=1e-10, atol=1e-12)


def gqa_cfg(n_kv, **kw):
    """tiny_cfg with 4 heads of size 4 and n_kv key/value heads."""
    return tiny_cfg(**{"n_head": 4, "d_model": 16, "n_kv_head": n_kv, **kw})


@pytest.mark.parametrize("n_kv", N_KV)
def test_gqa_model_gradients_every_entry(n_kv):
    cfg = gqa_cfg(n_kv, n_layer=1, dropout=0.2, tie_embeddings=False)
    params = scaled_params(gn, cfg, seed=1, mult=10.0)
    assert params["blocks.0.attn.qkv"].shape == (16, (4 + 2 * n_kv) * 4)
    ids, targets = batch(cfg)
    loss, grads = gn.loss_and_grads(params, ids, targets, cfg, seed=42)
    f = lambda: gn.cross_entropy_forward(gn.model_forward(params, ids, cfg, True, 42)[0], targets)[0]
    for k, p in params.items():
        err = record(f"model nkv={n_kv}", rel_err(grads[k], numeric_grad(f, p)))
        assert err < TOL, f"{k}: relative error {err:.2e}"


@pytest.mark.parametrize("n_kv", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gqa_checkpointing_is_bit_identical(backend, n_kv, dtype):
    gm = backend
    cfg, ckpt = gqa_cfg(n_kv, dropout=0.3), gqa_cfg(n_kv, dropout=0.3, checkpoint=True)
    params = gm.init_params(cfg, seed=0, dtype=dtype)
    ids, targets = batch(cfg)
    loss1, g1 = gm.loss_and_grads(params, ids, targets, cfg, seed=17)
    loss2, g2 = gm.loss_and_grads(params, ids, targets, ckpt, seed=17)
    assert loss1 == loss2
    for k in params:
        np.testing.assert_array_equal(gm.to_host(g1[k]), gm.to_host(g2[k]), err_msg=k)


@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_kv_cache_holds_nkv_heads_and_equals_full_forward(backend, n_kv):
    gm = backend
    cfg = gqa_cfg(n_kv, max_seq_len=9)
    params = trained_ish_params(gm, cfg)
    seq = np.random.default_rng(3).integers(0, cfg.vocab_size, 9)
    kv = gm.kv_cache_init(cfg, np.float64)
    assert all(K.shape == V.shape == (1, n_kv, 9, 4) for K, V in kv)   # nh / nkv times smaller
    logits = gm.forward_cached(params, seq[None, :4], cfg, kv, 0)
    np.testing.assert_allclose(gm.to_host(logits), gm.to_host(gm.forward(params, seq[None, :4], cfg)),
                               rtol=1e-10, atol=1e-12)
    for pos in range(4, 9):
        step = gm.forward_cached(params, seq[None, pos:pos + 1], cfg, kv, pos)
        full = gm.forward(params, seq[None, :pos + 1], cfg)[:, -1:]
        np.testing.assert_allclose(gm.to_host(step), gm.to_host(full), rtol=1e-10, atol=1e-12)
    assert generation.generate(gm, params, [1, 5], cfg, 10, temperature=0) == naive_greedy(gm, params, [1, 5], cfg, 10)


def test_gqa_config():
    cfg = gqa_cfg(2)
    assert cfg.qkv_size == (4 + 2 * 2) * 4 and gqa_cfg(None).n_kv_head == 4
    assert gn.GPTConfig(**cfg.to_dict()) == cfg                       # as a checkpoint stores it
    for bad in (3, 0, 8, 2.0, True):
        with pytest.raises(ValueError, match="n_kv_head must be a positive divisor of n_head"):
            gqa_cfg(bad)


# ----------------------------------------------------------------------------------------------------
# causal attention by query blocks, against the plain form it must equal

@pytest.mark.parametrize("n_kv", [1, 3])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_blocked_attention_equals_plain(backend, n_kv, p_drop, monkeypatch):
    # blocks of 4 rows over T = 11 (the last one partial), float64: outputs and every gradient agree
    gm = backend
    monkeypatch.setattr(model_of(gm), "ATT_BLOCK", 4)
    B, T, C, nh = 2, 11, 24, 3
    hs = C // nh
    cos, sin = gm.rope_tables(np.arange(T), hs, 10000.0, np.float64)
    x, Wqkv = normal(gm, B, T, C), normal(gm, C, (nh + 2 * n_kv) * hs, scale=0.5, seed=2)
    Wproj = normal(gm, C, C, scale=0.5, seed=3)
    plain_forward, plain_backward = (gm.REFERENCE_FORMS[f"attention_{s}"] for s in ("forward", "backward"))
    out1, c1 = plain_forward(x, Wqkv, Wproj, cos, sin, nh, p_drop, (5, 0, 0))
    out2, c2 = gm.attention_forward_blocked(x, Wqkv, Wproj, cos, sin, nh, p_drop, (5, 0, 0))
    assert c1.blocks is None and c2.blocks == [(0, 4, 4), (4, 8, 8), (8, 11, 11)]
    assert [a.shape[-2:] for a in c2.att] == [(4 * nh // n_kv, 4), (4 * nh // n_kv, 8), (3 * nh // n_kv, 11)]
    np.testing.assert_allclose(gm.to_host(out2), gm.to_host(out1), rtol=1e-12, atol=1e-13)
    dout = normal(gm, *out1.shape, seed=7)
    for g1, g2 in zip(plain_backward(dout, c1), gm.attention_backward_blocked(dout, c2)):
        np.testing.assert_allclose(gm.to_host(g2), gm.to_host(g1), rtol=1e-11, atol=1e-12)


def test_blocked_attention_backward(backend, monkeypatch):
    gm = backend
    monkeypatch.setattr(model_of(gm), "ATT_BLOCK", 2)
    B, T, C, nh, n_kv = 2, 5, 16, 4, 2
    hs = C // nh
    cos, sin = gm.rope_tables(np.arange(T), hs, 10000.0, np.float64)
    x, Wqkv = normal(gm, B, T, C), normal(gm, C, (nh + 2 * n_kv) * hs, scale=0.5, seed=2)
    Wproj = normal(gm, C, C, scale=0.5, seed=3)
    fwd = lambda x, Wqkv, Wproj: gm.attention_forward_blocked(x, Wqkv, Wproj, cos, sin, nh, 0.25, (3, 1, 0))
    check_layer(gm, "attention blocked", fwd, gm.attention_backward_blocked, [x, Wqkv, Wproj])


def test_fast_forms_take_over_as_the_table_says(monkeypatch):
    # FAST_FORMS: the flat embedding backward and the in-place AdamW always, blocked attention from
    # T >= 2 * ATT_BLOCK, its backward following the form of the forward that made the cache
    gm = gn
    assert gm.embedding_backward is gm.embedding_backward_flat and gm.adamw_step is gm.adamw_step_inplace
    assert gm.REFERENCE_FORMS["embedding_backward"].__name__ == "embedding_backward"
    assert gm.REFERENCE_FORMS["adamw_step"].__name__ == "adamw_step"
    monkeypatch.setattr(gm, "ATT_BLOCK", 4)
    nh, n_kv, C = 2, 1, 8
    hs = C // nh
    Wqkv, Wproj = normal(gm, C, (nh + 2 * n_kv) * hs, seed=2), normal(gm, C, C, seed=3)
    for T, blocked in ((7, False), (8, True), (11, True)):
        cos, sin = gm.rope_tables(np.arange(T), hs, 10000.0, np.float64)
        x, dout = normal(gm, 2, T, C), normal(gm, 2, T, C, seed=4)
        out, cache = gm.attention_forward(x, Wqkv, Wproj, cos, sin, nh, 0.2, (1, 0, 0))
        assert (cache.blocks is not None) == blocked, T
        form = gm.attention_forward_blocked if blocked else gm.REFERENCE_FORMS["attention_forward"]
        out2, cache2 = form(x, Wqkv, Wproj, cos, sin, nh, 0.2, (1, 0, 0))
        np.testing.assert_array_equal(out, out2)
        back = gm.attention_backward_blocked if blocked else gm.REFERENCE_FORMS["attention_backward"]
        for g1, g2 in zip(gm.attention_backward(dout, cache), back(dout, cache2)):
            np.testing.assert_array_equal(g1, g2)
    # use_forms rebinds a name for every caller, and gives back what it replaced
    seen = []

    def counted(dout, cache):
        seen.append(1)
        return gm.embedding_backward_flat(dout, cache)

    old = gm.use_forms({"embedding_backward": (counted, None)})
    try:
        cfg = tiny_cfg()
        gm.loss_and_grads(gm.init_params(cfg), *batch(cfg), cfg)
        assert seen == [1] and old == {"embedding_backward": gm.embedding_backward_flat}
    finally:
        gm.use_forms({k: (f, None) for k, f in old.items()})
    assert gm.embedding_backward is gm.embedding_backward_flat


def test_blocked_attention_with_a_kv_cache(backend, monkeypatch):
    # a prefill after earlier positions: block rows start at pos, and see the cache's keys too
    gm = backend
    monkeypatch.setattr(model_of(gm), "ATT_BLOCK", 3)
    cfg = gqa_cfg(2, max_seq_len=20)
    params = trained_ish_params(gm, cfg)
    seq = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 20))
    kv = gm.kv_cache_init(cfg, np.float64)
    gm.forward_cached(params, seq[:, :5], cfg, kv, 0)                 # 5 >= 2 blocks: blocked
    logits = gm.forward_cached(params, seq[:, 5:], cfg, kv, 5)         # 15 more, from position 5
    monkeypatch.setattr(model_of(gm), "ATT_BLOCK", 10**6)                       # the plain form only
    np.testing.assert_allclose(gm.to_host(logits), gm.to_host(gm.forward(params, seq, cfg)[:, 5:]),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_model_with_blocked_attention(backend, checkpoint, monkeypatch):
    # the whole model takes the blocked form once T >= 2 blocks: the same loss and gradients as the
    # plain form, and checkpointing still bit-identical to no checkpointing
    gm = backend
    cfg = gqa_cfg(2, dropout=0.2, checkpoint=checkpoint)
    params = gm.init_params(cfg, seed=1, dtype=np.float64)
    ids, targets = batch(cfg)
    plain_loss, plain = gm.loss_and_grads(params, ids, targets, cfg, seed=4)
    monkeypatch.setattr(model_of(gm), "ATT_BLOCK", 2)
    loss, grads = gm.loss_and_grads(params, ids, targets, cfg, seed=4)
    assert abs(loss - plain_loss) < 1e-12
    for k in params:
        assert rel_err(grads[k], plain[k]) < 1e-10, k
    if checkpoint:
        _, g2 = gm.loss_and_grads(params, ids, targets, gqa_cfg(2, dropout=0.2), seed=4)
        for k in params:
            np.testing.assert_array_equal(gm.to_host(g2[k]), gm.to_host(grads[k]), err_msg=k)


def test_blocked_attention_in_half_precision(backend, monkeypatch):
    # mixed precision takes the blocked form too: probabilities kept in float32, gradients as the plain form's
    gm = backend
    cfg = small_cfg(n_kv_head=2)
    params = gm.init_params(cfg, seed=0)
    ids, targets = batch(cfg, B=2, T=16)
    _, plain = mixed_precision.loss_and_grads_mixed(gm, params, ids, targets, cfg, 1024.0, seed=1)
    monkeypatch.setattr(model_of(gm), "ATT_BLOCK", 4)
    _, cache = gm.model_forward({k: v.astype(np.float16) for k, v in params.items()}, ids, cfg, train=True)
    atts = cache[1][0][1].att
    assert isinstance(atts, list) and all(a.dtype == np.float32 for a in atts)
    _, grads = mixed_precision.loss_and_grads_mixed(gm, params, ids, targets, cfg, 1024.0, seed=1)
    for k in params:
        assert rel_err(grads[k], plain[k]) < 1e-2, k


# ----------------------------------------------------------------------------------------------------
# RoPE scaling

LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_rope_scaling_linear_and_llama3():
    hs, theta = 32, 10000.0
    base = theta ** (-np.arange(0, hs, 2) / hs)
    np.testing.assert_allclose(gn.rope_inv_freq(hs, theta, {"type": "linear", "factor": 4.0}), base / 4, rtol=1e-15)
    # llama3 with an original context of 64: waves shorter than 64/4 = 16 positions stay, longer than
    # 64/1 are divided by 8, and in between the blend (1 - s) f / 8 + s f with s = (64 / w - 1) / (4 - 1)
    got = gn.rope_inv_freq(hs, theta, LLAMA3)
    w = 2 * np.pi / base
    short, long_ = w < 16, w > 64
    mid = ~short & ~long_
    assert short.any() and long_.any() and mid.any()                  # all three regimes are tested
    np.testing.assert_array_equal(got[short], base[short])
    np.testing.assert_allclose(got[long_], base[long_] / 8, rtol=1e-15)
    s = (64 / w[mid] - 1) / 3
    np.testing.assert_allclose(got[mid], (1 - s) * base[mid] / 8 + s * base[mid], rtol=1e-15)


@pytest.mark.parametrize("rs, match", [
    ({"type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn' is not implemented: choose one of linear, llama3"),
    ({"rope_type": "dynamic", "factor": 2.0}, "type 'dynamic' is not implemented"),
    ({"type": "linear"}, "linear: factor must be a positive number"),
    ({**LLAMA3, "high_freq_factor": 0.5}, "high_freq_factor must exceed low_freq_factor"),
    ("linear", "must be None or a dict"),
])
def test_rope_scaling_refused_by_name(rs, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(rope_scaling=rs)


def test_rope_scaling_reaches_every_path(backend):
    # the full forward, the KV cache and a checkpoint's config all see the scaling
    gm = backend
    cfg = gqa_cfg(2, rope_scaling={"rope_type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "type"}},
                  max_seq_len=7)
    assert cfg.rope_scaling == LLAMA3 and gn.GPTConfig(**cfg.to_dict()) == cfg
    params = trained_ish_params(gm, cfg)
    seq = np.array([[3, 1, 4, 1, 5, 9, 2]])
    plain = gm.forward(params, seq, gqa_cfg(2, max_seq_len=7))
    full = gm.forward(params, seq, cfg)
    assert rel_err(full, plain) > 1e-3                                # the scaling changes the model
    kv = gm.kv_cache_init(cfg, np.float64)
    gm.forward_cached(params, seq[:, :5], cfg, kv, 0)
    step = gm.forward_cached(params, seq[:, 5:], cfg, kv, 5)
    np.testing.assert_allclose(gm.to_host(step), gm.to_host(full[:, 5:]), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# generation

def trained_ish_params(gm, cfg, seed=0):
    params = gn.init_params(cfg, seed=seed, dtype=np.float64)
    for p in params.values():
        if p.ndim == 2:
            p *= 20.0                                  # sharper logits than the init, still random
    return {k: gm.to_device(v) for k, v in params.items()}


def test_kv_cache_logits_equal_full_forward(backend):
    gm = backend
    cfg = tiny_cfg(max_seq_len=10)
    params = trained_ish_params(gm, cfg)
    seq = np.random.default_rng(3).integers(0, cfg.vocab_size, 10)
    kv = gm.kv_cache_init(cfg, np.float64)
    logits = gm.forward_cached(params, seq[None, :4], cfg, kv, 0)     # prefill 4 tokens
    np.testing.assert_allclose(gm.to_host(logits), gm.to_host(gm.forward(params, seq[None, :4], cfg)),
                               rtol=1e-10, atol=1e-12)
    for pos in range(4, 10):                                          # then one token at a time
        step = gm.forward_cached(params, seq[None, pos:pos + 1], cfg, kv, pos)
        full = gm.forward(params, seq[None, :pos + 1], cfg)[:, -1:]
        np.testing.assert_allclose(gm.to_host(step), gm.to_host(full), rtol=1e-10, atol=1e-12)


def test_kv_cache_holds_unscaled_rotated_keys(backend):
    # the cache's keys are rope(x @ Wk), as Hugging Face's past_key_values: no 1/sqrt(hs) folded in
    gm = backend
    cfg = tiny_cfg(n_layer=1, max_seq_len=6)
    params = trained_ish_params(gm, cfg)
    seq = np.array([[1, 4, 2, 9]])
    kv = gm.kv_cache_init(cfg, np.float64)
    gm.forward_cached(params, seq, cfg, kv, 0)
    C, nh, hs = cfg.d_model, cfg.n_head, cfg.head_size
    x = gm.to_host(params["tok_emb"])[seq]
    h = gm.to_host(gm.rmsnorm_forward(gm.to_device(x), params["blocks.0.norm1.weight"], cfg.norm_eps)[0])
    k = (h @ gm.to_host(params["blocks.0.attn.qkv"])[:, C:2 * C]).reshape(1, 4, nh, hs).transpose(0, 2, 1, 3)
    cos, sin = gn.rope_tables(np.arange(4), hs, cfg.rope_theta, np.float64)
    expect = k * cos + np.concatenate([-k[..., hs // 2:], k[..., :hs // 2]], -1) * sin
    np.testing.assert_allclose(gm.to_host(kv[0][0])[:, :, :4], expect, rtol=1e-12, atol=1e-12)
    assert not gm.to_host(kv[0][0])[:, :, 4:].any()


def naive_greedy(gm, params, prompt, cfg, n):
    ids = list(prompt)
    for _ in range(n):
        ctx = np.asarray([ids[-cfg.max_seq_len:]])
        ids.append(int(np.argmax(gm.to_host(gm.forward(params, ctx, cfg))[0, -1])))
    return ids


def test_greedy_generation_matches_full_forward_and_crops_context(backend):
    gm = backend
    cfg = tiny_cfg(max_seq_len=6)
    params = trained_ish_params(gm, cfg, seed=2)
    prompt = [1, 5, 2]
    out = generation.generate(gm, params, prompt, cfg, max_new_tokens=9, temperature=0)   # runs past max_seq_len
    assert out == naive_greedy(gm, params, prompt, cfg, 9)
    assert out == generation.generate(gm, params, prompt, cfg, max_new_tokens=9, temperature=0)
    # a prompt longer than max_seq_len is cropped to its end
    long_prompt = list(range(10))
    assert generation.generate(gm, params, long_prompt, cfg, 3, temperature=0) == naive_greedy(gm, params, long_prompt, cfg, 3)


def test_a_kv_session_feeds_only_the_new_tokens_and_changes_nothing(backend, monkeypatch):
    """A chat: each turn's prompt is the last turn's prompt and reply plus a new message. With a KVSession
    the model reads only the tokens after the common prefix, and the replies are the same as without it:
    also when the next prompt differs from the cache before its end (a reply re-tokenized differently)
    and when the cache has to grow."""
    gm = backend
    cfg = tiny_cfg(max_seq_len=40)
    params = trained_ish_params(gm, cfg, seed=5)
    fed = []
    real = gm.forward_cached
    monkeypatch.setattr(gm, "forward_cached", lambda p, ids, *a, **k: fed.append(ids.shape[1]) or real(p, ids, *a, **k))
    session = generation.KVSession()
    prompt, lengths = [1, 7, 3], []
    for turn, new in enumerate([[4, 2], [9], [5, 5, 6]]):
        fed.clear()
        with_session = generation.generate(gm, params, prompt, cfg, 4, temperature=0, session=session)
        n_fed = list(fed)
        assert with_session == generation.generate(gm, params, prompt, cfg, 4, temperature=0)     # no session: all of it
        assert session.ids == with_session[:-1]                      # what the cache holds: all but the last
        if turn > 0:
            assert n_fed[0] == 1 + len(new_prev)                     # prefill: the previous reply's last token + the message
        prompt, new_prev = with_session + new, new
        lengths.append(session.kv[0][0].shape[2])
    assert lengths[0] == 3 + 4 - 1 and lengths[-1] > lengths[0]       # sized for the first turn, then grown
    # a prompt that leaves the cached ids at position 2: the rest is recomputed, the result the same
    fed.clear()
    other = session.ids[:2] + [8, 8, 8]
    assert generation.generate(gm, params, other, cfg, 3, temperature=0, session=session) == generation.generate(gm, params, other, cfg, 3, temperature=0)
    assert fed[0] == len(other) - 2                                  # ids 2.. of the prompt


def test_sampling_is_reproducible_and_respects_stop_and_top_k(backend):
    gm = backend
    cfg = tiny_cfg(max_seq_len=8)
    params = trained_ish_params(gm, cfg, seed=4)
    a = generation.generate(gm, params, [3], cfg, 12, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    b = generation.generate(gm, params, [3], cfg, 12, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    assert a == b and len(a) == 13
    outs = {tuple(generation.generate(gm, params, [3], cfg, 12, temperature=2.0, seed=s)) for s in range(5)}
    assert len(outs) > 1
    stop = a[4]
    c = generation.generate(gm, params, [3], cfg, 12, temperature=1.0, top_k=5, top_p=0.9, seed=7, stop_ids=[stop])
    assert c[-1] == stop and len(c) == a.index(stop, 1) + 1
    # top_k=1 is greedy whatever the temperature
    assert generation.generate(gm, params, [3], cfg, 6, temperature=1.5, top_k=1, seed=1) == \
        generation.generate(gm, params, [3], cfg, 6, temperature=0)


def test_sample_next_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    r = np.random.default_rng(0)
    picks = {generation.sample_next(logits, r, 1.0, top_p=0.7) for _ in range(200)}
    assert picks == {0, 1}                             # 0.5 + 0.3 reaches 0.7: only the top two


# ----------------------------------------------------------------------------------------------------
# optimizer

def adamw_case(gm):
    r = rng()
    params = {"w": r.standard_normal((3, 4)), "norm.weight": r.standard_normal(4)}
    g1 = {k: r.standard_normal(p.shape) for k, p in params.items()}
    g2 = {k: r.standard_normal(p.shape) for k, p in params.items()}
    dev = lambda d: {k: gm.to_device(v) for k, v in d.items()}
    return params, g1, g2, dev


@pytest.mark.parametrize("form", ["adamw_step", "textbook"])
def test_adamw_two_steps_against_formula(backend, form):
    # the form the model runs (adamw_step_inplace on NumPy) and the textbook one it replaces
    gm = backend
    step = gm.adamw_step if form == "adamw_step" else gm.REFERENCE_FORMS["adamw_step"]
    params, g1, g2, dev = adamw_case(gm)
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.9, 1e-6, 0.5
    expect = {k: p.copy() for k, p in params.items()}
    for k in params:
        p, m, v = expect[k], 0.0, 0.0
        for t, g in ((1, g1[k]), (2, g2[k])):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            decay = wd if k == "w" else 0.0            # matrices only
            p = p - lr * decay * p - lr * mhat / (np.sqrt(vhat) + eps)
        expect[k] = p
    params = dev(params)
    state = gm.adamw_init(params)
    arrays = {k: (params[k], state["m"][k], state["v"][k]) for k in params}
    step(params, dev(g1), state, lr, b1, b2, eps, wd)
    step(params, dev(g2), state, lr, b1, b2, eps, wd)
    assert state["t"] == 2 and set(state) == {"t", "m", "v"}
    for k in params:
        np.testing.assert_allclose(gm.to_host(params[k]), expect[k], rtol=1e-12, atol=1e-14)
        # in place: the dicts still hold the same arrays (train.py and checkpoints rely on it)
        assert all(a is b for a, b in zip(arrays[k], (params[k], state["m"][k], state["v"][k])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_adamw_equals_reference(backend, dtype):
    gm = backend
    cfg = tiny_cfg(norm="layernorm", tie_embeddings=False)
    ids, targets = batch(cfg)
    p1 = gm.init_params(cfg, seed=0, dtype=dtype)
    p2 = {k: v.copy() for k, v in p1.items()}
    s1, s2 = gm.adamw_init(p1), gm.adamw_init(p2)
    for step in range(3):
        _, grads = gm.loss_and_grads(p1, ids, targets, cfg)
        gm.adamw_step(p1, grads, s1, 1e-2, weight_decay=0.1)
        gm.REFERENCE_FORMS["adamw_step"](p2, grads, s2, 1e-2, weight_decay=0.1)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for k in p1:
        assert rel_err(p1[k], p2[k]) < tol and rel_err(s1["m"][k], s2["m"][k]) < tol, k
        assert rel_err(s1["v"][k], s2["v"][k]) < tol, k


@pytest.mark.parametrize("block", [1, 5, 24, 1 << 20])
def test_adamw_by_blocks_of_rows_is_bit_identical(monkeypatch, block):
    # adamw_step_inplace runs each parameter through its passes in blocks of rows of ~ADAMW_BLOCK numbers:
    # blocks of single numbers, of 5 (one 3-wide row of "w" a block, 5 numbers of "b"), of 24 (8 rows of the
    # (13, 3) matrix: a short last block) and whole parameters must give the same bits, the decay still
    # decided by the whole parameter's ndim (the 1-D "b" is never decayed), views written in place
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((13, 3)), "b": rng.standard_normal(7), "t": rng.standard_normal((4, 2, 3))}
    grads = [{k: rng.standard_normal(p.shape) for k, p in params.items()} for _ in range(2)]

    def run(b):
        monkeypatch.setattr(gn, "ADAMW_BLOCK", b)
        p = {k: v.copy() for k, v in params.items()}
        st = gn.adamw_init(p)
        held = {k: (p[k], st["m"][k], st["v"][k]) for k in p}
        for g in grads:
            gn.adamw_step_inplace(p, g, st, 0.01, weight_decay=0.5)
        assert all(a is b for k in p for a, b in zip(held[k], (p[k], st["m"][k], st["v"][k])))
        return p, st

    (p1, s1), (p2, s2) = run(block), run(1 << 30)
    for k in params:
        for a, b in ((p1[k], p2[k]), (s1["m"][k], s2["m"][k]), (s1["v"][k], s2["v"][k])):
            np.testing.assert_array_equal(a, b)
    ref = {k: v.copy() for k, v in params.items()}
    st = gn.adamw_init(ref)
    for g in grads:
        gn.REFERENCE_FORMS["adamw_step"](ref, g, st, 0.01, weight_decay=0.5)
    for k in params:
        np.testing.assert_allclose(p1[k], ref[k], rtol=1e-12, atol=1e-14)


def test_clip_grad_norm(backend):
    gm = backend
    g = {"a": gm.to_device(np.array([3.0, 0.0])), "b": gm.to_device(np.array([[4.0]]))}
    assert gm.clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    assert math.sqrt(sum(float((v * v).sum()) for v in g.values())) == pytest.approx(1.0, rel=1e-5)
    g = {"a": gm.to_device(np.array([0.3, 0.4]))}
    gm.clip_grad_norm(g, 1.0)
    np.testing.assert_array_equal(gm.to_host(g["a"]), [0.3, 0.4])   # below the limit: untouched


def test_lr_schedule():
    f = lambda s: gn.lr_schedule(s, 1e-3, 1e-4, 10, 110)
    assert f(0) == pytest.approx(1e-4) and f(9) == pytest.approx(1e-3)
    assert f(60) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert f(110) == pytest.approx(1e-4) and f(500) == pytest.approx(1e-4)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_overfits_one_batch(backend):
    gm = backend
    cfg = gn.GPTConfig(vocab_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16)
    params = gm.init_params(cfg, seed=0)
    state = gm.adamw_init(params)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17))
    first = None
    for step in range(150):
        loss, grads = gm.loss_and_grads(params, data[:, :-1], data[:, 1:], cfg, seed=step)
        first = loss if first is None else first
        gm.clip_grad_norm(grads, 1.0)
        gm.adamw_step(params, grads, state, gm.lr_schedule(step, 1e-2, 1e-3, 10, 150), weight_decay=0.0)
    assert loss < first / 10, (first, loss)


# ----------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("kw, match", [
    (dict(d_model=10, n_head=4), r"d_model \(10\) must be divisible by n_head \(4\)"),
    (dict(d_model=12, n_head=4), r"head size .* = 3 must be even"),
    (dict(norm="batchnorm"), r"unknown norm 'batchnorm'.*rmsnorm, layernorm"),
    (dict(n_layer=0), r"n_layer must be a positive integer"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(**kw)


@pytest.mark.parametrize("ids, match", [
    (np.array([[1, 11]]), r"token id 11 out of range: ids must be in \[0, 11\)"),
    (np.array([[-1, 2]]), r"token id -1 out of range"),
    (np.zeros((1, 8), int), r"sequence length 8 exceeds max_seq_len 7.*\[1, 7\]"),
    (np.zeros(5, int), r"shape \(B, T\)"),
    (np.zeros((1, 3)), r"must be integers"),
])
def test_bad_ids(ids, match):
    cfg = tiny_cfg()
    params = gn.init_params(cfg)
    with pytest.raises(ValueError, match=match):
        gn.forward(params, ids, cfg)
    with pytest.raises(ValueError, match=match):
        gn.loss_and_grads(params, ids, np.zeros(ids.shape, int), cfg)


def test_bad_targets():
    cfg = tiny_cfg()
    params = gn.init_params(cfg)
    ids = np.zeros((2, 4), int)
    with pytest.raises(ValueError, match=r"targets shape \(2, 3\) differs from ids shape \(2, 4\)"):
        gn.loss_and_grads(params, ids, np.zeros((2, 3), int), cfg)
    with pytest.raises(ValueError, match=r"target 11 out of range"):
        gn.loss_and_grads(params, ids, np.full((2, 4), 11), cfg)
    with pytest.raises(ValueError, match=r"every target is -1"):
        gn.loss_and_grads(params, ids, np.full((2, 4), -1), cfg)


def test_bad_generate_args():
    cfg = tiny_cfg()
    params = gn.init_params(cfg)
    with pytest.raises(ValueError, match="prompt"):
        generation.generate(gn, params, [], cfg, 3)
    with pytest.raises(ValueError, match=r"token id 99 out of range"):
        generation.generate(gn, params, [99], cfg, 3)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"temperature must be finite and >= 0"):
            generation.generate(gn, params, [1], cfg, 3, temperature=t)
    with pytest.raises(ValueError, match="top_p"):
        generation.generate(gn, params, [1], cfg, 3, top_p=1.5)


def test_zz_report_largest_errors():
    # printed with `pytest -s`: the largest relative error each gradient check saw
    for name, err in sorted(MAX_SEEN.items()):
        print(f"  largest relative gradient error  {name:14s} {err:.2e}")
    assert all(err < TOL for err in MAX_SEEN.values())


def test_generation_sizes_the_kv_cache_to_prompt_plus_new_tokens(monkeypatch):
    # issue 12: a model with a long context (Llama 3's 131072) must not allocate its whole KV cache to
    # generate a few tokens. Here the full cache would be 2 layers x (K, V) x 2 heads x 131072 x 16 x 4
    # bytes = 67 MB; generation allocates the prompt plus the new tokens, capped at the context.
    import tracemalloc
    cfg = gn.GPTConfig(vocab_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=32, max_seq_len=131072)
    params = gn.init_params(cfg)
    lengths = []
    real = gn.kv_cache_init
    monkeypatch.setattr(gn, "kv_cache_init", lambda *a, **k: lengths.append(k.get("length")) or real(*a, **k))
    tracemalloc.start()
    try:
        out = generation.generate(gn, params, [1, 2, 3], cfg, 5, temperature=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out) == 8 and lengths == [3 + 5 - 1]                  # the last token is never fed back
    assert peak < 1 << 20, f"{peak / 1e6:.1f} MB"
    # capped at the context: a small model runs past it and crops (test_greedy_generation_... above)
    small = tiny_cfg(max_seq_len=6)
    generation.generate(gn, gn.init_params(small), [1, 2, 3], small, 9, temperature=0)
    assert lengths[-1] == 6


def test_forward_cached_checks_ids_and_positions():
    cfg = tiny_cfg()
    params = gn.init_params(cfg)
    kv = gn.kv_cache_init(cfg, np.float32)
    with pytest.raises(ValueError, match=r"token id -1 out of range"):
        gn.forward_cached(params, np.array([[-1]]), cfg, kv, 0)
    with pytest.raises(ValueError, match=r"pos \+ T must be at most max_seq_len"):
        gn.forward_cached(params, np.zeros((1, 2), int), cfg, kv, cfg.max_seq_len - 1)
    logits = gn.forward_cached(params, np.zeros((1, 2), int), cfg, kv, cfg.max_seq_len - 2)   # fits exactly
    assert logits.shape == (1, 2, cfg.vocab_size)
