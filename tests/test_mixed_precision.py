"""Tests for mixed precision in gpt_numpy.py: float16 compute from float32 master weights with dynamic
loss scaling. Gradients against the float32 ones on the same weights, overflow and the scaler, float16
safety of the norms, training, and dtypes. NumPy's float16 is slow (no BLAS), so the configs are tiny.
The tests taking `backend` (conftest.py) also run on CuPy where there is a GPU."""

import numpy as np
import pytest

import gpt_numpy as gn
from test_gpt_numpy import cache_arrays          # every array reachable from a cache
from lib import mixed_precision

# ----------------------------------------------------------------------------------------------------
# helpers

# Tolerances of the float16 path against float32 on the same master weights. float16 keeps 11
# significant bits (unit roundoff 4.9e-4). Measured over the configs of the tests below: each gradient
# tensor's error in the norm sense, ||g16 - g32|| / ||g32||, at most 2.2e-3 (median 0.9e-3 to 1.4e-3
# per config); the loss at most 2.8e-5 relative.
LOSS_RTOL = 1e-3
GRAD_RTOL = 5e-3
SCALE = 2.0 ** 16


def norm_error(a, b):
    """||a - b|| / ||b|| over the whole tensor, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cfg_tiny(**kw):
    base = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16)
    base.update(kw)
    return gn.GPTConfig(**base)


def batch(cfg, B=4, T=16, seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (B, T))
    targets = r.integers(0, cfg.vocab_size, (B, T))
    targets[0, :2] = -1                                 # ignored positions
    return ids, targets


def worst_grad_error(g16, g32):
    errs = {k: norm_error(g16[k], g32[k]) for k in g32}
    k = max(errs, key=errs.get)
    return errs[k], k


# ----------------------------------------------------------------------------------------------------
# gradients against float32

@pytest.mark.parametrize("kw, mult", [
    (dict(), 1.0),                                                      # the init: small gradients
    (dict(norm="layernorm", tie_embeddings=False, dropout=0.2), 1.0),   # dropout: the same masks
    (dict(dropout=0.2, checkpoint=True), 1.0),                          # checkpointing recomputes in half
    (dict(), 5.0),                                                      # larger weights, sharper logits
    (dict(norm="layernorm"), 5.0),
])
def test_mixed_loss_and_grads_match_float32(backend, kw, mult):
    gm = backend
    cfg = cfg_tiny(**kw)
    params = gn.init_params(cfg, seed=1)
    for p in params.values():
        if p.ndim == 2:
            p *= mult
    before = {k: p.copy() for k, p in params.items()}
    params = {k: gm.to_device(p) for k, p in params.items()}
    ids, targets = batch(cfg)
    loss32, g32 = gm.loss_and_grads(params, ids, targets, cfg, seed=3)
    loss16, g16 = mixed_precision.loss_and_grads_mixed(gm, params, ids, targets, cfg, SCALE, seed=3)
    assert abs(loss16 - loss32) / loss32 < LOSS_RTOL, (loss16, loss32)
    assert set(g16) == set(params)
    assert all(g16[k].dtype == np.float32 and g16[k].shape == p.shape for k, p in params.items())
    g32, g16 = ({k: gm.to_host(v) for k, v in g.items()} for g in (g32, g16))
    err, k = worst_grad_error(g16, g32)
    assert err < GRAD_RTOL, f"{k}: relative error {err:.2e}"
    for k, p in params.items():                         # the master weights are read, never written
        assert p.dtype == np.float32
        np.testing.assert_array_equal(gm.to_host(p), before[k])


def test_loss_scaling_keeps_small_gradients():
    # 256 positions: dlogits = (softmax - onehot) / 256 sits near float16's bottom (6e-5 is the smallest
    # normal number), where it keeps few significant bits or flushes to zero. Without scaling the worst
    # tensor's error measured 1.0e-2, with S = 2^16 1.2e-3; with S = 2^-8 0.99: the gradients are lost.
    cfg = cfg_tiny()
    params = gn.init_params(cfg, seed=1)
    ids, targets = batch(cfg, B=16)
    _, g32 = gn.loss_and_grads(params, ids, targets, cfg, seed=3)
    err = {s: worst_grad_error(mixed_precision.loss_and_grads_mixed(gn, params, ids, targets, cfg, s, seed=3)[1], g32)[0]
           for s in (2.0 ** -8, 1.0, SCALE)}
    assert err[SCALE] < GRAD_RTOL
    assert err[1.0] > 3 * err[SCALE]
    assert err[2.0 ** -8] > 0.5


# ----------------------------------------------------------------------------------------------------
# overflow and the scaler

def test_overflow_skips_the_step_and_halves_the_scale():
    cfg = cfg_tiny()
    params = gn.init_params(cfg, seed=1)
    ids, targets = batch(cfg)
    scaler = mixed_precision.loss_scaler_init(2.0 ** 40)             # dlogits * 2^40 is far past float16's 65504
    scaler["good_steps"] = 7
    loss, grads = mixed_precision.loss_and_grads_mixed(gn, params, ids, targets, cfg, scaler["scale"])
    assert grads is None and np.isfinite(loss)          # the forward was fine: only the backward overflowed
    mixed_precision.loss_scaler_update(scaler, grads is not None)
    assert scaler == {"scale": 2.0 ** 39, "good_steps": 0}
    # halving until the gradients fit: then they are the float32 ones
    _, g32 = gn.loss_and_grads(params, ids, targets, cfg)
    while grads is None:
        _, grads = mixed_precision.loss_and_grads_mixed(gn, params, ids, targets, cfg, scaler["scale"])
        mixed_precision.loss_scaler_update(scaler, grads is not None)
    assert 1.0 <= scaler["scale"] < 2.0 ** 39 and scaler["good_steps"] == 1
    assert worst_grad_error(grads, g32)[0] < GRAD_RTOL      # (21 halvings, to 2^19, measured)


def test_weights_beyond_float16_skip_the_step():
    # a master weight float16 cannot hold (> 65504) turns into inf in the compute copy
    cfg = cfg_tiny()
    params = gn.init_params(cfg, seed=1)
    params["blocks.0.norm1.weight"][:] = 1e5
    ids, targets = batch(cfg)
    loss, grads = mixed_precision.loss_and_grads_mixed(gn, params, ids, targets, cfg, SCALE)
    assert grads is None and not np.isfinite(loss)


def test_scale_doubles_after_growth_interval_good_steps():
    scaler = mixed_precision.loss_scaler_init()
    assert scaler == {"scale": 2.0 ** 16, "good_steps": 0}
    for _ in range(4):
        mixed_precision.loss_scaler_update(scaler, True, growth_interval=5)
    assert scaler == {"scale": 2.0 ** 16, "good_steps": 4}
    mixed_precision.loss_scaler_update(scaler, False, growth_interval=5)   # an overflow resets the count
    assert scaler == {"scale": 2.0 ** 15, "good_steps": 0}
    for _ in range(5):
        mixed_precision.loss_scaler_update(scaler, True, growth_interval=5)
    assert scaler == {"scale": 2.0 ** 16, "good_steps": 0}
    for _ in range(2000):                              # the default interval
        mixed_precision.loss_scaler_update(scaler, True)
    assert scaler == {"scale": 2.0 ** 17, "good_steps": 0}


# ----------------------------------------------------------------------------------------------------
# float16 safety of the layers

@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_statistics_do_not_overflow_in_float16(norm):
    # |x| ~ 300 at C = 64: the sum of squares (about 6e6) is far beyond float16's 65504
    r = np.random.default_rng(0)
    x = (300.0 * r.standard_normal((2, 5, 64))).astype(np.float16)
    w, b = (1.0 + 0.3 * r.standard_normal(64)).astype(np.float16), r.standard_normal(64).astype(np.float16)
    assert np.isinf(np.einsum("...c,...c->...", x, x)).all()           # the naive statistic overflows
    if norm == "rmsnorm":
        fwd, bwd = (lambda x, w: gn.rmsnorm_forward(x, w, 1e-5)), gn.rmsnorm_backward
        args = (w,)
    else:
        fwd, bwd = (lambda x, w, b: gn.layernorm_forward(x, w, b, 1e-5)), gn.layernorm_backward
        args = (w, b)
    y16, cache = fwd(x, *args)
    y64, cache64 = fwd(x.astype(np.float64), *(a.astype(np.float64) for a in args))
    assert y16.dtype == np.float16 and np.isfinite(y16).all()
    assert norm_error(y16, y64) < 2e-3                 # measured 3.6e-4 (RMSNorm), 3.2e-4 (LayerNorm)
    dout = r.standard_normal(x.shape)
    d16, d64 = bwd(dout.astype(np.float16), cache), bwd(dout, cache64)
    assert d16[0].dtype == np.float16
    for a, e in zip(d16, d64):                          # dx, dw (and db): measured at most 4.6e-4
        assert np.isfinite(a).all() and norm_error(a, e) < 5e-3


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_large_activations_train_in_mixed_precision(backend, norm):
    # embeddings of size ~100: every first norm's sum of squares overflows float16 without the upcast
    # (untied: a tied LM head would scale the logits by 5000 too). On CuPy the float16 matmuls use
    # tensor cores and the norms' float32 accumulation takes CuPy's code paths.
    gm = backend
    cfg = cfg_tiny(norm=norm, dropout=0.2, tie_embeddings=False)
    params = gm.init_params(cfg, seed=1)
    params["tok_emb"] *= 5000.0
    ids, targets = batch(cfg, B=16)
    loss32, g32 = gm.loss_and_grads(params, ids, targets, cfg, seed=3)     # the backend's dropout masks
    loss16, g16 = mixed_precision.loss_and_grads_mixed(gm, params, ids, targets, cfg, SCALE, seed=3)
    assert g16 is not None and abs(loss16 - loss32) / loss32 < LOSS_RTOL
    g32, g16 = ({k: gm.to_host(v) for k, v in g.items()} for g in (g32, g16))
    assert all(g16[k].dtype == np.float32 for k in g16)
    assert worst_grad_error(g16, g32)[0] < GRAD_RTOL


def test_half_compute_stays_half():
    # on a float16 copy of the weights every activation kept for the backward is float16, except the
    # attention probabilities `att` (softmaxed in float32; their dropped-out copy att_d is float16)
    cfg = cfg_tiny(dropout=0.2)
    half = {k: p.astype(np.float16) for k, p in gn.init_params(cfg).items()}
    ids, _ = batch(cfg)
    logits, cache = gn.model_forward(half, ids, cfg, train=True, seed=3)
    assert logits.dtype == np.float16
    blocks = cache[1]
    atts = [c_attn.att for _, c_attn, *_ in blocks]     # attention_forward's AttentionCache
    assert all(a.dtype == np.float32 and a.shape == (4, cfg.n_head, 16, 16) for a in atts)
    rest = [a for a in cache_arrays(cache) if a.dtype.kind == "f" and not any(a is t for t in atts)]
    assert rest and all(a.dtype == np.float16 for a in rest), {a.dtype for a in rest}


# ----------------------------------------------------------------------------------------------------
# training

def test_mixed_precision_overfits_one_batch():
    # the float32 overfitting test of test_gpt_numpy.py, in mixed precision: AdamW on float32 masters
    cfg = gn.GPTConfig(vocab_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16)
    params = gn.init_params(cfg, seed=0)
    state = gn.adamw_init(params)
    scaler = mixed_precision.loss_scaler_init()
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17))
    first, skipped = None, 0
    for step in range(100):                             # float16 is slow in NumPy: 100 steps, not 150
        loss, grads = mixed_precision.loss_and_grads_mixed(gn, params, data[:, :-1], data[:, 1:], cfg, scaler["scale"],
                                              seed=step)
        mixed_precision.loss_scaler_update(scaler, grads is not None, growth_interval=50)
        first = loss if first is None else first
        if grads is None:
            skipped += 1
            continue
        gn.clip_grad_norm(grads, 1.0)
        gn.adamw_step(params, grads, state, gn.lr_schedule(step, 1e-2, 1e-3, 10, 100), weight_decay=0.0)
    assert loss < first / 10, (first, loss)             # measured: 2.79 -> 0.026
    assert skipped == 0 and scaler["scale"] == 2.0 ** 18      # two growths, no overflow
    assert all(v.dtype == np.float32 for d in (params, state["m"], state["v"]) for v in d.values())
