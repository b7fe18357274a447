"""Tests for train.py --threads N (lib/parallel.py): a step with N threads is, bit for bit, the step of
--batch-size B/N --grad-accum G*N on one thread (dropout on, clipping biting, with mixed precision and LoRA
too); a killed --threads run resumes bit-exactly, and one resumed with another thread count draws the same
batches; bad settings are refused in one line. Then the pool itself: items in order, the first error raised
once all are done, the BLAS thread count restored, and the row-split element-wise work (gradient sums,
scaling, AdamW) identical to one thread's. Runs use one BLAS thread (so they are bit-comparable)."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import gpt_numpy as gm
import train
from conftest import ROOT, main_error, make_text, run_quiet, tiny_cfg
from lib import parallel
from lib.checkpoint import load_checkpoint
from lib.train_config import TrainConfig, check_config
from errors import UserError


def args(d, out, *extra):
    """A tiny run with dropout and clipping that bites; no evaluations or samples between (speed)."""
    return [str(a) for a in ["--preset", "tiny", "--data", d / "text.txt", "--data-dir", d / "data", "--out-dir", d / out,
                             "--max-iters", 16, "--lr-decay-iters", 16, "--ckpt-interval", 8, "--eval-interval", 100,
                             "--sample-tokens", 0, "--dropout", 0.1, "--grad-clip", 0.5, *extra]]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("threads")
    make_text(d / "text.txt")
    return d


def ensure(d, out, *extra):
    """The run args(d, out, *extra), made once per module (tests share a few)."""
    if not (d / out / "ckpt.safetensors").exists():
        run_quiet(args(d, out, *extra))
    return d / out


def assert_same_state(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    assert a.step == b.step
    for group in ("params", "adam_m", "adam_v"):
        for k in a.params:
            assert np.array_equal(getattr(a, group)[k], getattr(b, group)[k]), (group, k)
    assert a.meta["rng"] == b.meta["rng"]                               # the sampler too


# ----------------------------------------------------------------------------------------------------
# what a step with N threads computes


@pytest.mark.parametrize("threads, accum", [(2, 1), (2, 2), (4, 1)])
def test_threads_equal_smaller_micro_batches_accumulated_bit_for_bit(d, threads, accum):
    """--batch-size 4 --grad-accum G --threads N is --batch-size 4/N --grad-accum G*N on one thread: the
    same rows (the sampler draws whole micro-batches, which split into the smaller ones), the same dropout
    masks (shard j of micro-batch m keyed as micro-batch m*N + j) and the same order of the sums."""
    ensure(d, f"thr{threads}-acc{accum}", "--threads", threads, "--grad-accum", accum)
    ensure(d, f"ref{threads}-acc{accum}", "--batch-size", 4 // threads, "--grad-accum", threads * accum)
    assert_same_state(d / f"thr{threads}-acc{accum}", d / f"ref{threads}-acc{accum}")
    assert load_checkpoint(d / f"thr{threads}-acc{accum}").meta["train_config"]["threads"] == threads


def test_threads_is_not_the_whole_batch_on_one_thread(d):
    """The test above can fail: the whole batch of 4 on one thread (one micro-batch, its own dropout masks)
    ends elsewhere than 2 shards of 2."""
    a = load_checkpoint(ensure(d, "whole"))
    b = load_checkpoint(ensure(d, "thr2-acc1", "--threads", 2, "--grad-accum", 1))
    assert not all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert a.meta["rng"] == b.meta["rng"]                               # but the same batches were drawn


def test_mixed_precision_and_lora_with_threads(d):
    """The other paths of a micro-batch: float16 with loss scaling (an overflow in any shard skips the
    step), and LoRA's adapters; each equal to its accumulation run, bit for bit."""
    mixed = ["--mixed-precision", "--max-iters", 6]
    run_quiet(args(d, "mixed-thr", "--threads", 2, *mixed))
    run_quiet(args(d, "mixed-ref", "--batch-size", 2, "--grad-accum", 2, *mixed))
    assert_same_state(d / "mixed-thr", d / "mixed-ref")
    ensure(d, "whole")
    lora = ["--init-from", d / "whole", "--lora-rank", 2, "--lora-dropout", 0.1, "--max-iters", 6, "--lr", "3e-3"]
    run_quiet(args(d, "lora-thr", "--threads", 2, *lora))
    run_quiet(args(d, "lora-ref", "--batch-size", 2, "--grad-accum", 2, *lora))
    assert_same_state(d / "lora-thr", d / "lora-ref")


# ----------------------------------------------------------------------------------------------------
# resume


def run_cli(argv, fault=None):
    """train.py as a subprocess, one BLAS thread; with a fault, tests/train_runner.py injects it."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    program = [str(ROOT / "train.py")] if fault is None else [str(ROOT / "tests" / "train_runner.py"), fault]
    return subprocess.run([sys.executable, *program, *argv], env=env, capture_output=True, text=True, timeout=120)


def test_a_killed_threads_run_resumes_bit_exactly(d):
    """SIGKILL of a --threads 2 run at step 11: resumed (it keeps --threads 2 from its checkpoint), it ends
    with the weights, AdamW state and sampler of the run that was never killed."""
    ensure(d, "thr2-acc1", "--threads", 2, "--grad-accum", 1)
    first = run_cli(args(d, "killed", "--threads", 2), fault="step:11")
    assert first.returncode == -signal.SIGKILL
    assert load_checkpoint(d / "killed").step == 8
    resumed = run_cli(args(d, "killed", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_state(d / "thr2-acc1", d / "killed")


def test_resumed_with_another_thread_count_draws_the_same_batches(d):
    """A --threads 2 run resumed with --threads 1 (or the reverse) trains on the same sequences: the
    sampler's state after the last step is the uninterrupted run's; without dropout the weights then agree
    up to float rounding (2 shards' mean against one batch's)."""
    nodrop = ["--dropout", 0]
    run_quiet(args(d, "straight", "--threads", 2, *nodrop))
    run_quiet(args(d, "switched", "--threads", 2, *nodrop, "--max-iters", 8))
    res = run_quiet(args(d, "switched", "--threads", 1, *nodrop, "--resume"))
    assert res["step"] == 16
    a, b = load_checkpoint(d / "straight"), load_checkpoint(d / "switched")
    assert a.meta["rng"] == b.meta["rng"] and b.meta["train_config"]["threads"] == 1
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("zero", [0, 1])
def test_threads_under_mpiexec_equal_accumulation_on_every_rank(d, zero):
    """2 ranks x --threads 2 is 2 ranks x --batch-size 2 --grad-accum 2, bit for bit: each rank sums its
    shards in order, then the ranks average as they always do (dist.DataParallel)."""
    from test_dist import needs_mpi, run_mpi                         # noqa: F401 (the skip rule, the runner)
    if needs_mpi.args[0]:
        pytest.skip(needs_mpi.kwargs["reason"])
    for out, extra in ((f"mpi-thr-z{zero}", ["--threads", 2]), (f"mpi-ref-z{zero}", ["--batch-size", 2, "--grad-accum", 2])):
        p = run_mpi(2, args(d, out, "--zero", zero, "--max-iters", 8, *extra))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert_same_state(d / f"mpi-thr-z{zero}", d / f"mpi-ref-z{zero}")


# ----------------------------------------------------------------------------------------------------
# refused settings


@pytest.mark.parametrize("extra, message", [
    (["--threads", 0], "--threads must be at least 1, got 0"),
    (["--threads", 3], "--batch-size 4 does not divide into --threads 3 equal shards"),
    (["--threads", 2, "--backend", "cupy"], "--threads 2 is for --backend numpy"),
])
def test_bad_thread_settings_are_refused_in_one_line(d, capsys, extra, message):
    code, err = main_error(train.main, args(d, "refused", *extra), capsys)
    assert code == 2 and message in err, err
    assert not (d / "refused").exists()


def test_threads_default_to_one_and_show_in_help(capsys):
    assert TrainConfig().threads == 1
    check_config(TrainConfig(threads=4, batch_size=8))
    with pytest.raises(UserError, match="divide"):
        check_config(TrainConfig(threads=4, batch_size=6))
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "--threads N" in out and "--grad-accum G*N" in out


# ----------------------------------------------------------------------------------------------------
# the pool and the row-split work


def test_pool_runs_items_at_once_in_order_and_raises_the_first_error_after_all():
    pool = parallel.Pool(3)
    try:
        assert pool.map(lambda x: x * x, range(7)) == [0, 1, 4, 9, 16, 25, 36]
        # the items of a wave run at once: each waits for the others to arrive
        barrier = threading.Barrier(3, timeout=10)
        assert pool.map(lambda x: barrier.wait() is not None and x, [1, 2, 3]) == [1, 2, 3]
        done = []

        def f(x):
            if x in (2, 1):
                raise ValueError(f"item {x}")
            done.append(x)
            return x
        with pytest.raises(ValueError, match="item 1"):               # the first in items' order
            pool.map(f, [0, 1, 2])
        assert done == [0]                                            # and only once the wave was done
    finally:
        pool.close()


def test_pool_sets_one_blas_thread_inside_and_restores_it():
    if parallel.blas_threads() is None:
        pytest.skip("no OpenBLAS found in this process")
    get, _ = parallel.blas_threads()
    old = parallel.set_blas_threads(2)
    try:
        pool = parallel.Pool(2)
        assert pool.map(lambda _: get(), range(2)) == [1, 1]
        assert get() == 2
        pool.close()
        assert parallel.Pool(1).map(lambda _: get(), [0]) == [2]       # one thread: the BLAS keeps its own
    finally:
        parallel.set_blas_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_split_sums_and_adamw_equal_one_thread_bit_for_bit(threads):
    cfg = tiny_cfg(n_layer=2)
    params = gm.init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    g1, g2 = ({k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()} for _ in range(2))
    parts = parallel.row_parts([params], threads)                       # every row in exactly one part
    for k, p in params.items():
        rows = [part[0][k] for part in parts if k in part[0]]
        assert sum(len(r) for r in rows) == len(p) and all(r.base is p or r is p for r in rows)
    pool = parallel.Pool(threads)
    try:
        want = {k: (g1[k] + g2[k]) * np.float32(0.5) for k in g1}
        got = {k: v.copy() for k, v in g1.items()}
        parallel.add_into(pool, got, g2)
        parallel.scale(pool, got, 0.5)
        assert all(np.array_equal(got[k], want[k]) for k in want)
        p1, p2 = ({k: v.copy() for k, v in params.items()} for _ in range(2))
        s1, s2 = gm.adamw_init(p1), gm.adamw_init(p2)
        for step in range(3):
            g = g1 if step % 2 else g2
            gm.adamw_step(p1, g, s1, 1e-2, weight_decay=0.1)
            parallel.adamw_step(pool, gm, p2, g, s2, 1e-2, weight_decay=0.1)
        assert s1["t"] == s2["t"] == 3
        for d1, d2 in ((p1, p2), (s1["m"], s2["m"]), (s1["v"], s2["v"])):
            assert all(np.array_equal(d1[k], d2[k]) for k in d1)
        assert not np.array_equal(p1["blocks.0.attn.qkv"], params["blocks.0.attn.qkv"])   # it did update
    finally:
        pool.close()
