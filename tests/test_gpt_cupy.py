"""Tests for gpt_cupy.py that only make sense with a GPU or across backends. The model's own tests
(gradient checks in float64, checkpointing, the KV cache, AdamW, generation, mixed precision) run on
CuPy too: they take the `backend` fixture of conftest.py. Without CuPy or a GPU (as in CI) only the
error message is checked here and the rest skips; on a GPU: float32 agreement with NumPy within 1e-4
relative, the fused kernels against the reference, TF32, and generation against NumPy."""

import importlib
import sys

import numpy as np
import pytest

import gpt_numpy as gn
from conftest import gpu_available, rel_err, small_cfg
from lib import generation

HAS_GPU = gpu_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CuPy and an NVIDIA GPU")


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the error path cannot be reached")
def test_clear_error_without_cupy_or_gpu():
    sys.modules.pop("gpt_cupy", None)
    with pytest.raises(RuntimeError, match=r"cupy backend needs (CuPy|an NVIDIA GPU).*--backend numpy"):
        importlib.import_module("gpt_cupy")


@pytest.fixture(scope="module")
def gm():
    if not HAS_GPU:
        pytest.skip("needs CuPy and an NVIDIA GPU")
    import gpt_cupy
    gpt_cupy.use_fused_kernels(False)
    return gpt_cupy


def batch(cfg, B=3, T=16, seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (B, T))
    targets = r.integers(0, cfg.vocab_size, (B, T))
    targets[0, :3] = -1
    return ids, targets


@needs_gpu
def test_numpy_module_stays_on_numpy(gm):
    assert gn.xp is np and gm.model.xp is not np
    assert gm.model is not gn


@needs_gpu
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_float32_matches_numpy(gm, norm):
    cfg = small_cfg(norm=norm, tie_embeddings=(norm == "rmsnorm"))
    ids, targets = batch(cfg)
    p_np = gn.init_params(cfg, seed=1)
    p_gpu = gm.init_params(cfg, seed=1)
    for k in p_np:
        np.testing.assert_array_equal(gm.to_host(p_gpu[k]), p_np[k])   # same weights on both
    assert rel_err(gm.forward(p_gpu, ids, cfg), gn.forward(p_np, ids, cfg)) < 1e-4
    l_np, g_np = gn.loss_and_grads(p_np, ids, targets, cfg)
    l_gpu, g_gpu = gm.loss_and_grads(p_gpu, ids, targets, cfg)
    assert l_gpu == pytest.approx(l_np, rel=1e-5)
    for k in g_np:
        assert rel_err(g_gpu[k], g_np[k]) < 1e-4, k


@needs_gpu
def test_fused_kernels_match_reference(gm):
    import cupy
    cfg = small_cfg()
    ids, targets = batch(cfg)
    params = gm.init_params(cfg, seed=0)
    _, grads = gm.loss_and_grads(params, ids, targets, cfg)
    ref = {k: v.copy() for k, v in params.items()}
    ref2 = {k: v.copy() for k, v in params.items()}
    s_ref, s_ref2, s_fused = gm.adamw_init(ref), gm.adamw_init(ref2), gm.adamw_init(params)
    for _ in range(3):
        gm.model.adamw_step(ref, grads, s_ref, 1e-3, 0.9, 0.95, 1e-8, 0.1)
        gm.model.REFERENCE_FORMS["adamw_step"](ref2, grads, s_ref2, 1e-3, 0.9, 0.95, 1e-8, 0.1)
        gm.fused_adamw_step(params, grads, s_fused, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    for k in params:
        assert rel_err(params[k], ref[k]) < 1e-6, k
        assert rel_err(params[k], ref2[k]) < 1e-6, k


@needs_gpu
def test_tf32_is_close_and_can_be_turned_off(gm):
    cfg = small_cfg()
    ids, targets = batch(cfg)
    params = gm.init_params(cfg, seed=1)
    exact = gm.to_host(gm.forward(params, ids, cfg))
    try:
        gm.enable_tf32(True)
        tf32 = gm.to_host(gm.forward(params, ids, cfg))
    finally:
        gm.enable_tf32(False)
    assert rel_err(tf32, exact) < 1e-2
    np.testing.assert_array_equal(gm.to_host(gm.forward(params, ids, cfg)), exact)


@needs_gpu
def test_embedding_backward_deterministic_and_equal_to_numpy(gm):
    import cupy
    r = np.random.default_rng(0)
    V, C = 50, 24
    ids = r.integers(0, 5, (8, 300))                    # few distinct ids: hundreds of terms per row
    ids[0, 0] = V - 1                                   # and a row used once
    dout = r.standard_normal((8, 300, C)).astype(np.float32)
    ref = gn.embedding_backward(dout, (ids, (V, C)))    # NumPy's add.at, in position order
    for _ in range(3):
        got = gm.to_host(gm.embedding_backward(cupy.asarray(dout), (cupy.asarray(ids), (V, C))))
        np.testing.assert_array_equal(got, ref)        # bit for bit, every time
    half = gm.embedding_backward(cupy.asarray(dout).astype(cupy.float16), (cupy.asarray(ids), (V, C)))
    assert half.dtype == cupy.float32


@needs_gpu
def test_greedy_generation_matches_numpy(gm):
    cfg = small_cfg()
    p_np = gn.init_params(cfg, seed=4, dtype=np.float64)
    for p in p_np.values():
        if p.ndim == 2:
            p *= 20.0
    p_gpu = {k: gm.to_device(v) for k, v in p_np.items()}
    assert generation.generate(gm, p_gpu, [1, 2, 3], cfg, 20, temperature=0) == generation.generate(gn, p_np, [1, 2, 3], cfg, 20, temperature=0)
