"""
eval.py's scoring on long windows (lib/scoring.py): text windows go through the inference forward in pieces
of positions on top of their KV cache, so a window of the model's whole context (8192 positions over
49152 ids: 1.6 GB of logits) never holds all its logits at once, and a piece with nothing to score
computes the LM head for one position. Equal results are checked here against a plain forward; the
speed against lm-evaluation-harness's procedure is bench/evaluation.py's (never timed in a test).
"""
import tracemalloc

import numpy as np

import gpt_numpy as gn
from conftest import rel_err, small_cfg
from lib import scoring


def window_loglikelihood(params, cfg, ids, start, end, first):
    """A window's summed log-probabilities from one plain forward of all its positions (float64)."""
    logits = gn.forward(params, np.asarray([ids[start:end]]), cfg)[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return sum(logp[t - 1 - start, ids[t]] for t in range(first, end + 1))


def test_long_windows_are_scored_in_pieces_without_all_their_logits():
    # one window of 96 positions over 3000 ids: its logits would be 1.15 MB in float32; scored with pieces of
    # 8 positions (batch_bytes), the peak stays under half of that, and the sums equal a plain forward's
    cfg = small_cfg(vocab_size=3000, max_seq_len=96, n_kv_head=2)
    params = {k: v * 6 if v.ndim == 2 else v for k, v in gn.init_params(cfg, seed=2).items()}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 200)
    windows = [(0, 0, 96, 1), (0, 96, 192, 150), (0, 104, 199, 199)]   # a whole one, a strided one, a last one
    full = 96 * cfg.vocab_size * 4
    tracemalloc.start()
    try:
        sums = scoring.score_windows(gn, params, cfg, [ids], windows, batch_bytes=8 * cfg.vocab_size * 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < full / 2, (peak, full)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    want = [window_loglikelihood(p64, cfg, ids, *w[1:]) for w in windows]
    assert rel_err(sums, want) < 1e-5


def test_pieces_without_targets_ask_for_one_position(monkeypatch):
    # a strided window scores its last positions only: the pieces before them take forward_cached's last_only
    cfg = small_cfg(vocab_size=50, max_seq_len=40)
    params = gn.init_params(cfg, seed=1, dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 80)
    calls = []
    real = gn.forward_cached

    def spy(params, x, cfg, kv, pos, last_only=False, lora=None):
        calls.append((pos, x.shape[1], last_only))
        return real(params, x, cfg, kv, pos, last_only, lora)

    monkeypatch.setattr(gn, "forward_cached", spy)
    r = scoring.score_text(gn, params, cfg, ids, block_size=40, stride=10, batch_bytes=10 * cfg.vocab_size * 4,
                           batch_tokens=40)
    assert calls[:4] == [(0, 10, False), (10, 10, False), (20, 10, False), (30, 10, False)]   # the first window: all scored
    assert calls[4:8] == [(0, 10, True), (10, 10, True), (20, 10, True), (30, 10, False)]     # a later one: its last 10
    monkeypatch.setattr(gn, "forward_cached", real)
    assert rel_err(r["loss"], scoring.score_text(gn, params, cfg, ids, block_size=40, stride=10)["loss"]) < 1e-12
