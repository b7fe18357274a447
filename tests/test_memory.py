"""Tests for lib/memory.py: its estimates against what the model really allocates. The kept activations
against the bytes of model_forward's cache (multi-head, grouped-query and blocked attention, dropout,
checkpointing, layernorm, float16), a whole training step against tracemalloc's peak, and generation's
KV cache and peak against generate_stream's own. Each configuration is small enough to take
milliseconds; the tolerances are tight enough that a rule of the model changing under the estimate
(another array kept, GQA or blocked attention counted as plain attention) breaks them, and the last
tests check that they do."""

import tracemalloc

import numpy as np
import pytest

import gpt_numpy as gn
from lib import generation, memory
from lib.mixed_precision import loss_and_grads_mixed

KEPT_TOL = 0.03             # activation_bytes within 3% of the bytes model_forward's cache holds
STEP_RANGE = (0.95, 1.3)    # training_bytes / tracemalloc's peak of a whole step (weights included)
GEN_RANGE = (0.85, 1.25)    # generation's KV cache + activations / tracemalloc's peak of generate_stream


def cfg_of(**kw):
    """4 heads of size 16, 2 layers: T = 512 fits, so blocked attention (T >= 2 * ATT_BLOCK) runs."""
    base = dict(vocab_size=65, n_layer=2, n_head=4, d_model=64, d_ff=172, max_seq_len=512)
    return gn.GPTConfig(**{**base, **kw})


def batch(cfg, B, T, seed=0):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T + 1))
    return ids[:, :-1], ids[:, 1:]


def measured_kept(cfg, B, T, half=False):
    """The bytes model_forward(..., train=True) keeps for the backward (float16 weights: half)."""
    params = gn.init_params(cfg)
    if half:                                        # as loss_and_grads_mixed runs the model
        params = {k: p.astype(np.float16) for k, p in params.items()}
    ids, _ = batch(cfg, B, T)
    _, cache = gn.model_forward(params, ids, cfg, train=True, seed=1)
    return memory.held_bytes(cache, params.values())


# name: (config, B, T, half precision)
KEPT_CASES = {
    "mha": (cfg_of(), 8, 64, False),
    "gqa 4:1": (cfg_of(n_kv_head=1), 8, 64, False),
    "gqa 4:2 blocked": (cfg_of(n_kv_head=2), 1, 512, False),
    "mha blocked": (cfg_of(), 2, 384, False),
    "dropout": (cfg_of(dropout=0.1), 4, 64, False),
    "dropout blocked": (cfg_of(dropout=0.1), 1, 256, False),
    "checkpoint": (cfg_of(checkpoint=True), 8, 64, False),
    "checkpoint blocked": (cfg_of(checkpoint=True, n_layer=4), 2, 256, False),
    "layernorm untied": (cfg_of(norm="layernorm", tie_embeddings=False), 8, 64, False),
    "float16": (cfg_of(), 8, 64, True),
    "float16 gqa blocked": (cfg_of(n_kv_head=2), 2, 256, True),
}


@pytest.mark.parametrize("name", list(KEPT_CASES))
def test_kept_activations_are_what_model_forward_keeps(name):
    cfg, B, T, half = KEPT_CASES[name]
    est = memory.activation_bytes(cfg, B, T, itemsize=2 if half else 4)
    got = measured_kept(cfg, B, T, half)
    assert abs(est / got - 1) < KEPT_TOL, (name, est, got)


def step_peak(cfg, B, T, mixed=False):
    """tracemalloc's peak over a whole training step (AdamW's state made, loss and gradients, clipping,
    the update), plus the weights, which exist before it starts."""
    params = gn.init_params(cfg)
    ids, targets = batch(cfg, B, T)
    tracemalloc.start()
    try:
        opt = gn.adamw_init(params)
        if mixed:
            _, grads = loss_and_grads_mixed(gn, params, ids, targets, cfg, 1024.0, seed=1)
        else:
            _, grads = gn.loss_and_grads(params, ids, targets, cfg, seed=1)
        gn.clip_grad_norm(grads, 1.0)
        gn.adamw_step(params, grads, opt, 1e-3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak + 4 * gn.num_params(params)


# name: (config, B, T, mixed precision)
STEP_CASES = {
    "mha": (cfg_of(), 8, 64, False),
    "gqa": (cfg_of(n_kv_head=1), 8, 64, False),
    "gqa blocked": (cfg_of(n_kv_head=2), 1, 512, False),
    "dropout blocked": (cfg_of(dropout=0.1), 1, 256, False),
    "checkpoint": (cfg_of(checkpoint=True, n_layer=4), 2, 256, False),
    "vocab-heavy, 1 layer": (cfg_of(vocab_size=16384, n_layer=1), 2, 128, False),
    "vocab-heavy untied": (cfg_of(vocab_size=4096, tie_embeddings=False), 4, 64, False),
    "mixed precision": (cfg_of(), 8, 64, True),
}


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_training_estimate_follows_the_measured_peak_of_a_step(name):
    cfg, B, T, mixed = STEP_CASES[name]
    est = sum(memory.training_bytes(cfg, B, T, mixed).values())
    peak = step_peak(cfg, B, T, mixed)
    lo, hi = STEP_RANGE
    assert lo < est / peak < hi, (name, est, peak, est / peak)


@pytest.mark.parametrize("prompt_len, new_tokens", [(10, 20), (3, 1), (50, 600), (600, 5), (512, 1)])
def test_kv_cache_is_what_generation_allocates(prompt_len, new_tokens):
    """generate_stream's cache (kept in a KVSession, to be looked at) has memory.kv_cache_positions
    positions and memory.kv_cache_bytes bytes: the prompt and the new tokens, not the whole context."""
    cfg = cfg_of(vocab_size=50, n_kv_head=2)
    params = gn.init_params(cfg)
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len))
    session = generation.KVSession()
    list(generation.generate_stream(gn, params, prompt, cfg, new_tokens, temperature=0, session=session))
    positions = memory.kv_cache_positions(cfg, prompt_len, new_tokens)
    assert session.kv[0][0].shape[2] == positions
    assert positions == min(cfg.max_seq_len, min(prompt_len, cfg.max_seq_len) + new_tokens - 1)
    assert memory.kv_cache_bytes(cfg, positions) == sum(K.nbytes + V.nbytes for K, V in session.kv)
    assert memory.kv_cache_positions(cfg, prompt_len, 0) == 0          # nothing generated, nothing allocated


def generation_peak(cfg, prompt_len, new_tokens):
    params = gn.init_params(cfg)
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len))
    tracemalloc.start()
    try:
        list(generation.generate_stream(gn, params, prompt, cfg, new_tokens, temperature=0))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# name: (config, prompt_len, new_tokens)
GEN_CASES = {
    "prefill 100": (cfg_of(vocab_size=300), 100, 5),
    "blocked prefill 400": (cfg_of(vocab_size=300), 400, 5),
    "gqa blocked prefill 512": (cfg_of(vocab_size=300, n_kv_head=1), 512, 3),
    "the cache fills: prefill again": (cfg_of(vocab_size=300, max_seq_len=300), 290, 20),
}


@pytest.mark.parametrize("name", list(GEN_CASES))
def test_generation_estimate_follows_the_measured_peak(name):
    cfg, prompt_len, new_tokens = GEN_CASES[name]
    need = memory.generation_bytes(cfg, prompt_len, new_tokens, memory.kv_cache_positions(cfg, prompt_len, new_tokens))
    est = need["KV cache"] + need["activations"]                        # the weights exist before
    peak = generation_peak(cfg, prompt_len, new_tokens)
    lo, hi = GEN_RANGE
    assert lo < est / peak < hi, (name, est, peak, est / peak)


# ----------------------------------------------------------------------------------------------------
# The tolerances above catch drift: estimates that miss one of the model's rules fall outside them.

def test_kept_tolerance_tells_gqa_and_blocked_attention_apart(monkeypatch):
    # counted as multi-head attention, the grouped-query config's estimate misses by more than KEPT_TOL
    cfg, B, T, _ = KEPT_CASES["gqa 4:1"]
    as_mha = memory.activation_bytes(gn.GPTConfig(**{**cfg.to_dict(), "n_kv_head": cfg.n_head}), B, T)
    assert abs(as_mha / measured_kept(cfg, B, T) - 1) > KEPT_TOL
    # counted with the full T x T scores, the blocked config's estimate misses by more than KEPT_TOL
    cfg, B, T, _ = KEPT_CASES["mha blocked"]
    got = measured_kept(cfg, B, T)
    monkeypatch.setattr(gn, "ATT_BLOCK", 10 ** 9)                       # memory.py sees no blocks
    assert abs(memory.activation_bytes(cfg, B, T) / got - 1) > KEPT_TOL


def test_step_range_catches_a_missing_part():
    # without the logits (the largest transient of a vocab-heavy step), the estimate falls below the range
    cfg, B, T, _ = STEP_CASES["vocab-heavy, 1 layer"]
    est = sum(memory.training_bytes(cfg, B, T).values()) - B * T * cfg.vocab_size * 4
    assert est / step_peak(cfg, B, T) < STEP_RANGE[0]
