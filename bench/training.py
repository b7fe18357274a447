"""
bench/training.py: how fast gpt_numpy trains, measured against this machine's own float32 matmul peak.

For each named config it times full training steps (loss_and_grads, clip_grad_norm, adamw_step) and
prints the median ms/step after warm-up, tokens/s, the model FLOPs of a step, the achieved GFLOP/s,
and the MFU: achieved GFLOP/s over the float32 matmul peak measured in the same process, with the same
backend and thread count, between the timing trials (a (2048 x 2048) @ (2048 x 2048) float32 matmul,
median of repeats). Each config runs in a fresh subprocess, so its peak memory is its own.

    python bench/training.py --threads 2                      # cpu-small, cpu-mid, bpe-mid on NumPy
    python bench/training.py --configs cpu-small --steps 30 --trials 5      # one thread (the default)
    python bench/training.py --threads 2 --checkpoint-activations   # adds checkpointed runs: time, memory ratios
    python bench/training.py --threads 2 --memory             # activation bytes, 8-layer config, +/- checkpointing
    python bench/training.py --threads 2 --torch              # adds PyTorch eager on the same model (if installed)
    python bench/training.py --backend cupy --configs shakespeare-gpu,gpt2-small [--tf32]
    python bench/training.py --configs cpu-mid --ranks 2      # data parallel (mpiexec) vs 1 process x 2 threads
    python bench/training.py --configs cpu-mid --optimizer-memory 1,2,4   # AdamW bytes per rank, +/- --zero 1
    python bench/training.py --dp-estimate                    # on paper: GPT-2 small on 8 GPUs with NCCL
    python bench/training.py --threads 2 --scaling            # 1 -> 2 threads measured; 8 and 32 by a model
    python bench/training.py --threads 2 --parallel blas      # the whole batch with 2 BLAS threads instead

Run it from the repository root, as `python bench/training.py` or `python -m bench.training` (the same).

FLOPs per training step (model FLOPs, the PaLM / nanoGPT MFU convention; a multiply-add is 2 flops,
the backward pass is 2x the forward, so a step is 3x the forward):

    N_mm  = L * (4 C^2 + 3 C F) + C V        matmul weights: qkv 3C^2, proj C^2, gate, up, down 3CF,
                                             LM head CV (counted even when tied to the embedding;
                                             the embedding lookup itself is not a matmul and not counted)
    step  = 6 * N_mm * tokens                weight matmuls, tokens = B * T
          + 12 * L * T * C * tokens          attention: q k^T and att @ v, 2 * B * T^2 * C flops each per
                                             layer in the forward; the full T x T (the causal half that
                                             is masked out is not subtracted)

Elementwise work (norms, RoPE, softmax, SwiGLU gating, AdamW) is not counted: it is the overhead.

Threads (--threads N): NumPy runs the step as train.py --threads N does (lib/parallel.py): the batch in N
shards of B/N sequences at once, one per thread, each with one BLAS thread; the gradients summed in shard
order, their mean and AdamW split among the threads by rows (--parallel blas instead: the whole batch, N
BLAS threads inside each matmul). PyTorch gets torch.set_num_threads(N), the same weights and the same
batch, and its steps alternate with ours trial by trial, so that the load of a shared machine hits both
alike; "numpy / torch time" is the ratio of the medians, and its range the ratios of the paired trials.

Scaling (--scaling, with --threads N): in one process, steps on 1 thread (the whole batch, one BLAS thread)
and on N (shards) alternate; beside them the machine's own N-core scaling at that moment (N loops of
one-thread matmuls at once against one after another: what the cores give to work that needs nothing of
each other) and the CPU seconds of each step (more at N: work the threads added, by contention). Then a
model for 2, 8 and 32 threads from one-thread measurements (scaling_model): each thread's shard of
ceil(B / n) sequences, whose wave lasts at least n x the Python a shard runs (which holds the GIL), then
the gradient sums and AdamW split n ways and the gradient norm, serial.

Data parallel (--ranks N, dist.py as train.py uses it under mpiexec): N ranks with --threads BLAS threads
each train one micro-batch of the config per step, against one process with N x --threads threads that
accumulates the same N micro-batches (the same global batch, the same weights). The ranks alternate steps
with the overlap on (each bucket of gradients sent while the backward pass of the earlier layers runs) and
off (everything sent after the backward pass): "comm" is the time a step waits for the gradients at its
end; off, it is the whole all-reduce (plus any skew between the ranks), on, what the overlap did not
hide. "all-reduce" is a plain blocking MPI Allreduce of the same bytes after a barrier, and its bus
bandwidth 2 (N-1)/N x bytes / time (NCCL's convention).

Memory:
  peak RSS delta   ru_maxrss of the subprocess after the warm-up steps (at least one: a step reaches its
                   peak the first time) minus ru_maxrss just before the first step (after the weights,
                   optimizer state, batch and matmul-peak buffers exist; before PyTorch's):
                   activations, gradients, temporaries. Sound for NumPy buffers, which tracemalloc does
                   not see reliably. On CuPy: the memory pool's high-water bytes instead.
  activations      bytes of the distinct array buffers reachable from the cache that
                   model_forward(..., train=True) returns (views of one buffer counted once; the
                   parameters, which the cache also references, excluded): what is kept between the
                   forward and the backward pass.

The machine is shared and noisy: check `cat /proc/loadavg` (printed before and after each config), and
compare MFU, a ratio against the peak measured in the same process, rather than raw times.
"""

import argparse
import dataclasses
import os
import sys
import time

if __package__ in (None, ""):   # `python bench/training.py`: import from the repository root, not from bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench import common
from errors import ArgumentParser, UserError, run_main

# name: (V, L, H, C, F, T, B)
CONFIGS = {
    "cpu-small":       dict(V=65,    L=4,  H=4,  C=128, F=344,  T=64,   B=12),
    "cpu-mid":         dict(V=65,    L=6,  H=6,  C=384, F=1024, T=256,  B=8),
    "bpe-mid":         dict(V=4096,  L=6,  H=6,  C=384, F=1024, T=256,  B=8),
    "shakespeare-gpu": dict(V=65,    L=6,  H=6,  C=384, F=1024, T=256,  B=64),
    "gpt2-small":      dict(V=50304, L=12, H=12, C=768, F=2048, T=1024, B=8),
    # the config of the activation-memory comparison: cpu-mid with 8 layers
    "mem-8l":          dict(V=65,    L=8,  H=6,  C=384, F=1024, T=256,  B=8),
}
DEFAULT_CONFIGS = "cpu-small,cpu-mid,bpe-mid"
MEMORY_CONFIG = "mem-8l"
PEAK_N = 2048                                   # the peak matmul: (N x N) @ (N x N), float32


def matmul_params(c):
    """N_mm: weights that take part in a matmul, LM head included, embedding lookup excluded."""
    return c["L"] * (4 * c["C"] ** 2 + 3 * c["C"] * c["F"]) + c["C"] * c["V"]


def flops_per_step(c):
    """6 * N_mm * tokens + 12 * L * T * C * tokens (see the docstring)."""
    tokens = c["B"] * c["T"]
    return 6 * matmul_params(c) * tokens + 12 * c["L"] * c["T"] * c["C"] * tokens


# ----------------------------------------------------------------------------------------------------
# The child: one config, one backend, one process.

def maxrss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # KiB on Linux


def child(a):
    import numpy as np
    out_malloc = False
    if a.backend == "cupy":
        import gpt_cupy as gm                       # raises RuntimeError with a clear message without a GPU
        xp = gm.cupy
        if a.tf32:
            gm.enable_tf32(True)
        sync = gm.synchronize
    else:
        import gpt_numpy as gm
        xp = np
        sync = lambda: None
        if not a.no_malloc_tuning:
            from lib.backend import keep_freed_memory
            out_malloc = keep_freed_memory()        # as a CPU training program does (data.load_backend)
    c = CONFIGS[a.child]
    cfg = gm.GPTConfig(vocab_size=c["V"], n_layer=c["L"], n_head=c["H"], d_model=c["C"], d_ff=c["F"],
                       max_seq_len=c["T"], checkpoint=bool(a.ckpt))
    out = {"config": a.child, "checkpoint": bool(a.ckpt), "backend": a.backend, "load_before": common.loadavg()}
    if a.backend == "numpy":
        out["malloc_tuned"] = bool(not a.no_malloc_tuning and out_malloc)

    # the matmul peak: buffers made before the memory baseline
    A = xp.asarray(np.random.default_rng(1).standard_normal((PEAK_N, PEAK_N), dtype=np.float32))
    Bm = xp.asarray(np.random.default_rng(2).standard_normal((PEAK_N, PEAK_N), dtype=np.float32))
    Cm = xp.empty_like(A)

    def peak_gflops(reps=5):
        xp.matmul(A, Bm, out=Cm)
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            xp.matmul(A, Bm, out=Cm)
            sync()
            ts.append(time.perf_counter() - t0)
        return 2 * PEAK_N ** 3 / float(np.median(ts)) / 1e9

    params = gm.init_params(cfg, seed=0)
    state = gm.adamw_init(params)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (c["B"], c["T"] + 1))
    ids, targets = data[:, :-1], data[:, 1:]

    # --threads N > 1 on NumPy: as train.py --threads N (lib/parallel.py), N shards of B/N sequences at once,
    # one BLAS thread each, their gradients summed in shard order; the sum, the mean and AdamW split among
    # the threads too. --parallel blas: the whole batch at once, N BLAS threads in each matmul.
    shards = None
    if a.backend == "numpy" and a.threads > 1 and a.parallel == "shards":
        from lib import parallel
        if c["B"] % a.threads:
            raise UserError(f"{a.child}: batch {c['B']} does not divide into {a.threads} shards")
        shards = parallel.pool(a.threads)
        out["blas_control"] = parallel.blas_threads() is not None

    def grads_of(cfg):                              # the whole batch's (loss, summed gradients), in shards
        if shards is None:
            return gm.loss_and_grads(params, ids, targets, cfg)
        b = c["B"] // a.threads
        each = shards.map(lambda j: gm.loss_and_grads(params, ids[j * b:(j + 1) * b], targets[j * b:(j + 1) * b],
                                                      cfg), range(a.threads))
        loss, grads = 0.0, each[0][1]
        for l, g in each:
            loss += l / a.threads
            if g is not grads:
                parallel.add_into(shards, grads, g)
        return loss, grads

    def step(cfg=cfg):
        loss, grads = grads_of(cfg)
        for _ in range(a.accum - 1):                # --ranks: the ranks' global batch in this one process
            _, g = grads_of(cfg)
            for k in grads:
                grads[k] += g[k]
        n = a.accum * (a.threads if shards is not None else 1)
        if n > 1:                                   # the mean of the micro-batches (or shards)
            if shards is not None:
                parallel.scale(shards, grads, 1.0 / n)
            else:
                for g in grads.values():
                    g *= 1.0 / n
        gm.clip_grad_norm(grads, 1.0)
        if shards is not None:
            parallel.adamw_step(shards, gm, params, grads, state, 1e-4)
        else:
            gm.adamw_step(params, grads, state, 1e-4)
        return loss

    peak_gflops(1)                                  # touches Cm and the BLAS buffers before the baseline
    sync()
    if a.backend == "cupy":
        pool = xp.get_default_memory_pool()
        base = pool.total_bytes()
    rss0 = maxrss_bytes()
    for _ in range(max(1, a.warmup)):               # the memory of a step: its first run reaches the peak
        step()
    sync()
    if a.backend == "cupy":
        out["mem_bytes"] = int(pool.total_bytes() - base)
        out["mem_method"] = "cupy pool bytes"
    else:
        out["mem_bytes"] = maxrss_bytes() - rss0
        out["mem_method"] = "maxrss delta"
    # PyTorch's step, on the same weights and batch, alternates with ours trial by trial, so that the load
    # of a shared machine hits both alike
    torch_step = None
    if a.torch and not a.ckpt:
        loss_ref = gm.loss_fn(params, ids, targets, cfg)
        torch_step, info = torch_setup(a, c, params, ids, targets, loss_ref)
        out.update(info)
    runs = [("", step, []), ("torch_", torch_step, [])] if torch_step else [("", step, [])]
    peaks, trial_ms = [], {key: [] for key, _, _ in runs}
    for _ in range(a.trials):
        peaks.append(peak_gflops())
        for key, fn, times in runs:
            ts = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
            times += ts
            trial_ms[key].append(1e3 * float(np.median(ts)))
    peaks.append(peak_gflops())
    for key, _, times in runs:
        out[key + "ms"] = 1e3 * float(np.median(times))
        out[key + "trial_ms"] = trial_ms[key]
        out[key + "peak"] = float(np.median(peaks))
    out["peak_range"] = [min(peaks), max(peaks)]

    if a.ckpt:
        # the time ratio checkpointed / plain, with the two kinds of step alternating in this process so
        # that the load of a shared machine hits both alike (after the RSS measurement: plain steps need
        # more memory)
        plain = dataclasses.replace(cfg, checkpoint=False)
        tc, tp = [], []
        for _ in range(a.trials * a.steps):
            for cf, ts in ((cfg, tc), (plain, tp)):
                t0 = time.perf_counter()
                step(cf)
                sync()
                ts.append(time.perf_counter() - t0)
        out["ratio_interleaved"] = float(np.median(tc) / np.median(tp))
    if a.activations:                               # bytes kept between forward and backward (after
        from lib.memory import held_bytes                              # the RSS measurement: it adds)
        _, cache = gm.model_forward(params, ids, cfg, train=True)
        out["activation_bytes"] = held_bytes(cache, params.values())
        del cache
    out["load_after"] = common.loadavg()
    common.print_result(out)


# ----------------------------------------------------------------------------------------------------
# --scaling: the step time from 1 to --threads N threads, measured, and a model for more cores

SCALING_MODEL = (2, 8, 32)              # the thread counts the model predicts


def child_scaling(a):
    """One config: steps on 1 thread and on N (shards, lib/parallel.py) alternating in this process, the
    machine's own N-core scaling beside them (N independent one-thread matmul loops against the same loops
    one after another), the CPU seconds of each step, and the one-thread measurements of the model."""
    import numpy as np
    import gpt_numpy as gm
    from lib import parallel
    from lib.backend import keep_freed_memory
    keep_freed_memory()
    N, c = a.threads, CONFIGS[a.child]
    if c["B"] % N:
        raise UserError(f"{a.child}: batch {c['B']} does not divide into {N} shards")
    cfg = gm.GPTConfig(vocab_size=c["V"], n_layer=c["L"], n_head=c["H"], d_model=c["C"], d_ff=c["F"],
                       max_seq_len=c["T"])
    params = gm.init_params(cfg, seed=0)
    state = gm.adamw_init(params)
    rng = np.random.default_rng(0)
    out = {"config": a.child, "threads": N, "load_before": common.loadavg()}
    pools = {1: parallel.Pool(1), N: parallel.pool(N)}
    parallel.set_blas_threads(1)                    # one BLAS thread everywhere: the threads are the shards'
    inside = [0.0]                                  # seconds inside the pool's maps (the rest: serial)

    def batch(b, T=c["T"], V=c["V"]):
        d = rng.integers(0, V, (b, T + 1))
        return d[:, :-1], d[:, 1:]
    ids, targets = batch(c["B"])

    def step(n):
        pool, b = pools[n], c["B"] // n
        t0 = time.perf_counter()
        each = pool.map(lambda j: gm.loss_and_grads(params, ids[j * b:(j + 1) * b], targets[j * b:(j + 1) * b], cfg),
                        range(n))
        grads = each[0][1]
        for _, g in each[1:]:
            parallel.add_into(pool, grads, g)
        if n > 1:
            parallel.scale(pool, grads, 1.0 / n)
        t1 = time.perf_counter()
        gm.clip_grad_norm(grads, 1.0)               # serial: one reduction
        t2 = time.perf_counter()
        parallel.adamw_step(pool, gm, params, grads, state, 1e-4)
        inside[0] += (t1 - t0) + (time.perf_counter() - t2)

    # the machine's own N-core scaling: N loops of one-thread (1024 x 1024) matmuls, at once and in a row
    M = [np.random.default_rng(i).standard_normal((1024, 1024), dtype=np.float32) for i in range(N)]

    def loops(together):
        work = lambda i: [M[i] @ M[i] for _ in range(8)]        # noqa: E731
        t0 = time.perf_counter()
        if together:
            pools[N].map(work, range(N))
        else:
            for i in range(N):
                work(i)
        return time.perf_counter() - t0

    for n in (1, N):
        for _ in range(max(1, a.warmup)):
            step(n)
    wall, cpu, machine = {1: [], N: []}, {1: [], N: []}, []
    for _ in range(a.trials):
        machine.append(loops(False) / loops(True))
        for n in (1, N):                            # alternating, so the machine's load hits both alike
            for _ in range(a.steps):
                inside[0] = 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                step(n)
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
                if n == N:
                    out.setdefault("serial_s", []).append(wall[n][-1] - inside[0])
    med = lambda xs: float(np.median(xs))          # noqa: E731
    out.update({"ms": {n: 1e3 * med(v) for n, v in wall.items()}, "cpu_ms": {n: 1e3 * med(v) for n, v in cpu.items()},
                "machine": med(machine), "machine_range": [min(machine), max(machine)],
                "trial_speedups": [med(wall[1][i:i + a.steps]) / med(wall[N][i:i + a.steps])
                                   for i in range(0, len(wall[1]), a.steps)]})
    out["serial_ms"] = 1e3 * med(out.pop("serial_s"))

    # the model's inputs, each measured on one thread, uncontended by the shards
    def timed(fn, reps):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return med(ts)
    shard_s = {}
    for n in (1, *SCALING_MODEL):
        b = -(-c["B"] // n)                         # sequences per shard: B / n, at least 1 (more threads than
        if b not in shard_s:                        # sequences: the batch grows to n x b)
            x, y = batch(b)
            shard_s[b] = timed(lambda: gm.loss_and_grads(params, x, y, cfg), max(2, a.steps))
    g = {k: np.ones_like(v) for k, v in params.items()}
    one = pools[1]
    out["add_ms"] = 1e3 * timed(lambda: parallel.add_into(one, g, params), 5)
    out["adamw_ms"] = 1e3 * timed(lambda: parallel.adamw_step(one, gm, params, g, state, 0.0), 5)
    out["clip_ms"] = 1e3 * timed(lambda: gm.clip_grad_norm(g, 1.0), 5)
    # the Python of a shard, which holds the GIL: the same calls on arrays too small to take time (as many
    # attention blocks as the config's T has, each of 4 rows)
    blocks = -(-c["T"] // gm.ATT_BLOCK) if gm.attends_by_blocks(c["T"]) else 1
    tiny = gm.GPTConfig(vocab_size=16, n_layer=c["L"], n_head=c["H"], d_model=2 * c["H"], d_ff=8,
                        max_seq_len=4 * blocks)
    tp = gm.init_params(tiny, seed=0)
    x, y = batch(1, T=4 * blocks, V=16)
    att_block, gm.ATT_BLOCK = gm.ATT_BLOCK, (4 if blocks > 1 else gm.ATT_BLOCK)
    try:
        out["python_ms"] = 1e3 * timed(lambda: gm.loss_and_grads(tp, x, y, tiny), 20)
    finally:
        gm.ATT_BLOCK = att_block
    out["shard_ms"] = {b: 1e3 * t for b, t in shard_s.items()}
    out["load_after"] = common.loadavg()
    common.print_result(out)


def scaling_model(r, c):
    """[(n, batch, sequences per shard, model ms/step, model speedup in tokens/s)] for SCALING_MODEL:
    each of n threads runs one shard of b = ceil(B / n) sequences (the batch grows to n b where n > B), its
    wave lasting the longer of the shard's one-thread time and n x the Python a shard runs under the GIL
    (the shards' interpreter time cannot overlap); then the (n - 1) gradient sums and AdamW, split n ways,
    and the gradient norm, serial. Not modeled: memory bandwidth and caches shared by the cores, and a
    core's slower clock when all are busy (the measured 2-thread step shows how much they cost here)."""
    t1 = r["shard_ms"][str(c["B"])] + r["clip_ms"] + r["adamw_ms"]
    rows = [(1, c["B"], c["B"], t1, 1.0)]
    for n in SCALING_MODEL:
        b = -(-c["B"] // n)
        wave = max(r["shard_ms"][str(b)], n * r["python_ms"])
        t = wave + (n - 1) * r["add_ms"] / n + r["adamw_ms"] / n + r["clip_ms"]
        rows.append((n, n * b, b, t, (n * b / t) / (c["B"] / t1)))
    return rows


def scaling_main(a, names):
    n = a.threads
    print(f"bench/training.py --scaling: 1 thread vs {n} (shards of B/{n} sequences, one BLAS thread each, "
          f"lib/parallel.py), steps alternating in one process; steps={a.steps} x trials={a.trials}; "
          f"cpus={os.cpu_count()}; load={common.loadavg()}")
    for name in names:
        c = CONFIGS[name]
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-scaling", "--threads", str(n),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--trials", str(a.trials)]
        r = common.run_child(cmd, 1, f"the scaling child for {name}")
        ms = {int(k): v for k, v in r["ms"].items()}
        cpu = {int(k): v for k, v in r["cpu_ms"].items()}
        sp = r["trial_speedups"]
        print(f"{name} (B {c['B']}, T {c['T']}): 1 thread {ms[1]:.1f} ms/step, {n} threads {ms[n]:.1f}: "
              f"x{ms[1] / ms[n]:.2f} (trials x{min(sp):.2f}-{max(sp):.2f}); load {r['load_before']} -> "
              f"{r['load_after']}")
        print(f"  CPU seconds per step {cpu[1]:.1f} -> {cpu[n]:.1f} ms (x{cpu[n] / cpu[1]:.2f}: the work itself); serial "
              f"in the {n}-thread step {r['serial_ms']:.1f} ms; the machine's own {n}-core scaling meanwhile "
              f"(one-thread matmul loops at once / in a row): x{r['machine']:.2f} "
              f"(x{r['machine_range'][0]:.2f}-{r['machine_range'][1]:.2f})")
        shard = ", ".join(f"{b} seq {t:.1f} ms" for b, t in r["shard_ms"].items())
        print(f"  model, from one-thread measurements: a shard's forward+backward ({shard}), its Python (GIL) "
              f"{r['python_ms']:.1f} ms, a gradient sum {r['add_ms']:.1f} ms, AdamW {r['adamw_ms']:.1f} ms, the "
              f"norm {r['clip_ms']:.1f} ms (serial)")
        for k, batch_, b, t, speed in scaling_model(r, c):
            seen = f"   measured x{ms[1] / ms[n]:.2f}" if k == n else ""
            print(f"    {k:>3} threads: batch {batch_:>3}, {b} seq/shard: {t:8.1f} ms/step, x{speed:5.2f} tokens/s{seen}")


# ----------------------------------------------------------------------------------------------------
# Data parallel: one rank of --ranks N or of --optimizer-memory, started by mpiexec

def child_dist(a):
    import numpy as np
    from lib import dist
    import gpt_numpy as gm
    from lib.backend import keep_freed_memory
    keep_freed_memory()
    comm = dist.MPIComm()
    N = comm.size
    c = CONFIGS[a.child]
    cfg = gm.GPTConfig(vocab_size=c["V"], n_layer=c["L"], n_head=c["H"], d_model=c["C"], d_ff=c["F"],
                       max_seq_len=c["T"])
    params = gm.init_params(cfg, seed=0)
    opt = gm.adamw_init(params)
    dp = dist.DataParallel(comm, gm, params, zero=a.zero, bucket_mb=a.bucket_mb)
    params, opt = dp.adopt(params, opt)
    out = {"config": a.child, "ranks": N, "zero": a.zero, "optimizer_bytes": dp.optimizer_bytes(opt),
           "param_bytes": sum(int(p.nbytes) for p in params.values()), "buckets": len(dp.layout.buckets),
           "load_before": common.loadavg()}
    if a.memory_only:
        every = comm.allgather_host(np.array([out["optimizer_bytes"]]), "gathering")
        out["optimizer_bytes_all"] = every.ravel().tolist()
        if comm.rank == 0:
            common.print_result(out)
        return
    data = np.random.default_rng(comm.rank).integers(0, c["V"], (c["B"], c["T"] + 1))
    ids, targets = data[:, :-1], data[:, 1:]

    def step(overlap):
        dp.overlap = overlap
        w0 = dp.stats["wait_s"]
        t0 = time.perf_counter()
        loss = dp.loss_and_grads(params, ids, targets, cfg, 0, first=True, last=True)
        dp.finish(loss / N, False)
        dp.scale_grads(1.0 / N)
        dp.clip_grad_norm(1.0)
        dp.adamw_step(params, opt, 1e-4, 0.9, 0.95, 1e-8, 0.1)
        return time.perf_counter() - t0, dp.stats["wait_s"] - w0

    for _ in range(a.warmup):
        step(True)
    times = {True: [], False: []}
    for _ in range(a.trials * a.steps):
        for overlap in (True, False):               # alternating, so the machine's load hits both alike
            comm.barrier("bench")
            times[overlap].append(step(overlap))
    # the plain all-reduce of the same bytes
    buf = np.ones(dp.layout.n, dtype=np.float32)
    ar = []
    for _ in range(5):
        comm.barrier("bench")
        t0 = time.perf_counter()
        comm.comm.Allreduce(comm.MPI.IN_PLACE, buf)
        ar.append(time.perf_counter() - t0)
    med = lambda xs: float(np.median(xs))           # noqa: E731
    out.update({"ms_on": 1e3 * med([t for t, _ in times[True]]), "ms_off": 1e3 * med([t for t, _ in times[False]]),
                "wait_on": 1e3 * med([w for _, w in times[True]]), "wait_off": 1e3 * med([w for _, w in times[False]]),
                "bytes": 4 * dp.layout.n, "allreduce_ms": 1e3 * med(ar), "load_after": common.loadavg()})
    # rank 0 reports; the slowest rank sets the pace, so take the max over ranks of each median
    keys = ["ms_on", "ms_off", "wait_on", "wait_off", "allreduce_ms"]
    every = comm.allgather_host(np.array([out[k] for k in keys]), "gathering")
    out.update({k: float(every[:, i].max()) for i, k in enumerate(keys)})
    if comm.rank == 0:
        common.print_result(out)


def run_dist(a, name, ranks, zero=0, memory_only=False):
    """mpiexec -n ranks bench/training.py --child-dist: one rank's RESULT."""
    import shutil
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")         # the mpich wheel's
    mpiexec = beside if os.path.isfile(beside) else shutil.which("mpiexec")
    if mpiexec is None:
        raise UserError("--ranks needs mpiexec (pip install mpi4py mpich)")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--child", name, "--child-dist",
           "--zero", str(zero), "--bucket-mb", str(a.bucket_mb), "--steps", str(a.steps), "--warmup",
           str(a.warmup), "--trials", str(a.trials)] + (["--memory-only"] if memory_only else [])
    return common.run_child(cmd, a.threads, f"the {ranks}-rank run of {name}")


def dist_main(a, names):
    """--ranks N: one process x N*threads threads vs N ranks x threads each, per config."""
    n = a.ranks
    print(f"bench/training.py --ranks {n}: 1 process x {n * a.threads} threads (grad accumulation {n}) vs {n} ranks x "
          f"{a.threads} thread(s), the same global batch of {n} micro-batches; steps={a.steps} x trials={a.trials}; "
          f"bucket {a.bucket_mb} MB; cpus={os.cpu_count()}; load={common.loadavg()}")
    for name in names:
        one = argparse.Namespace(**{**vars(a), "threads": n * a.threads, "accum": n})
        r1 = run_child(one, name, False)
        rd = run_dist(a, name, n, zero=a.zero)
        c = CONFIGS[name]
        tokens = n * c["B"] * c["T"]
        hidden = 1 - rd["wait_on"] / rd["wait_off"] if rd["wait_off"] > 0 else float("nan")
        busbw = 2 * (n - 1) / n * rd["bytes"] / (rd["allreduce_ms"] / 1e3) / 1e9
        print(f"{name}: global batch {tokens:,} tokens; gradients {rd['bytes'] / 2**20:.1f} MiB in "
              f"{rd['buckets']} buckets")
        print(f"  1 process x {n * a.threads} threads      {r1['ms']:8.1f} ms/step  "
              f"{tokens / r1['ms'] * 1e3:8.0f} tokens/s   (load {r1['load_before']} -> {r1['load_after']})")
        print(f"  {n} ranks x {a.threads} thread(s), overlap {rd['ms_on']:8.1f} ms/step  "
              f"{tokens / rd['ms_on'] * 1e3:8.0f} tokens/s   x{r1['ms'] / rd['ms_on']:.2f} the speed of 1 process  "
              f"(load {rd['load_before']} -> {rd['load_after']})")
        print(f"  {n} ranks, no overlap           {rd['ms_off']:8.1f} ms/step")
        print(f"  comm per step: {rd['wait_off']:.1f} ms without overlap, {rd['wait_on']:.1f} ms exposed with it: "
              f"{100 * hidden:.0f}% hidden; a plain all-reduce of the {rd['bytes'] / 2**20:.1f} MiB: "
              f"{rd['allreduce_ms']:.1f} ms ({busbw:.2f} GB/s bus bandwidth)")


def memory_main(a, names):
    """--optimizer-memory 1,2,4: AdamW's bytes per rank, with and without ZeRO-1."""
    ranks = [int(r) for r in a.optimizer_memory.split(",")]
    print("AdamW state (both moments) held per rank; dist.DataParallel.optimizer_bytes, measured in each rank")
    for name in names:
        print(f"{name}:")
        print(f"  {'ranks':>5}  {'zero 0 (MiB)':>14}  {'zero 1 (MiB)':>14}  {'ratio':>6}")
        for n in ranks:
            r0 = run_dist(a, name, n, zero=0, memory_only=True)
            r1 = run_dist(a, name, n, zero=1, memory_only=True)
            b0, b1 = max(r0["optimizer_bytes_all"]), max(r1["optimizer_bytes_all"])
            print(f"  {n:>5}  {b0 / 2**20:14.2f}  {b1 / 2**20:14.2f}  {b0 / b1:6.2f}   (zero 1, each rank: "
                  f"{', '.join(f'{b / 2**20:.2f}' for b in r1['optimizer_bytes_all'])} MiB)")


def dp_estimate(a):
    """On paper: GPT-2 small (bench's gpt2-small config) data parallel on 8 GPUs with NCCL."""
    import math
    import gpt_numpy as gm
    c = CONFIGS["gpt2-small"]
    shapes = gm.param_shapes(gm.GPTConfig(vocab_size=c["V"], n_layer=c["L"], n_head=c["H"], d_model=c["C"],
                                          d_ff=c["F"], max_seq_len=c["T"]))
    n_params = sum(math.prod(s) for s in shapes.values())
    grad_bytes = 4 * n_params                                       # float32 gradients
    flops = flops_per_step(c)                                       # per GPU: one micro-batch of B x T
    emb_bytes = 4 * math.prod(shapes["tok_emb"])                    # the last bucket: the embedding
    print(f"GPT-2 small (V {c['V']}, L {c['L']}, C {c['C']}, F {c['F']}, T {c['T']}, B {c['B']} per GPU): "
          f"{n_params / 1e6:.1f}M parameters, {grad_bytes / 1e6:.0f} MB of float32 gradients, "
          f"{flops / 1e12:.2f} TFLOP per GPU per step")
    N, busbw = a.gpus, a.busbw * 1e9
    t_comm = 2 * (N - 1) / N * grad_bytes / busbw                    # ring all-reduce (or reduce-scatter + all-gather)
    t_last = 2 * (N - 1) / N * emb_bytes / busbw                     # what the overlap cannot hide
    print(f"{N} GPUs, NCCL at {a.busbw:g} GB/s bus bandwidth: all-reduce {1e3 * t_comm:.2f} ms per step "
          f"(2 (N-1)/N x bytes / bus bandwidth), of which the embedding bucket, sent last, {1e3 * t_last:.2f} ms")
    print(f"{'GPU (float32 rate, MFU)':<34} {'compute':>9} {'no overlap':>11} {'eff.':>6} {'overlap':>9} {'eff.':>6}")
    for gpu, tflops, mfu in (("A100 TF32 156 TFLOP/s, 40%", 156, 0.40), ("A100 FP32 19.5 TFLOP/s, 70%", 19.5, 0.70),
                             ("H100 SXM TF32 495 TFLOP/s, 40%", 495, 0.40)):
        t = flops / (tflops * 1e12 * mfu)
        t_bwd = 2 / 3 * t                                            # the backward pass: 2/3 of the FLOPs
        no = t + t_comm                                              # all of it after the backward pass
        # overlapped: the blocks' buckets travel while the backward pass runs; exposed are what the link
        # could not finish by then, and at least the embedding's bucket, which is ready only at the end
        ov = t + max(t_comm - t_bwd, t_last)
        print(f"{gpu:<34} {1e3 * t:7.1f}ms {1e3 * no:9.1f}ms {100 * t / no:5.1f}% {1e3 * ov:7.1f}ms "
              f"{100 * t / ov:5.1f}%")


# ----------------------------------------------------------------------------------------------------
# Optional: the same architecture in PyTorch eager, same weights, same step (clip + AdamW).

def torch_setup(a, c, params, ids, targets, loss_ref):
    """(step, info): PyTorch eager's training step on these weights and this batch, with as many threads as
    ours, and what to report of it (its version, threads, the loss difference on the same weights); (None,
    {"torch": None}) where PyTorch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, {"torch": None}
    import numpy as np
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    dev = "cuda" if a.backend == "cupy" else "cpu"     # on a GPU run, PyTorch on the same GPU
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(a.tf32)
        torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    P = {k: torch.tensor(np.asarray(v.get() if hasattr(v, "get") else v), requires_grad=True, device=dev)
         for k, v in params.items()}
    L, H, C, T = c["L"], c["H"], c["C"], c["T"]
    hs = C // H
    inv = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().float().to(dev), ang.sin().float().to(dev)
    mask = torch.full((T, T), float("-inf")).triu(1).to(dev)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(u):
        u1, u2 = u[..., :hs // 2], u[..., hs // 2:]
        return u * cos + torch.cat([-u2, u1], -1) * sin

    def loss_fn(ids, tg):
        B = ids.shape[0]
        x = P["tok_emb"][ids]
        for i in range(L):
            p = f"blocks.{i}."
            h = rms(x, P[p + "norm1.weight"])
            q, k, v = (h @ P[p + "attn.qkv"]).split(C, -1)
            q, k, v = (z.view(B, T, H, hs).transpose(1, 2) for z in (q, k, v))
            if a.torch_attention == "sdpa":            # PyTorch's fused (flash) CPU kernel
                y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            else:                                       # the same math as gpt_numpy, op by op
                att = (rope(q) @ rope(k).transpose(-2, -1)) * hs ** -0.5 + mask
                y = att.softmax(-1) @ v
            x = x + y.transpose(1, 2).reshape(B, T, C) @ P[p + "attn.proj"]
            h = rms(x, P[p + "norm2.weight"])
            x = x + (F.silu(h @ P[p + "ffn.w_gate"]) * (h @ P[p + "ffn.w_up"])) @ P[p + "ffn.w_down"]
        logits = rms(x, P["norm_f.weight"]) @ P["tok_emb"].T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tg.reshape(-1))

    decay = [p for k, p in P.items() if p.ndim >= 2]
    no_decay = [p for k, p in P.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    ti, tt = torch.as_tensor(ids).to(dev), torch.as_tensor(targets).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ti, tt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(P.values(), 1.0)
        opt.step()

    with torch.no_grad():                           # same weights, same batch: the same loss?
        check = abs(float(loss_fn(ti, tt)) - float(loss_ref))
    for _ in range(max(1, a.warmup)):
        step()
    sync()
    return step, {"torch": torch.__version__, "torch_loss_diff": check, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------
# The parent: runs each config in a fresh subprocess with the thread count in its environment.

def run_child(a, name, ckpt, activations=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--ckpt", str(int(ckpt)),
           "--backend", a.backend, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--trials", str(a.trials)]
    cmd += ["--tf32"] if a.tf32 else []
    cmd += ["--torch", "--torch-attention", a.torch_attention] if a.torch else []
    cmd += ["--activations"] if activations else []
    cmd += ["--no-malloc-tuning"] if a.no_malloc_tuning else []
    cmd += ["--accum", str(a.accum)] if a.accum > 1 else []
    cmd += ["--threads", str(a.threads), "--parallel", a.parallel]
    return common.run_child(cmd, a.threads, f"bench child for {name}")


def row(r, c):
    fl = flops_per_step(c)
    s = r["ms"] / 1e3
    gf = fl / s / 1e9
    toks = c["B"] * c["T"] / s
    return (f"{r['config']:<16} {'ckpt' if r['checkpoint'] else '-':<5} {r['ms']:9.1f} {toks:10.0f} "
            f"{fl / 1e9:9.2f} {gf:8.1f} {r['peak']:8.1f} {100 * gf / r['peak']:6.1f}% "
            f"{common.fmt_mib(r['mem_bytes'])}  {min(r['trial_ms']):8.1f}-{max(r['trial_ms']):<8.1f} "
            f"{r['load_before']} -> {r['load_after']}")


def parse_args(argv):
    ap = ArgumentParser(prog="bench/training.py", description=__doc__.split("\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                    help="numpy (CPU) or cupy (an NVIDIA GPU) (default: %(default)s)")
    common.add_threads_argument(ap)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"comma-separated, from: {', '.join(CONFIGS)} (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per trial (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=3,
                    help="trials, each preceded by a peak measurement (default: %(default)s)")
    ap.add_argument("--checkpoint-activations", action="store_true",
                    help="also run each config with activation checkpointing; print time and memory ratios")
    ap.add_argument("--memory", action="store_true",
                    help=f"activation bytes kept between forward and backward for {MEMORY_CONFIG} "
                         "(8 layers) with and without checkpointing, and the step-time ratio")
    ap.add_argument("--parallel", choices=("shards", "blas"), default="shards",
                    help="numpy with --threads N > 1: 'shards' runs the batch as train.py --threads N does, N "
                         "shards of B/N sequences at once, one BLAS thread each (lib/parallel.py); 'blas' runs it "
                         "whole, N BLAS threads in each matmul (train.py --threads 1 with OPENBLAS_NUM_THREADS=N) "
                         "(default: %(default)s)")
    ap.add_argument("--scaling", action="store_true",
                    help="numpy: the step time on 1 thread and on --threads N (shards), alternating in one "
                         "process, with the machine's own N-core scaling beside it, and a model of "
                         f"{', '.join(map(str, SCALING_MODEL))} threads from one-thread measurements")
    ap.add_argument("--tf32", action="store_true", help="cupy: TF32 tensor-core matmuls (the peak too)")
    ap.add_argument("--torch", action="store_true", help="add PyTorch eager on the same model, if installed")
    ap.add_argument("--torch-attention", choices=("sdpa", "math"), default="sdpa",
                    help="torch: F.scaled_dot_product_attention (fused, skips the masked half) or the "
                         "explicit matmul / mask / softmax / matmul of gpt_numpy (default: %(default)s)")
    ap.add_argument("--ranks", type=int, default=0, metavar="N",
                    help="data parallel: N MPI ranks x --threads each (mpiexec) vs 1 process x N * --threads "
                         "threads, the same global batch; comm time and the share the overlap hides "
                         "(default: %(default)s, off)")
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1), help="--ranks: ZeRO stage (default: %(default)s)")
    ap.add_argument("--bucket-mb", type=float, default=4.0,
                    help="--ranks: gradient bucket size in MB (default: %(default)s)")
    ap.add_argument("--optimizer-memory", default="", metavar="N,N",
                    help="AdamW bytes per rank with and without --zero 1 at these numbers of ranks, e.g. 1,2,4 "
                         "(default: off)")
    ap.add_argument("--dp-estimate", action="store_true",
                    help="on paper: GPT-2 small data parallel on --gpus GPUs with NCCL at --busbw GB/s")
    ap.add_argument("--gpus", type=int, default=8, help="--dp-estimate: number of GPUs (default: %(default)s)")
    ap.add_argument("--busbw", type=float, default=100.0,
                    help="--dp-estimate: NCCL bus bandwidth in GB/s (default: %(default)s)")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="numpy: leave glibc malloc as it is (by default the subprocess calls "
                         "lib.backend.keep_freed_memory(), as train.py does)")
    # internal: the per-config subprocess
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--activations", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child-dist", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-scaling", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    common.check_threads(a.threads)
    a.names = [MEMORY_CONFIG] if a.memory else [n.strip() for n in a.configs.split(",") if n.strip()]
    for n in a.names if not a.child else [a.child]:
        if n not in CONFIGS:
            raise UserError(f"unknown config {n!r}: choose from {', '.join(CONFIGS)}")
    return a


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure."""
    return run_main(parse_args, bench, argv)


def bench(a):
    if a.child:
        return child_dist(a) if a.child_dist else child_scaling(a) if a.child_scaling else child(a)
    if a.dp_estimate:
        return dp_estimate(a)
    if a.backend == "cupy":                         # fail early, with gpt_cupy's message
        try:
            import gpt_cupy  # noqa: F401
        except RuntimeError as e:
            raise UserError(str(e))
    names = a.names
    if a.ranks:
        return dist_main(a, names)
    if a.optimizer_memory:
        return memory_main(a, names)
    if a.scaling:
        return scaling_main(a, names)
    malloc = "" if a.backend != "numpy" else ("  malloc=default" if a.no_malloc_tuning else "  malloc=keep_freed_memory")
    par = f" ({a.parallel})" if a.backend == "numpy" and a.threads > 1 else ""
    print(f"bench/training.py  backend={a.backend}{' tf32' if a.tf32 else ''}{malloc}  threads={a.threads}{par}  "
          f"steps={a.steps} x trials={a.trials} (after {a.warmup} warm-up)  cpus={os.cpu_count()}  "
          f"load={common.loadavg()}")
    print("FLOPs/step = 6 * N_mm * tokens + 12 * L * T * C * tokens, "
          "N_mm = L * (4C^2 + 3CF) + CV, tokens = B * T")
    print(f"peak = float32 ({PEAK_N}x{PEAK_N}) @ ({PEAK_N}x{PEAK_N}) matmul, median, same process; "
          f"MFU = GFLOP/s / peak; mem = peak RSS delta over the steps (CuPy: pool bytes)")
    head = (f"{'config':<16} {'ckpt':<5} {'ms/step':>9} {'tokens/s':>10} {'GFLOP':>9} {'GFLOP/s':>8} "
            f"{'peak':>8} {'MFU':>7} {'mem':>12}  {'trial medians':<17} load before -> after")
    print(head)
    print("-" * len(head))
    for n in names:
        c = CONFIGS[n]
        runs = [False, True] if (a.checkpoint_activations or a.memory) else [False]
        rs = {}
        for ck in runs:
            rs[ck] = run_child(a, n, ck, activations=a.memory)
            print(row(rs[ck], c), flush=True)
        if True in rs:
            r0, r1 = rs[False], rs[True]
            mem_ratio = r0["mem_bytes"] / max(r1["mem_bytes"], 1)
            print(f"{'':<16} checkpointing: time x{r1['ratio_interleaved']:.2f} (steps alternating in one "
                  f"process; the rows above: x{r1['ms'] / r0['ms']:.2f}), peak-RSS-delta memory {mem_ratio:.1f}x less")
        if a.memory:
            r0, r1 = rs[False], rs[True]
            b0, b1 = r0["activation_bytes"], r1["activation_bytes"]
            print(f"\nactivations kept between forward and backward, {n} (L={c['L']}, C={c['C']}, "
                  f"F={c['F']}, T={c['T']}, B={c['B']}, V={c['V']}):")
            print(f"  without checkpointing {common.fmt_mib(b0)}")
            print(f"  with checkpointing    {common.fmt_mib(b1)}   ({b0 / b1:.1f}x less)")
            print(f"  step time with / without: x{r1['ratio_interleaved']:.2f} (steps alternating in one process; "
                  f"the rows above: {r1['ms']:.1f} / {r0['ms']:.1f} ms = x{r1['ms'] / r0['ms']:.2f})")
            print("  (goal: at least 4x less memory for at most 1.35x the time)")
        if a.torch and rs[False].get("torch_ms"):
            r = rs[False]
            fl = flops_per_step(c)
            gf = fl / (r["torch_ms"] / 1e3) / 1e9
            ratios = [x / y for x, y in zip(r["trial_ms"], r["torch_trial_ms"])]     # the trials alternate
            print(f"{'':<16} torch {r['torch']} ({r['torch_threads']} threads, {a.torch_attention} attention): "
                  f"{r['torch_ms']:.1f} ms/step, "
                  f"{gf:.1f} GFLOP/s, MFU {100 * gf / r['torch_peak']:.1f}% of peak {r['torch_peak']:.1f}; "
                  f"numpy / torch time = {r['ms'] / r['torch_ms']:.2f} (trial by trial "
                  f"{min(ratios):.2f}-{max(ratios):.2f}; |loss difference| on the same weights "
                  f"{r['torch_loss_diff']:.1e})")
        elif a.torch:
            print(f"{'':<16} torch: not installed, column skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
