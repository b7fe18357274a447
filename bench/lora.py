"""
bench/lora.py: what LoRA saves. Full fine-tuning against LoRA (rank 8 on every projection) on the same
100M+ parameter model and batch, and the same LoRA step in PyTorch + peft on the same weights.

    python bench/lora.py --threads 1                                # SmolLM2-135M's shape, B 4, T 128
    python bench/lora.py --threads 1 --model gpt2-124m --rounds 2
    python bench/lora.py --threads 1 --checkpoint-activations       # both sides recompute their blocks
    python -m bench.lora --threads 1                                # the same program, run as a module

Run it from the repository root (it runs export.py, the program, from there).

The weights are random (init_params, seed 0; time and memory do not depend on their values) and the adapters
are lora_init's with a small random B, so that they change the loss. The parent writes them once as our
checkpoints (the base, and a LoRA run's adapters that name it), and exports them with export.py (the base
as a Hugging Face Llama, the adapters as a PEFT adapter), so all three kinds of step start from the same
numbers:

    full   gpt_numpy.loss_and_grads + clip_grad_norm + adamw_step on every weight
    lora   the same with lora=LoraConfig(rank 8, alpha 16, qkv, proj, gate, up, down): the adapters train,
           the base weights are frozen (no gradient, no AdamW state)
    torch  transformers' LlamaForCausalLM (sdpa attention) wrapped by peft.PeftModel (LoRA on q, k, v, o,
           gate, up, down), cross-entropy, clip_grad_norm_ and torch.optim.AdamW on the adapters

Memory: each kind runs alone in a fresh subprocess with the thread count in its environment (OPENBLAS,
OMP and MKL_NUM_THREADS; torch.set_num_threads), so that its peak is its own: VmHWM, the peak resident
memory of the whole process (Python, the libraries, the weights, the optimizer state, activations and
temporaries), over --warmup + --steps steps.

Time: one more subprocess holds all three (separate weights for each) and alternates their steps, full,
lora, torch, full, lora, torch, ... (--rounds * --steps of each after --warmup), so that the load of a
shared machine, which changes from minute to minute, hits the three alike. The ratios are taken between
neighbouring steps and the median is reported, with /proc/loadavg before and after.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np          # the parent's; each child gets --threads in its environment before it starts

if __package__ in (None, ""):   # `python bench/lora.py`: import from the repository root, not from bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench import common
from errors import ArgumentParser, UserError, run_main

MODELS = {   # name: GPTConfig fields
    "smollm2-135m": dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536),
    "gpt2-124m": dict(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048),
}
KINDS = ("full", "lora", "torch")


# ----------------------------------------------------------------------------------------------------
# The parent: weights, exports, rounds of children, the table

def weights(a, checkpoint=False):
    """The model's config, its weights and the adapters: the same numbers in every process."""
    import gpt_numpy as gn
    cfg = gn.GPTConfig(**MODELS[a.model], max_seq_len=a.block, checkpoint=checkpoint)
    from lib import lora as lora_lib
    lora = lora_lib.LoraConfig(rank=a.rank, alpha=a.alpha)
    adapters = lora_lib.init(gn, cfg, lora, seed=0)
    r = np.random.default_rng(1)
    for k in adapters:
        if k.endswith("lora_B"):
            adapters[k] += r.normal(0.0, 1e-3, adapters[k].shape).astype(np.float32)
    return cfg, lora, gn.init_params(cfg, seed=0), adapters


def prepare(a, work):
    """The weights as our checkpoints (the base, and a LoRA run's adapters naming it) exported with
    export.py (a Hugging Face Llama and a PEFT adapter) for the torch child, and the batch."""
    import gpt_numpy as gn
    from lib.checkpoint import build_meta, lora_base_ref, load_checkpoint, save_checkpoint
    import bpe
    cfg, lora, params, adapters = weights(a)
    tok = bpe.Tokenizer("gpt4", [])         # the exports need a tokenizer (256 byte ids); none is used
    save_checkpoint(work / "base" / "ckpt.safetensors", params, {}, {}, build_meta(cfg, tok))
    base_ref = lora_base_ref(load_checkpoint(work / "base"), work / "lora")
    save_checkpoint(work / "lora" / "ckpt.safetensors", adapters, {}, {},
                    build_meta(cfg, tok, lora={"config": lora.to_dict(), "base": base_ref}))
    for argv in (["--ckpt", work / "base", "--out", work / "hf_base"],
                 ["--ckpt", work / "lora", "--out", work / "hf_merged", "--peft-adapter", work / "hf_adapter"]):
        p = subprocess.run([sys.executable, str(common.EXPORT), *map(str, argv)], capture_output=True, text=True)
        if p.returncode:
            sys.stderr.write(p.stdout + p.stderr)
            raise UserError(f"export.py {' '.join(map(str, argv))} failed")
    batch = np.random.default_rng(2).integers(0, cfg.vocab_size, (a.batch, a.block + 1))
    np.save(work / "batch.npy", batch)
    return cfg, gn.num_params(params)


def run_child(a, kind, work):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--work", str(work),
           "--model", a.model, "--batch", str(a.batch), "--block", str(a.block), "--rank", str(a.rank),
           "--alpha", str(a.alpha), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--rounds", str(a.rounds), "--kinds", ",".join(a.kinds)]
    cmd += ["--checkpoint-activations"] if a.checkpoint_activations else []
    before = common.loadavg()
    out = common.run_child(cmd, a.threads, f"the {kind} child", cwd=common.ROOT)
    return {**out, "load_before": before, "load_after": common.loadavg()}


def report(a, mem, speed, n_params):
    med = lambda xs: float(np.median(xs))                                          # noqa: E731
    times = speed["ms"]
    print(f"\n{'kind':<6} {'trainable params':>17} {'optimizer state':>16} {'peak RSS':>10} {'ms/step':>9} "
          f"{'loss at start':>14}")
    for kind in a.kinds:
        r = mem[kind]
        print(f"{kind:<6} {r['trainable']:>17,} {r['opt_bytes'] / 2**20:>12.1f} MiB {r['maxrss_mib']:>6.0f} MiB "
              f"{med(times[kind]):>9.0f} {r['loss']:>14.6f}")
    print(f"\nmodel {a.model}: {n_params:,} parameters; batch {a.batch} x {a.block} tokens; LoRA rank {a.rank}, alpha "
          f"{a.alpha:g} on every projection; {a.threads} thread(s); "
          f"{'activation checkpointing on every side; ' if a.checkpoint_activations else ''}"
          f"peak RSS: each kind alone ({a.warmup} + {a.steps} steps); ms/step: the median of {len(times[a.kinds[0]])} "
          f"steps of each, alternating in one process")
    if "full" in mem and "lora" in mem:
        t = [lo / fu for lo, fu in zip(times["lora"], times["full"])]
        print(f"LoRA / full fine-tuning: step time x{med(t):.2f} (neighbouring steps; quartiles "
              f"{np.percentile(t, 25):.2f}-{np.percentile(t, 75):.2f}; goal <= 0.8), peak RSS "
              f"x{mem['lora']['maxrss_mib'] / mem['full']['maxrss_mib']:.2f} (goal <= 0.5), optimizer state "
              f"x{mem['lora']['opt_bytes'] / mem['full']['opt_bytes']:.4f}")
    if "lora" in mem and "torch" in mem:
        s = [to / lo for to, lo in zip(times["torch"], times["lora"])]
        d = abs(mem["lora"]["loss"] - mem["torch"]["loss"])
        print(f"ours / PyTorch + peft: speed x{med(s):.2f} (torch ms / ours, neighbouring steps; quartiles "
              f"{np.percentile(s, 25):.2f}-{np.percentile(s, 75):.2f}; goal >= 1.0); |loss difference| at the start "
              f"{d:.1e} (same weights, adapters and batch); torch {mem['torch']['torch']}, peft {mem['torch']['peft']}, "
              f"{mem['torch']['threads']} torch thread(s)")
    print("loadavg before -> after: " + "; ".join(f"{k} {r['load_before']} -> {r['load_after']}"
                                                  for k, r in [*mem.items(), ("timing", speed)]))


# ----------------------------------------------------------------------------------------------------
# The children: one kind of step each

def child(a):
    work = Path(a.work)
    batch = np.load(work / "batch.npy")
    ids, targets = batch[:, :-1], batch[:, 1:]
    if a.child == "speed":                              # all kinds in one process, steps alternating
        steps = {k: (torch_step if k == "torch" else numpy_step)(a, k, work, ids, targets)[0] for k in a.kinds}
        for _ in range(a.warmup):
            for k in a.kinds:
                steps[k]()
        ms = {k: [] for k in a.kinds}
        for _ in range(a.rounds * a.steps):
            for k in a.kinds:
                t0 = time.perf_counter()
                steps[k]()
                ms[k].append(1e3 * (time.perf_counter() - t0))
        out = {"ms": ms}
    else:                                               # one kind alone: its memory
        step, out = (torch_step if a.child == "torch" else numpy_step)(a, a.child, work, ids, targets)
        out["ms"] = timed(step, a)
    out["maxrss_mib"] = common.peak_rss_mib()
    common.print_result(out)


def timed(step, a):
    for _ in range(a.warmup):
        step()
    ts = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def numpy_step(a, kind, work, ids, targets):
    """(step, info) for our full or LoRA step. The weights are made here rather than read from the
    checkpoint the parent wrote (the same numbers): reading a file holds it in memory a while, and the peak
    RSS is to be the training step's."""
    import gpt_numpy as gn
    from lib.backend import keep_freed_memory
    keep_freed_memory()                                 # as train.py does (data.load_backend)
    cfg, lora, params, adapters = weights(a, a.checkpoint_activations)
    trained = params
    if kind == "lora":
        params.update(adapters)
        trained = adapters
    else:
        lora = None
    opt = gn.adamw_init(trained)
    loss0 = gn.loss_fn(params, ids, targets, cfg, lora=lora)

    def step():
        loss, grads = gn.loss_and_grads(params, ids, targets, cfg, lora=lora)
        gn.clip_grad_norm(grads, 1.0)
        gn.adamw_step(trained, grads, opt, 1e-4, 0.9, 0.99, 1e-8, 0.1)

    return step, {"kind": kind, "loss": float(loss0), "trainable": gn.num_params(trained),
                  "opt_bytes": sum(int(v.nbytes) for d in (opt["m"], opt["v"]) for v in d.values())}


def torch_step(a, kind, work, ids, targets):
    """(step, info) for the PyTorch + peft LoRA step."""
    import peft
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    base = transformers.AutoModelForCausalLM.from_pretrained(work / "hf_base", dtype=torch.float32,
                                                             attn_implementation="sdpa")
    model = peft.PeftModel.from_pretrained(base, work / "hf_adapter", is_trainable=True)
    if a.checkpoint_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ti, tt = torch.as_tensor(ids), torch.as_tensor(targets)
    V = base.config.vocab_size
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(input_ids=ti).logits.view(-1, V), tt.reshape(-1))  # noqa: E731
    with torch.no_grad():
        loss0 = float(loss_fn())

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()

    step()                                              # AdamW makes its state on the first step
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    return step, {"kind": "torch", "loss": loss0, "trainable": sum(p.numel() for p in trained),
                  "opt_bytes": opt_bytes, "torch": torch.__version__, "peft": peft.__version__,
                  "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = ArgumentParser(prog="bench/lora.py", description=__doc__.split("\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="See the module docstring for what is measured and how.")
    ap.add_argument("--model", choices=list(MODELS), default="smollm2-135m", help="the model's shape (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4, help="B (default: %(default)s)")
    ap.add_argument("--block", type=int, default=128, help="T (default: %(default)s)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    common.add_threads_argument(ap)
    ap.add_argument("--steps", type=int, default=2, help="steps of each kind per round, and of each memory "
                    "run (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the alternating timing (default: %(default)s)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which kinds, comma-separated (default: %(default)s)")
    ap.add_argument("--checkpoint-activations", action="store_true", help="activation checkpointing on every side")
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    common.check_threads(a.threads)
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if any(k not in KINDS for k in a.kinds):
        raise UserError(f"--kinds: choose from {', '.join(KINDS)}")
    return a


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure."""
    return run_main(parse_args, bench, argv)


def bench(a):
    if a.child:
        return child(a)
    print(f"bench/lora.py  model={a.model}  B={a.batch} T={a.block}  rank={a.rank} alpha={a.alpha:g}  "
          f"threads={a.threads}  cpus={os.cpu_count()}  load={common.loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_lora-") as tmp:
        work = Path(tmp)
        t0 = time.time()
        cfg, n_params = prepare(a, work)
        print(f"weights written and exported in {time.time() - t0:.0f} s: {n_params:,} parameters", flush=True)
        mem = {}
        for kind in a.kinds:
            mem[kind] = run_child(a, kind, work)
            print(f"memory: {kind:<5} peak RSS {mem[kind]['maxrss_mib']:6.0f} MiB ({mem[kind]['ms']:.0f} ms/step alone)  "
                  f"load {mem[kind]['load_before']} -> {mem[kind]['load_after']}", flush=True)
        speed = run_child(a, "speed", work)
        report(a, mem, speed, n_params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
