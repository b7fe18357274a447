"""
lib/lora.py: the bookkeeping of LoRA runs (Hu et al. 2021), around the adapters' forward and backward,
which are array code inside the model (gpt_numpy.py's appendix A: the Lora record, lora_forward,
lora_backward): a run's LoraConfig, the adapters' names and shapes, their initialisation, and merging
them into the weights (W + (alpha / r) A @ B) and back out.

    lc = LoraConfig(rank=8, alpha=16, targets=("qkv", "proj"))
    adapters = init(gm, cfg, lc, seed=0)                  # {"blocks.0.attn.qkv.lora_A": (C, r), ...}
    loss, grads = gm.loss_and_grads({**params, **adapters}, x, y, cfg, lora=lc)   # grads: the adapters' only
    merged = merge({**params, **adapters}, lc)            # a plain model's weights
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

import gpt_numpy
from gpt_numpy import LORA_TARGETS


@dataclass
class LoraConfig:
    rank: int = 8                 # r: rank of each adapter, e.g. 4 .. 64
    alpha: float = 16.0           # the update (x @ A) @ B is scaled by alpha / r, e.g. 2r
    targets: tuple = tuple(LORA_TARGETS)   # weights of every block with an adapter: any of qkv, proj,
                                  # gate, up, down (e.g. ("qkv",) as in Hu et al.'s attention-only runs)
    dropout: float = 0.0          # dropout on each adapter's input in training, e.g. 0.0 .. 0.1

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        targets = (self.targets.split(",") if isinstance(self.targets, str) else list(self.targets))
        targets = [t.strip() for t in targets if t.strip()]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {', '.join(LORA_TARGETS)}; got "
                             f"{', '.join(map(repr, unknown or targets)) or 'none'}")
        self.targets = tuple(t for t in LORA_TARGETS if t in targets)     # canonical order, no repeats
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.alpha = float(self.alpha)

    @property
    def scale(self):
        return self.alpha / self.rank

    def to_dict(self):
        return {**asdict(self), "targets": list(self.targets)}




def shapes(cfg, lora):
    """The adapters of a LoRA run, {name: shape}, block by block in LORA_TARGETS order: for a weight W
    (in, out), "<W's name>.lora_A" (in, r) and "<W's name>.lora_B" (r, out).

    Example: rank 8, targets ("qkv",), d_model 64 -> {"blocks.0.attn.qkv.lora_A": (64, 8),
    "blocks.0.attn.qkv.lora_B": (8, 192), "blocks.1.attn.qkv.lora_A": ...}.
    """
    base = gpt_numpy.param_shapes(cfg)
    shapes = {}
    for i in range(cfg.n_layer):
        for t in lora.targets:
            name = f"blocks.{i}.{LORA_TARGETS[t][0]}"
            n_in, n_out = base[name]
            shapes[name + ".lora_A"] = (n_in, lora.rank)
            shapes[name + ".lora_B"] = (lora.rank, n_out)
    return shapes


def init(gm, cfg, lora, seed=0, dtype=np.float32):
    """Fresh adapters: A ~ normal(0, 1/r) (PEFT's init_lora_weights="gaussian"), B = 0, so that
    (x @ A) @ B = 0 and the adapted model starts as the base model, exactly. Host RNG, as init_params."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes(cfg, lora).items():
        w = rng.normal(0.0, 1.0 / lora.rank, shape) if name.endswith(".lora_A") else np.zeros(shape)
        out[name] = gm.to_device(w.astype(dtype))
    return out


def merge(params, lora):
    """A plain model's weights from a LoRA run's params (base weights and adapters in one dict):
    W + (alpha / r) A @ B for every weight with an adapter, the other weights as they are (the same
    arrays), no adapter keys. forward(merged) equals forward(params, lora=lora) to rounding."""
    merged = {k: v for k, v in params.items() if not k.endswith((".lora_A", ".lora_B"))}
    for k in merged:
        if k + ".lora_A" in params:
            merged[k] = merged[k] + lora.scale * (params[k + ".lora_A"] @ params[k + ".lora_B"])   # (in, out)
    return merged


def unmerge(merged, adapters, lora):
    """The inverse of merge: W' - (alpha / r) A @ B for each adapter in `adapters`, the base
    weights back (to rounding: W + s A B - s A B is W up to the last bits of float32)."""
    base = dict(merged)
    for k in merged:
        if k + ".lora_A" in adapters:
            base[k] = merged[k] - lora.scale * (adapters[k + ".lora_A"] @ adapters[k + ".lora_B"])
    return base

