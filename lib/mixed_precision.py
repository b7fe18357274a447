"""
lib/mixed_precision.py: training in float16 with float32 master weights and dynamic loss scaling
(Micikevicius et al. 2018), composed from the model's own forward and backward (gm: gpt_numpy or gpt_cupy).
train.py --mixed-precision uses it; it pays on a GPU (NumPy has no float16 matrix multiply).

    scaler = loss_scaler_init()
    loss, grads = loss_and_grads_mixed(gm, params, x, y, cfg, scaler["scale"], seed=step)
    loss_scaler_update(scaler, grads is not None)          # None: a gradient overflowed, skip the step
"""

import numpy as np


# Mixed precision (Micikevicius et al. 2018): the optimizer keeps and updates float32 weights, the
# "master" copy; each step runs the forward and backward on a float16 copy of them (half the memory
# traffic, and tensor cores on a GPU). float16 keeps 11 significant bits and spans about 6e-8 (the
# smallest subnormal) to 65504, so small gradients flush to zero. Dynamic loss scaling moves them up:
# the backward starts from S * loss, every gradient comes out S times larger, and dividing by S after
# the cast to float32 gives back the true gradient. Too large an S overflows to inf or nan: that step
# is skipped and S halved; after growth_interval good steps in a row S doubles, so S stays near the
# largest value that does not overflow. The scaler state is a plain dict, checkpointed like AdamW's.
# Kept in float32 in the half-precision path: the cross-entropy and its softmax (here), the attention
# softmax and the norms' statistics (upcast in the layers). Dropout draws the masks of the float32 run.

def loss_scaler_init(scale=2.0 ** 16):
    """The scaler's state: the scale S and the number of finite steps since S last changed."""
    return {"scale": float(scale), "good_steps": 0}


def loss_scaler_update(scaler, finite, growth_interval=2000):
    """After each step: halve the scale if a gradient overflowed (the step was skipped), double it
    after growth_interval finite steps in a row."""
    if not finite:
        scaler["scale"] /= 2.0
        scaler["good_steps"] = 0
        return
    scaler["good_steps"] += 1
    if scaler["good_steps"] >= growth_interval:
        scaler["scale"] *= 2.0
        scaler["good_steps"] = 0


def loss_and_grads_mixed(gm, params, ids, targets, cfg, scale, seed=0, dtype=np.float16, lora=None):
    """loss_and_grads in half precision (`dtype`) from the master weights `params`, the backward run
    on scale * loss. Returns (loss, grads), grads unscaled and in the master weights' dtype, or
    (loss, None) when a gradient overflowed: then skip the optimizer step. Either way, pass
    `grads is not None` to loss_scaler_update. Dropout masks are those of loss_and_grads with `seed`.
    lora: as in loss_and_grads (the frozen weights are cast too; the adapters alone get gradients)."""
    gm.check_ids(ids, cfg)
    gm.check_targets(targets, ids, cfg)
    # overflow is expected here and handled below: silence NumPy's warnings (CuPy gives none)
    with np.errstate(over="ignore", invalid="ignore"):
        half = {k: p.astype(dtype) for k, p in params.items()}          # the compute copy
        logits, cache = gm.model_forward(half, ids, cfg, train=True, seed=seed, lora=lora)
        loss, c_ce = gm.cross_entropy_forward(gm.upcast(logits), gm.to_device(targets), overwrite=True)   # float32 softmax
        del logits
        dlogits = gm.cross_entropy_backward(scale, c_ce).astype(dtype)             # d(S * loss), (N, V)
        grads = gm.model_backward(dlogits, cache, half, cfg)
        for k, g in grads.items():
            grads[k] = g.astype(params[k].dtype, copy=False)                    # up to float32
            grads[k] *= 1.0 / scale                                             # unscale
        # inf and nan survive a sum: one host sync checks every gradient
        finite = bool(gm.xp.isfinite(gm.xp.stack([g.sum() for g in grads.values()])).all())
    return loss, (grads if finite else None)

