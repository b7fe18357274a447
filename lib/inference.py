"""
lib/inference.py: the model's forms for inference on the CPU, where nothing needs a gradient: the KV-cache
forward's block (generation and scoring), which gpt_numpy swaps in for block_forward (its FAST_FORMS,
appendix B), and the weights laid out in memory for it (pack_for_inference, which sample.py and eval.py
call after loading). Each is identical to what it replaces up to float rounding (tests/test_decode_speedups.py).

gm is the model module, gpt_numpy or gpt_cupy: the array work runs there (its xp, matmul, qkv_forward ...),
as in lib/generation.py and lib/scoring.py.
"""

import math
import weakref

import numpy as np


# The KV-cache forward's block (forward_cached: generation and scoring, no gradients): identical to
# block_forward with a KV cache, except that it keeps nothing for a backward and makes fewer passes over
# memory. gpt_numpy's FAST_FORMS hands it every block_forward call with a cache, outside LoRA
# (uses_cached_block).
# - Attention in tiles, FlashAttention's way (Dao et al. 2022): the queries by blocks of CACHED_ROWS rows,
#   and each block's keys by tiles of about CACHED_SCORES_BYTES of scores (cached_attention_blocks), so
#   that a tile's scores stay in the cache while the softmax passes over them and the matmuls see
#   shapes the BLAS runs near its peak: at T = 8192, 64 x 2048 tiles take 1.75 s a layer of SmolLM2
#   instead of 1.92 s for whole rows of keys (and 6.3 s for attention_forward_blocked, which keeps 1.2 GB
#   of probabilities a layer, mostly time spent faulting in fresh memory). Nothing is kept.
# - The softmax over the tiles of a row, online: with m the largest score so far, each tile adds
#   e = exp(s - m) to l = sum(e) and to acc = e @ v, after rescaling the earlier sums by exp(m_old - m)
#   when the new tile raises m; y = acc / l at the end (FlashAttention's deferred division: a pass over
#   (rows, hs) instead of (rows, keys)). The sums stay in float32 or wider.
# - SwiGLU in place: silu(a) * b = a / (1 + exp(-a)) * b, in a's buffer.
# - Decoding (T = 1) takes block_forward_decode below: the same arithmetic in fewer array calls.
CACHED_ROWS = 64                                # query rows per block
CACHED_SCORES_BYTES = 4 << 20                   # a tile's float32 scores, about


def cached_attention_blocks(B, T, pos, n_head):
    """[(i0, i1, tiles)]: for the KV-cache forward of T queries after pos cached positions, query rows
    i0 .. i1-1, CACHED_ROWS at a time, and the key tiles (j0, j1) that cover the keys they see, 0 .. pos + i1:
    as many keys a tile as keep B * n_head * rows * keys * 4 bytes near CACHED_SCORES_BYTES, the last tile
    holding the block's diagonal square (its keys pos + i0 .. pos + i1 - 1, the only ones masked).
    T = 1 (decoding): one row, its keys in one tile."""
    rows = min(T, CACHED_ROWS)
    keys = max(rows, CACHED_SCORES_BYTES // (4 * B * n_head * rows))
    out = []
    for i0 in range(0, T, rows):
        i1 = min(T, i0 + rows)
        n = pos + i1
        last = (n - (i1 - i0)) // keys * keys                       # at or before the diagonal square
        out.append((i0, i1, [(j0, j0 + keys) for j0 in range(0, last, keys)] + [(last, n)]))
    return out


def attention_forward_cached(gm, x, Wqkv, Wproj, cos, sin, n_head, kv, pos):
    """gm.attention_forward(x, Wqkv, Wproj, cos, sin, n_head, kv=kv, pos=pos) without dropout: its output
    alone."""
    xp = gm.xp
    B, T, C = x.shape
    hs = C // n_head
    q, k, v, _ = gm.qkv_forward(x, Wqkv, cos, sin, n_head, kv, pos)      # (B, nh, T, hs), 2 x (B, nkv, Tk, hs)
    n_kv = k.shape[1]
    g = n_head // n_kv
    q5 = q.reshape(B, n_kv, g, T, hs)                                # the query heads of each group, a view
    y = xp.empty((B, n_kv, g, T, hs), dtype=x.dtype)
    for i0, i1, tiles in cached_attention_blocks(B, T, pos, n_head):
        rows = i1 - i0
        qb = q5[:, :, :, i0:i1] * (1.0 / math.sqrt(hs))              # the block's rows of the g heads, scaled
        qb = qb.reshape(B, n_kv, g * rows, hs)
        m = None
        for j0, j1 in tiles:
            s = gm.upcast(qb @ k[:, :, j0:j1].transpose(0, 1, 3, 2))    # (B, nkv, g*rows, keys)
            if j1 == pos + i1 and rows > 1:                          # the diagonal square (a lone row sees all)
                s.reshape(B, n_kv, g, rows, j1 - j0)[..., -rows:] += gm.causal_mask(rows, rows, 0, s.dtype)
            m_tile = s.max(axis=-1, keepdims=True)                   # (B, nkv, g*rows, 1)
            m_new = m_tile if m is None else xp.maximum(m, m_tile)
            s -= m_new
            xp.exp(s, out=s)                                         # e, unnormalized
            l_tile = xp.einsum("...j->...", s)[..., None]            # rowsum(e)
            acc_tile = s @ gm.upcast(v[:, :, j0:j1])                    # (B, nkv, g*rows, keys) @ (B, nkv, keys, hs)
            if m is None:
                l, acc = l_tile, acc_tile
            else:
                rescale = xp.exp(m - m_new)                          # the earlier tiles' terms, to the new max
                l = l * rescale + l_tile
                acc = acc * rescale + acc_tile
            m = m_new
        y[:, :, :, i0:i1] = (acc / l).reshape(B, n_kv, g, rows, hs)
    y = gm.merge_heads(y.reshape(B, n_head, T, hs))                     # (B, T, C)
    return gm.matmul(y, Wproj)


def swiglu_forward_cached(gm, x, Wg, Wu, Wd):
    """gm.swiglu_forward(x, Wg, Wu, Wd)'s output alone, its gating in a's buffer; a and b from one
    product x @ [Wg | Wu] where pack_for_inference laid the two matrices side by side (one call instead of
    two: SmolLM2's 30 gate and up products of a decoded token 1-9% faster, 9.3 ms instead of 9.6-9.9 at
    1 thread)."""
    xp = gm.xp
    Wgu = side_by_side(Wg, Wu)
    if Wgu is None:
        a = gm.matmul(x, Wg)                                            # (B, T, F)
        b = gm.matmul(x, Wu)
    else:
        ab = gm.matmul(x, Wgu)                                          # (B, T, 2F): a | b, views
        a, b = ab[..., :Wg.shape[1]], ab[..., Wg.shape[1]:]
    e = xp.negative(a)
    xp.exp(e, out=e)
    e += 1.0                                                         # 1 + exp(-a)
    a /= e                                                           # silu(a) = a * sigmoid(a)
    a *= b
    return gm.matmul(a, Wd)                                             # (B, T, C)


def block_forward_cached(gm, x, params, i, cfg, cos, sin, p_drop=0.0, seed=0, kv=None, pos=0, recompute=False,
                         lora=None):
    """gm.block_forward(x, params, i, cfg, cos, sin, kv=kv, pos=pos) for inference: (out, None)."""
    if x.shape[1] == 1:
        return block_forward_decode(gm, x, params, i, cfg, cos, sin, kv, pos), None
    p = f"blocks.{i}."
    h = gm.norm_forward(x, params, p + "norm1", cfg)[0]
    x1 = x + attention_forward_cached(gm, h, params[p + "attn.qkv"], params[p + "attn.proj"], cos, sin,
                                      cfg.n_head, kv, pos)
    h = gm.norm_forward(x1, params, p + "norm2", cfg)[0]
    x1 += swiglu_forward_cached(gm, h, params[p + "ffn.w_gate"], params[p + "ffn.w_up"], params[p + "ffn.w_down"])
    return x1, None


# Decoding, one new position a call (T = 1): block_forward_cached above, identical except that it runs on
# (B, C) rows in fewer array calls. A decoded token's arrays are small (a (1, 576) row a layer for
# SmolLM2), so its time outside the matrix-vector products goes to the number of calls (2-4 us each), not
# to their work: the general form's calls were ~5 ms of a ~30 ms token. Here one row sees every key (no
# mask, no query blocks, no key tiles: the softmax in one pass); v stays a view of the qkv row; the
# grouped query heads meet their key/value head by a reshape, (B, nkv, g, hs); RoPE is one small product
# by the position's rotation matrix (rope_rotation), q's with the 1/sqrt(hs) of the scores in it (two
# calls instead of seven); and a single row's RMSNorm takes its statistic as one dot product and Python
# floats (norm_row).
def block_forward_decode(gm, x, params, i, cfg, cos, sin, kv, pos):
    """block_forward_cached's output for x (B, 1, C) at position pos: (B, 1, C)."""
    xp = gm.xp
    B, _, C = x.shape
    nh, hs = cfg.n_head, cfg.head_size
    K, V = kv                                                        # (B, nkv, length, hs) each
    nkv = K.shape[1]
    p = f"blocks.{i}."
    x = x.reshape(B, C)
    h = norm_row(gm, x, params, p + "norm1", cfg)
    heads = (h @ params[p + "attn.qkv"]).reshape(B, nh + 2 * nkv, hs)   # q, k, v heads side by side
    R, R_q = rope_rotation(gm, cos, sin)                             # (hs, hs): u @ R = rope_forward(u)
    K[:, :, pos], V[:, :, pos] = heads[:, nh:nh + nkv] @ R, heads[:, nh + nkv:]   # the new key (rotated), value
    q = (heads[:, :nh] @ R_q).reshape(B, nkv, nh // nkv, hs)         # rotated and scaled, (B, nkv, g, hs)
    s = gm.upcast(q @ K[:, :, :pos + 1].transpose(0, 1, 3, 2))       # (B, nkv, g, Tk)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)                                                 # e, unnormalized
    y = (s @ gm.upcast(V[:, :, :pos + 1])) / s.sum(axis=-1, keepdims=True)   # (B, nkv, g, hs)
    x1 = x + y.astype(x.dtype, copy=False).reshape(B, C) @ params[p + "attn.proj"]
    h = norm_row(gm, x1, params, p + "norm2", cfg)
    x1 += swiglu_forward_cached(gm, h, params[p + "ffn.w_gate"], params[p + "ffn.w_up"], params[p + "ffn.w_down"])
    return x1.reshape(B, 1, C)


def rope_rotation(gm, cos, sin):
    """(R, R / sqrt(hs)) for the tables cos, sin (1, hs) of one position: u @ R equals
    gm.rope_forward(u, cos, sin), which is linear in u: u * cos + rotate_half(u) * sin, rotate_half(u) =
    (-u2, u1) for the halves u1, u2, so R = diag(cos) with -sin[j] at (j + hs/2, j) and sin[j + hs/2] at
    (j, j + hs/2), j < hs/2 (each output a sum of two products, as rope_forward's). Made once per decoded
    token: forward_cached hands the same cos to every block, and the last pair made is kept for it."""
    entry = _ROTATION.get("last")
    if entry is not None and entry[0] is cos and entry[1] is sin:
        return entry[2]
    xp = gm.xp
    hs = cos.shape[-1]
    j = xp.arange(hs // 2)
    R = xp.diag(cos[0])                                              # (hs, hs)
    R[j + hs // 2, j] = -sin[0, :hs // 2]
    R[j, j + hs // 2] = sin[0, hs // 2:]
    pair = R, R * R.dtype.type(1.0 / math.sqrt(hs))
    _ROTATION["last"] = (cos, sin, pair)                             # holds cos and sin: `is` stays sound
    return pair


_ROTATION = {}


def norm_row(gm, x, params, prefix, cfg):
    """gm.norm_forward(x, params, prefix, cfg)'s output for x (B, C). For one row (B = 1) of RMSNorm,
    x * (1 / sqrt(mean(x^2) + eps)) * w with mean(x^2) one dot product (float32 or wider, as
    rmsnorm_forward's) and the rest in Python floats: three array calls instead of nine (NumPy)."""
    if x.shape[0] != 1 or cfg.norm != "rmsnorm" or gm.xp is not np:    # (CuPy: float() would wait for the GPU)
        return gm.norm_forward(x, params, prefix, cfg)[0]
    xs = gm.upcast(x[0])
    rstd = 1.0 / math.sqrt(float(xs @ xs) / x.shape[1] + cfg.norm_eps)
    return x * rstd * params[prefix + ".weight"]


def uses_cached_block(x, params, i, cfg, cos, sin, p_drop=0.0, seed=0, kv=None, pos=0, recompute=False, lora=None):
    """Does this block_forward call take block_forward_cached? With a KV cache, no dropout, no LoRA."""
    return kv is not None and lora is None and not p_drop and not recompute


# The weights laid out for inference (pack_for_inference; NumPy). Decoding a token multiplies one vector
# by every weight matrix, reading all of them (538 MB for SmolLM2): its speed is the memory bandwidth those
# matrix-vector products reach, and three things about the arrays' memory raise it:
# - 2 MiB pages: the weights in one buffer which Linux backs with transparent huge pages
#   (madvise(MADV_HUGEPAGE); NumPy asks for them only for arrays of 4 MiB and more, and a block's matrices
#   are 1.3 to 3.5 MiB): one TLB entry per 2 MiB instead of per 4 KiB of weights streamed.
# - rows of the right length: OpenBLAS streams y = x @ W fastest when W's rows in memory are long, and
#   a (576, 1536) matrix whose 576-long rows are its inputs (ffn.w_down, (F, C), and the tied head
#   tok_emb.T, (C, V), which is tok_emb (V, C) read sideways) streams slower than the same numbers stored
#   the other way. So those two are stored transposed: the arrays keep their shapes and values, and are
#   Fortran-ordered views (W.T of a C-ordered (C, F) buffer), which matmul passes to the BLAS as they are.
# - the gate and up matrices side by side: one (C, 2F) buffer whose rows are a row of ffn.w_gate then the
#   same row of ffn.w_up; the two arrays are its left and right halves (views with rows 2F apart), and
#   swiglu_forward_cached multiplies by the whole (side_by_side) in one product with rows twice as long.
def pack_for_inference(gm, params, cfg):
    """Move every array of params into one buffer of huge pages, ffn.w_down and a tied tok_emb stored
    transposed, each block's ffn.w_gate and ffn.w_up side by side (see above). In place: the dict keeps its
    keys and order, each value becomes a view with the same shape and values, and each old array is freed
    as its copy is made (if nothing else holds it), so the peak stays near the model's size. For
    generation and scoring, not training (a view cannot be written back to a checkpoint as it is). NumPy
    only: on CuPy (gm = gpt_cupy) it does nothing. Returns params."""
    if gm.xp is not np:
        return params
    size = lambda p: -(-p.nbytes // 64) * 64                         # noqa: E731  whole cache lines
    buf = huge_page_buffer(sum(size(p) for p in params.values()))
    up_of = {k: k[:-len("gate")] + "up" for k in params if k.endswith("ffn.w_gate")}
    up_of = {g: u for g, u in up_of.items()
             if u in params and params[u].shape == params[g].shape and params[u].dtype == params[g].dtype}
    start = 0
    for k in list(params):
        if k in up_of.values():
            continue                                                 # moved with its gate matrix
        p = params[k]
        if k in up_of:                                               # [w_gate | w_up], (C, 2F)
            up, (n, F) = up_of[k], p.shape
            both = buf[start:start + 2 * size(p)].view(p.dtype)[:2 * p.size].reshape(n, 2 * F)
            both[:, :F], both[:, F:] = p, params[up]
            params[k], params[up] = both[:, :F], both[:, F:]
            _record_side_by_side(params[k], params[up], both)
            start += 2 * size(p)
        else:
            flip = k.endswith("ffn.w_down") or (k == "tok_emb" and cfg.tie_embeddings)
            a = buf[start:start + p.nbytes].view(p.dtype).reshape(p.shape[::-1] if flip else p.shape)
            a[...] = p.T if flip else p
            params[k] = a.T if flip else a
            start += size(p)
        del p                                                        # the old array goes (if nothing else holds it)
        return_freed_memory()
    return params


def side_by_side(a, b):
    """[a | b], (n, p + q), where pack_for_inference made a (n, p) and b (n, q) the left and right halves of
    one buffer (a block's gate and up matrices), else None. A lookup (two weak references compared), not
    a test of addresses, as it runs for every block of every decoded token."""
    entry = _SIDE_BY_SIDE.get(id(a))
    return entry[2] if entry is not None and entry[0]() is a and entry[1]() is b else None


_SIDE_BY_SIDE = {}          # id(a) -> (weakref to a, weakref to b, [a | b]), while a lives


def _record_side_by_side(a, b, both):
    key = id(a)
    _SIDE_BY_SIDE[key] = (weakref.ref(a, lambda _: _SIDE_BY_SIDE.pop(key, None)), weakref.ref(b), both)


def return_freed_memory():
    """Hand the memory that glibc's malloc holds freed back to the OS (malloc_trim; elsewhere nothing).
    pack_for_inference calls it after each array it moves: a CPU program keeps freed memory for reuse
    (lib/backend.keep_freed_memory), which would otherwise keep the old copy of the weights resident."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def huge_page_buffer(nbytes):
    """A zeroed uint8 NumPy array of nbytes that starts on a 2 MiB boundary, in memory Linux may back with
    2 MiB pages (transparent huge pages in `madvise` or `always` mode; elsewhere ordinary memory)."""
    import mmap
    align = 2 << 20
    # private: Python's anonymous mmap is shared by default, and shared memory gets huge pages only where
    # the kernel's shmem_enabled allows them (often "never"), whatever the advice
    mm = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE)       # anonymous, zeroed, page-aligned
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):                                # not Linux, or a kernel without them
        pass
    a = np.frombuffer(mm, np.uint8)
    first = -a.ctypes.data % align
    return a[first:first + nbytes]
