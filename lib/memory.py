"""
memory.py: how much memory a model needs, and how much the machine has, so that a size that cannot fit
is refused up front with one line instead of growing into an out-of-memory kill or a hang.

    need = training_bytes(mcfg, batch_size=16, block_size=128)  # {"weights and gradients": .., "AdamW state": ..,
                                                                #  "activations": ..}: bytes
    check_fits(need, "this run", gm, hint="use a smaller --batch-size")   # UserError if it cannot fit
    generation_bytes(cfg, prompt_len=10, new_tokens=300, cache_positions=1024)   # weights, KV cache, prefill

The counts follow gpt_numpy.py's arrays (its parameter table, the activations each layer keeps for the
backward, the KV cache) and are estimates: between 0.8 and 1.5 times the peak that tracemalloc measures
for small models (tests/test_hardening.py checks two). They are used only to refuse what cannot fit;
nothing here allocates.
"""

import os
from dataclasses import replace

import gpt_numpy

LONGEST_CONTEXT = 1 << 24   # max_seq_len above this (16.8M positions) is refused as absurd metadata


def count_params(cfg):
    """Number of weights of a GPTConfig, without building the parameter table of every layer (a config
    that says n_layer = 10**9 is counted at once): the table of 1 and of 2 layers, then L - 1 more of
    the difference. Returns (numbers, tensors). Example: the tiny preset's model (V 65) -> (3648, 9)."""
    one, two = (gpt_numpy.param_shapes(replace(cfg, n_layer=n)) for n in (1, 2))
    size = lambda shapes: sum(_prod(s) for s in shapes.values())         # noqa: E731
    numbers = size(one) + (cfg.n_layer - 1) * (size(two) - size(one))
    tensors = len(one) + (cfg.n_layer - 1) * (len(two) - len(one))
    return numbers, tensors


def _prod(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def kv_heads(cfg):
    """Heads of the keys and values (grouped-query attention has fewer than n_head)."""
    return getattr(cfg, "n_kv_head", None) or cfg.n_head


def kv_cache_bytes(cfg, positions, itemsize=4, batch=1):
    """The KV cache of generation: per layer a K and a V of (batch, kv heads, positions, head size)."""
    return 2 * cfg.n_layer * batch * kv_heads(cfg) * positions * cfg.head_size * itemsize


def kv_cache_positions(cfg, prompt_len, new_tokens):
    """The positions of the KV cache gpt_numpy.generate_stream allocates: kv_cache_init sizes it to the whole
    context, max_seq_len. (Where generation sizes it to the prompt + new tokens instead, capped at
    max_seq_len, this is min(prompt_len + new_tokens, cfg.max_seq_len).)"""
    return cfg.max_seq_len


def training_bytes(cfg, batch_size, block_size, mixed_precision=False):
    """Estimated peak bytes of one training step of a GPTConfig (float32 weights), by part:
    parameters, gradients and AdamW's two moments (4 copies of the weights; mixed precision adds a
    float16 copy), and the activations one micro-batch keeps for the backward pass:

        per layer      B*T*(10 C + 4 F) numbers + the (B, nh, T, T) attention probabilities (float32)
                       (+ a float32 copy and byte masks with dropout)
        once           B*T*V logits and their softmax, the batch itself (int64), and the backward's
                       temporaries of one layer (another attention-sized pair, 4 B*T*F)

    With cfg.checkpoint (gradient checkpointing) only each layer's input B*T*C is kept, plus one
    layer's activations while it is recomputed."""
    B, T, C, F, V, L = batch_size, block_size, cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layer
    s = 2 if mixed_precision else 4                       # the itemsize of the activations
    N, A = B * T, B * cfg.n_head * T * T
    P = count_params(cfg)[0]
    layer = N * (10 * C + 4 * F) * s + A * 4              # attention probabilities are softmaxed in float32
    if cfg.dropout > 0:
        layer += A * (s + 1) + 2 * N * C                  # the dropped-out copy, the keep masks (bool)
    kept = (L * N * C * s + layer) if cfg.checkpoint else L * layer
    once = N * V * (4 + 4 + s) + N * 8 * 3 + 2 * A * 4 + 4 * N * F * s
    return {"weights and gradients": (12 if mixed_precision else 8) * P,   # + float16 copies when mixed
            "AdamW state": 8 * P, "activations": kept + once}


def generation_bytes(cfg, prompt_len, new_tokens, cache_positions):
    """Estimated peak bytes of sampling new_tokens after a prompt of prompt_len tokens from a GPTConfig
    whose KV cache holds cache_positions positions: the weights, the cache, and the largest forward, the
    prefill of the prompt (or of the whole context, which generation re-reads once it is full): its
    activations, attention scores and logits."""
    ctx = cfg.max_seq_len
    T = ctx if prompt_len + new_tokens > ctx else min(prompt_len, ctx)
    forward = T * (10 * cfg.d_model + 4 * cfg.d_ff) * 4 + cfg.n_head * T * T * 4 * 3 + T * cfg.vocab_size * 4
    return {"weights": 4 * count_params(cfg)[0], "KV cache": kv_cache_bytes(cfg, cache_positions),
            "activations": forward}


# ----------------------------------------------------------------------------------------------------
# The machine

def machine_memory(gm=None):
    """(bytes, what): the GPU's memory for gpt_cupy, else the host's physical memory, or the control
    group's limit where that is lower (a container)."""
    cupy = getattr(gm, "cupy", None)
    if cupy is not None:
        return int(cupy.cuda.Device().mem_info[1]), "GPU memory"
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total, "memory"


def available_memory(gm=None):
    """Bytes free right now: the GPU's free memory for gpt_cupy, else the kernel's MemAvailable (what
    can be had without swapping: free memory plus reclaimable caches); None where unknown."""
    cupy = getattr(gm, "cupy", None)
    if cupy is not None:
        return int(cupy.cuda.Device().mem_info[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fmt_bytes(n):
    """1536 -> '1.5 KB', 3.2e15 -> '3.2 PB' (powers of 1000, one decimal)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def check_fits(need, what, gm=None, hint=""):
    """Raise errors.UserError, one line naming the estimate, its parts and the machine's memory, if the
    parts of `need` (a dict of bytes) add up to more than the machine has. If it fits the machine but not
    what is free right now (other programs hold the rest), warn on stderr and go on: they may finish,
    and the kernel may swap."""
    import sys
    from errors import UserError
    total = sum(need.values())
    have, where = machine_memory(gm)
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in need.items())
    if total > have:
        raise UserError(f"{what} needs about {fmt_bytes(total)} of memory ({parts}), but this machine has "
                        f"{fmt_bytes(have)} of {where}" + (f"; {hint}" if hint else ""))
    free = available_memory(gm)
    if free is not None and total > free:
        print(f"warning: {what} needs about {fmt_bytes(total)} of memory ({parts}), more than the "
              f"{fmt_bytes(free)} free now (of {fmt_bytes(have)}): it may swap or be stopped by the system"
              + (f"; {hint}" if hint else ""), file=sys.stderr)
