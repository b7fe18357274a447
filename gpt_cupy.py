"""
gpt_cupy.py: the model of gpt_numpy.py, run on an NVIDIA GPU through CuPy.

One source of truth: this file does not copy the model. It loads gpt_numpy.py a second time, as its own
module object, and points that copy's array namespace `xp` at CuPy. Every function of gpt_numpy is
then available here under the same name and runs on the GPU:

    import gpt_cupy as gm                      # raises RuntimeError with a clear message without a GPU
    params = gm.init_params(cfg, seed=0)       # same weights as gpt_numpy (drawn on the host)
    loss, grads = gm.loss_and_grads(params, ids, targets, cfg)   # ids, targets: NumPy arrays are fine
    host = {k: gm.to_host(v) for k, v in params.items()}         # back to NumPy for a checkpoint

Installing CuPy: `pip install "cupy-cuda12x[ctk]"` (CUDA 12) or `"cupy-cuda13x[ctk]"` (CUDA 13). The plain
`cupy-cuda12x` wheel lacks NVRTC, which CuPy needs to compile its elementwise kernels; the `[ctk]`
extra brings it.

GPU-only options:
    gm.enable_tf32(True)   # TF32 tensor-core matmuls for float32 (about 10 mantissa bits; off by default)
"""

import importlib.util
import sys
from pathlib import Path


def _require_gpu():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("the cupy backend needs CuPy: install it with `pip install \"cupy-cuda12x[ctk]\"` "
                           "(CUDA 12) or `pip install \"cupy-cuda13x[ctk]\"` (CUDA 13; [ctk] brings NVRTC, which "
                           "CuPy's kernels need), or use --backend numpy") from e
    try:
        ok = cupy.cuda.is_available()                  # the probe that never raises
    except Exception:                                  # a broken driver install
        ok = False
    if not ok:
        raise RuntimeError("the cupy backend needs an NVIDIA GPU with a working CUDA driver, and none was "
                           "found (cupy.cuda.is_available() is False); use --backend numpy")
    return cupy


cupy = _require_gpu()

# Load gpt_numpy.py as a separate module, so that `import gpt_numpy` elsewhere stays on NumPy.
_spec = importlib.util.spec_from_file_location("gpt_numpy_on_cupy", Path(__file__).with_name("gpt_numpy.py"))
_model = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _model                      # as an import does: the model finds itself there (FAST_FORMS)
_spec.loader.exec_module(_model)
_model.set_backend(cupy)

# Re-export the model's public names: these are the very function objects of the CuPy copy, so they
# look up `xp` (and each other) in that copy.
globals().update({k: v for k, v in vars(_model).items() if not k.startswith("__")})
model = _model


def enable_tf32(on=True):
    """Let float32 matmuls use TF32 tensor cores (faster; about 1e-3 relative precision)."""
    from cupy._core import _routines_linalg as linalg
    linalg.set_compute_type(cupy.float32, linalg.COMPUTE_TYPE_TF32 if on else linalg.COMPUTE_TYPE_DEFAULT)


def synchronize():
    """Wait for the GPU to finish queued work (for timing)."""
    cupy.cuda.Stream.null.synchronize()


# ----------------------------------------------------------------------------------------------------
# GPU forms: kernels that replace a function of the model on the GPU, swapped in by gpt_numpy's swap rule
# (use_forms: the model calls its functions by module-global name, so rebinding the name in the CuPy copy
# changes every caller). Each is checked against the NumPy form in tests/test_gpt_cupy.py on a GPU.

# AdamW, one pass over p, g, m, v instead of about ten (gpt_numpy.adamw_step has the math).
_adamw_kernel = cupy.ElementwiseKernel(
    "T g, T b1, T b2, T lr_bc1, T inv_bc2, T eps, T decay",
    "T p, T m, T v",
    """
    m = b1 * m + (1 - b1) * g;                          // first moment
    v = b2 * v + (1 - b2) * g * g;                      // second moment
    p = p * decay - lr_bc1 * m / (sqrt(v * inv_bc2) + eps);
    """,
    "gpt_adamw_step")


def fused_adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """identical to gpt_numpy's adamw_step except that each parameter's update is one kernel."""
    state["t"] += 1
    t = state["t"]
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    for k, p in params.items():
        decay = 1.0 - lr * weight_decay if (weight_decay and p.ndim >= 2) else 1.0
        _adamw_kernel(grads[k], beta1, beta2, lr / bc1, 1.0 / bc2, eps, decay,
                      p, state["m"][k], state["v"][k])


# Embedding backward, deterministic. gpt_numpy's `xp.add.at` becomes atomic adds on CuPy, and atomics
# land in whatever order the threads reach them: the sum of a frequent token's rows then differs in the
# last bits from run to run (seen on an H200: a checkpointed and a plain backward pass disagreed by
# 1e-8). This kernel gives each (row of dW, column) one thread that adds that row's gradients in
# position order, as NumPy's add.at does: the same bits on every run, and the same bits as NumPy.
_embedding_backward_kernel = cupy.ElementwiseKernel(
    "raw T dout, raw I pos, raw I starts, raw I uniq, int64 C",
    "raw T dW",
    """
    long long s = i / C, c = i % C;                     // segment s: all positions of token uniq[s]
    T acc = 0;
    for (I j = starts[s]; j < starts[s + 1]; j++)       // in position order
        acc += dout[pos[j] * C + c];
    dW[uniq[s] * C + c] = acc;
    """,
    "gpt_embedding_backward")


def deterministic_embedding_backward(dout, cache):
    """identical to gpt_numpy's embedding_backward except that the sums come out with the same bits on
    every run (and as NumPy's add.at)."""
    ids, shape = cache
    V, C = shape
    dout = _model.upcast(dout)                          # half precision accumulates in float32, as in gpt_numpy
    flat = cupy.asarray(ids).reshape(-1).astype(cupy.int64)
    N = flat.size
    key = cupy.sort(flat * N + cupy.arange(N))          # unique keys: (id, position) in order, any sort works
    sid, pos = key // N, key % N                        # (N,) ids grouped, positions ascending within each
    new = cupy.empty(N, dtype=bool)
    new[:1] = True
    new[1:] = sid[1:] != sid[:-1]
    starts = cupy.append(cupy.flatnonzero(new), N)     # (S+1,) segment boundaries
    uniq = sid[starts[:-1]]                             # (S,) the distinct ids
    dW = cupy.zeros(shape, dtype=dout.dtype)
    dflat = cupy.ascontiguousarray(dout).reshape(-1)
    _embedding_backward_kernel(dflat, pos, starts, uniq, C, dW, size=int(uniq.size) * C)
    return dW


# The GPU's tables, in gpt_numpy's FAST_FORMS format ({name the model calls: (its form, when)}).
# The deterministic embedding backward is always on: a model whose gradients change from run to run
# cannot promise bit-exact resume or checkpointed == plain backward. The fused AdamW is opt-in.
GPU_FORMS = {"embedding_backward": (deterministic_embedding_backward, None)}
FUSED_FORMS = {"adamw_step": (fused_adamw_step, None)}
UNFUSED_FORMS = {"adamw_step": (_model.adamw_step, None)}       # gpt_numpy's own (its in-place form)


def _use(table):
    """_model.use_forms(table), and the names re-exported here follow."""
    _model.use_forms(table)
    globals().update({name: getattr(_model, name) for name in table})


_use(GPU_FORMS)


def use_fused_kernels(on=True):
    """Swap the fused kernels in (or back out)."""
    _use(FUSED_FORMS if on else UNFUSED_FORMS)
