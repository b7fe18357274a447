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

Data parallel (--ranks N, dist.py as train.py uses it under mpiexec): N ranks with --threads BLAS threads
each train one micro-batch of the config per step, against one process with N x --threads threads that
accumulates the same N micro-batches (the same global batch, the same weights). The ranks alternate steps
with the overlap on (each bucket of gradients sent while the backward pass of the earlier layers runs) and
off (everything sent after the backward pass): "comm" is the time a step waits for the gradients at its
end; off, it is the whole all-reduce (plus any skew between the ranks), on, what the overlap did not
hide. "all-reduce" is a plain blocking MPI Allreduce of the same bytes after a barrier, and its bus
bandwidth 2 (N-1)/N x bytes / time (NCCL's convention).

Memory:
  peak RSS delta   ru_maxrss of the subprocess during the timed steps minus ru_maxrss just before the
                   first step (after the weights, optimizer state, batch and matmul-peak buffers exist):
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

    def step(cfg=cfg):
        loss, grads = gm.loss_and_grads(params, ids, targets, cfg)
        for _ in range(a.accum - 1):                # --ranks: the ranks' global batch in this one process
            _, g = gm.loss_and_grads(params, ids, targets, cfg)
            for k in grads:
                grads[k] += g[k]
        if a.accum > 1:
            for g in grads.values():
                g *= 1.0 / a.accum
        gm.clip_grad_norm(grads, 1.0)
        gm.adamw_step(params, grads, state, 1e-4)
        return loss

    peak_gflops(1)                                  # touches Cm and the BLAS buffers before the baseline
    sync()
    if a.backend == "cupy":
        pool = xp.get_default_memory_pool()
        base = pool.total_bytes()
    rss0 = maxrss_bytes()
    for _ in range(a.warmup):
        step()
    sync()
    times, peaks, trial_ms = [], [], []
    for _ in range(a.trials):
        peaks.append(peak_gflops())
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            sync()
            ts.append(time.perf_counter() - t0)
        times += ts
        trial_ms.append(1e3 * float(np.median(ts)))
    peaks.append(peak_gflops())
    out["ms"] = 1e3 * float(np.median(times))
    out["trial_ms"] = trial_ms
    out["peak"] = float(np.median(peaks))
    out["peak_range"] = [min(peaks), max(peaks)]
    if a.backend == "cupy":
        out["mem_bytes"] = int(pool.total_bytes() - base)
        out["mem_method"] = "cupy pool bytes"
    else:
        out["mem_bytes"] = maxrss_bytes() - rss0
        out["mem_method"] = "maxrss delta"

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
    if a.torch and not a.ckpt:
        loss_ref = gm.loss_fn(params, ids, targets, cfg)
        out.update(torch_bench(a, c, params, ids, targets, peak_gflops, loss_ref))
    out["load_after"] = common.loadavg()
    common.print_result(out)


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

def torch_bench(a, c, params, ids, targets, peak_gflops, loss_ref):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {"torch": None}
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
    for _ in range(a.warmup):
        step()
    sync()
    times, peaks = [], []
    for _ in range(a.trials):
        peaks.append(peak_gflops())
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    return {"torch": torch.__version__, "torch_loss_diff": check, "torch_ms": 1e3 * float(np.median(times)),
            "torch_peak": float(np.median(peaks)), "torch_threads": torch.get_num_threads()}


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
        return child_dist(a) if a.child_dist else child(a)
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
    malloc = "" if a.backend != "numpy" else ("  malloc=default" if a.no_malloc_tuning else "  malloc=keep_freed_memory")
    print(f"bench/training.py  backend={a.backend}{' tf32' if a.tf32 else ''}{malloc}  threads={a.threads}  "
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
            print(f"{'':<16} torch {r['torch']} ({r['torch_threads']} threads, {a.torch_attention} attention): "
                  f"{r['torch_ms']:.1f} ms/step, "
                  f"{gf:.1f} GFLOP/s, MFU {100 * gf / r['torch_peak']:.1f}% of peak {r['torch_peak']:.1f}; "
                  f"numpy / torch time = {r['ms'] / r['torch_ms']:.2f} "
                  f"(|loss difference| on the same weights {r['torch_loss_diff']:.1e})")
        elif a.torch:
            print(f"{'':<16} torch: not installed, column skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
