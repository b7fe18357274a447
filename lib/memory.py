"""
lib/memory.py: how much memory a model needs, and how much the machine has, so that a size that cannot fit
is refused up front with one line instead of growing into an out-of-memory kill or a hang.

    need = training_bytes(mcfg, batch_size=16, block_size=128)  # {"weights and gradients": .., "AdamW state": ..,
                                                                #  "activations": ..}: bytes
    check_fits(need, "this run", gm, hint="use a smaller --batch-size")   # UserError if it cannot fit
    generation_bytes(cfg, prompt_len=10, new_tokens=300, cache_positions=kv_cache_positions(cfg, 10, 300))

The counts are read off the model's own rules rather than copied from them: the parameter table
(gpt_numpy.param_shapes), the width of the attention's q, k and v (cfg.qkv_size: grouped-query attention
keeps nkv key/value heads), the blocked attention's blocks (gpt_numpy.attention_blocks: from T = 2 *
ATT_BLOCK on, each query block keeps the scores of the keys it sees only), and the KV cache generation
allocates (generation.cache_positions, kv_cache_init's shape). What they give, measured by
tests/test_memory.py on small models (multi-head, grouped-query and blocked attention, dropout,
checkpointing, float16):
  activation_bytes   what a training forward keeps for the backward: the bytes of model_forward's cache,
                     exactly (the test allows 3%)
  training_bytes     1.03 to 1.18 times the peak of a whole step that tracemalloc measures, weights
                     included (the test allows 0.95 to 1.3): it counts the gradients and the kept
                     activations as if alive at once, while the backward frees the activations as the
                     gradients appear
  generation_bytes   KV cache and activations 0.94 to 1.02 times generate_stream's peak (allowed: 0.85 to
                     1.25); the weights exist before
They are used only to refuse what cannot fit; nothing here allocates.
"""

import os
from dataclasses import replace

import gpt_numpy
from lib import generation, inference

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


# ----------------------------------------------------------------------------------------------------
# Generation: the KV cache

def kv_heads(cfg):
    """Heads of the keys and values (grouped-query attention has fewer than n_head)."""
    return cfg.n_kv_head


def kv_cache_bytes(cfg, positions, itemsize=4, batch=1):
    """The KV cache of generation: per layer a K and a V of kv_cache_init's shape (batch, nkv, positions, hs)."""
    return 2 * cfg.n_layer * batch * kv_heads(cfg) * positions * cfg.head_size * itemsize


def kv_cache_positions(cfg, prompt_len, new_tokens):
    """The positions of the KV cache generation.generate_stream allocates (its own rule,
    generation.cache_positions): the prompt and the new tokens, capped at max_seq_len."""
    return generation.cache_positions(cfg, prompt_len, new_tokens)


# ----------------------------------------------------------------------------------------------------
# Activations: what the forward pass keeps for the backward, one block and the whole model

def attention_scores(cfg, T, pos=0):
    """Attention scores one query head keeps for T queries after pos cached positions: T * (pos + T), or,
    where gpt_numpy.attends_by_blocks(T) (the blocked attention of FAST_FORMS), each block's rows
    times the keys it sees, gpt_numpy.attention_blocks."""
    if gpt_numpy.attends_by_blocks(T):
        return sum((i1 - i0) * n for i0, i1, n in gpt_numpy.attention_blocks(T, pos))
    return T * (pos + T)


def block_activation_bytes(cfg, batch_size, block_size, itemsize=4, pos=0, dropout=0.0):
    """Bytes of one block's cache (block_forward) for B x T tokens after pos cached positions, the
    activations at `itemsize` (4: float32, 2: float16), by what each layer keeps, per token:

        norm1          x_hat (C) and 1 / rms (1); its output h (C), the qkv matmul's input
        attention      q and k after RoPE (nh + nkv heads), v (nkv heads): cfg.qkv_size numbers; the
                       merged heads y (C), the projection's input
        norm2          x_hat (C), 1 / rms (1), its output (C), the input of gate and up
        SwiGLU         a = silu(a) (F), b (F), sigmoid(a) (F), their product h (F), down's input
                       = 5 C + qkv_size + 4 F + 2 numbers

    and per query head the attention probabilities (attention_scores of them, softmaxed in float32), a
    copy at `itemsize` after dropout or in half precision; with dropout the masks (bools): the scores'
    (over all T x (pos + T), also in the blocked form) and two (B, T, C) on the residual branches."""
    B, T, C, F = batch_size, block_size, cfg.d_model, cfg.d_ff
    N, heads = B * T, B * cfg.n_head
    numbers = N * (5 * C + cfg.qkv_size + 4 * F + 2)
    scores = heads * attention_scores(cfg, T, pos)
    att = scores * max(itemsize, 4)                          # gpt_numpy.upcast: float32 or wider
    if dropout > 0 or itemsize < 4:
        att += scores * itemsize                             # att_d, the dropped-out / cast-down copy
    if dropout > 0:
        att += heads * T * (pos + T) + 2 * N * C             # the keep masks, one byte each
    return numbers * itemsize + att


def cached_block_bytes(cfg, batch_size, block_size, pos=0, itemsize=4):
    """Peak bytes of the arrays alive inside one block of the KV-cache forward (lib/inference.block_forward_cached,
    which keeps nothing) for B x T new tokens after pos cached positions, the block's input x included: x
    and the norm's output h (2 C per token), then the largest of

        qkv         the qkv matmul's output (qkv_size), q and k's contiguous copy and RoPE's three
                    temporaries (4 x (nh + nkv) hs)
        attention   rope(q, k) ((nh + nkv) hs), the heads' output y (C), a block's scaled queries, its
                    e @ v and acc / l (3 C a row of the block) and two tiles' float32 scores
                    (lib/inference.cached_attention_blocks: per query head, a block's rows x a tile's keys;
                    a tile's scores are dropped when the next tile's replace them), and the first time,
                    the diagonals' causal masks (rows x rows, built in float64, kept in float32)
        SwiGLU      x1, down's output (2 C) and a, b, 1 + exp(-a) (3 F)"""
    B, T, C, F = batch_size, block_size, cfg.d_model, cfg.d_ff
    N, hq = B * T, (cfg.n_head + cfg.n_kv_head) * cfg.head_size
    blocks = inference.cached_attention_blocks(B, T, pos, cfg.n_head)
    tiles = [4 * B * cfg.n_head * (i1 - i0) * (j1 - j0) for i0, i1, ts in blocks for j0, j1 in ts]
    masks = sum(12 * r * r for r in {i1 - i0 for i0, i1, _ in blocks} if r > 1)    # a mask per block height
    scores = max(map(sum, zip(tiles, tiles[1:] + [0]))) + masks
    block = 3 * B * blocks[0][1] * C * 4                # a block's scaled queries, its e @ v and acc / l
    return N * 2 * C * itemsize + max(N * (cfg.qkv_size + 4 * hq) * itemsize,
                                      N * (hq + C) * itemsize + block + scores, N * (2 * C + 3 * F) * itemsize)


def activation_bytes(cfg, batch_size, block_size, itemsize=4):
    """Bytes of the cache model_forward(..., train=True) returns (parameters excluded): every block's
    cache, or with cfg.checkpoint only every block's input (B, T, C); and the model's own: the final
    norm's x_hat, 1 / rms and output (2 C + 1 per token), RoPE's cos and sin (T, hs) and the batch of ids
    (int64)."""
    B, T, C = batch_size, block_size, cfg.d_model
    N = B * T
    blocks = cfg.n_layer * (N * C * itemsize if cfg.checkpoint else
                            block_activation_bytes(cfg, B, T, itemsize, dropout=cfg.dropout))
    return blocks + N * (2 * C + 1) * itemsize + 2 * T * cfg.head_size * itemsize + B * (T + 1) * 8


def training_bytes(cfg, batch_size, block_size, mixed_precision=False):
    """Estimated peak bytes of one training step of a GPTConfig (float32 weights), by part:

        weights and gradients   float32 weights and their gradients (8 bytes a number); mixed precision
                                adds their float16 copies (12)
        AdamW state             the two moments, float32 (8)
        activations             what the forward keeps for the backward (activation_bytes), and what is
                                alive besides while the backward runs: the (B*T, V) logits, turned in
                                place into their softmax and then into their gradient (in float32, plus
                                the float16 logits and gradient with mixed precision), and one block's
                                cache again for the backward's temporaries (with cfg.checkpoint twice:
                                the block's recomputed cache, and the temporaries); with tied embeddings
                                the LM head's (V, C) gradient, kept beside the embedding's until the two
                                add up at the end of the backward

    Gradients and kept activations are counted as if alive at once; the backward frees each block's
    activations as it makes that block's gradients, so this errs on the side of more."""
    B, T, V = batch_size, block_size, cfg.vocab_size
    s = 2 if mixed_precision else 4                       # the itemsize of the activations
    P = count_params(cfg)[0]
    logits = B * T * V * (4 + (s if mixed_precision else 0))
    block = block_activation_bytes(cfg, B, T, s, dropout=cfg.dropout)
    temporaries = logits + block * (2 if cfg.checkpoint else 1)
    if cfg.tie_embeddings:
        temporaries += 4 * _prod(gpt_numpy.param_shapes(replace(cfg, n_layer=1))["tok_emb"])   # dW of the head
    return {"weights and gradients": (12 if mixed_precision else 8) * P,
            "AdamW state": 8 * P, "activations": activation_bytes(cfg, B, T, s) + temporaries}


def generation_bytes(cfg, prompt_len, new_tokens, cache_positions):
    """Estimated peak bytes of sampling new_tokens after a prompt of prompt_len tokens from a GPTConfig
    whose KV cache holds cache_positions positions (kv_cache_positions: what generation allocates): the
    weights, the cache, and the largest forward, the prefill of the prompt (cropped to max_seq_len; or of
    the whole context, which generation reads again once the cache is full). Its activations: one block of
    the KV-cache forward (cached_block_bytes: it keeps nothing), RoPE's tables and the logits of the last
    position alone (last_only)."""
    forward = 0                                           # nothing generated, nothing runs
    if new_tokens > 0:
        T = min(prompt_len, cfg.max_seq_len)              # generate_stream crops the prompt to the context
        if T + new_tokens - 1 > cache_positions:          # more positions are fed than the cache holds: it
            T = cfg.max_seq_len                           # fills, and the whole context is read again
        forward = cached_block_bytes(cfg, 1, T) + 2 * T * cfg.head_size * 4 + cfg.vocab_size * 4
    return {"weights": 4 * count_params(cfg)[0], "KV cache": kv_cache_bytes(cfg, cache_positions),
            "activations": forward}


def held_bytes(obj, exclude=()):
    """What an object really holds: the bytes of the distinct array buffers reachable from obj (through
    lists, tuples, NamedTuples and dicts), each buffer once (a view counted by the array that owns its
    memory), the buffers of the arrays in `exclude` (the parameters) left out. The benchmarks and the tests
    compare the estimates above with it, e.g. held_bytes(model_forward(..., train=True)[1], params.values())."""
    def owner(a):                                       # the array that owns the memory `a` views
        while getattr(a, "base", None) is not None and hasattr(a.base, "nbytes"):
            a = a.base
        return a
    skip = {id(owner(a)) for a in exclude}
    found, stack = {}, [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif hasattr(o, "nbytes") and hasattr(o, "shape"):
            b = owner(o)
            if id(b) not in skip:
                found[id(b)] = b                        # holds b, so that its id stays unique
    return sum(int(b.nbytes) for b in found.values())


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
