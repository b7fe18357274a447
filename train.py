"""
train.py: train the GPT of gpt_numpy.py on a text corpus: raw text in, a checkpoint and a sample out.

nanoGPT-shaped: a config whose fields are the flags (each documented once, in its field), named presets,
plainly named helpers (estimate_loss, get_lr) and one flat training loop (train(), in named steps; one
optimizer step is train_step()). What the loop takes as given lives in lib/: the config (TrainConfig),
its presets and its checks in lib/train_config.py; how a run starts in lib/runs.py: afresh, --resume and
its rules, --init-from, the out dir, the data, and the run's records (Run, what stays fixed; State, what
changes and is checkpointed). On the way lib/data.py finds the corpus (by default the Python standard library's own .py sources, which
every machine with Python has), trains a BPE tokenizer on it (bpe.py) or reads a character vocabulary off
it, and writes the token ids once to memory-mapped files under data/<name>/. Each of those steps is cached
and redone only when its inputs change. A bad command line prints `error: <one line>` and exits 2, any
later failure exits 1 (errors.run_main).

    pip install -r requirements.txt && python train.py     # the default job: stdlib sources, BPE, 2-3 min on 2 cores
    python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare.txt   # nanoGPT's CPU run
    python train.py --preset shakespeare-char              # the same, downloading Tiny Shakespeare
    python train.py --preset tiny --data notes.txt         # seconds: a smoke test on any text
    python train.py --data ~/books/ --tokenizer char       # a folder (or a file, or a glob "src/**/*.py")
    python train.py --threads 2                            # both cores of a 2-core machine for every step
    python train.py --resume                               # continue the run in its out dir (same flags)
    python train.py --config my_run.toml --lr 1e-3         # settings from a TOML file, flags over them
    python train.py --init-from out/imported --data notes.txt --lr 3e-4   # fine-tune a checkpoint on new text
    python train.py --init-from out/stdlib-bpe2048 --sft chat.jsonl --lora-rank 8    # LoRA on instruction data
    python train.py --help                                 # every flag and preset
    mpiexec -n 2 python train.py --preset tiny --data notes.txt   # 2 processes, one model (docs/distributed.md)
    python sample.py --ckpt out/stdlib-bpe2048 --prompt "def "   # stream text from a checkpoint

On N cores, `--threads N` computes each step's micro-batches in N shards at once, one per core (lib/parallel.py;
the same run as --batch-size B/N --grad-accum N on one core, bit for bit). Without it, run with
OPENBLAS_NUM_THREADS=1 (or 2) on a small shared machine: oversubscribed BLAS threads are slow.

Outputs in --out-dir (default out/<data>-<tokenizer>): ckpt.safetensors (the latest checkpoint, which
--resume continues; format in lib/checkpoint.py), best.safetensors (the weights of the best val loss so
far, for sample.py, eval.py, export.py and --init-from), log.jsonl (one JSON object per log line and per
evaluation) and config.toml (every setting of the run, which --config reads back). A folder that holds
another run is refused unless --resume or --force. Ctrl-C saves a checkpoint and exits (status 130: saved,
not done); `--resume` continues it, and a resumed run ends with the same weights, bit for bit, as one that
was never interrupted (given the same machine, backend and thread count). The settings come from the
defaults, a --preset, a --config file and the flags, each over the one before; --min-lr follows --lr
(lr / 10) and --lr-decay-iters follows --max-iters unless given. After its first steps a run says how long
it will take; evaluations show their progress.

Under mpiexec (MPI: several processes on one machine or several, or GPUs with NCCL) the ranks train one
model on slices of each step's batch; lib/dist.py holds that machinery and is imported only then. A run's
global batch is batch_size x grad_accum x the number of ranks; a resumed run keeps it, whatever the number
of ranks (grad_accum follows). See docs/distributed.md.

Fine-tuning: `--init-from CKPT` (a ckpt.safetensors or its folder: an earlier run's, or one that
`export.py --import-hf` wrote) starts a new run from that checkpoint's weights, architecture and tokenizer;
the optimizer, the step counter and the batch sampler start afresh, and the training settings come from the
flags and --preset as usual. Its out dir (default out/<data>-from-<checkpoint>) also holds the tokenizer
file the data cache is keyed by, and the run resumes like any other (`--resume out/<data>-from-<checkpoint>`).
`--lora-rank R` trains LoRA adapters beside the frozen weights instead of the weights themselves (the
checkpoints then hold only the adapters and name the base checkpoint by path and hash; `--lora-merge`
also writes the merged model), and `--sft FILE.jsonl` trains on chat or Alpaca records with the loss on the
assistant's tokens only (lib/sft.py). docs/finetuning.md has a worked example.
"""


import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

import gpt_numpy
from errors import UserError, run_main
from lib import generation, lora as lora_lib, mixed_precision, parallel, runs, scoring, sft
from lib.checkpoint import build_meta, check_tokenizer_fits, save_checkpoint
from lib.data import get_batch
from lib.runs import append_jsonl, check_corpus_length, load_eval_mc, open_out_dir
from lib.tokenizer import encode_prompt
from lib.train_config import check_memory, lora_config, model_config, parse_args
from lib.train_config import PRESETS, TrainConfig, build_parser, parse_config      # noqa: F401 (train.TrainConfig ...)


# ----------------------------------------------------------------------------------------------------
# Training helpers

def estimate_loss(gm, params, data, cfg, mcfg, lora=None, tick=None):
    """Mean loss over eval_iters batches of each split, without dropout. The batches come from a fixed
    seed, so every evaluation of a run sees the same windows and the curve is not sampling noise. tick(),
    if given, after each batch (a progress bar)."""
    out = {}
    for k, split in enumerate(("train", "val")):
        rng = np.random.default_rng([cfg.seed, 1, k])
        losses = []
        for _ in range(cfg.eval_iters):
            losses.append(gm.loss_fn(params, *get_batch(data[split], cfg.batch_size, cfg.block_size, rng), mcfg,
                                     lora=lora))
            if tick:
                tick()
        out[split] = float(np.mean(losses))
    return out


def estimate_sft_loss(gm, params, data, cfg, mcfg, lora=None, tick=None):
    """--sft: the loss per target token (the assistant's), over eval_iters batches drawn from the train
    split with a fixed seed, and over the val split in order (at most eval_iters batches). tick() as in
    estimate_loss."""
    rng = np.random.default_rng([cfg.seed, 1, 0])
    batches = {"train": [sft.get_batch(data["train"], cfg.batch_size, rng) for _ in range(cfg.eval_iters)],
               "val": sft.eval_batches(data["val"], cfg.batch_size, cfg.eval_iters)}
    out = {}
    for split, bs in batches.items():
        total = n = 0                                   # a batch's mean loss is over its targets
        for x, y in bs:
            k = int((y >= 0).sum())
            total, n = total + gm.loss_fn(params, x, y, mcfg, lora=lora) * k, n + k
            if tick:
                tick()
        out[split] = float(total / n)
    return out


def get_lr(step, cfg):
    """Linear warmup to lr over warmup_iters, cosine decay to min_lr at lr_decay_iters (then flat)."""
    decay = cfg.lr_decay_iters or cfg.max_iters
    return gpt_numpy.lr_schedule(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay)


def step_seed(seed, step, micro):
    """The dropout seed of one micro-step, a function of (run seed, step, micro-step) only, so a resumed
    run draws exactly the masks the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------
# The training loop: train() and its steps, in the order it calls them

def train(cfg, data, tok, gm, resume=None, log=print, init=None, comm=None):
    """Train (or continue `resume`, a checkpoint.Checkpoint) and return a summary dict. `init` (a
    Checkpoint too) fine-tunes: its weights and model config, a fresh optimizer and step 0. `comm`:
    under mpiexec, lib/dist.py's communicator (the ranks train one model; rank 0 logs, evaluates and saves).

    Each step (train_step): grad_accum micro-batches from the seeded sampler -> averaged gradients ->
    finite check -> clip -> AdamW at get_lr(step). Every eval_interval steps: train/val loss, val bits per
    byte, a sample. Every ckpt_interval steps, at the end and on Ctrl-C: an atomic checkpoint.
    """
    from tqdm import tqdm
    run, state = runs.on_every_rank(comm, lambda: open_run(cfg, data, tok, gm, resume, init, log, comm))
    if comm is not None and comm.size > 1:
        start_data_parallel(run, state)
    log_start(run, state)
    bar = tqdm(total=cfg.max_iters, initial=state.step, unit="step", dynamic_ncols=True,
               disable=None if run.rank == 0 else True, desc="training")
    run.write = tqdm.write if not bar.disable else log
    stop = threading.Event()                                           # set by Ctrl-C
    try:
        with ctrl_c_sets(stop, run.write):
            status = training_loop(run, state, bar, stop)
    finally:
        bar.close()
    return finish(run, state, status)


def open_run(cfg, data, tok, gm, resume, init, log, comm):
    """The Run and its State, fresh or resumed, once the model is known to fit the machine, its tokenizer
    and the corpus."""
    source = resume or init                                            # the checkpoint the model comes from
    mcfg = (source.model_config(dropout=cfg.dropout, checkpoint=cfg.checkpoint_activations) if source
            else model_config(cfg, tok.vocab_size))
    check_memory(cfg, mcfg, gm)
    if source:
        check_tokenizer_fits(tok, mcfg, source.path)   # a char vocabulary smaller than the model: refused
    if not cfg.sft:
        check_corpus_length(cfg, data)
    run = runs.Run(cfg, mcfg, gm, data, tok, open_out_dir(cfg), resumed=resume is not None, log=log, comm=comm,
                   lora=lora_config(cfg), chat=data.get("chat"), mc=load_eval_mc(cfg, tok, mcfg, source))
    state = runs.resumed_state(run, resume) if resume else runs.fresh_state(run, init)
    if resume and state.step >= cfg.max_iters:
        log(f"warning: {resume.path} is at step {state.step}, and --max-iters {cfg.max_iters} ends there: nothing to "
            f"train; pass a larger --max-iters to continue the run")
    return run, state


def start_data_parallel(run, state):
    """Under mpiexec: the gradient averaging of lib/dist.py over the weights this run trains (a LoRA run's
    adapters); with --zero 1 the ranks then keep their shards of AdamW's moments only."""
    from lib import dist
    trained = state.trained()
    run.dp = dist.DataParallel(run.comm, run.gm, trained, zero=run.cfg.zero, bucket_mb=run.cfg.bucket_mb,
                               lora=run.lora)
    views, state.opt = run.dp.adopt(trained, state.opt)
    state.params = {**state.params, **views}


def log_start(run, state):
    cfg, mcfg = run.cfg, run.mcfg
    n_model = run.gm.num_params(state.params) - (run.gm.num_params(state.trained()) if run.lora else 0)
    run.log(f"model: {n_model:,} parameters ({mcfg.n_layer} layers, d_model "
            f"{mcfg.d_model}, {mcfg.n_head} heads, d_ff {mcfg.d_ff}, vocab {mcfg.vocab_size}, context "
            f"{mcfg.max_seq_len}); backend {cfg.backend}"
            + ("; mixed precision: float16 compute, float32 weights, loss scale "
               f"{state.scaler['scale']:g}" if cfg.mixed_precision else ""))
    if cfg.mixed_precision and cfg.backend == "numpy":
        run.log("warning: --mixed-precision on --backend numpy is far slower than without it (~100x for the "
                "default model: NumPy multiplies float16 matrices without BLAS); it is meant for --backend cupy, "
                "drop it on a CPU")
    if run.lora is not None:
        n = run.gm.num_params(state.trained())
        run.log(f"LoRA: rank {run.lora.rank}, alpha {run.lora.alpha:g} on {','.join(run.lora.targets)}: {n:,} "
                f"trainable parameters ({100 * n / n_model:.2f}% of the model's, whose weights stay frozen); "
                f"AdamW state {8 * n / 2**20:.2f} MiB")
    ranks = f" x {run.world} ranks" if run.world > 1 else ""
    if cfg.threads > 1:
        run.log(f"threads: {cfg.threads}, each micro-batch in {cfg.threads} shards of {cfg.batch_size // cfg.threads} "
                f"sequences at once (lib/parallel.py)")
        if parallel.blas_threads() is None:
            run.log(f"warning: --threads {cfg.threads}: the BLAS's own thread count cannot be set from here (no "
                    f"OpenBLAS found): set its variable to 1 (MKL_NUM_THREADS=1 ...), or each shard's matmuls "
                    f"start threads of their own")
    if cfg.sft:
        run.log(f"training: {cfg.max_iters} steps of {cfg.batch_size} x {cfg.grad_accum}{ranks} examples (rows "
                f"padded to the longest drawn, at most {cfg.block_size} tokens); out dir {run.out_dir}")
    else:
        run.log(f"training: {cfg.max_iters} steps of {run.tokens_per_step:,} tokens (batch {cfg.batch_size} x "
                f"grad_accum {cfg.grad_accum}{ranks} x {cfg.block_size}); out dir {run.out_dir}")
    if run.dp is not None:
        dp = run.dp
        run.log(f"data parallel: {run.world} ranks, gradients in {len(dp.layout.buckets)} bucket(s), "
                f"optimizer state {dp.optimizer_bytes(state.opt) / 2**20:.2f} MiB per rank"
                + (f" (ZeRO-1: 1/{run.world} of the moments each)" if cfg.zero else ""))


@contextmanager
def ctrl_c_sets(stop, write):
    """While inside: Ctrl-C sets `stop` (the loop finishes its step, saves and leaves); a second Ctrl-C
    raises KeyboardInterrupt at once. Only the main thread can take signals; elsewhere, nothing changes."""
    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        write("Ctrl-C: saving a checkpoint after this step (press again to quit without saving)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_handler)


@dataclass
class Meter:
    """What the loop measures: since the last log line (its numbers), and since this process began."""
    step_log: int                   # the step of the last log line
    t_steps: float = 0.0            # seconds in train_step since then (not evaluations or saves)
    losses: list = field(default_factory=list)
    tokens: int = 0
    t_all: float = 0.0              # seconds in train_step since this process began, and its steps
    n_all: int = 0
    eval_s: float | None = None     # how long the last evaluation took


ESTIMATE_AFTER = 3      # steps: then a line says how long the run will take at this speed,
ESTIMATE_MIN_S = 10.0   # if that is this long or longer


def training_loop(run, state, bar, stop):
    """Evaluate, checkpoint and step until max_iters or Ctrl-C: returns "done" or "interrupted"."""
    cfg, start_step = run.cfg, state.step
    state.t_start = time.time()
    meter = Meter(state.step)
    while True:
        if state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters:
            if not (run.resumed and state.step == start_step):         # done before the checkpoint was saved
                t0 = time.time()
                if run.rank == 0:
                    try:
                        evaluate(run, state, stop)
                    except EvaluationStopped:                          # Ctrl-C: its checkpoint comes first
                        run.write(f"step {state.step}: evaluation stopped (Ctrl-C)")
                if run.comm is not None:                               # the others wait, without spinning
                    run.comm.barrier("rank 0 evaluates", timeout=None)
                meter.eval_s = time.time() - t0
        status = save_or_stop(run, state, stop, start_step)
        if status is not None:
            return status
        t0, tokens0 = time.time(), state.tokens_seen
        loss, norm, lr, overflow = train_step(run, state)
        dt, tokens = max(time.time() - t0, 1e-9), state.tokens_seen - tokens0
        meter.t_steps, meter.t_all, meter.n_all, meter.tokens = (meter.t_steps + dt, meter.t_all + dt,
                                                                 meter.n_all + 1, meter.tokens + tokens)
        if math.isfinite(loss) and not overflow:                       # a skipped step's loss is partial
            meter.losses.append(loss)
        bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens / dt:,.0f} tok/s", refresh=False)
        bar.update(1)
        if run.rank == 0 and meter.n_all == ESTIMATE_AFTER and state.step < cfg.max_iters:
            line, seconds = time_estimate(run, state, meter)
            if seconds >= ESTIMATE_MIN_S:
                run.write(line)
        if run.rank == 0 and (state.step % cfg.log_interval == 0 or state.step == cfg.max_iters):
            log_line(run, state, meter.losses, lr, norm, meter.t_steps / max(1, state.step - meter.step_log),
                     meter.tokens / meter.t_steps)
            meter.step_log, meter.t_steps, meter.losses, meter.tokens = state.step, 0.0, [], 0


def save_or_stop(run, state, stop, start_step):
    """The checkpoint when one is due, and the end of the loop: "done" at max_iters, "interrupted" after
    Ctrl-C (the step saved, once); None: go on."""
    cfg, saved = run.cfg, False
    due = state.step == cfg.max_iters or (cfg.ckpt_interval and state.step % cfg.ckpt_interval == 0)
    # a fresh run with --max-iters 0 saves its step 0: the out dir's checkpoint is then its own
    if due and (state.step != start_step or (not run.resumed and state.step == cfg.max_iters)):
        save(run, state)
        saved = True
    if stop_requested(run, stop):                                      # Ctrl-C: save (once) and leave
        if state.step == start_step:
            run.write(f"interrupted at step {state.step}, before any step: nothing new to save")
        else:
            if not saved:
                save(run, state)
            run.write(f"interrupted at step {state.step}: checkpoint saved to {run.ckpt_path}; continue "
                      f"with --resume {run.out_dir}")
        return "interrupted"
    return "done" if state.step >= cfg.max_iters else None


def time_estimate(run, state, meter):
    """(one line, seconds): how long the rest of the run takes at the speed of its first steps, with its
    evaluations, each as long as the last one was (or, none seen yet, 2 x eval_iters forward passes of one
    micro-batch, at about a third of a training micro-batch's forward and backward each)."""
    cfg, step_s = run.cfg, meter.t_all / meter.n_all
    steps = cfg.max_iters - state.step
    every = cfg.eval_interval                                          # (and one at max_iters)
    evals = cfg.max_iters // every - state.step // every + bool(cfg.max_iters % every)
    eval_s = meter.eval_s if meter.eval_s is not None else step_s * 2 * cfg.eval_iters / (3 * cfg.grad_accum)
    total = steps * step_s + evals * eval_s
    end = time.strftime("%H:%M" if total < 20 * 3600 else "%a %H:%M", time.localtime(time.time() + total))
    return (f"time: {step_s:.3g} s/step, so the {steps:,} steps to go and {evals} evaluation(s) of "
            f"~{duration(eval_s)} take ~{duration(total)} at this speed (until about {end})"), total


def duration(seconds):
    """3.2 s, 4.5 min, 2.6 h."""
    return (f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 90 else
            f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h")


def stop_requested(run, stop):
    """Ctrl-C seen? Under mpiexec every rank gets it, perhaps in different steps: they stop together if
    any one has seen it."""
    if run.comm is None:
        return stop.is_set()
    return run.comm.allreduce_host([float(stop.is_set())], "starting the next step (checking for Ctrl-C)")[0] > 0


def evaluate(run, state, stop=None):
    """Train and val loss and val bits per byte (and --eval-mc's accuracy), printed and logged, with a
    progress bar; best.safetensors when the val loss is the best so far; then a short sample. Ctrl-C
    (`stop` set) ends the loss estimate early: EvaluationStopped, nothing logged."""
    cfg, t0 = run.cfg, time.time()
    estimate = estimate_sft_loss if cfg.sft else estimate_loss
    with progress(run, 2 * cfg.eval_iters, f"step {state.step}: evaluating", stop) as tick:
        losses = estimate(run.gm, state.params, run.data, cfg, run.mcfg, run.lora, tick=tick)
    mc = {}
    if run.mc:                                          # the same numbers as eval.py --mc on this checkpoint
        weights = state.params if run.lora is None else lora_lib.merge(state.params, run.lora)
        r = scoring.mc_metrics(scoring.score_requests(run.gm, weights, run.mcfg, run.mc))
        mc = {f"mc_{k}": r[k] for k in ("acc", "acc_norm", "acc_token_norm", "items")}
    bpb = losses["val"] / run.data["meta"]["val_bytes_per_token"] / math.log(2)
    best = state.best_val is None or losses["val"] < state.best_val
    if best:
        state.best_val, state.best_step = losses["val"], state.step
        save_best(run, state)
    state.last_eval = {"step": state.step, "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb}
    run.write(f"step {state.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"val {bpb:.3f} bits/byte"
              + (f", mc acc {mc['mc_acc']:.4f} (norm {mc['mc_acc_norm']:.4f}, token norm "
                 f"{mc['mc_acc_token_norm']:.4f})" if mc else "")
              + f" ({time.time() - t0:.1f} s{'; the best so far: ' + run.best_path.name if best else ''})")
    append_jsonl(run.log_path, {"event": "eval", **state.last_eval, **mc, "lr": get_lr(state.step, cfg),
                                "time_s": state.elapsed_now(), "tokens_seen": state.tokens_seen, "best": best})
    if cfg.sample_tokens and state.step < cfg.max_iters:
        run.write(framed(run, make_sample(run, state, cfg.sample_tokens, seed=cfg.seed + state.step)))


PLAIN_PROGRESS_S = 30.0     # off a terminal, a long evaluation prints a progress line this often


class EvaluationStopped(Exception):
    """Ctrl-C during an evaluation, which may take minutes: it stops, and the loop saves and leaves."""


@contextmanager
def progress(run, total, what, stop=None):
    """Inside: tick(), once per unit of `total` (an evaluation's batches). On a terminal a tqdm bar below
    the training bar, gone when done; elsewhere (output to a file) a plain line every PLAIN_PROGRESS_S
    seconds, so that a long evaluation (minutes, fine-tuning a 135M model on a CPU) says how far it got.
    tick() raises EvaluationStopped once `stop` (Ctrl-C) is set."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=what, unit="batch", leave=False, dynamic_ncols=True, disable=None)
    t0 = last = time.time()
    done = 0

    def tick():
        nonlocal done, last
        if stop is not None and stop.is_set():
            raise EvaluationStopped
        done += 1
        bar.update(1)
        if bar.disable and time.time() - last >= PLAIN_PROGRESS_S and done < total:
            last, spent = time.time(), time.time() - t0
            run.write(f"{what}: {done}/{total} batches in {duration(spent)}, "
                      f"~{duration(spent * (total - done) / done)} to go")
    try:
        yield tick
    finally:
        bar.close()


def make_sample(run, state, n, seed):
    """The evaluation's sample (KV-cache generation): --sample-prompt and n tokens sampled after it, or
    with --sft the model's answer to it sent as a user message in the chat template: greedy, at most n
    tokens, up to the template's end of turn."""
    cfg, tok, gm = run.cfg, run.tok, run.gm
    if cfg.sft:
        ids, stop = sft.chat_prompt_ids(tok, run.chat, cfg.sample_prompt), sft.stop_ids(tok, run.chat)
        new = list(generation.generate_stream(gm, state.params, ids, run.mcfg, n, temperature=0, stop_ids=stop,
                                              lora=run.lora))
        return tok.decode_bytes([i for i in new if i not in stop]).decode("utf-8", "replace")
    ids = encode_prompt(tok, cfg.sample_prompt)
    new = list(generation.generate_stream(gm, state.params, ids, run.mcfg, n, temperature=0.8, top_k=200, seed=seed,
                                          lora=run.lora))
    return tok.decode_bytes(ids + new).decode("utf-8", "replace")


def framed(run, text):
    head = f"--- answer to {run.cfg.sample_prompt!r} ---" if run.cfg.sft else "--- sample ---"
    return head + "\n" + text.strip("\n") + "\n--------------"


def save(run, state):
    """An atomic checkpoint of the state: lib/checkpoint.py's file, runs.checkpoint_meta's metadata."""
    meta = runs.checkpoint_meta(run, state)
    host = lambda arrays: {k: run.gm.to_host(v) for k, v in arrays.items()}     # noqa: E731
    # a LoRA run saves its adapters, not the frozen base (the metadata names the base and its hash)
    if run.dp is None:
        tensors = host(state.trained()), host(state.opt["m"]), host(state.opt["v"])
    else:                                               # the whole state on rank 0 (ZeRO: gathered)
        tensors = run.dp.gather_state(state.trained(), state.opt)
    if run.rank == 0:
        save_checkpoint(run.ckpt_path, *tensors, meta)
    state.saved_step = state.step


def save_best(run, state):
    """best.safetensors, beside the latest checkpoint: the weights of the best val loss so far (a LoRA
    run's adapters), atomic and hashed like every checkpoint, with the model, tokenizer and run metadata
    but no optimizer state (--resume continues ckpt.safetensors). sample.py, eval.py and export.py --ckpt
    and train.py --init-from take it. Rank 0 alone evaluates, and holds the whole weights."""
    weights = {k: run.gm.to_host(v) for k, v in state.trained().items()}
    save_checkpoint(run.best_path, weights, {}, {}, runs.best_meta(run, state, state.best_val))


def train_step(run, state):
    """One optimizer step on the global batch, grad_accum x world micro-batches drawn from the sampler in
    order, of which this rank computes grad_accum in a row (rank r: r * grad_accum ...; one process: all):
    the gradients summed (under mpiexec over every rank, by dist.DataParallel) -> their mean -> a finite
    check -> clip -> AdamW at get_lr(step). Every rank draws every micro-batch, so the samplers stay equal,
    and dropout is keyed by the global micro-batch index, so a run sees the same sequences and masks at any
    world size. A float16 overflow (mixed precision) skips the step: it does no more work, but still draws
    its batches, so the sampler stays in step with a run where it did not overflow. So does a non-finite
    loss with --skip-nonfinite. Returns (mean loss over the global batch, grad norm, lr, overflow).

    --threads N cuts each micro-batch into N shards of batch_size / N rows, computed at once (lib/parallel.py):
    shard j of micro-batch m is micro-batch m * N + j of the run with --batch-size B/N and --grad-accum G*N,
    which this step equals bit for bit (the same rows, dropout keys and order of the sums). The sampler
    draws whole micro-batches at any N, so a run resumed with another --threads trains on the same
    sequences, its gradients equal to the uninterrupted run's up to float rounding (and with --dropout,
    masks drawn per shard). (--sft: a shard keeps its micro-batch's padding, so there the step equals the
    smaller micro-batches' up to float rounding.)"""
    cfg, gm, dp, N = run.cfg, run.gm, run.dp, run.cfg.threads
    pool = parallel.pool(N) if N > 1 else None                         # None: one thread (lib/parallel's helpers too)
    n = cfg.grad_accum * run.world                                     # micro-batches in the global batch
    mine = range(run.rank * cfg.grad_accum, (run.rank + 1) * cfg.grad_accum)
    loss, grads, overflow, tokens = 0.0, None, False, 0
    for micro in range(n):
        batch, positions = next_batch(run, state, read=micro in mine)
        tokens += positions
        if micro not in mine or overflow:
            continue
        first, last = micro == mine[0], micro == mine[-1]
        for j, (l, g) in enumerate(shard_grads(run, state, batch, micro, pool, first, last)):
            loss += l / (n * N)
            overflow = cfg.mixed_precision and g is None               # float16 overflowed: no gradients
            if overflow:
                break
            if g is None:                                              # (they are in dp's buffer)
                continue
            if dp is not None:
                dp.accumulate(g, first=first and j == 0)
            elif grads is None:
                grads = g
            else:
                parallel.add_into(pool, grads, g)                      # by rows on the threads, if any
    if dp is not None:                                                 # summed over the ranks
        loss, overflow = dp.finish(loss, overflow)
    lr, norm = get_lr(state.step, cfg), math.nan
    if not overflow and dp is not None:                                # the mean over all ranks' micro-batches
        dp.scale_grads(1.0 / (n * N))
        norm = dp.clip_grad_norm(cfg.grad_clip)                        # the same on every rank
    elif not overflow:
        if cfg.grad_accum * N > 1:                                     # the mean of the micro-batches (shards)
            parallel.scale(pool, grads, 1.0 / (cfg.grad_accum * N))
        norm = gm.clip_grad_norm(grads, cfg.grad_clip)
    if cfg.mixed_precision:
        mixed_precision.loss_scaler_update(state.scaler, not overflow)
    if overflow and math.isfinite(loss):
        skip_overflow(run, state)
    elif not (math.isfinite(loss) and math.isfinite(norm)):
        skip_nonfinite(run, state, loss, norm)
    elif dp is not None:
        dp.adamw_step(state.trained(), state.opt, lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
    else:                                                              # by rows on the threads, if any
        parallel.adamw_step(pool, gm, state.trained(), grads, state.opt, lr, cfg.beta1, cfg.beta2, cfg.eps,
                            cfg.weight_decay)
    state.step += 1
    state.tokens_seen += tokens
    return loss, norm, lr, overflow


def shard_grads(run, state, batch, micro, pool, first, last):
    """[(loss, gradients)] of micro-batch `micro` (micro_grads; first, last: this rank's first and last of the
    step): of the whole batch, or with --threads N of its N shards of rows, computed at once in the pool, in
    shard order; shard j's dropout is keyed as micro-batch micro * N + j."""
    cfg = run.cfg
    if pool is None:
        seed = step_seed(cfg.seed, state.step, micro)
        return [micro_grads(run, state, *batch, seed, first=first, last=last)]
    N, (x, y) = cfg.threads, batch
    b = len(x) // N

    def shard(j):
        seed = step_seed(cfg.seed, state.step, micro * N + j)
        return micro_grads(run, state, x[j * b:(j + 1) * b], y[j * b:(j + 1) * b], seed, hooked=False)
    return pool.map(shard, range(N))


def next_batch(run, state, read=True):
    """The sampler's next micro-batch, (x, y), and its positions. read=False (another rank's micro-batch):
    drawn, so that the sampler moves on, but not read (None). --sft's rows are padded to the longest
    example drawn, so its positions vary."""
    cfg = run.cfg
    if cfg.sft:
        x, y = sft.get_batch(run.data["train"], cfg.batch_size, state.rng)
        return (x, y), x.size
    batch = get_batch(run.data["train"], cfg.batch_size, cfg.block_size, state.rng, read=read)
    return batch, cfg.batch_size * cfg.block_size


def micro_grads(run, state, x, y, seed, first=False, last=False, hooked=True):
    """One micro-batch's (loss, gradients): in float16 with loss scaling (gradients None: they overflowed),
    through dist.DataParallel, which sends each layer's gradients to the other ranks while the backward
    pass goes on (None: they are in its buffer; first, last: this rank's first and last micro-batch of the
    step; not with hooked=False, a shard of --threads, whose gradients the caller adds), or plainly."""
    gm, mcfg, lora = run.gm, run.mcfg, run.lora
    if run.cfg.mixed_precision:
        return mixed_precision.loss_and_grads_mixed(gm, state.params, x, y, mcfg, state.scaler["scale"], seed=seed,
                                                    lora=lora)
    if run.dp is not None and hooked:
        return run.dp.loss_and_grads(state.params, x, y, mcfg, seed, first=first, last=last), None
    return gm.loss_and_grads(state.params, x, y, mcfg, seed=seed, lora=lora)


def skip_overflow(run, state):
    """The loss scale was too large for float16: the step is skipped (the scale is halved already)."""
    if run.rank == 0:
        append_jsonl(run.log_path, {"event": "overflow", "step": state.step, "scale": state.scaler["scale"]})
    if state.scaler["scale"] < 2.0 ** -24:
        raise UserError(f"mixed precision: gradients overflow float16 at every loss scale (now "
                        f"{state.scaler['scale']:.1e}) at step {state.step}; train without --mixed-precision")


def skip_nonfinite(run, state, loss, norm):
    """A nan/inf loss or gradient: stop, keeping the last good checkpoint, or with --skip-nonfinite skip
    the step."""
    what = (f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
            f"(loss {loss}, grad norm {norm}) at step {state.step}")
    if not run.cfg.skip_nonfinite:
        kept = (f"the last good checkpoint {run.ckpt_path} (step {state.saved_step}) is kept"
                if state.saved_step is not None else "no checkpoint of this run was written")
        raise UserError(f"{what}: stopping; {kept}. Lower --lr, or pass --skip-nonfinite")
    run.write(f"warning: {what}: step skipped (--skip-nonfinite)")
    if run.rank == 0:
        append_jsonl(run.log_path, {"event": "skip", "step": state.step, "loss": loss, "grad_norm": norm})


def log_line(run, state, loss_log, lr, norm, dt_avg, tokens_per_s):
    rec = {"event": "train", "step": state.step, "loss": float(np.mean(loss_log)) if loss_log else math.nan,
           "lr": lr, "grad_norm": norm, "ms_per_step": 1000 * dt_avg,
           "tokens_per_s": tokens_per_s, "time_s": state.elapsed_now()}
    run.write(f"step {state.step}/{run.cfg.max_iters}: loss {rec['loss']:.4f}, lr {lr:.2e}, "
              f"{rec['ms_per_step']:.0f} ms/step, {rec['tokens_per_s']:,.0f} tok/s, {rec['time_s']:.0f} s")
    append_jsonl(run.log_path, rec)


def finish(run, state, status):
    """The summary of the run; after a complete run, a longer final sample."""
    cfg, last = run.cfg, state.last_eval
    result = {"status": status, "step": state.step, "time_s": state.elapsed_now(), "tokens_seen": state.tokens_seen,
              "best_val_loss": state.best_val, "best_step": state.best_step, "last_eval": last,
              "ckpt": str(run.ckpt_path),
              "params": {k: run.gm.to_host(v) for k, v in state.params.items()}}
    if status == "done" and cfg.sample_tokens and run.rank == 0:
        text = make_sample(run, state, 4 * cfg.sample_tokens, seed=cfg.seed)
        result["sample"] = text
        run.log(framed(run, text))
    if status == "done" and cfg.lora_merge:
        result["merged"] = str(write_merged(run, state))
    if status == "done" and last:                      # (Ctrl-C's "interrupted ..." line was the last word)
        best = (f"; best val loss {state.best_val:.4f} at step {state.best_step}: {run.best_path}"
                if state.best_step is not None and state.best_step != last["step"] and run.best_path.is_file() else "")
        run.log(f"done: step {state.step}, val loss {last['val_loss']:.4f}, {last['val_bpb']:.3f} bits/byte, "
                f"{state.elapsed_now():.0f} s of training; checkpoint {run.ckpt_path}{best}")
    return result


def write_merged(run, state):
    """--lora-merge: out_dir/merged.safetensors, the base weights plus (alpha/r) A @ B, a weights-only
    checkpoint with the model config, tokenizer and chat template (no optimizer state)."""
    gm, path = run.gm, run.out_dir / "merged.safetensors"
    merged = {k: gm.to_host(v) for k, v in lora_lib.merge(state.params, run.lora).items()}
    meta = build_meta(run.mcfg, run.tok, step=state.step,
                      merged_from={"adapters": str(run.ckpt_path), "base": run.lora_base["path"]},
                      **({"chat": run.chat.to_meta()} if run.chat is not None else {}))
    save_checkpoint(path, merged, {}, {}, meta)
    run.log(f"wrote {path}: the base with the adapters merged in ({gm.num_params(merged):,} parameters)")
    return path


# ----------------------------------------------------------------------------------------------------
# Command line (parsed by lib/train_config.parse_args: usage errors, exit 2), then prepare and train
# (failures: exit 1)

def run(argv=None, log=print):
    """Everything main() does, raising UserError instead of exiting. Returns train()'s summary plus the
    data metadata."""
    return prepare_and_train(parse_args(argv), log=log)


def prepare_and_train(cl, log=print, comm=None):
    """From a parsed command line (a CommandLine): runs.start settles the checkpoint to continue or start
    from, the config, the folders and the data; then train(). `comm`: under mpiexec, lib/dist.py's
    communicator (only rank 0 logs)."""
    if comm is not None and comm.rank != 0:
        log = lambda *a, **k: None                      # noqa: E731
    with runs.start(cl.cfg, cl.explicit, cl.flags, cl.resume, log, comm, force=cl.force) as s:
        result = train(s.cfg, s.data, s.tok, s.gm, resume=s.resume, log=log, init=s.init, comm=comm)
    result["data_meta"] = s.data["meta"]
    return result


def mpi_world_size():
    """How many processes mpiexec started (1 without it), from the variables its launcher sets (MPICH and
    Intel MPI: PMI_SIZE, also srun --mpi=pmi2; Open MPI; MVAPICH): nothing of MPI is imported for this."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def main(argv=None):
    """Command-line entry, through errors.run_main: exit status 0 on success; `error: <one line>` and 2 for
    a bad command line, 1 for a failure (a bad file, an empty corpus, a full disk ...); 130 on a second
    Ctrl-C. Under mpiexec the ranks train together (lib/dist.py, and MPI, imported only then), and a
    failure on any rank ends the whole job (report_failure)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)     # log lines show up at once, also in a file or a pipe
    job = {"comm": None}                                # under mpiexec: lib/dist.py's communicator, once started

    def work(cl):
        if mpi_world_size() > 1:
            from lib import dist
            job["comm"] = dist.start(cl.cfg.backend, cl.cfg.dist_timeout)
        result = prepare_and_train(cl, comm=job["comm"])
        return 130 if result["status"] == "interrupted" else 0         # Ctrl-C: saved, but not done
    return run_main(parse_args, work, argv, on_error=lambda status, e: report_failure(status, e, job["comm"]))


def report_failure(status, e, comm):
    """run_main's on_error, where train.py differs from the other programs. A usage error (status 2) is
    printed once: under mpiexec every rank parses the same command line, and rank 0 alone reports it. A
    second Ctrl-C prints "interrupted". Under mpiexec (comm) a failure the ranks agreed on (dist.together:
    the first rank that failed reports it) ends every rank in order; any other may leave ranks waiting for
    this one: it is reported (a bug with its traceback) and MPI_Abort ends the job. Returns True for a
    failure reported here, False to leave it to run_main."""
    if comm is not None:
        from lib import dist                            # (imported already: comm is its communicator)
        if isinstance(e, dist.OtherRankFailed):         # the rank that failed says what happened
            return True
        if hasattr(e, "reported_by"):
            if e.reported_by == comm.rank:
                print(f"error: {e}" if comm.rank == 0 else f"error: rank {comm.rank}: {e}", file=sys.stderr)
            return True
    if status == 2:
        return os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) != "0"
    if isinstance(e, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        if comm is not None:
            comm.abort(130)
        return True
    if comm is None:
        return False
    if isinstance(e, (UserError, OSError)):             # OSError: disk full, permissions, a path that is not a folder
        dist.report_and_abort(comm, f"error: {e}" if comm.rank == 0 else f"error: rank {comm.rank}: {e}", 1)
    else:                                               # a bug: its traceback, then the job ends
        import traceback
        dist.report_and_abort(comm, f"rank {comm.rank}: " + traceback.format_exc().rstrip(), 1)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
