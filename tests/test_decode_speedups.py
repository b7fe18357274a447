"""
The inference path's faster forms (lib/inference.py): block_forward_cached, which FAST_FORMS hands every
block_forward call with a KV cache (prefill by query blocks sized to their keys, decoding, no dropout, no
LoRA; every decoded position through block_forward_decode, its RoPE one product by rope_rotation's
matrix), against the textbook block_forward it replaces; and pack_for_inference, the weights in one buffer
of huge pages with ffn.w_down and a tied head stored transposed and each block's gate and up matrices side
by side, against the arrays it moves. The speed itself is shown by bench/generation.py and
bench/evaluation.py, never timed here.
"""
import weakref
from dataclasses import replace

import numpy as np
import pytest

import gpt_numpy as gn
from conftest import rel_err, small_cfg
from lib import generation, inference

TEXTBOOK_BLOCK = gn.REFERENCE_FORMS["block_forward"]


def scaled_params(cfg, seed=1, dtype=np.float64):
    """Weights 10x the init's scale, so the attention is far from uniform and a wrong mask or
    normalization shows."""
    params = gn.init_params(cfg, seed=seed, dtype=dtype)
    return {k: (v if "norm" in k else v * 10) for k, v in params.items()}


def cached_logits(params, cfg, ids, splits, B=1):
    """forward_cached over ids (B, T) in pieces: a prefill of splits[0] tokens, then the others, each one
    forward from where the cache is; the logits of every position, (B, T, V)."""
    kv = gn.kv_cache_init(cfg, next(iter(params.values())).dtype, batch=B, length=ids.shape[1])
    out, pos = [], 0
    for n in splits:
        out.append(gn.forward_cached(params, ids[:, pos:pos + n], cfg, kv, pos))
        pos += n
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("n_kv, norm, B", [(2, "rmsnorm", 1), (4, "rmsnorm", 2), (1, "layernorm", 1)])
def test_cached_block_equals_the_textbook_block(n_kv, norm, B, monkeypatch):
    # a prefill in several query blocks of 16 rows, each block's keys in tiles of 16 (the scores budget is
    # tiny: the online softmax runs over several tiles), more positions after it, then single-token decoding
    # (more than 16 keys: tiles of one row too): the logits of the textbook forms within float64 rounding
    cfg = small_cfg(n_kv_head=n_kv, norm=norm, max_seq_len=60)
    params = scaled_params(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (B, 60))
    monkeypatch.setattr(inference, "CACHED_ROWS", 16)
    monkeypatch.setattr(inference, "CACHED_SCORES_BYTES", 1)
    assert inference.cached_attention_blocks(B, 40, 0, cfg.n_head) == [
        (0, 16, [(0, 16)]), (16, 32, [(0, 16), (16, 32)]), (32, 40, [(0, 16), (16, 32), (32, 40)])]
    assert inference.cached_attention_blocks(B, 1, 40, cfg.n_head) == [(0, 1, [(j, j + 1) for j in range(41)])]
    splits = [40, 7] + [1] * 13
    fast = cached_logits(params, cfg, ids, splits, B)
    monkeypatch.setattr(gn, "block_forward", TEXTBOOK_BLOCK)
    textbook = cached_logits(params, cfg, ids, splits, B)
    assert np.abs(textbook).max() > 1.0                                  # far from uniform
    np.testing.assert_allclose(fast, textbook, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(fast, gn.forward(params, ids, cfg), rtol=1e-11, atol=1e-11)


def test_cached_block_in_float32_and_float16():
    # float32: within rounding of the textbook block; float16 (probabilities in float32, as the textbook
    # form): close to float32, no overflow
    cfg = small_cfg(n_kv_head=2)
    p64 = scaled_params(cfg, dtype=np.float64)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 16))
    want = gn.forward(p64, ids, cfg)
    for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-2)):
        got = cached_logits({k: v.astype(dtype) for k, v in p64.items()}, cfg, ids, [10] + [1] * 6)
        assert got.dtype == dtype and np.isfinite(got).all()
        assert rel_err(got, want) < tol, dtype


def test_fast_forms_route_only_inference_with_a_cache_to_the_cached_block(monkeypatch):
    cfg = small_cfg()
    params = gn.init_params(cfg, dtype=np.float64)
    seen = []
    monkeypatch.setattr(inference, "block_forward_cached", lambda gm, *a, **k: seen.append("cached") or TEXTBOOK_BLOCK(*a, **k))
    gn.use_forms({"block_forward": (lambda *a, **k: inference.block_forward_cached(gn, *a, **k), inference.uses_cached_block)})
    try:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 5))
        gn.forward_cached(params, ids, cfg, gn.kv_cache_init(cfg, np.float64), 0)
        assert seen == ["cached"] * cfg.n_layer
        seen.clear()
        gn.loss_and_grads(params, ids, ids, replace(cfg, dropout=0.1))          # training: the textbook block
        gn.forward(params, ids, cfg)                                              # no cache: the textbook block
        assert seen == []
    finally:
        gn.use_forms({"block_forward": (gn.FAST_FORMS["block_forward"][0], inference.uses_cached_block)})
    assert inference.uses_cached_block(None, params, 0, cfg, None, None, kv=([], []))
    assert not inference.uses_cached_block(None, params, 0, cfg, None, None, kv=([], []), lora=object())
    assert not inference.uses_cached_block(None, params, 0, cfg, None, None, p_drop=0.1, kv=([], []))
    assert not inference.uses_cached_block(None, params, 0, cfg, None, None)


def test_cached_attention_blocks_follow_the_scores_budget():
    # query blocks of CACHED_ROWS rows; key tiles as long as keep B * n_head * rows * keys float32 scores near
    # the budget, together covering each block's keys once, the last tile holding the block's diagonal square
    for B, nh, T, pos in ((1, 9, 512, 0), (1, 9, 8192, 0), (2, 9, 300, 5000), (1, 9, 1, 0), (1, 9, 1, 8000),
                          (1, 4, 20, 0), (3, 12, 130, 7)):
        blocks = inference.cached_attention_blocks(B, T, pos, nh)
        rows = min(T, inference.CACHED_ROWS)
        keys = max(rows, inference.CACHED_SCORES_BYTES // (4 * B * nh * rows))
        assert [b[:2] for b in blocks] == [(i0, min(T, i0 + rows)) for i0 in range(0, T, rows)]
        for i0, i1, tiles in blocks:
            n = pos + i1
            assert tiles[0][0] == 0 and tiles[-1][1] == n and all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
            assert all(j1 - j0 == keys for j0, j1 in tiles[:-1]) and tiles[-1][0] <= n - (i1 - i0)
            assert tiles[-1][1] - tiles[-1][0] < keys + (i1 - i0)
    assert inference.cached_attention_blocks(1, 1, 8000, 9) == [(0, 1, [(0, 8001)])]         # decoding: one tile
    assert [len(t) for _, _, t in inference.cached_attention_blocks(1, 512, 0, 9)] == [1] * 8
    assert inference.cached_attention_blocks(1, 8192, 0, 9)[-1][2][:2] == [(0, 1820), (1820, 3640)]


# ----------------------------------------------------------------------------------------------------
# pack_for_inference

@pytest.mark.parametrize("tie", [True, False])
def test_pack_for_inference_keeps_every_value_and_shape(tie):
    cfg = small_cfg(n_kv_head=2, tie_embeddings=tie)
    params = gn.init_params(cfg, seed=2)
    before = {k: v.copy() for k, v in params.items()}
    refs = [weakref.ref(v) for v in params.values()]
    out = inference.pack_for_inference(gn, params, cfg)
    assert out is params and list(params) == list(before)
    assert all(r() is None for r in refs)                               # each old array freed: no second copy
    base = params["tok_emb"].base
    while getattr(base, "base", None) is not None:
        base = base.base
    for k, v in params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
        assert v.dtype == before[k].dtype and v.shape == before[k].shape
        assert np.shares_memory(v, params["norm_f.weight"]) or k.endswith("ffn.w_up") or v.ctypes.data % 64 == 0, k
        flipped = k.endswith("ffn.w_down") or (k == "tok_emb" and tie)
        if k.endswith(("ffn.w_gate", "ffn.w_up")):                      # the two halves of one (C, 2F) buffer
            assert v.strides == (2 * v.shape[1] * v.itemsize, v.itemsize), k
            continue
        assert (v.flags.f_contiguous and not v.flags.c_contiguous) if flipped else v.flags.c_contiguous, k
    for i in range(cfg.n_layer):
        g, u = params[f"blocks.{i}.ffn.w_gate"], params[f"blocks.{i}.ffn.w_up"]
        np.testing.assert_array_equal(inference.side_by_side(g, u), np.concatenate([before[f"blocks.{i}.ffn.w_gate"],
                                                                                   before[f"blocks.{i}.ffn.w_up"]], axis=1))
    starts = sorted(v.ctypes.data for v in params.values())
    assert starts[0] % (2 << 20) == 0                                   # the buffer starts on a 2 MiB page
    assert gn.lm_head(params, cfg).flags.c_contiguous                   # the head: (C, V), rows of V numbers


def test_pack_for_inference_frees_each_array_as_it_goes(monkeypatch):
    # the old arrays go one by one, each before the next is copied, and the freed memory is handed back to
    # the OS each time (a CPU program's malloc keeps it otherwise: lib/backend.keep_freed_memory), so the
    # peak stays near one copy of the weights (sample.py: 803 MB for SmolLM2's 538 MB, not 1.22 GB)
    cfg = small_cfg(n_kv_head=2)
    params = gn.init_params(cfg, seed=2)
    refs = [weakref.ref(v) for v in params.values()]
    seen = []
    monkeypatch.setattr(inference, "return_freed_memory", lambda: seen.append(sum(r() is None for r in refs)))
    inference.pack_for_inference(gn, params, cfg)
    pairs = cfg.n_layer                                                 # a block's gate and up matrices go together
    assert len(seen) == len(refs) - pairs and seen[-1] == len(refs)
    assert all(0 < b - a <= 2 for a, b in zip([0] + seen, seen))


def test_pack_for_inference_asks_for_huge_pages():
    # the buffer's mapping carries the kernel's huge-page advice ("hg" in /proc/self/smaps' VmFlags) and is
    # private ("rw-p"): an anonymous mapping shared with nobody is still shmem to the kernel where it is
    # mapped shared (Python's default), and shmem gets huge pages only where shmem_enabled allows them,
    # which is often never, whatever the advice (the buffer had none that way: AnonHugePages 0)
    import os
    if not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        pytest.skip("no transparent huge pages here")
    buf = inference.huge_page_buffer(3 << 20)
    assert buf.ctypes.data % (2 << 20) == 0 and buf.size == 3 << 20 and not buf.any()
    addr, perms, flags = buf.ctypes.data, None, None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
                perms = line.split()[1] if inside else perms
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
                break
    assert flags is not None and "hg" in flags
    assert perms == "rw-p"


def test_packed_weights_generate_the_same_tokens():
    cfg = small_cfg(n_kv_head=2, max_seq_len=40)
    params = {k: v * 4 if "norm" not in k else v for k, v in gn.init_params(cfg, seed=5).items()}
    prompt = list(np.random.default_rng(1).integers(0, cfg.vocab_size, 12))
    want = generation.generate(gn, params, prompt, cfg, 20, temperature=0)
    ids = np.asarray([want])
    logits = gn.forward(params, ids, cfg)
    inference.pack_for_inference(gn, params, cfg)
    assert generation.generate(gn, params, prompt, cfg, 20, temperature=0) == want
    assert rel_err(gn.forward(params, ids, cfg), logits) < 1e-5


def test_packed_gate_and_up_are_one_product_with_the_textbook_values():
    # after packing, each block's gate and up matrices are the halves of one buffer, multiplied in one
    # product (side_by_side); prefill and decoding on the packed weights give the textbook block's logits
    cfg = small_cfg(n_kv_head=2, max_seq_len=40)
    params = scaled_params(cfg, dtype=np.float32)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 30))
    want = cached_logits(params, cfg, ids, [20] + [1] * 10)
    g, u = params["blocks.0.ffn.w_gate"], params["blocks.0.ffn.w_up"]
    assert inference.side_by_side(g, u) is None                         # two arrays of their own
    inference.pack_for_inference(gn, params, cfg)
    for i in range(cfg.n_layer):
        g, u = params[f"blocks.{i}.ffn.w_gate"], params[f"blocks.{i}.ffn.w_up"]
        both = inference.side_by_side(g, u)
        assert both.shape == (g.shape[0], 2 * g.shape[1]) and np.shares_memory(both, g) and np.shares_memory(both, u)
        assert inference.side_by_side(u, g) is None and inference.side_by_side(g[:, 1:], u) is None
    assert rel_err(cached_logits(params, cfg, ids, [20] + [1] * 10), want) < 1e-5
    assert rel_err(cached_logits(params, cfg, ids, [30]), gn.forward(params, ids, cfg)) < 1e-5
    keys = {id(params[f"blocks.{i}.ffn.w_gate"]) for i in range(cfg.n_layer)}
    assert keys <= set(inference._SIDE_BY_SIDE)
    params.clear()                                                      # the record goes with the weights
    del g, u, both
    assert not keys & set(inference._SIDE_BY_SIDE)


def test_every_single_position_takes_the_decoding_form_with_the_textbook_values(monkeypatch):
    # block_forward_decode: every T = 1 call of block_forward_cached, none of a prefill; grouped heads
    # (nkv < nh), batch 2, a cache with earlier positions: the textbook block's logits within float64 rounding
    cfg = small_cfg(n_kv_head=2, max_seq_len=24)
    params = scaled_params(cfg)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 24))
    seen = []
    decode = inference.block_forward_decode
    monkeypatch.setattr(inference, "block_forward_decode", lambda gm, x, *a: seen.append(x.shape[1]) or decode(gm, x, *a))
    fast = cached_logits(params, cfg, ids, [8, 3] + [1] * 13, B=2)
    assert seen == [1] * (13 * cfg.n_layer)
    monkeypatch.setattr(gn, "block_forward", TEXTBOOK_BLOCK)
    np.testing.assert_allclose(fast, cached_logits(params, cfg, ids, [8, 3] + [1] * 13, B=2), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_rope_rotation_is_rope_as_one_product(dtype, tol):
    # block_forward_decode rotates q and k by u @ R: the textbook rope_forward's numbers, and R_q = R / sqrt(hs)
    hs = 16
    u = np.random.default_rng(3).standard_normal((2, 5, hs)).astype(dtype)
    for pos in (0, 1, 37, 4000):
        cos, sin = gn.rope_tables(np.arange(pos, pos + 1), hs, 10000.0, dtype)
        R, R_q = inference.rope_rotation(gn, cos, sin)
        assert R.shape == (hs, hs) and R.dtype == dtype and R_q.dtype == dtype
        want = gn.rope_forward(u, cos, sin)
        np.testing.assert_allclose(u @ R, want, rtol=tol, atol=tol)
        np.testing.assert_allclose(u @ R_q, want / np.sqrt(hs), rtol=tol, atol=tol)
        assert inference.rope_rotation(gn, cos, sin)[0] is R            # the 30 blocks of a token share one
        cos2, sin2 = gn.rope_tables(np.arange(pos, pos + 1), hs, 10000.0, dtype)
        assert inference.rope_rotation(gn, cos2, sin2)[0] is not R       # new tables (the next token): made anew
