"""Tests for LoRA in gpt_numpy.py: the adapters' gradients against central finite differences in float64
(the layer alone, then the whole model for each subset of targets, with grouped-query attention, dropout
and checkpointing), merge == the LoRA forward, no gradient for a frozen weight, the KV cache, mixed
precision, and frozen weights that stay bit-identical through training."""

import itertools

import numpy as np
import pytest

import gpt_numpy as gn
from conftest import numeric_grad, rel_err, tiny_cfg
from test_mixed_precision import GRAD_RTOL, LOSS_RTOL, SCALE as GRAD_SCALE, norm_error
from lib import generation, lora as lora_lib, mixed_precision

TOL = 1e-6          # largest relative error a float64 gradient check may show


def normal(gm, *shape, scale=1.0, seed=1234):
    return gm.to_device(scale * np.random.default_rng(seed).standard_normal(shape))


def batch(cfg, B=2, T=5, seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (B, T))
    targets = r.integers(0, cfg.vocab_size, (B, T))
    targets[0, 2] = targets[1, 4] = -1
    return ids, targets


def lora_params(gm, cfg, lora, seed=1, mult=10.0, dtype=np.float64, b_scale=0.3):
    """Base weights (matrices scaled up, norms perturbed, as the model tests do) and adapters whose B
    is random (normal(0, b_scale)) rather than zero, so that every path of the adapter carries a
    gradient worth checking."""
    base = gn.init_params(cfg, seed=seed, dtype=dtype)
    r = np.random.default_rng(seed + 1)
    for p in base.values():
        if p.ndim == 2:
            p *= mult
        else:
            p += 0.3 * r.standard_normal(p.shape)
    adapters = lora_lib.init(gn, cfg, lora, seed=seed, dtype=dtype)
    for k, p in adapters.items():
        p += (b_scale if k.endswith("lora_B") else 0.0) * r.standard_normal(p.shape)
    return {k: gm.to_device(v) for k, v in {**base, **adapters}.items()}


# ----------------------------------------------------------------------------------------------------
# the layer

@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_lora_layer_gradients(backend, p_drop):
    # y = x @ W + s (dropout(x) @ A) @ B: dx, dA and dB against finite differences of sum(y * dout)
    gm = backend
    x, W = normal(gm, 2, 3, 6), normal(gm, 6, 5, seed=2)
    A, B = normal(gm, 6, 2, seed=3), normal(gm, 2, 5, seed=4)
    dout = normal(gm, 2, 3, 5, seed=5)
    fwd = lambda: gm.lora_forward(x, gm.Lora(W, A, B, 1.5, p_drop, (7, 0, 3)))   # noqa: E731
    y, cache = fwd()
    dx, (dA, dB) = gm.lora_backward(dout, cache)
    f = lambda: float((fwd()[0] * dout).sum())                                   # noqa: E731
    for name, a, g in (("x", x, dx), ("A", A, dA), ("B", B, dB)):
        assert rel_err(g, numeric_grad(f, a)) < TOL, name
    # the formula, written out (no dropout)
    if p_drop == 0:
        xh, Wh, Ah, Bh = (gm.to_host(a) for a in (x, W, A, B))
        np.testing.assert_allclose(gm.to_host(y), xh @ Wh + 1.5 * (xh @ Ah) @ Bh, rtol=1e-12)


def test_frozen_weight_without_adapter_gives_dx_only(backend):
    gm = backend
    x, W = normal(gm, 2, 3, 4), normal(gm, 4, 5, seed=2)
    w = gm.Lora(W, None, None, 2.0, 0.0, (0, 0, 3))
    y, cache = gm.matmul_forward(x, w)                  # a Lora record: matmul_forward hands it to lora_forward
    np.testing.assert_array_equal(gm.to_host(y), gm.to_host(gm.matmul(x, W)))
    dout = normal(gm, 2, 3, 5, seed=3)
    dx, dw = gm.matmul_backward(dout, cache)
    assert dw == ()                                     # no adapter: nothing to store (put_grad)
    np.testing.assert_array_equal(gm.to_host(dx), gm.to_host(gm.matmul_backward(dout, (x, W))[0]))


# ----------------------------------------------------------------------------------------------------
# the whole model: every entry of every adapter, per subset of targets

TARGET_SETS = [("qkv",), ("proj",), ("gate", "up"), ("down",), ("qkv", "proj", "gate", "up", "down")]


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("n_kv,dropout,lora_dropout,checkpoint",
                         [(2, 0.0, 0.0, False), (1, 0.2, 0.25, True), (2, 0.0, 0.25, False)])
def test_lora_model_gradients_every_entry(targets, n_kv, dropout, lora_dropout, checkpoint):
    cfg = tiny_cfg(n_head=2, d_model=8, n_kv_head=n_kv, dropout=dropout, checkpoint=checkpoint,
                   tie_embeddings=n_kv == 2)
    lora = lora_lib.LoraConfig(rank=2, alpha=3.0, targets=targets, dropout=lora_dropout)
    params = lora_params(gn, cfg, lora)
    ids, targets_ = batch(cfg)
    loss, grads = gn.loss_and_grads(params, ids, targets_, cfg, seed=42, lora=lora)
    # gradients for the adapters alone: no frozen weight has one
    assert list(grads) == list(lora_lib.shapes(cfg, lora))

    def train_loss():
        logits, _ = gn.model_forward(params, ids, cfg, train=True, seed=42, lora=lora)
        return gn.cross_entropy_forward(logits, targets_)[0]

    assert train_loss() == loss
    for k in grads:
        err = rel_err(grads[k], numeric_grad(train_loss, params[k]))
        assert err < TOL, f"{k}: relative error {err:.2e}"


def test_lora_grads_sampled_on_backend(backend):
    # the same check, sampled, on either backend (CuPy where there is a GPU)
    gm = backend
    cfg = tiny_cfg(n_head=4, d_model=16, n_kv_head=2, dropout=0.1, n_layer=2)
    lora = lora_lib.LoraConfig(rank=3, alpha=6.0, dropout=0.2)
    params = lora_params(gm, cfg, lora, mult=5.0)
    ids, targets = batch(cfg, B=3, T=7)
    _, grads = gm.loss_and_grads(params, ids, targets, cfg, seed=9, lora=lora)
    t = gm.to_device(targets)
    f = lambda: gm.cross_entropy_forward(gm.model_forward(params, ids, cfg, True, 9, lora)[0], t)[0]  # noqa: E731
    r = np.random.default_rng(0)
    for k, g in grads.items():
        idx = r.choice(g.size, size=min(g.size, 6), replace=False)
        num = numeric_grad(f, params[k], idx=idx).reshape(-1)[idx]
        assert rel_err(gm.to_host(g).reshape(-1)[idx], num) < TOL, k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lora_checkpointing_is_bit_identical(backend, dtype):
    gm = backend
    cfg = tiny_cfg(dropout=0.2, n_layer=3, n_head=2, n_kv_head=1)
    ckpt = tiny_cfg(dropout=0.2, n_layer=3, n_head=2, n_kv_head=1, checkpoint=True)
    lora = lora_lib.LoraConfig(rank=2, dropout=0.3)
    params = lora_params(gm, cfg, lora, mult=1.0, dtype=dtype)
    ids, targets = batch(cfg)
    loss1, g1 = gm.loss_and_grads(params, ids, targets, cfg, seed=17, lora=lora)
    loss2, g2 = gm.loss_and_grads(params, ids, targets, ckpt, seed=17, lora=lora)
    assert loss1 == loss2
    for k in g1:
        assert g1[k].dtype == dtype
        np.testing.assert_array_equal(gm.to_host(g1[k]), gm.to_host(g2[k]), err_msg=k)
    # the adapters' dropout is on: another seed, another loss
    assert gm.loss_and_grads(params, ids, targets, cfg, seed=18, lora=lora)[0] != loss1


@pytest.mark.parametrize("tie", [False, True])
def test_no_gradient_is_computed_for_frozen_weights(monkeypatch, tie):
    # not computed and dropped: never computed, where it costs (gpt_numpy.trains). The embedding backward
    # and every frozen matrix's dW = x^T @ dout are the frozen weights' own work: a LoRA step never calls
    # the embedding backward, and every matmul_backward of its blocks goes to lora_backward (which has no
    # dW). The norms' (C,) gradients cost nothing: computed, but not returned (nor handed to `ready`).
    cfg = tiny_cfg(norm="layernorm", tie_embeddings=tie)
    lora = lora_lib.LoraConfig(rank=2, targets="qkv,down")
    params = lora_params(gn, cfg, lora)
    ids, targets = batch(cfg)

    def fail(*a, **k):
        raise AssertionError("a frozen weight's gradient was computed")

    calls = {"matmul_backward": 0, "lora_backward": 0}

    def counted(name, fn):
        def f(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return f

    monkeypatch.setattr(gn, "embedding_backward", fail)
    for name in calls:
        monkeypatch.setattr(gn, name, counted(name, getattr(gn, name)))
    reported = []
    _, grads = gn.loss_and_grads(params, ids, targets, cfg, lora=lora, ready=lambda g, names: reported.extend(names))
    assert calls["matmul_backward"] == calls["lora_backward"] == 5 * cfg.n_layer
    assert set(grads) == set(lora_lib.shapes(cfg, lora)) and sorted(reported) == sorted(grads)
    assert {k.rsplit(".", 1)[0] for k in grads} == {f"blocks.{i}.{n}" for i in range(2)
                                                    for n in ("attn.qkv", "ffn.w_down")}


# ----------------------------------------------------------------------------------------------------
# init, merge, config

def test_fresh_adapters_leave_the_model_unchanged(backend):
    gm = backend
    cfg = tiny_cfg(n_head=2, n_kv_head=1)
    lora = lora_lib.LoraConfig(rank=4)
    base = gm.init_params(cfg, seed=3)
    adapters = lora_lib.init(gm, cfg, lora, seed=3)
    assert all(float(abs(v).max()) == 0 for k, v in adapters.items() if k.endswith("lora_B"))
    A = gm.to_host(adapters["blocks.0.attn.qkv.lora_A"])
    assert A.shape == (8, 4) and A.std() == pytest.approx(1 / 4, rel=0.35)     # normal(0, 1/r)
    ids, _ = batch(cfg)
    np.testing.assert_array_equal(gm.to_host(gm.forward({**base, **adapters}, ids, cfg, lora=lora)),
                                  gm.to_host(gm.forward(base, ids, cfg)))


@pytest.mark.parametrize("n_kv", [1, 2])
def test_merged_forward_equals_lora_forward_float32(backend, n_kv):
    gm = backend
    cfg = tiny_cfg(n_head=2, d_model=16, n_kv_head=n_kv, d_ff=24)
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
    # an update s A @ B of entries ~0.02, the size of the 0.02-init weights: a strong fine-tune
    params = lora_params(gm, cfg, lora, mult=1.0, dtype=np.float32, b_scale=0.005)
    ids, _ = batch(cfg, T=7)
    merged = lora_lib.merge(params, lora)
    assert set(merged) == set(gn.param_shapes(cfg))
    want = gm.forward(params, ids, cfg, lora=lora)
    got = gm.forward(merged, ids, cfg)
    assert want.dtype == got.dtype == np.float32
    assert rel_err(got, want) < 1e-6
    # the adapters change the model (so the comparison means something), and unmerge gives W back
    assert rel_err(gm.forward({k: params[k] for k in merged}, ids, cfg), want) > 1e-3
    base = lora_lib.unmerge(merged, params, lora)
    for k in base:
        np.testing.assert_allclose(gm.to_host(base[k]), gm.to_host(params[k]), rtol=0, atol=1e-6)


def test_lora_config_checks():
    assert lora_lib.LoraConfig(targets="down, qkv").targets == ("qkv", "down")      # canonical order
    assert lora_lib.LoraConfig(rank=4, alpha=2).scale == 0.5
    for kw, msg in ((dict(rank=0), "rank"), (dict(alpha=0), "alpha"), (dict(targets="qkv,lm_head"), "lm_head"),
                    (dict(targets=""), "non-empty"), (dict(dropout=1.0), "dropout")):
        with pytest.raises(ValueError, match=msg):
            lora_lib.LoraConfig(**kw)
    cfg = tiny_cfg(n_head=2, n_kv_head=1, d_model=8, d_ff=12)
    shapes = lora_lib.shapes(cfg, lora_lib.LoraConfig(rank=3, targets="qkv,down"))
    assert shapes == {"blocks.0.attn.qkv.lora_A": (8, 3), "blocks.0.attn.qkv.lora_B": (3, 16),
                      "blocks.0.ffn.w_down.lora_A": (12, 3), "blocks.0.ffn.w_down.lora_B": (3, 8),
                      "blocks.1.attn.qkv.lora_A": (8, 3), "blocks.1.attn.qkv.lora_B": (3, 16),
                      "blocks.1.ffn.w_down.lora_A": (12, 3), "blocks.1.ffn.w_down.lora_B": (3, 8)}


# ----------------------------------------------------------------------------------------------------
# generation, mixed precision, training

@pytest.mark.parametrize("n_kv", [1, 2])
def test_kv_cache_with_adapters_equals_full_forward(backend, n_kv):
    gm = backend
    cfg = tiny_cfg(n_head=2, d_model=16, n_kv_head=n_kv, max_seq_len=9)
    lora = lora_lib.LoraConfig(rank=2, dropout=0.5)          # dropout is off outside training
    params = lora_params(gm, cfg, lora, mult=1.0)
    seq = np.random.default_rng(3).integers(0, cfg.vocab_size, 9)
    kv = gm.kv_cache_init(cfg, np.float64)
    logits = gm.forward_cached(params, seq[None, :4], cfg, kv, 0, lora=lora)
    np.testing.assert_allclose(gm.to_host(logits), gm.to_host(gm.forward(params, seq[None, :4], cfg, lora=lora)),
                               rtol=1e-10, atol=1e-12)
    for pos in range(4, 9):
        step = gm.forward_cached(params, seq[None, pos:pos + 1], cfg, kv, pos, lora=lora)
        full = gm.forward(params, seq[None, :pos + 1], cfg, lora=lora)[:, -1:]
        np.testing.assert_allclose(gm.to_host(step), gm.to_host(full), rtol=1e-10, atol=1e-12)
    merged = lora_lib.merge(params, lora)
    assert generation.generate(gm, params, [1, 5], cfg, 7, temperature=0, lora=lora) == generation.generate(gm, merged, [1, 5], cfg, 7,
                                                                                       temperature=0)


def test_mixed_precision_with_adapters_matches_float32():
    # the tolerances of test_mixed_precision.py: each tensor's ||g16 - g32|| / ||g32||, the loss relative
    cfg = gn.GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16, n_kv_head=1)
    lora = lora_lib.LoraConfig(rank=4, targets="qkv,up,down")
    params = lora_params(gn, cfg, lora, mult=1.0, dtype=np.float32, b_scale=0.02)
    ids, targets = batch(cfg, B=4, T=16)
    loss32, g32 = gn.loss_and_grads(params, ids, targets, cfg, lora=lora)
    loss16, g16 = mixed_precision.loss_and_grads_mixed(gn, params, ids, targets, cfg, GRAD_SCALE, lora=lora)
    assert list(g16) == list(g32) == list(lora_lib.shapes(cfg, lora))
    assert abs(loss16 - loss32) / loss32 < LOSS_RTOL
    for k in g32:
        assert g16[k].dtype == np.float32 and norm_error(g16[k], g32[k]) < GRAD_RTOL, k


def test_frozen_weights_stay_bit_identical_through_training():
    cfg = tiny_cfg(n_head=2, d_model=16, n_kv_head=1, dropout=0.1)
    lora = lora_lib.LoraConfig(rank=2, targets="qkv,proj,gate", dropout=0.1)
    base = gn.init_params(cfg, seed=0)
    for p in base.values():
        if p.ndim == 2:
            p *= 10.0                                  # a base model with something to say
    before = {k: v.copy() for k, v in base.items()}
    adapters = lora_lib.init(gn, cfg, lora, seed=0)
    params = {**base, **adapters}
    state = gn.adamw_init(adapters)                    # optimizer state for the adapters alone
    ids, targets = batch(cfg, B=4, T=7)
    losses = []
    for step in range(30):
        loss, grads = gn.loss_and_grads(params, ids, targets, cfg, seed=step, lora=lora)
        gn.clip_grad_norm(grads, 1.0)
        gn.adamw_step(adapters, grads, state, 1e-2)
        losses.append(loss)
    assert max(losses[-5:]) < losses[0] - 0.5          # the adapters learn
    for k in before:
        assert params[k] is base[k]
        np.testing.assert_array_equal(base[k], before[k], err_msg=k)
    assert set(state["m"]) == set(adapters)


def test_every_target_subset_names_its_grads():
    # every subset of the five targets: grads name exactly that subset's adapters
    cfg = tiny_cfg(n_layer=1)
    ids, targets = batch(cfg)
    for n in range(1, 6):
        for subset in itertools.combinations(gn.LORA_TARGETS, n):
            lora = lora_lib.LoraConfig(rank=1, targets=subset)
            params = {**gn.init_params(cfg), **lora_lib.init(gn, cfg, lora)}
            _, grads = gn.loss_and_grads(params, ids, targets, cfg, lora=lora)
            assert list(grads) == list(lora_lib.shapes(cfg, lora))
