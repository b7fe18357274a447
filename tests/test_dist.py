"""Tests for data-parallel training (dist.py and train.py under mpiexec). First what needs no MPI: the
backward pass with its hook equals gpt_numpy's bit for bit, the flat buffer's layout, the resume rules,
and that a run without mpiexec never imports MPI. Then the runs under `mpiexec -n 2` (and 3), one BLAS
thread per rank: the same weights and AdamW state as one process with gradient accumulation, with and
without --zero 1; resuming at another world size; a killed, hanging or interrupted rank. Those skip
cleanly where mpiexec or mpi4py is missing."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from lib import dist
import gpt_numpy
import train
from lib import runs
from lib.train_config import TrainConfig
from lib.checkpoint import load_checkpoint, read_meta
from conftest import ROOT, make_text, rel_err, tiny_cfg
from errors import UserError

# ----------------------------------------------------------------------------------------------------
# helpers

# the mpiexec of this Python's environment (the mpich wheel puts it beside python), else the one on PATH
MPIEXEC = next((str(p) for p in [os.path.join(os.path.dirname(sys.executable), "mpiexec")] if os.path.isfile(p)),
               shutil.which("mpiexec"))
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpiexec and mpi4py (pip install mpi4py mpich)")


def env1():
    """One BLAS thread per process (so runs are bit-comparable)."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def args(d, out, *extra):
    """A tiny run with dropout (keyed by the global micro-batch) and clipping that bites (the gradient
    norm is ~0.6-0.7 here), a checkpoint every 10 steps; no evaluations or samples between (speed)."""
    return ["--preset", "tiny", "--data", str(d / "text.txt"), "--data-dir", str(d / "data"), "--out-dir", str(d / out),
            "--max-iters", "30", "--lr-decay-iters", "30", "--ckpt-interval", "10", "--eval-interval", "100",
            "--sample-tokens", "0", "--dropout", "0.1", "--grad-clip", "0.5", *map(str, extra)]


def run1(argv):
    """train.py in one process (no mpiexec)."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], env=env1(), capture_output=True,
                          text=True, timeout=120)


def run_mpi(n, argv, rank_fault=None, timeout=120):
    """mpiexec -n n python train.py argv; rank_fault {rank: "KIND:K"} runs those ranks through
    tests/train_runner.py, which injects the fault at step K (MPMD segments of one rank each)."""
    if not rank_fault:
        cmd = [MPIEXEC, "-n", str(n), sys.executable, str(ROOT / "train.py"), *argv]
    else:
        cmd = [MPIEXEC]
        for r in range(n):
            program = [str(ROOT / "tests" / "train_runner.py"), rank_fault[r]] if r in rank_fault else [str(ROOT / "train.py")]
            cmd += [":"] if r else []
            cmd += ["-n", "1", sys.executable, *program, *argv]
    return subprocess.run(cmd, env=env1(), capture_output=True, text=True, timeout=timeout)


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def state_of(path):
    ck = load_checkpoint(path)
    return ck, {**{"p." + k: a for k, a in ck.params.items()}, **{"m." + k: a for k, a in ck.adam_m.items()},
                **{"v." + k: a for k, a in ck.adam_v.items()}}


def assert_same_state(a, b):
    """Weights and both AdamW moments equal, bit for bit; the step counters too."""
    (ca, ta), (cb, tb) = state_of(a), state_of(b)
    assert ca.meta["step"] == cb.meta["step"] and ca.meta["adam_t"] == cb.meta["adam_t"]
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if not np.array_equal(ta[k], tb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[0]}: rel err {rel_err(ta[diff[0]], tb[diff[0]]):.2e}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The corpus, its data cache, and the reference: one process, --grad-accum 2, 30 steps."""
    d = tmp_path_factory.mktemp("dist")
    make_text(d / "text.txt")
    ok(run1(args(d, "one-accum2", "--grad-accum", 2)))
    return d


# ----------------------------------------------------------------------------------------------------
# without MPI


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, norm="layernorm"), dict(checkpoint=True),
                                dict(dropout=0.2)], ids=["tied", "untied-layernorm", "checkpointed", "dropout"])
def test_hooked_backward_equals_gpt_numpy_and_reports_each_gradient_once(kw):
    cfg = tiny_cfg(n_layer=3, **kw)
    params = gpt_numpy.init_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (3, 7))
    tg = rng.integers(0, cfg.vocab_size, (3, 7))
    loss, grads = gpt_numpy.loss_and_grads(params, ids, tg, cfg, seed=5)
    calls = []

    def ready(g, names):
        for k in names:
            assert np.array_equal(g[k], grads[k]), k           # final when reported
        calls.append(list(names))

    loss2, grads2 = dist.loss_and_grads_hooked(gpt_numpy, params, ids, tg, cfg, 5, ready)
    assert loss2 == loss
    for k in params:
        assert np.array_equal(grads2[k], grads[k]), k
    # in the flat buffer's order: head, last block ... first block, embedding; every name once
    assert [sorted(c) for c in calls] == [sorted(u) for u in dist.backward_units(list(params))]
    assert sorted(k for c in calls for k in c) == sorted(params)


def test_layout_buckets_shards_and_padding():
    cfg = tiny_cfg(n_layer=3)
    shapes = gpt_numpy.param_shapes(cfg)
    n = sum(int(np.prod(s)) for s in shapes.values())
    lay = dist.Layout(shapes, 3, 0)                          # bucket_elems 0: one bucket per unit
    units = dist.backward_units(list(shapes))
    assert units[0] == ["norm_f.weight"] and units[1][0].startswith("blocks.2.") and units[-1] == ["tok_emb"]
    assert len(lay.buckets) == len(units) == 5 and lay.n == n
    assert lay.buckets[0][0] == 0 and lay.buckets[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(lay.buckets, lay.buckets[1:]))          # contiguous
    assert lay.padded % 3 == 0 and 0 <= lay.padded - n < 3 and lay.shard * 3 == lay.padded
    # the shards cover [0, padded) once
    assert sum(b - a for a, b in (lay.owned(r, 0, lay.padded) for r in range(3))) == lay.padded
    assert all(sum(lay.counts(lo, hi)) == hi - lo for lo, hi in lay.buckets)          # reduce-scatter counts
    assert dist.Layout(shapes, 3, 10 ** 9).buckets == [(0, n)]                         # one big bucket
    assert dist.backward_units(["tok_emb", "blocks.0.a", "blocks.1.a", "norm_f.weight"]) == \
        [["norm_f.weight"], ["blocks.1.a"], ["blocks.0.a"], ["tok_emb"]]


def test_resume_keeps_the_global_batch_at_any_world_size():
    cfg = TrainConfig(grad_accum=1)
    meta = {"train_config": {"grad_accum": 1}, "world_size": 2}
    runs.resume_world(cfg, set(), meta, 1)                  # 2 ranks x 1 -> 1 process x 2
    assert cfg.grad_accum == 2
    runs.resume_world(cfg, set(), {"train_config": {"grad_accum": 2}}, 2)     # an old single-process file
    assert cfg.grad_accum == 1
    cfg.grad_accum = 3
    with pytest.raises(UserError, match="global batch is 2 micro-batches"):
        runs.resume_world(cfg, {"grad_accum"}, meta, 1)
    with pytest.raises(UserError, match="cannot resume on 3 ranks"):
        runs.resume_world(cfg, set(), meta, 3)


def test_single_process_never_imports_mpi(tmp_path):
    make_text(tmp_path / "text.txt")
    code = ("import sys, train; train.run(%r, log=lambda *a: None); "
            "print(sorted(m for m in ('lib.dist', 'mpi4py') if m in sys.modules))"
            % args(tmp_path, "out", "--max-iters", 3))
    p = ok(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env1(), capture_output=True, text=True,
                          timeout=120))
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_bad_distributed_flags_are_refused(tmp_path, capsys):
    for flags, msg in ((["--zero", "2"], "invalid choice"), (["--bucket-mb", "-1"], "--bucket-mb"),
                       (["--dist-timeout", "0"], "--dist-timeout")):
        assert train.main(["--preset", "tiny", "--data", "x", *flags]) == 2
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# under mpiexec


@needs_mpi
@pytest.mark.parametrize("zero", [0, 1])
def test_two_ranks_equal_one_process_with_accumulation_bit_for_bit(ref, zero):
    """2 ranks x grad_accum 1 vs 1 process x grad_accum 2: the same sequences and dropout masks, and a sum
    of two terms is the same either way round (the halving is a power of two): weights and AdamW state
    bit-identical after 30 steps; one bucket per layer, so the overlap path sends several."""
    p = ok(run_mpi(2, args(ref, f"two-zero{zero}", "--zero", zero, "--bucket-mb", 0)))
    assert_same_state(ref / "one-accum2", ref / f"two-zero{zero}")
    assert read_meta(ref / f"two-zero{zero}" / "ckpt.safetensors")["world_size"] == 2
    # clipping bit (so the norm, summed from shards under ZeRO, had to be exact)
    log = [json.loads(line) for line in (ref / f"two-zero{zero}" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("grad_norm", 0) > 0.5 for r in log if r["event"] == "train")
    # rank 0 alone logs: each line once
    assert p.stdout.count("done: step 30") == 1 and p.stdout.count("step 30/30") == 1
    assert "data parallel: 2 ranks" in p.stdout and ("ZeRO-1" in p.stdout) == bool(zero)


@needs_mpi
@pytest.mark.parametrize("zero", [0, 1])
def test_lora_two_ranks_equal_one_process_bit_for_bit(ref, zero):
    """LoRA under mpiexec: only the adapters' gradients go through the buckets (and, with ZeRO, only their
    moments are sharded); the base stays frozen on every rank. 2 ranks equal 1 process with grad_accum 2."""
    lora = ["--init-from", ref / "one-accum2", "--lora-rank", 2, "--lora-dropout", 0.1, "--max-iters", 12,
            "--lr-decay-iters", 12, "--lr", "3e-3"]
    if not (ref / "lora-one").is_dir():
        ok(run1(args(ref, "lora-one", "--grad-accum", 2, *lora)))
    p = ok(run_mpi(2, args(ref, f"lora-two-zero{zero}", "--zero", zero, "--bucket-mb", 0, *lora)))
    assert_same_state(ref / "lora-one", ref / f"lora-two-zero{zero}")
    ck = load_checkpoint(ref / f"lora-two-zero{zero}")
    assert ck.meta["lora"]["config"]["rank"] == 2 and all(".lora_" in k for k in ck.params)   # adapters only
    assert "data parallel: 2 ranks" in p.stdout and "LoRA: rank 2" in p.stdout


@needs_mpi
def test_sft_with_lora_two_ranks_equal_one_process(tmp_path):
    """--sft under mpiexec: every rank draws every micro-batch of chat examples (the sampler stays in
    step) and trains on its own; 2 ranks equal 1 process with grad_accum 2, bit for bit."""
    from test_finetune import write_chats
    make_text(tmp_path / "text.txt")
    common = ["--data-dir", tmp_path / "data", "--sample-tokens", 0, "--eval-interval", 100, "--block-size", 48]
    ok(run1([*map(str, ["--preset", "tiny", "--data", tmp_path / "text.txt", "--tokenizer", "bpe", "--vocab-size",
                        300, "--max-iters", 20, "--out-dir", tmp_path / "base", *common])]))
    write_chats(tmp_path / "chats.jsonl")
    sft = ["--init-from", tmp_path / "base", "--sft", tmp_path / "chats.jsonl", "--lora-rank", 2, "--batch-size", 2,
           "--max-iters", 8, "--lr", "1e-2", *common]
    ok(run1([*map(str, sft), "--grad-accum", "2", "--out-dir", str(tmp_path / "one")]))
    p = ok(run_mpi(2, [*map(str, sft), "--zero", "1", "--out-dir", str(tmp_path / "two")]))
    assert_same_state(tmp_path / "one", tmp_path / "two")
    assert "data parallel: 2 ranks" in p.stdout


@needs_mpi
def test_mixed_precision_two_ranks_equal_one_process(ref):
    """--mixed-precision takes the other path of DataParallel: whole float16 backward passes, then the
    ranks agree that none overflowed before any gradient is sent. Still bit-identical to one process."""
    ok(run1(args(ref, "one-mixed", "--grad-accum", 2, "--mixed-precision", "--max-iters", 8)))
    ok(run_mpi(2, args(ref, "two-mixed", "--mixed-precision", "--max-iters", 8, "--bucket-mb", 0)))
    assert_same_state(ref / "one-mixed", ref / "two-mixed")


@needs_mpi
def test_three_ranks_match_accumulation_of_three_closely(ref):
    """3 ranks vs 1 process x grad_accum 3: within 1e-6 relative. Not bit for bit in general: a sum of three
    terms depends on its grouping, ((g0 + g1) + g2) in one process, whatever reduction tree MPI picks
    across three ranks (with --zero 1 the owner of each element sums what reduce-scatter brings)."""
    ok(run1(args(ref, "one-accum3", "--grad-accum", 3)))
    ok(run_mpi(3, args(ref, "three", "--zero", 1)))
    (_, a), (_, b) = state_of(ref / "one-accum3"), state_of(ref / "three")
    for k in a:
        if k.startswith("p."):
            assert rel_err(b[k], a[k]) < 1e-6, k


@needs_mpi
def test_resume_across_world_sizes_two_ranks_then_one_process(ref):
    out = ref / "resumed-2-1"
    ok(run_mpi(2, args(ref, out.name, "--max-iters", 15, "--zero", 1)))
    assert read_meta(out / "ckpt.safetensors")["step"] == 15
    p = ok(run1(args(ref, out.name, "--resume")))                # grad_accum becomes 2 by itself
    assert "grad_accum 2" in p.stdout
    assert_same_state(ref / "one-accum2", out)


@needs_mpi
@pytest.mark.parametrize("rank,hook,last", [(1, "step:12", 10), (0, "save:20", 10)],
                         ids=["rank1-mid-step", "rank0-inside-save"])
def test_a_killed_rank_ends_the_job_and_resume_is_bit_exact(ref, rank, hook, last):
    """SIGKILL of one rank: the job exits non-zero within 60 s (mpiexec takes the others down), the last
    checkpoint is intact (a rank killed inside the save leaves the old file), and --resume on 2 ranks ends
    bit-identical to the uninterrupted run."""
    out = ref / f"killed-{rank}"
    t0 = time.time()
    p = run_mpi(2, args(ref, out.name), rank_fault={rank: hook}, timeout=60)
    assert p.returncode != 0 and time.time() - t0 < 60
    assert load_checkpoint(out).meta["step"] == last           # verified by its sha256 as it loads
    ok(run_mpi(2, args(ref, out.name, "--resume")))
    assert_same_state(ref / "one-accum2", out)


@needs_mpi
def test_a_hanging_rank_is_detected_by_the_bounded_wait(ref):
    out = ref / "hung"
    t0 = time.time()
    p = run_mpi(2, args(ref, out.name, "--dist-timeout", 8), rank_fault={1: "hang:12"},
                timeout=60)
    assert p.returncode != 0 and time.time() - t0 < 60
    assert "error: rank 0: no word from the other ranks for 8 s" in p.stderr
    assert load_checkpoint(out).meta["step"] == 10


@needs_mpi
def test_ctrl_c_on_one_rank_stops_all_at_the_same_step(ref):
    """A SIGINT that reaches rank 1 alone: the ranks agree to stop after the same step and save; the run
    then resumes bit-exactly."""
    out = ref / "ctrl-c"
    p = run_mpi(2, args(ref, out.name), rank_fault={1: "sigint:13"})
    assert p.returncode == 130 and "interrupted at step 13" in p.stdout, p.stderr[-3000:]   # saved, not done
    assert "done:" not in p.stdout and p.stderr == ""
    assert read_meta(out / "ckpt.safetensors")["step"] == 13
    ok(run_mpi(2, args(ref, out.name, "--resume")))
    assert_same_state(ref / "one-accum2", out)


@needs_mpi
def test_an_error_ends_the_job_with_one_clear_line_not_a_hang(ref):
    # a checkpoint whose global batch (2 micro-batches) 3 ranks cannot share: every rank finds it, so the
    # job ends in order (dist.together), with rank 0's line alone: no MPI_Abort, whose launcher adds lines
    p = run_mpi(3, args(ref, "one-accum2", "--resume"), timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith("error: cannot resume on 3 ranks: the checkpoint's global batch is 2 micro-batches")
    assert len(p.stderr.splitlines()) == 1, p.stderr
    # the same for a failure found while preparing the data, on rank 0 first (dist.in_turn)
    p = run_mpi(2, args(ref, "empty") + ["--data", str(ref / "nothing.txt")], timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("error: --data") and len(p.stderr.splitlines()) == 1, p.stderr
    assert not (ref / "empty").exists()                 # nor an out dir that a failed start made


@needs_mpi
def test_a_usage_error_is_reported_once_and_a_bug_or_a_second_ctrl_c_ends_the_job(ref):
    """Every rank parses the same command line: rank 0 alone reports a usage error (exit 2). A bug on one
    rank (its traceback) or a second Ctrl-C ("interrupted", 130) ends the whole job through MPI_Abort."""
    p = run_mpi(2, ["--n-layer", "0"], timeout=60)
    assert p.returncode == 2 and p.stderr == "error: --n-layer must be at least 1, got 0\n", p.stderr
    t0 = time.time()
    p = run_mpi(2, args(ref, "bug"), rank_fault={1: "bug:3"}, timeout=60)
    assert p.returncode == 1 and "rank 1: Traceback" in p.stderr and "RuntimeError: injected bug" in p.stderr
    # (a second Ctrl-C aborts at once after its "interrupted", which MPI_Abort may cut off: the status only)
    p = run_mpi(2, args(ref, "quit"), rank_fault={1: "quit:3"}, timeout=60)
    assert p.returncode == 130 and time.time() - t0 < 60, p.stderr[-3000:]


@needs_mpi
def test_a_nan_on_one_rank_is_seen_by_every_rank():
    """Rank 1 alone gets a nan loss and gradient: after the reduction every rank has the nan loss and a nan
    gradient norm, so all of them stop (or skip the step) together; with and without ZeRO."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import numpy as np, gpt_numpy as gm\nfrom lib import dist\n"
            "c = dist.MPIComm()\n"
            "cfg = gm.GPTConfig(vocab_size=11, n_layer=2, n_head=2, d_model=8, d_ff=12, max_seq_len=7)\n"
            "for zero in (0, 1):\n"
            "    p = gm.init_params(cfg, 1); dp = dist.DataParallel(c, gm, p, zero=zero, bucket_mb=0)\n"
            "    p, o = dp.adopt(p, gm.adamw_init(p))\n"
            "    ids = np.random.default_rng(c.rank).integers(0, 11, (2, 8))\n"
            "    _, g = gm.loss_and_grads(p, ids[:, :-1], ids[:, 1:], cfg)\n"
            "    if c.rank == 1:\n"
            "        g['blocks.0.attn.qkv'][0, 0] = np.nan\n"
            "    dp.accumulate(g, first=True)\n"
            "    loss, _ = dp.finish(float('nan') if c.rank == 1 else 1.0, False)\n"
            "    dp.scale_grads(0.5)\n"
            "    seen = c.allgather_host(np.array([np.isnan(loss), np.isnan(dp.clip_grad_norm(1.0))]), 'test')\n"
            "    if c.rank == 0:\n"
            "        print(zero, seen.tolist())\n" % str(ROOT))
    p = ok(subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], env=env1(), capture_output=True, text=True,
                          timeout=60))
    assert p.stdout.split("\n")[:2] == ["0 [[True, True], [True, True]]", "1 [[True, True], [True, True]]"], p.stdout


@needs_mpi
def test_data_is_prepared_by_rank_0_first(tmp_path):
    """dist.in_turn: rank 0 runs alone; then the others (3 ranks on one machine: all in the last turn)."""
    code = ("import sys, time; sys.path.insert(0, %r); from lib import dist\n"
            "c = dist.MPIComm()\n"
            "def fn():\n"
            "    t0 = time.time(); time.sleep(0.3 if c.rank == 0 else 0.05)\n"
            "    open(%r + f'/{c.rank}', 'w').write(f'{t0} {time.time()}')\n"
            "    return c.rank\n"
            "assert dist.in_turn(c, fn) == c.rank\n" % (str(ROOT), str(tmp_path)))
    ok(subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-c", code], env=env1(), capture_output=True, text=True,
                      timeout=60))
    spans = {r: [float(x) for x in (tmp_path / str(r)).read_text().split()] for r in range(3)}
    assert all(spans[0][1] <= spans[r][0] for r in (1, 2))


# ----------------------------------------------------------------------------------------------------
# NCCL (--backend cupy under mpiexec): these need an NVIDIA GPU (two for the second) and skip without


def gpu_count():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() if cupy.cuda.is_available() else 0
    except Exception:
        return 0


NCCL_SCRIPT = """
import sys; sys.path.insert(0, %r)
import numpy as np
from lib import dist
comm = dist.start("cupy")                     # NCCLComm: picks this rank's GPU before CuPy works
import gpt_cupy as gm
cfg = gm.GPTConfig(vocab_size=11, n_layer=3, n_head=2, d_model=8, d_ff=12, max_seq_len=7, dropout=0.1)
W, r = comm.size, comm.rank
batches = [np.random.default_rng(s).integers(0, 11, (W, 3, 8)) for s in range(4)]
ref = gm.init_params(cfg, 1); o_ref = gm.adamw_init(ref)
for s, b in enumerate(batches):               # one process, accumulating the W micro-batches
    grads = None
    for j in range(W):
        _, g = gm.loss_and_grads(ref, b[j][:, :-1], b[j][:, 1:], cfg, seed=10 * s + j)
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
    for g in grads.values():
        g *= 1.0 / W
    gm.clip_grad_norm(grads, 0.05)
    gm.adamw_step(ref, grads, o_ref, 1e-2)
for zero in (0, 1):
    p = gm.init_params(cfg, 1); o = gm.adamw_init(p)
    dp = dist.DataParallel(comm, gm, p, zero=zero, bucket_mb=0)
    p, o = dp.adopt(p, o)
    for s, b in enumerate(batches):
        l = dp.loss_and_grads(p, b[r][:, :-1], b[r][:, 1:], cfg, 10 * s + r, first=True, last=True)
        dp.finish(l / W, False)
        dp.scale_grads(1.0 / W)
        dp.clip_grad_norm(0.05)
        dp.adamw_step(p, o, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    st = dp.gather_state(p, o)
    if r == 0:
        P, M, V = st
        same = all(np.array_equal(P[k], gm.to_host(ref[k])) and np.array_equal(M[k], gm.to_host(o_ref["m"][k]))
                   for k in P)
        print(f"zero {zero} same {same}")
"""


@needs_mpi
@pytest.mark.skipif(gpu_count() < 1, reason="NCCL: needs CuPy and an NVIDIA GPU")
@pytest.mark.parametrize("ranks", [1, 2])
def test_nccl_data_parallel_equals_one_process(tmp_path, ranks):
    """dist.NCCLComm on 1 GPU (one rank: every NCCL call runs, with nothing to add) or 2 (two ranks): the
    weights and moments of gpt_cupy with grad accumulation, bit for bit, with and without ZeRO-1."""
    if gpu_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs")
    p = ok(subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-c", NCCL_SCRIPT % str(ROOT)], env=env1(),
                          capture_output=True, text=True, timeout=300))
    assert "zero 0 same True" in p.stdout and "zero 1 same True" in p.stdout, p.stdout
