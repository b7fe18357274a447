"""Tests for gpt_numpy.py: every backward against central finite differences in float64, the whole
model, gradient checkpointing, the KV cache, AdamW, learning, and bad input."""

import math

import numpy as np
import pytest

import gpt_numpy as gn

# ----------------------------------------------------------------------------------------------------
# helpers

TOL = 1e-6          # largest relative error a float64 gradient check may show
MAX_SEEN = {}       # largest relative error per check, printed at the end (pytest -s)


def rel_error(analytic, numeric):
    """max |a - n| / max(|n|): relative to the gradient's scale, so tiny entries don't divide by ~0."""
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    scale = max(np.abs(n).max(), np.abs(a).max(), 1e-12)
    return float(np.abs(a - n).max() / scale)


def record(name, err):
    MAX_SEEN[name] = max(MAX_SEEN.get(name, 0.0), err)
    return err


def numeric_grad(f, x, h=1e-6, idx=None):
    """Central differences (f(x+h) - f(x-h)) / 2h of scalar f() w.r.t. the entries of x (in place).
    idx: the flat indices to check (default: all)."""
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    g = np.zeros(flat.size)
    for i in idx:
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g.reshape(x.shape)


def rng():
    return np.random.default_rng(1234)


def check_layer(name, fwd, bwd, inputs, out_shape_from=None):
    """fwd(*inputs) -> (out, cache); bwd(dout, cache) -> grads for each input (tuple or single).
    The scalar is sum(out * dout) with a random dout."""
    out, _ = fwd(*inputs)
    dout = rng().standard_normal(out.shape)
    _, cache = fwd(*inputs)
    grads = bwd(dout.copy(), cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    for k, (x, g) in enumerate(zip(inputs, grads)):
        num = numeric_grad(lambda: float((fwd(*inputs)[0] * dout).sum()), x)
        err = record(name, rel_error(g, num))
        assert err < TOL, f"{name}: input {k} relative error {err:.2e}"


# ----------------------------------------------------------------------------------------------------
# each layer's backward on its own

def test_embedding_backward_accumulates_repeated_ids():
    r = rng()
    W = r.standard_normal((7, 5))
    ids = np.array([[1, 3, 1], [6, 1, 3]])              # ids repeat: gradients must add up
    out, cache = gn.embedding_forward(ids, W)
    dout = r.standard_normal(out.shape)
    dW = gn.embedding_backward(dout, cache)
    num = numeric_grad(lambda: float((gn.embedding_forward(ids, W)[0] * dout).sum()), W)
    assert record("embedding", rel_error(dW, num)) < TOL
    np.testing.assert_allclose(dW[1], dout[0, 0] + dout[0, 2] + dout[1, 1])


def test_rmsnorm_backward():
    r = rng()
    x, w = r.standard_normal((2, 3, 6)), r.standard_normal(6)
    check_layer("rmsnorm", lambda x, w: gn.rmsnorm_forward(x, w, 1e-5), gn.rmsnorm_backward, [x, w])


def test_layernorm_backward():
    r = rng()
    x, w, b = r.standard_normal((2, 3, 6)), r.standard_normal(6), r.standard_normal(6)
    check_layer("layernorm", lambda x, w, b: gn.layernorm_forward(x, w, b, 1e-5), gn.layernorm_backward,
                [x, w, b])


def test_matmul_backward():
    r = rng()
    x, W = r.standard_normal((2, 3, 4)), r.standard_normal((4, 5))
    check_layer("matmul", gn.matmul_forward, gn.matmul_backward, [x, W])


def test_rope_backward_and_convention():
    r = rng()
    T, hs = 5, 8
    cos, sin = gn.rope_tables(np.arange(T), hs, 10000.0, np.float64)
    u = r.standard_normal((2, 3, T, hs))
    check_layer("rope", lambda u: (gn.rope_forward(u, cos, sin), None),
                lambda d, _: gn.rope_backward(d, cos, sin), [u])
    # the half-split convention of SPEC.md, written out the long way
    inv = 10000.0 ** (-np.arange(0, hs, 2) / hs)
    ang = np.arange(T)[:, None] * inv
    c, s = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-u[..., hs // 2:], u[..., :hs // 2]], -1)
    np.testing.assert_allclose(gn.rope_forward(u, cos, sin), u * c + rot * s, rtol=1e-12, atol=1e-12)


def test_softmax_backward():
    r = rng()
    a = r.standard_normal((2, 4, 5))

    def fwd(a):
        p = gn.softmax_(a.copy())
        return p, p

    check_layer("softmax", fwd, lambda d, p: gn.softmax_backward_(d, p), [a])


def test_softmax_backward_with_given_rowsum():
    r = rng()
    p = gn.softmax_(r.standard_normal((2, 3, 4, 6)))
    dp = r.standard_normal(p.shape)
    rowsum = (dp * p).sum(-1, keepdims=True)
    np.testing.assert_allclose(gn.softmax_backward_(dp.copy(), p, rowsum), gn.softmax_backward_(dp.copy(), p),
                               rtol=1e-12, atol=1e-14)


def test_dropout_backward():
    r = rng()
    x = r.standard_normal((3, 4, 5))
    keep = gn.dropout_mask(x.shape, 0.3, (7, 0, 1))
    assert keep.dtype == bool and 0 < keep.mean() < 1
    check_layer("dropout", lambda x: (gn.dropout_forward(x, keep, 0.3), None),
                lambda d, _: gn.dropout_backward(d, keep, 0.3), [x])


@pytest.mark.parametrize("p_drop", [0.0, 0.25])
def test_attention_backward(p_drop):
    r = rng()
    B, T, C, nh = 2, 5, 8, 2
    cos, sin = gn.rope_tables(np.arange(T), C // nh, 10000.0, np.float64)
    x = r.standard_normal((B, T, C))
    Wqkv, Wproj = 0.5 * r.standard_normal((C, 3 * C)), 0.5 * r.standard_normal((C, C))
    fwd = lambda x, Wqkv, Wproj: gn.attention_forward(x, Wqkv, Wproj, cos, sin, nh, p_drop, (3, 1, 0))
    check_layer(f"attention", fwd, gn.attention_backward, [x, Wqkv, Wproj])


def test_attention_is_causal():
    r = rng()
    B, T, C, nh = 1, 6, 8, 2
    cos, sin = gn.rope_tables(np.arange(T), C // nh, 10000.0, np.float64)
    x = r.standard_normal((B, T, C))
    Wqkv, Wproj = r.standard_normal((C, 3 * C)), r.standard_normal((C, C))
    out1 = gn.attention_forward(x, Wqkv, Wproj, cos, sin, nh)[0]
    x2 = x.copy()
    x2[:, 4:] = r.standard_normal((B, 2, C))           # change the future: the past must not move
    out2 = gn.attention_forward(x2, Wqkv, Wproj, cos, sin, nh)[0]
    np.testing.assert_array_equal(out1[:, :4], out2[:, :4])
    assert not np.allclose(out1[:, 4:], out2[:, 4:])


def test_swiglu_backward():
    r = rng()
    x = r.standard_normal((2, 3, 4))
    Wg, Wu, Wd = r.standard_normal((4, 6)), r.standard_normal((4, 6)), r.standard_normal((6, 4))
    check_layer("swiglu", gn.swiglu_forward, gn.swiglu_backward, [x, Wg, Wu, Wd])


def test_cross_entropy_backward_with_ignored_targets():
    r = rng()
    logits = r.standard_normal((2, 4, 7))
    targets = np.array([[1, -1, 6, 0], [-1, 3, 3, 2]])
    loss, cache = gn.cross_entropy_forward(logits, targets)
    dlogits = gn.cross_entropy_backward(1.0, cache).reshape(logits.shape)
    num = numeric_grad(lambda: gn.cross_entropy_forward(logits, targets)[0], logits)
    assert record("cross_entropy", rel_error(dlogits, num)) < TOL
    assert np.all(dlogits[0, 1] == 0) and np.all(dlogits[1, 0] == 0)
    # the formula, directly
    lse = np.log(np.exp(logits).sum(-1))
    valid = targets >= 0
    picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    assert loss == pytest.approx(((lse - picked) * valid).sum() / valid.sum(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# the whole model in float64

def tiny_cfg(**kw):
    base = dict(vocab_size=11, n_layer=2, n_head=2, d_model=8, d_ff=12, max_seq_len=7)
    base.update(kw)
    return gn.GPTConfig(**base)


def batch(cfg, B=2, T=5, seed=0, ignore=True):
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (B, T))
    ids[0, 1] = ids[0, 3] = ids[1, 0]                  # repeated ids in the embedding
    targets = r.integers(0, cfg.vocab_size, (B, T))
    if ignore:
        targets[0, 2] = targets[1, 4] = -1
    return ids, targets


def perturb(params, seed=5):
    """Random norm weights and biases, so their gradients are not trivially symmetric."""
    r = np.random.default_rng(seed)
    for k, p in params.items():
        if p.ndim == 1:
            p += 0.3 * r.standard_normal(p.shape)
    return params


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_gradients_every_entry(norm, tie, dropout):
    cfg = tiny_cfg(norm=norm, tie_embeddings=tie, dropout=dropout)
    params = perturb(gn.init_params(cfg, seed=1, dtype=np.float64))
    # larger weights than the 0.02 init, so every path carries signal worth checking
    for k, p in params.items():
        if p.ndim == 2:
            p *= 10.0
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
        err = record("model", rel_error(grads[k], num))
        assert err < TOL, f"{k}: relative error {err:.2e}"


def test_model_gradients_sampled_larger_config():
    # a config with more heads, layers and positions; a random sample of entries per tensor
    cfg = gn.GPTConfig(vocab_size=23, n_layer=3, n_head=4, d_model=16, d_ff=40, max_seq_len=12,
                       dropout=0.1, tie_embeddings=False)
    params = perturb(gn.init_params(cfg, seed=3, dtype=np.float64))
    for p in params.values():
        if p.ndim == 2:
            p *= 5.0
    ids, targets = batch(cfg, B=3, T=12)
    loss, grads = gn.loss_and_grads(params, ids, targets, cfg, seed=9)
    f = lambda: gn.cross_entropy_forward(gn.model_forward(params, ids, cfg, True, 9)[0], targets)[0]
    r = np.random.default_rng(0)
    for k, p in params.items():
        idx = r.choice(p.size, size=min(p.size, 12), replace=False)
        num = numeric_grad(f, p, idx=idx).reshape(-1)[idx]
        err = record("model", rel_error(grads[k].reshape(-1)[idx], num))
        assert err < TOL, f"{k}: relative error {err:.2e}"


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_is_bit_identical(norm, dtype):
    cfg = tiny_cfg(norm=norm, dropout=0.3, n_layer=3)
    ckpt = tiny_cfg(norm=norm, dropout=0.3, n_layer=3, checkpoint=True)
    params = gn.init_params(cfg, seed=0, dtype=dtype)
    ids, targets = batch(cfg)
    loss1, g1 = gn.loss_and_grads(params, ids, targets, cfg, seed=17)
    loss2, g2 = gn.loss_and_grads(params, ids, targets, ckpt, seed=17)
    assert loss1 == loss2
    for k in params:
        assert g1[k].dtype == dtype
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    # and dropout is really on: another seed gives another loss
    assert gn.loss_and_grads(params, ids, targets, cfg, seed=18)[0] != loss1


def test_float32_by_default_and_float64_when_asked():
    cfg = tiny_cfg()
    p32, p64 = gn.init_params(cfg), gn.init_params(cfg, dtype=np.float64)
    ids, targets = batch(cfg)
    assert all(p.dtype == np.float32 for p in p32.values())
    _, g = gn.loss_and_grads(p32, ids, targets, cfg)
    assert all(v.dtype == np.float32 for v in g.values())
    assert gn.forward(p64, ids, cfg).dtype == np.float64
    np.testing.assert_allclose(gn.forward(p32, ids, cfg), gn.forward(p64, ids, cfg), rtol=1e-4, atol=1e-5)


def cache_arrays(cache):
    """Every array reachable from a model_forward cache."""
    out, stack = [], [cache]
    while stack:
        o = stack.pop()
        if isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, np.ndarray):
            out.append(o)
    return out


@pytest.mark.parametrize("checkpoint", [False, True])
def test_float32_training_never_upcasts(checkpoint):
    # NumPy 2 keeps float32 with Python floats; a float64 array anywhere would double memory and time
    cfg = tiny_cfg(dropout=0.2, checkpoint=checkpoint)
    params = gn.init_params(cfg)
    ids, targets = batch(cfg)
    _, cache = gn.model_forward(params, ids, cfg, train=True, seed=3)
    floats = [a for a in cache_arrays(cache) if a.dtype.kind == "f"]
    assert floats and all(a.dtype == np.float32 for a in floats), {a.dtype for a in floats}
    # and the recomputed block caches of a checkpointed backward
    cos, sin = gn.rope_tables(np.arange(ids.shape[1]), cfg.head_size, cfg.rope_theta, np.float32)
    x = params["tok_emb"][ids]
    _, c = gn.block_forward(x, params, 0, cfg, cos, sin, 0.2, 3, recompute=True)
    assert all(a.dtype == np.float32 for a in cache_arrays(c) if a.dtype.kind == "f")
    logits, _ = gn.model_forward(params, ids, cfg, train=True, seed=3)
    assert logits.dtype == np.float32
    _, grads = gn.loss_and_grads(params, ids, targets, cfg, seed=3)
    state = gn.adamw_init(params)
    gn.adamw_step(params, grads, state, 1e-3)
    assert all(v.dtype == np.float32 for d in (params, state["m"], state["v"]) for v in d.values())


def test_recompute_gives_the_cache_of_the_first_forward():
    cfg = tiny_cfg(dropout=0.3)
    params = gn.init_params(cfg, dtype=np.float64)
    ids, _ = batch(cfg)
    cos, sin = gn.rope_tables(np.arange(ids.shape[1]), cfg.head_size, cfg.rope_theta, np.float64)
    x = params["tok_emb"][ids]
    out, c1 = gn.block_forward(x, params, 1, cfg, cos, sin, 0.3, 5)
    none, c2 = gn.block_forward(x, params, 1, cfg, cos, sin, 0.3, 5, recompute=True)
    assert none is None and out.shape == x.shape
    a1, a2 = cache_arrays(c1), cache_arrays(c2)
    assert len(a1) == len(a2)
    for u, v in zip(a1, a2):
        np.testing.assert_array_equal(u, v)


def test_init_matches_spec():
    cfg = gn.GPTConfig(vocab_size=50, n_layer=4, n_head=4, d_model=64, d_ff=172, max_seq_len=16,
                       norm="layernorm", tie_embeddings=False)
    params = gn.init_params(cfg, seed=0)
    assert params["tok_emb"].shape == (50, 64) and params["lm_head"].shape == (64, 50)
    assert params["blocks.3.attn.qkv"].shape == (64, 192)
    assert params["blocks.0.ffn.w_down"].shape == (172, 64)
    assert np.all(params["blocks.1.norm2.weight"] == 1) and np.all(params["norm_f.bias"] == 0)
    assert params["blocks.0.attn.qkv"].std() == pytest.approx(0.02, rel=0.05)
    assert params["blocks.0.attn.proj"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert "lm_head" not in gn.init_params(tiny_cfg(), seed=0)


# ----------------------------------------------------------------------------------------------------
# generation

def trained_ish_params(cfg, seed=0):
    params = gn.init_params(cfg, seed=seed, dtype=np.float64)
    for p in params.values():
        if p.ndim == 2:
            p *= 20.0                                  # sharper logits than the init, still random
    return params


def test_kv_cache_logits_equal_full_forward():
    cfg = tiny_cfg(max_seq_len=10)
    params = trained_ish_params(cfg)
    seq = np.random.default_rng(3).integers(0, cfg.vocab_size, 10)
    kv = gn.kv_cache_init(cfg, np.float64)
    logits = gn.forward_cached(params, seq[None, :4], cfg, kv, 0)     # prefill 4 tokens
    np.testing.assert_allclose(logits, gn.forward(params, seq[None, :4], cfg), rtol=1e-10, atol=1e-12)
    for pos in range(4, 10):                                          # then one token at a time
        step = gn.forward_cached(params, seq[None, pos:pos + 1], cfg, kv, pos)
        full = gn.forward(params, seq[None, :pos + 1], cfg)[:, -1:]
        np.testing.assert_allclose(step, full, rtol=1e-10, atol=1e-12)


def naive_greedy(params, prompt, cfg, n):
    ids = list(prompt)
    for _ in range(n):
        ctx = np.asarray([ids[-cfg.max_seq_len:]])
        ids.append(int(np.argmax(gn.forward(params, ctx, cfg)[0, -1])))
    return ids


def test_greedy_generation_matches_full_forward_and_crops_context():
    cfg = tiny_cfg(max_seq_len=6)
    params = trained_ish_params(cfg, seed=2)
    prompt = [1, 5, 2]
    out = gn.generate(params, prompt, cfg, max_new_tokens=9, temperature=0)   # runs past max_seq_len
    assert out == naive_greedy(params, prompt, cfg, 9)
    assert out == gn.generate(params, prompt, cfg, max_new_tokens=9, temperature=0)
    # a prompt longer than max_seq_len is cropped to its end
    long_prompt = list(range(10))
    assert gn.generate(params, long_prompt, cfg, 3, temperature=0) == naive_greedy(params, long_prompt, cfg, 3)


def test_sampling_is_reproducible_and_respects_stop_and_top_k():
    cfg = tiny_cfg(max_seq_len=8)
    params = trained_ish_params(cfg, seed=4)
    a = gn.generate(params, [3], cfg, 12, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    b = gn.generate(params, [3], cfg, 12, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    assert a == b and len(a) == 13
    outs = {tuple(gn.generate(params, [3], cfg, 12, temperature=2.0, seed=s)) for s in range(5)}
    assert len(outs) > 1
    stop = a[4]
    c = gn.generate(params, [3], cfg, 12, temperature=1.0, top_k=5, top_p=0.9, seed=7, stop_ids=[stop])
    assert c[-1] == stop and len(c) == a.index(stop, 1) + 1
    # top_k=1 is greedy whatever the temperature
    assert gn.generate(params, [3], cfg, 6, temperature=1.5, top_k=1, seed=1) == \
        gn.generate(params, [3], cfg, 6, temperature=0)


def test_sample_next_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    r = np.random.default_rng(0)
    picks = {gn.sample_next(logits, r, 1.0, top_p=0.7) for _ in range(200)}
    assert picks == {0, 1}                             # 0.5 + 0.3 reaches 0.7: only the top two


# ----------------------------------------------------------------------------------------------------
# optimizer

def test_adamw_two_steps_against_formula():
    r = rng()
    params = {"w": r.standard_normal((3, 4)), "norm.weight": r.standard_normal(4)}
    g1 = {k: r.standard_normal(p.shape) for k, p in params.items()}
    g2 = {k: r.standard_normal(p.shape) for k, p in params.items()}
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.9, 1e-6, 0.5
    expect = {k: p.copy() for k, p in params.items()}
    state = gn.adamw_init(params)
    for k in params:
        p, m, v = expect[k], 0.0, 0.0
        for t, g in ((1, g1[k]), (2, g2[k])):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            decay = wd if k == "w" else 0.0            # matrices only
            p = p - lr * decay * p - lr * mhat / (np.sqrt(vhat) + eps)
        expect[k] = p
    gn.adamw_step(params, g1, state, lr, b1, b2, eps, wd)
    gn.adamw_step(params, g2, state, lr, b1, b2, eps, wd)
    assert state["t"] == 2
    for k in params:
        np.testing.assert_allclose(params[k], expect[k], rtol=1e-12, atol=1e-14)


def test_clip_grad_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert gn.clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    assert math.sqrt(sum((v * v).sum() for v in g.values())) == pytest.approx(1.0, rel=1e-5)
    g = {"a": np.array([0.3, 0.4])}
    gn.clip_grad_norm(g, 1.0)
    np.testing.assert_array_equal(g["a"], [0.3, 0.4])  # below the limit: untouched


def test_lr_schedule():
    f = lambda s: gn.lr_schedule(s, 1e-3, 1e-4, 10, 110)
    assert f(0) == pytest.approx(1e-4) and f(9) == pytest.approx(1e-3)
    assert f(60) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert f(110) == pytest.approx(1e-4) and f(500) == pytest.approx(1e-4)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_overfits_one_batch():
    cfg = gn.GPTConfig(vocab_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16)
    params = gn.init_params(cfg, seed=0)
    state = gn.adamw_init(params)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17))
    first = None
    for step in range(150):
        loss, grads = gn.loss_and_grads(params, data[:, :-1], data[:, 1:], cfg, seed=step)
        first = loss if first is None else first
        gn.clip_grad_norm(grads, 1.0)
        gn.adamw_step(params, grads, state, gn.lr_schedule(step, 1e-2, 1e-3, 10, 150), weight_decay=0.0)
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
        gn.generate(params, [], cfg, 3)
    with pytest.raises(ValueError, match=r"token id 99 out of range"):
        gn.generate(params, [99], cfg, 3)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"temperature must be finite and >= 0"):
            gn.generate(params, [1], cfg, 3, temperature=t)
    with pytest.raises(ValueError, match="top_p"):
        gn.generate(params, [1], cfg, 3, top_p=1.5)


def test_zz_report_largest_errors():
    # printed with `pytest -s`: the largest relative error each gradient check saw
    for name, err in sorted(MAX_SEEN.items()):
        print(f"  largest relative gradient error  {name:14s} {err:.2e}")
    assert all(err < TOL for err in MAX_SEEN.values())


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
