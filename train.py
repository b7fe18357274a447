"""
train.py: train the GPT of gpt_numpy.py on a text corpus: raw text in, a checkpoint and a sample out.

nanoGPT-shaped: a config whose fields are the flags (each documented once, in its field), named presets,
plainly named helpers (estimate_loss, get_lr) and one flat training loop (train(), in named steps). On
the way data.py finds the corpus (by default the Python standard library's own .py sources, which every
machine with Python has), trains a BPE tokenizer on it (bpe.py) or reads a character vocabulary off it,
and writes the token ids once to memory-mapped files under data/<name>/. Each of those steps is cached
and redone only when its inputs change. A bad command line prints `error: <one line>` and exits 2, any
later failure exits 1.

    pip install -r requirements.txt && python train.py     # the default job: stdlib sources, BPE, ~2 min on 2 cores
    python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare.txt   # nanoGPT's CPU run
    python train.py --preset shakespeare-char              # the same, downloading Tiny Shakespeare
    python train.py --preset tiny --data notes.txt         # seconds: a smoke test on any text
    python train.py --data ~/books/ --tokenizer char       # a folder (or a file, or a glob "src/**/*.py")
    python train.py --resume                               # continue the run in its out dir (same flags)
    python train.py --init-from out/imported --data notes.txt --lr 3e-4   # fine-tune a checkpoint on new text
    python train.py --init-from out/stdlib-bpe2048 --sft chat.jsonl --lora-rank 8    # LoRA on instruction data
    python train.py --help                                 # every flag and preset
    mpiexec -n 2 python train.py --preset tiny --data notes.txt   # 2 processes, one model (docs/distributed.md)
    python sample.py --ckpt out/stdlib-bpe2048 --prompt "def "   # stream text from a checkpoint

Run with OPENBLAS_NUM_THREADS=1 (or 2) on a small shared machine: oversubscribed BLAS threads are slow.

Outputs in --out-dir (default out/<data>-<tokenizer>): ckpt.safetensors (the latest checkpoint; format in
checkpoint.py) and log.jsonl (one JSON object per log line and per evaluation). Ctrl-C saves a checkpoint
and exits; `--resume` continues it, and a resumed run ends with the same weights, bit for bit, as one that
was never interrupted (given the same machine, backend and thread count).

Under mpiexec (MPI: several processes on one machine or several, or GPUs with NCCL) the ranks train one
model on slices of each step's batch; dist.py holds that machinery and is imported only then. A run's
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
assistant's tokens only (sft.py). docs/finetuning.md has a worked example.
"""


import argparse
import json
import math
import os
import signal
import sys
import textwrap
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, asdict, field, fields, replace
from pathlib import Path

import numpy as np

import gpt_numpy
from lib import generation, lora as lora_lib, memory, mixed_precision, scoring, sft
from lib.checkpoint import (build_meta, check_tokenizer_fits, load_adapters, load_checkpoint, load_lora_base, load_params,
                        lora_base_ref, read_meta, save_checkpoint)
from errors import ArgumentParser, FileFormatError, UserError
from lib.backend import load_backend
from lib.data import data_key, data_name, digest_sources, find_sources, get_batch, get_tokenizer, prepare_data, safe_name, tokenizer_tag
from lib.files import locked_folder, mark_output_folder, naming_errors, write_text_atomic
from lib.tokenizer import encode_prompt, load_tokenizer_file


# ----------------------------------------------------------------------------------------------------
# Config: the defaults are the default job (stdlib + BPE); a preset overrides some; flags override both.
# Each field is one flag (--n-layer for n_layer), documented once, here: its help is the --help text.

def flag(default, help, **argparse_extras):
    """A TrainConfig field: its default, its --help text and argparse extras (choices, metavar)."""
    return field(default=default, metadata={"help": help, **argparse_extras})


@dataclass
class TrainConfig:
    # data
    data: str = flag("stdlib", "corpus: 'stdlib' (Python's own .py sources), 'shakespeare' (downloaded once), "
                     "a text file, a folder of text files, or a glob such as 'src/**/*.py'")
    name: str = flag("", "cache name under --data-dir (default: from --data, e.g. stdlib, tinyshakespeare)")
    tokenizer: str = flag("bpe", "'bpe' (train bpe.py on the corpus, cached), 'char' (one id per character, as "
                          "nanoGPT's shakespeare_char), or the path of a saved tokenizer (a bpe.py file, or the "
                          "tokenizer file in a fine-tuning run's out dir)")
    vocab_size: int = flag(2048, "BPE vocabulary: 256 bytes + merges + 1 special token, e.g. 512 .. 8192")
    bpe_sample_mb: float = flag(20.0, "train the BPE on an evenly spread sample of at most this many MB of the "
                                "corpus (0: all of it)")
    val_fraction: float = flag(0.1, "fraction of the tokens (the last ones) held out for validation "
                               "(nanoGPT's 90/10)")
    # model (gpt_numpy.GPTConfig)
    init_from: str = flag("", "fine-tune: start a new run from this checkpoint (a ckpt.safetensors or its "
                          "folder, e.g. from an earlier run or export.py --import-hf): its weights, model and "
                          "tokenizer; the optimizer, step and sampler start afresh, the training settings "
                          "come from the flags and --preset (--block-size at most the model's context; model "
                          "flags must match it)", metavar="CKPT")
    n_layer: int = flag(4, "L: transformer blocks")
    n_head: int = flag(4, "nh: attention heads (d_model / n_head must be even, for RoPE)")
    d_model: int = flag(128, "C: model width, the residual stream")
    d_ff: int = flag(344, "F: SwiGLU hidden width, ~8/3 d_model (344 keeps the params near a GELU MLP's 4 * 128)")
    block_size: int = flag(128, "T: context length in tokens (the model's max_seq_len)")
    norm: str = flag("rmsnorm", "rmsnorm (Llama) or layernorm (GPT-2)", choices=["rmsnorm", "layernorm"])
    dropout: float = flag(0.0, "dropout rate in training, e.g. 0.0 (small data: 0.1 .. 0.2)")
    checkpoint_activations: bool = flag(False, "gradient checkpointing: recompute each block in the backward "
                                        "pass: less memory, ~1.3x time")
    mixed_precision: bool = flag(False, "float16 forward and backward on a copy of the float32 weights, with "
                                 "dynamic loss scaling (overflowing steps are skipped); for --backend cupy: "
                                 "NumPy has no float16 BLAS")
    # fine-tuning (with --init-from): LoRA adapters instead of every weight, and instruction data
    lora_rank: int = flag(0, "LoRA: train rank-r adapters A (in, r), B (r, out) beside frozen weights, y = x @ W + "
                          "(alpha/r) (x @ A) @ B, e.g. 8 (0: full fine-tuning); the checkpoints hold the adapters "
                          "and the base checkpoint's path and hash")
    lora_alpha: float = flag(16.0, "LoRA: the adapters' output is scaled by alpha / rank")
    lora_targets: str = flag("qkv,proj,gate,up,down", "LoRA: the weights of every block that get an adapter "
                             "(comma-separated, from qkv, proj, gate, up, down)")
    lora_dropout: float = flag(0.0, "LoRA: dropout on the adapters' input in training, e.g. 0.05")
    lora_merge: bool = flag(False, "LoRA: when the run ends, also write merged.safetensors in the out dir: the base "
                            "weights plus (alpha/r) A @ B, a full checkpoint for sample.py, export.py, --init-from")
    sft: str = flag("", "supervised fine-tuning on a JSONL file of chat records {\"messages\": [{\"role\", "
                    "\"content\"}, ...]} or Alpaca records {\"instruction\", \"input\", \"output\"}, "
                    "instead of --data: rendered with the checkpoint's chat template (or --chat-template, or "
                    "the default of docs/finetuning.md), loss on the assistant's tokens only, one padded "
                    "example per row; the samples answer --sample-prompt as a user message", metavar="FILE")
    sft_train_on_prompt: bool = flag(False, "--sft: put the loss on every token, the prompt's too")
    chat_template: str = flag("", "--sft: a Jinja chat template file to use instead of the checkpoint's",
                              metavar="FILE")
    # optimisation: AdamW, linear warmup then cosine decay to min_lr
    batch_size: int = flag(16, "B: sequences per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step (gradients averaged): the effective batch is "
                           "B * grad_accum")
    max_iters: int = flag(600, "optimizer steps in all")
    lr: float = flag(2e-3, "peak learning rate")
    min_lr: float = flag(2e-4, "final learning rate, ~ lr / 10")
    warmup_iters: int = flag(50, "linear warmup steps")
    lr_decay_iters: int = flag(0, "the cosine decay ends here (0: at max_iters)")
    beta1: float = flag(0.9, "AdamW first-moment decay")
    beta2: float = flag(0.99, "AdamW second-moment decay (0.99 for small batches, 0.95 for large)")
    eps: float = flag(1e-8, "AdamW epsilon")
    weight_decay: float = flag(0.1, "AdamW decoupled weight decay, on matrices only (not on norm weights)")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    # evaluation, logging, checkpoints
    eval_interval: int = flag(150, "evaluate (train and val loss, val bits per byte, a sample) every N steps")
    eval_iters: int = flag(20, "batches per split in each evaluation")
    log_interval: int = flag(50, "print a log line every N steps")
    ckpt_interval: int = flag(150, "write a checkpoint every N steps (0: only at the end and on Ctrl-C)")
    sample_tokens: int = flag(100, "tokens sampled at each evaluation; the final sample is 4x (0: none)")
    sample_prompt: str = flag("\n", "prompt of those samples")
    eval_mc: str = flag("", "a multiple-choice JSONL file (eval.py --mc's formats, e.g. HellaSwag's) scored at every "
                        "evaluation as eval.py scores it: acc, acc_norm, acc_token_norm, printed and in log.jsonl",
                        metavar="FILE")
    eval_mc_limit: int = flag(0, "score only the first N items of --eval-mc (0: all)")
    # run
    seed: int = flag(1337, "seed of the weights, the batch sampler and the dropout masks")
    backend: str = flag("numpy", "numpy (CPU) or cupy (NVIDIA GPU, through gpt_cupy.py)", choices=["numpy", "cupy"])
    tf32: bool = flag(False, "cupy: float32 matmuls on TF32 tensor cores (about 10 mantissa bits; ~1.2x faster "
                      "steps on an H200 for shakespeare-char-gpu)")
    fused_kernels: bool = flag(False, "cupy: gpt_cupy's fused kernels (AdamW in one pass) instead of the "
                               "array-level reference")
    out_dir: str = flag("", "checkpoint and log folder (default: out/<data>-<tokenizer>)")
    data_dir: str = flag("data", "root folder of the data caches")
    skip_nonfinite: bool = flag(False, "skip a step whose loss or gradient is nan/inf instead of stopping")
    # under mpiexec (dist.py; ignored by a single process)
    zero: int = flag(0, "under mpiexec: 1 shards AdamW's moments across the ranks (ZeRO stage 1: 1/N of the "
                     "optimizer memory per rank, the same weights), 0 keeps them whole on every rank", choices=[0, 1])
    bucket_mb: float = flag(4.0, "under mpiexec: size of the gradient buckets in MB; each is sent while the "
                            "backward pass of the earlier layers still runs (0: one bucket per layer)")
    dist_timeout: float = flag(300.0, "under mpiexec: seconds a rank waits for the others inside the training "
                               "loop before it declares a rank dead and aborts the job")


PRESETS = {
    "default": ("the default job: BPE (vocab 2048) on Python's standard library, 600 steps; ~2 min on 2 cores, ~3.5 on 1",
                {}),
    "shakespeare-char": ("nanoGPT's shakespeare_char CPU run (val loss ~1.71 here, nanoGPT 1.88); ~1.7 min on 2 cores",
                         dict(data="shakespeare", tokenizer="char", n_layer=4, n_head=4, d_model=128, d_ff=344,
                              block_size=64, batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4,
                              warmup_iters=100, lr_decay_iters=2000, beta2=0.99, weight_decay=0.1,
                              grad_clip=1.0, dropout=0.0, eval_interval=250, eval_iters=20, log_interval=50,
                              ckpt_interval=500, sample_tokens=200)),
    "shakespeare-char-gpu": ("nanoGPT's full shakespeare_char GPU run (nanoGPT: best val 1.4697 on an A100; here "
                             "best 1.4752 at step 1250, 6.4 min for 5000 steps on an H200 with --tf32 "
                             "--fused-kernels); use --backend cupy",
                             dict(data="shakespeare", tokenizer="char", n_layer=6, n_head=6, d_model=384, d_ff=1024,
                                  block_size=256, batch_size=64, max_iters=5000, lr=1e-3, min_lr=1e-4,
                                  warmup_iters=100, lr_decay_iters=5000, beta2=0.99, weight_decay=0.1,
                                  grad_clip=1.0, dropout=0.2, eval_interval=250, eval_iters=200,
                                  log_interval=50, ckpt_interval=1000, sample_tokens=200)),
    "tiny": ("seconds: a 1-layer model for smoke tests (pass --data)",
             dict(tokenizer="char", n_layer=1, n_head=2, d_model=16, d_ff=32, block_size=16, batch_size=4,
                  max_iters=20, lr=1e-2, min_lr=1e-3, warmup_iters=2, eval_interval=10, eval_iters=2,
                  log_interval=5, ckpt_interval=10, sample_tokens=16)),
}

# Flags that a resumed run may change; every other setting must match the checkpoint's. (--data may name
# the corpus by another path: what must match is the corpus hash, file names and contents, checked later.)
RESUME_MAY_CHANGE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
                     "sample_tokens", "sample_prompt", "backend", "tf32", "fused_kernels", "out_dir", "data_dir",
                     "skip_nonfinite", "data", "name", "zero", "bucket_mb", "dist_timeout", "lora_merge", "sft",
                     "eval_mc", "eval_mc_limit",
                     "grad_accum"}      # grad_accum: as long as the global batch stays (resume_world)

# What a fine-tuning run (--init-from) takes from its checkpoint instead of from the preset and flags, with
# the tokenizer; an explicit flag that differs is an error. (block_size is a flag, up to its max_seq_len.)
FROM_CHECKPOINT = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "norm")


# ----------------------------------------------------------------------------------------------------
# Training helpers

def estimate_loss(gm, params, data, cfg, mcfg, lora=None):
    """Mean loss over eval_iters batches of each split, without dropout. The batches come from a fixed
    seed, so every evaluation of a run sees the same windows and the curve is not sampling noise."""
    out = {}
    for k, split in enumerate(("train", "val")):
        rng = np.random.default_rng([cfg.seed, 1, k])
        losses = [gm.loss_fn(params, *get_batch(data[split], cfg.batch_size, cfg.block_size, rng), mcfg, lora=lora)
                  for _ in range(cfg.eval_iters)]
        out[split] = float(np.mean(losses))
    return out


def estimate_sft_loss(gm, params, data, cfg, mcfg, lora=None):
    """--sft: the loss per target token (the assistant's), over eval_iters batches drawn from the train
    split with a fixed seed, and over the val split in order (at most eval_iters batches)."""
    rng = np.random.default_rng([cfg.seed, 1, 0])
    batches = {"train": [sft.get_batch(data["train"], cfg.batch_size, rng) for _ in range(cfg.eval_iters)],
               "val": sft.eval_batches(data["val"], cfg.batch_size, cfg.eval_iters)}
    out = {}
    for split, bs in batches.items():
        n = [int((y >= 0).sum()) for _, y in bs]                       # a batch's mean is over its targets
        out[split] = float(sum(gm.loss_fn(params, x, y, mcfg, lora=lora) * k for (x, y), k in zip(bs, n)) / sum(n))
    return out


def get_lr(step, cfg):
    """Linear warmup to lr over warmup_iters, cosine decay to min_lr at lr_decay_iters (then flat)."""
    decay = cfg.lr_decay_iters or cfg.max_iters
    return gpt_numpy.lr_schedule(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay)


def step_seed(seed, step, micro):
    """The dropout seed of one micro-step, a function of (run seed, step, micro-step) only, so a resumed
    run draws exactly the masks the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def sample_text(gm, params, mcfg, tok, prompt, n, seed, temperature=0.8, top_k=200, lora=None):
    """The prompt and n sampled tokens, as text (KV-cache generation)."""
    ids = encode_prompt(tok, prompt)
    new = list(generation.generate_stream(gm, params, ids, mcfg, n, temperature=temperature, top_k=top_k, seed=seed, lora=lora))
    return tok.decode_bytes(ids + new).decode("utf-8", "replace")


def sample_answer(gm, params, mcfg, tok, chat, question, n, lora=None):
    """--sft: the model's answer to `question` sent as a user message in the chat template: greedy, at
    most n tokens, up to the template's end of turn."""
    ids = sft.chat_prompt_ids(tok, chat, question)
    stop = sft.stop_ids(tok, chat)
    new = list(generation.generate_stream(gm, params, ids, mcfg, n, temperature=0, stop_ids=stop, lora=lora))
    return tok.decode_bytes([i for i in new if i not in stop]).decode("utf-8", "replace")


def lora_config(cfg):
    """The run's lib.lora.LoraConfig, or None for full training (--lora-rank 0)."""
    if not cfg.lora_rank:
        return None
    try:
        return lora_lib.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                    dropout=cfg.lora_dropout)
    except ValueError as e:
        raise UserError(f"bad LoRA setting: {e}") from None


def model_config(cfg, vocab_size):
    """A new run's GPTConfig, from the flags."""
    try:
        return gpt_numpy.GPTConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                   d_model=cfg.d_model, d_ff=cfg.d_ff, max_seq_len=cfg.block_size,
                                   norm=cfg.norm, dropout=cfg.dropout, checkpoint=cfg.checkpoint_activations)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config: {e}") from None


def kill_hook(kind, step):
    """For the tests, through the environment: TRAIN_TEST_KILL="step:K" SIGKILLs this process when it
    reaches step K (after that step's checkpoint, if one is due); "save:K" SIGKILLs it inside the checkpoint
    write at step K, when the temporary file is complete but has not replaced the last good checkpoint;
    "sigint:K" sends it a SIGINT (Ctrl-C) at step K; "hang:K" stops it (SIGSTOP) at step K, as a rank that
    hangs under mpiexec."""
    want = os.environ.get("TRAIN_TEST_KILL", "")
    if want == f"{kind}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "step" and want == f"sigint:{step}":
        os.kill(os.getpid(), signal.SIGINT)
    if kind == "step" and want == f"hang:{step}":
        os.kill(os.getpid(), signal.SIGSTOP)


def mpi_world_size():
    """How many processes mpiexec started (1 without it), from the variables its launcher sets (MPICH and
    Intel MPI: PMI_SIZE, also srun --mpi=pmi2; Open MPI; MVAPICH): nothing of MPI is imported for this."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def check_memory(cfg, mcfg, gm=None):
    """Refuse a run whose weights, AdamW state and activations cannot fit in the machine's memory (the
    GPU's for gm = gpt_cupy): memory.py's estimate, one line naming it, instead of an out-of-memory kill."""
    need = memory.training_bytes(mcfg, cfg.batch_size, cfg.block_size, cfg.mixed_precision)
    memory.check_fits(need, f"this run ({mcfg.n_layer} layers, d_model {mcfg.d_model}, batch {cfg.batch_size} x "
                            f"{cfg.block_size} tokens)", gm,
                      hint="use a smaller model, --batch-size or --block-size (or --checkpoint-activations)")


def append_jsonl(path, record):
    with naming_errors(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------
# The training loop: train() and its steps, in the order it calls them

@dataclass
class Run:
    """What stays fixed while a run trains."""
    cfg: TrainConfig
    mcfg: gpt_numpy.GPTConfig
    gm: object                  # gpt_numpy or gpt_cupy
    data: dict                  # data.prepare_data's {"train", "val", "meta"}
    tok: object
    out_dir: Path
    resumed: bool               # continues a checkpoint of this run (--resume)
    log: object = print         # log(line); while the progress bar shows, write(line) prints above it
    write: object = print
    comm: object = None         # under mpiexec: dist.py's communicator (rank, size); None: one process
    dp: object = None           # under mpiexec: dist.DataParallel, which averages the gradients
    lora: object = None         # lib.lora.LoraConfig of a LoRA run, else None
    lora_base: dict = None      # a LoRA run's base checkpoint: checkpoint.lora_base_ref's path and hash
    chat: object = None         # --sft: the sft.Chat the records are rendered with
    mc: list | None = None      # --eval-mc's items, encoded once (scoring.MCRequest)

    ckpt_path = property(lambda self: self.out_dir / "ckpt.safetensors")
    log_path = property(lambda self: self.out_dir / "log.jsonl")
    rank = property(lambda self: self.comm.rank if self.comm else 0)     # rank 0 logs, evaluates, saves
    world = property(lambda self: self.comm.size if self.comm else 1)
    tokens_per_step = property(lambda self: self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum
                               * self.world)


@dataclass
class State:
    """What changes while a run trains, all of it checkpointed: the weights, AdamW, the loss scaler, the
    batch sampler (a seeded generator) and the progress."""
    params: dict
    opt: dict
    scaler: dict
    rng: np.random.Generator
    step: int = 0
    elapsed: float = 0.0            # seconds of training before this process started
    tokens_seen: int = 0
    best_val: float | None = None
    last_eval: dict | None = None   # the latest evaluation: step, train and val loss, val bits per byte
    saved_step: int | None = None   # the step of this run's checkpoint in out_dir (None: none written yet)
    t_start: float = field(default_factory=time.time)    # when this process started training
    trained_keys: list = None       # the names of the weights the optimizer updates (set with opt)

    def elapsed_now(self):
        return round(self.elapsed + time.time() - self.t_start, 3)

    def trained(self):
        """The parameters the optimizer updates: every weight, or a LoRA run's adapters (the base weights
        in params stay frozen)."""
        return {k: self.params[k] for k in self.trained_keys}


def train(cfg, data, tok, gm, resume=None, log=print, init=None, comm=None):
    """Train (or continue `resume`, a checkpoint.Checkpoint) and return a summary dict. `init` (a
    Checkpoint too) fine-tunes: its weights and model config, a fresh optimizer and step 0. `comm`:
    under mpiexec, dist.py's communicator (the ranks train one model; rank 0 logs, evaluates and saves).

    Each step: grad_accum micro-batches from the seeded sampler -> averaged gradients -> finite check ->
    clip -> AdamW at get_lr(step). Every eval_interval steps: train/val loss, val bits per byte, a sample.
    Every ckpt_interval steps, at the end and on Ctrl-C: an atomic checkpoint.
    """
    from tqdm import tqdm
    source = resume or init                                            # the checkpoint the model comes from
    mcfg = (source.model_config(dropout=cfg.dropout, checkpoint=cfg.checkpoint_activations) if source
            else model_config(cfg, tok.vocab_size))
    check_memory(cfg, mcfg, gm)
    if source:
        check_tokenizer_fits(tok, mcfg, source.path)   # a char vocabulary smaller than the model: refused
    if not cfg.sft:
        check_corpus_length(cfg, data)
    run = Run(cfg, mcfg, gm, data, tok, open_out_dir(cfg), resumed=resume is not None, log=log, comm=comm,
              lora=lora_config(cfg), chat=data.get("chat"), mc=load_eval_mc(cfg, tok, mcfg, source))
    state = resumed_state(run, resume) if resume else fresh_state(run, init)
    if resume and state.step >= cfg.max_iters:
        log(f"warning: {resume.path} is at step {state.step}, and --max-iters {cfg.max_iters} ends there: nothing to "
            f"train; pass a larger --max-iters to continue the run")
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


def check_corpus_length(cfg, data):
    for split in ("train", "val"):
        if len(data[split]) < cfg.block_size + 1:
            raise UserError(f"corpus too short: the {split} split has {len(data[split])} tokens, and one "
                            f"sequence needs block_size + 1 = {cfg.block_size + 1}; use more text or a "
                            f"smaller --block-size")


def open_out_dir(cfg):
    """The run's folder, without the temporary files of a process killed while saving."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".ckpt.safetensors.tmp-*"):
        stale.unlink(missing_ok=True)
    return out_dir


def fresh_state(run, init):
    """Step 0: new weights (or, fine-tuning, the init checkpoint's), a fresh optimizer, sampler and log."""
    gm, cfg = run.gm, run.cfg
    if init is None:
        params = gm.init_params(run.mcfg, seed=cfg.seed)
    else:                                               # fine-tuning: the weights only; all else starts afresh
        params = load_params(gm, init.params, run.mcfg, init.path)
        run.log(f"initialized from {init.path} (its step {init.step if init.step is not None else '?'}): "
                f"its weights, architecture and tokenizer; a fresh optimizer from step 0")
    trained = params
    if run.lora is not None:                            # LoRA: those weights stay frozen; fresh adapters train
        run.lora_base = lora_base_ref(init, run.out_dir)
        trained = lora_lib.init(gm, run.mcfg, run.lora, seed=cfg.seed)
        params.update(trained)
    if run.rank == 0:
        run.log_path.write_text("")                                   # a fresh run starts a fresh log
    return State(params, gm.adamw_init(trained), mixed_precision.loss_scaler_init(), np.random.default_rng(cfg.seed),
                 trained_keys=list(trained))


def resumed_state(run, ck):
    """The state a checkpoint of this run saved; the log cut back to its step."""
    gm, meta = run.gm, ck.meta
    if not ck.has_training_state:
        raise UserError(f"cannot resume: the checkpoint lacks {', '.join(ck.missing_training_state())} (a weights-"
                        f"only file? fine-tune from it with --init-from instead)")
    if run.lora is not None:                            # the adapters, and the base they were trained on
        base = load_lora_base(ck)
        run.lora_base = meta["lora"]["base"]
        params = load_params(gm, base.params, run.mcfg, base.path)
        trained = load_adapters(gm, ck.params, run.mcfg, run.lora, ck.path)
        params.update(trained)
    else:
        params = trained = load_params(gm, ck.params, run.mcfg, ck.path)
    opt = {"t": int(meta["adam_t"]), "m": {k: gm.to_device(ck.adam_m[k]) for k in trained},
           "v": {k: gm.to_device(ck.adam_v[k]) for k in trained}}
    rng = np.random.default_rng(run.cfg.seed)
    rng.bit_generator.state = meta["rng"]["batch"]
    p = meta["progress"]
    state = State(params, opt, dict(meta.get("loss_scaler") or mixed_precision.loss_scaler_init()), rng, step=int(meta["step"]),
                  elapsed=p["elapsed_s"], tokens_seen=p["tokens_seen"], best_val=p["best_val_loss"],
                  last_eval=p.get("last_eval"), saved_step=int(meta["step"]), trained_keys=list(trained))
    run.log(f"resumed from {ck.path} at step {state.step}")
    if run.rank != 0:
        return state
    # drop what the interrupted run logged after its checkpoint: those steps are about to be redone
    kept = [line for line in (run.log_path.read_text().splitlines() if run.log_path.is_file() else [])
            if line.strip() and json.loads(line).get("step", 0) <= state.step]
    write_text_atomic(run.log_path, "".join(line + "\n" for line in kept))
    append_jsonl(run.log_path, {"event": "resume", "step": state.step, "world_size": run.world})
    return state


def start_data_parallel(run, state):
    """Under mpiexec: the gradient averaging of dist.py over the weights this run trains (a LoRA run's
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
        run.log("note: --mixed-precision on the CPU is slow (NumPy has no float16 matrix multiply); it is meant "
                "for --backend cupy")
    if run.lora is not None:
        n = run.gm.num_params(state.trained())
        run.log(f"LoRA: rank {run.lora.rank}, alpha {run.lora.alpha:g} on {','.join(run.lora.targets)}: {n:,} "
                f"trainable parameters ({100 * n / n_model:.2f}% of the model's, whose weights stay frozen); "
                f"AdamW state {8 * n / 2**20:.2f} MiB")
    ranks = f" x {run.world} ranks" if run.world > 1 else ""
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


def training_loop(run, state, bar, stop):
    """Evaluate, checkpoint and step until max_iters or Ctrl-C: returns "done" or "interrupted"."""
    cfg, start_step = run.cfg, state.step
    state.t_start = time.time()
    t_steps, step_log, loss_log, tok_log = 0.0, state.step, [], 0      # since the last log line
    while True:
        if state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters:
            if not (run.resumed and state.step == start_step):         # done before the checkpoint was saved
                if run.rank == 0:
                    evaluate(run, state)
                if run.comm is not None:                               # the others wait, without spinning
                    run.comm.barrier("rank 0 evaluates", timeout=None)
        saved = False
        due = state.step == cfg.max_iters or (cfg.ckpt_interval and state.step % cfg.ckpt_interval == 0)
        # a fresh run with --max-iters 0 saves its step 0: the out dir's checkpoint is then its own
        if due and (state.step != start_step or (not run.resumed and state.step == cfg.max_iters)):
            save(run, state)
            saved = True
        kill_hook("step", state.step)
        if stop_requested(run, stop):                                  # Ctrl-C: save (once) and leave
            if state.step == start_step:
                run.write(f"interrupted at step {state.step}, before any step: nothing new to save")
            else:
                if not saved:
                    save(run, state)
                run.write(f"interrupted at step {state.step}: checkpoint saved to {run.ckpt_path}; continue "
                          f"with --resume {run.out_dir}")
            return "interrupted"
        if state.step >= cfg.max_iters:
            return "done"

        t0, tokens0 = time.time(), state.tokens_seen
        loss, norm, lr, overflow = optimizer_step(run, state)
        dt, tokens = max(time.time() - t0, 1e-9), state.tokens_seen - tokens0
        t_steps += dt                                                  # step time only, not evals or saves
        tok_log += tokens
        if math.isfinite(loss) and not overflow:                       # a skipped step's loss is partial
            loss_log.append(loss)
        bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens / dt:,.0f} tok/s", refresh=False)
        bar.update(1)
        if run.rank == 0 and (state.step % cfg.log_interval == 0 or state.step == cfg.max_iters):
            log_line(run, state, loss_log, lr, norm, t_steps / max(1, state.step - step_log), tok_log / t_steps)
            t_steps, step_log, loss_log, tok_log = 0.0, state.step, [], 0


def stop_requested(run, stop):
    """Ctrl-C seen? Under mpiexec every rank gets it, perhaps in different steps: they stop together if
    any one has seen it."""
    if run.comm is None:
        return stop.is_set()
    return run.comm.allreduce_host([float(stop.is_set())], "starting the next step (checking for Ctrl-C)")[0] > 0


def load_eval_mc(cfg, tok, mcfg, source=None):
    """--eval-mc's items, read and encoded once, so that a bad file fails before the first step. source:
    the checkpoint the model comes from, whose metadata may name its BOS (scoring.start_ids)."""
    if not cfg.eval_mc:
        return None
    try:
        items = scoring.read_mc(cfg.eval_mc, cfg.eval_mc_limit or None)
        return scoring.encode_items(tok, items, mcfg.max_seq_len, start=scoring.start_ids(tok, source and source.meta))
    except UserError as e:
        raise type(e)(f"--eval-mc: {e}") from None


def evaluate(run, state):
    """Train and val loss and val bits per byte (and --eval-mc's accuracy), printed and logged; then a
    short sample."""
    cfg, t0 = run.cfg, time.time()
    losses = (estimate_sft_loss if cfg.sft else estimate_loss)(run.gm, state.params, run.data, cfg, run.mcfg, run.lora)
    mc = {}
    if run.mc:                                          # the same numbers as eval.py --mc on this checkpoint
        weights = state.params if run.lora is None else lora_lib.merge(state.params, run.lora)
        r = scoring.mc_metrics(scoring.score_requests(run.gm, weights, run.mcfg, run.mc))
        mc = {f"mc_{k}": r[k] for k in ("acc", "acc_norm", "acc_token_norm", "items")}
    bpb = losses["val"] / run.data["meta"]["val_bytes_per_token"] / math.log(2)
    state.best_val = losses["val"] if state.best_val is None else min(state.best_val, losses["val"])
    state.last_eval = {"step": state.step, "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb}
    run.write(f"step {state.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"val {bpb:.3f} bits/byte"
              + (f", mc acc {mc['mc_acc']:.4f} (norm {mc['mc_acc_norm']:.4f}, token norm "
                 f"{mc['mc_acc_token_norm']:.4f})" if mc else "") + f" ({time.time() - t0:.1f} s)")
    append_jsonl(run.log_path, {"event": "eval", **state.last_eval, **mc, "lr": get_lr(state.step, cfg),
                                "time_s": state.elapsed_now(), "tokens_seen": state.tokens_seen})
    if cfg.sample_tokens and state.step < cfg.max_iters:
        run.write(framed(run, make_sample(run, state, cfg.sample_tokens, seed=cfg.seed + state.step)))


def make_sample(run, state, n, seed):
    """The evaluation's sample: a continuation of --sample-prompt, or with --sft the model's answer to it
    as a user message."""
    cfg = run.cfg
    if cfg.sft:
        return sample_answer(run.gm, state.params, run.mcfg, run.tok, run.chat, cfg.sample_prompt, n, run.lora)
    return sample_text(run.gm, state.params, run.mcfg, run.tok, cfg.sample_prompt, n, seed=seed, lora=run.lora)


def framed(run, text):
    head = f"--- answer to {run.cfg.sample_prompt!r} ---" if run.cfg.sft else "--- sample ---"
    return head + "\n" + text.strip("\n") + "\n--------------"


def save(run, state):
    """An atomic checkpoint of the state (checkpoint.py's file, build_meta's metadata)."""
    cfg, gm, d = run.cfg, run.gm, run.data["meta"]
    sampler = ({"kind": "uniform random examples", "train_examples": len(run.data["train"])} if cfg.sft else
               {"kind": "uniform random windows", "train_tokens": len(run.data["train"])})
    meta = build_meta(
        run.mcfg, run.tok, step=state.step, adam_t=state.opt["t"], train_config=asdict(cfg),
        rng={"batch": state.rng.bit_generator.state}, loss_scaler=state.scaler,
        sampler={**sampler, "batch_size": cfg.batch_size, "block_size": cfg.block_size}, world_size=run.world,
        data={"name": d["name"], "key": d["key"], "train_tokens": d["train_tokens"], "val_tokens": d["val_tokens"],
              "val_bytes_per_token": d["val_bytes_per_token"]},
        progress={"elapsed_s": state.elapsed_now(), "tokens_seen": state.tokens_seen,
                  "best_val_loss": state.best_val, "last_eval": state.last_eval}, **fine_tuning_meta(run))
    hook = (lambda tmp: kill_hook("save", state.step)) if os.environ.get("TRAIN_TEST_KILL") else None
    host = lambda arrays: {k: gm.to_host(v) for k, v in arrays.items()}     # noqa: E731
    # a LoRA run saves its adapters, not the frozen base (the metadata names the base and its hash)
    if run.dp is None:
        tensors = host(state.trained()), host(state.opt["m"]), host(state.opt["v"])
    else:                                               # the whole state on rank 0 (ZeRO: gathered)
        tensors = run.dp.gather_state(state.trained(), state.opt)
    if run.rank == 0:
        save_checkpoint(run.ckpt_path, *tensors, meta, before_replace=hook)
    state.saved_step = state.step


def fine_tuning_meta(run):
    """The metadata a fine-tuning run adds: "lora" (its config and base) and "chat" (the template)."""
    extra = {}
    if run.lora is not None:
        extra["lora"] = {"config": run.lora.to_dict(), "base": run.lora_base}
    if run.chat is not None:
        extra["chat"] = run.chat.to_meta()
    return extra


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


def optimizer_step(run, state):
    """One step: accumulated gradients -> finite check -> clip -> AdamW, or a skipped step (a float16
    overflow, or a non-finite loss with --skip-nonfinite). Returns (loss, grad norm, lr, overflow)."""
    cfg, gm, dp = run.cfg, run.gm, run.dp
    lr = get_lr(state.step, cfg)
    loss, grads, overflow, tokens = accumulate_grads(run, state)
    norm = math.nan
    if not overflow and dp is not None:                                # the mean over all ranks' micro-batches
        dp.scale_grads(1.0 / (cfg.grad_accum * run.world))
        norm = dp.clip_grad_norm(cfg.grad_clip)                        # the same on every rank
    elif not overflow:
        if cfg.grad_accum > 1:
            for g in grads.values():
                g *= 1.0 / cfg.grad_accum
        norm = gm.clip_grad_norm(grads, cfg.grad_clip)
    if cfg.mixed_precision:
        mixed_precision.loss_scaler_update(state.scaler, not overflow)
    if overflow and math.isfinite(loss):
        # the loss scale was too large for float16: the step is skipped and the scale halved
        if run.rank == 0:
            append_jsonl(run.log_path, {"event": "overflow", "step": state.step, "scale": state.scaler["scale"]})
        if state.scaler["scale"] < 2.0 ** -24:
            raise UserError(f"mixed precision: gradients overflow float16 at every loss scale (now "
                            f"{state.scaler['scale']:.1e}) at step {state.step}; train without --mixed-precision")
    elif not (math.isfinite(loss) and math.isfinite(norm)):
        skip_nonfinite(run, state, loss, norm)
    elif dp is not None:
        dp.adamw_step(state.trained(), state.opt, lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
    else:
        gm.adamw_step(state.trained(), grads, state.opt, lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
    state.step += 1
    state.tokens_seen += tokens
    return loss, norm, lr, overflow


def accumulate_grads(run, state):
    """The step's global batch, grad_accum x world micro-batches drawn from the sampler in order, of which
    this rank takes grad_accum in a row (rank r: r * grad_accum ...; one process: all): (mean loss over the
    global batch, summed gradients, overflow?, the global batch's positions: --sft's padded rows are as
    long as the longest example drawn, not block_size). Every rank draws every micro-batch's windows, so the
    samplers stay equal, and reads only its own; dropout is keyed by the global micro-batch index, so a
    run sees the same sequences and masks at any world size. Under mpiexec the sum runs over all ranks
    (dist.DataParallel; its grads are returned). After a float16 overflow (mixed precision) the step does
    no more work, but still draws its batches, so the sampler stays in step with a run where it did not
    overflow."""
    cfg, gm, dp = run.cfg, run.gm, run.dp
    n = cfg.grad_accum * run.world                                     # micro-batches in the global batch
    mine = range(run.rank * cfg.grad_accum, (run.rank + 1) * cfg.grad_accum)
    grads, loss, overflow = None, 0.0, False
    tokens = 0 if cfg.sft else run.tokens_per_step
    for micro in range(n):
        batch = (sft.get_batch(run.data["train"], cfg.batch_size, state.rng) if cfg.sft
                 else get_batch(run.data["train"], cfg.batch_size, cfg.block_size, state.rng, read=micro in mine))
        if cfg.sft:
            tokens += batch[0].size                                    # every rank draws every batch
        if micro not in mine or overflow:
            continue
        x, y = batch
        seed = step_seed(cfg.seed, state.step, micro)
        if cfg.mixed_precision:                                        # grads None: float16 overflowed
            l, g = mixed_precision.loss_and_grads_mixed(gm, state.params, x, y, run.mcfg, state.scaler["scale"], seed=seed,
                                           lora=run.lora)
            overflow = g is None
        elif dp is not None:                                           # into dp's buffer; the last one sends
            l, g = dp.loss_and_grads(state.params, x, y, run.mcfg, seed, first=micro == mine[0],
                                     last=micro == mine[-1]), None
        else:
            l, g = gm.loss_and_grads(state.params, x, y, run.mcfg, seed=seed, lora=run.lora)
        loss += l / n
        if overflow or g is None:
            continue
        if dp is not None:
            dp.accumulate(g, first=micro == mine[0])
        elif grads is None:
            grads = g
        else:
            for k in grads:
                grads[k] += g[k]
    if dp is not None:                                                 # summed over the ranks
        loss, overflow = dp.finish(loss, overflow)
        grads = dp.grads
    return loss, grads, overflow, tokens


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
              "best_val_loss": state.best_val, "last_eval": last, "ckpt": str(run.ckpt_path),
              "params": {k: run.gm.to_host(v) for k, v in state.params.items()}}
    if status == "done" and cfg.sample_tokens and run.rank == 0:
        text = make_sample(run, state, 4 * cfg.sample_tokens, seed=cfg.seed)
        result["sample"] = text
        run.log(framed(run, text))
    if status == "done" and cfg.lora_merge:
        result["merged"] = str(write_merged(run, state))
    if last:
        run.log(f"done: step {state.step}, val loss {last['val_loss']:.4f}, {last['val_bpb']:.3f} bits/byte, "
                f"{state.elapsed_now():.0f} s of training; checkpoint {run.ckpt_path}")
    return result


# ----------------------------------------------------------------------------------------------------
# Command line: parse (usage errors: exit 2), then prepare and train (failures: exit 1)

def build_parser():
    presets = "\n".join(f"  {k:<18}{desc}\n" + textwrap.fill(" ".join(f"{n}={v}" for n, v in values.items()) or
                                                           "the defaults above", 100, initial_indent=" " * 20,
                                                           subsequent_indent=" " * 20)
                        for k, (desc, values) in PRESETS.items())
    p = ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the NumPy GPT of gpt_numpy.py on a text corpus (default: the Python standard "
                    "library's sources, with a BPE tokenizer).",
        epilog=f"presets (--preset NAME; explicit flags override the preset's values):\n{presets}\n\n"
               "examples:\n  python train.py\n"
               "  python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare.txt\n"
               "  python train.py --preset tiny --data notes.txt --out-dir out/tiny\n"
               "  python train.py --resume\n"
               "  mpiexec -n 2 python train.py --preset tiny --data notes.txt --zero 1     # 2 ranks\n\n"
               "fine-tuning (--init-from: the weights, model and tokenizer of a checkpoint; a fresh optimizer):\n"
               "  python export.py --import-hf path/to/hf-llama --out out/imported --max-seq-len 256\n"
               "  python train.py --init-from out/imported --data notes.txt --lr 3e-4 --min-lr 3e-5 \\\n"
               "      --warmup-iters 20 --max-iters 200      # writes out/notes-from-imported\n"
               "  python train.py --resume out/notes-from-imported      # continue it after Ctrl-C\n"
               "  python sample.py --ckpt out/notes-from-imported --prompt \"Once\"\n\n"
               "LoRA and instruction data (docs/finetuning.md):\n"
               "  python train.py --init-from out/stdlib-bpe2048 --sft docs/examples/python_howto.jsonl \\\n"
               "      --lora-rank 8 --lr 3e-3 --max-iters 300 --sample-prompt \"How do I sort a list?\" --lora-merge\n"
               "  python export.py --ckpt out/python_howto-from-stdlib-bpe2048 --out export/merged --peft-adapter export/adapter")
    p.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                   help="start from a named configuration (listed below)")
    p.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, metavar="CKPT",
                   help="continue from --out-dir's ckpt.safetensors, or from the checkpoint file CKPT")
    for f in fields(TrainConfig):
        help_ = f.metadata["help"] + (f" (default: {f.default!r})" if f.default != "" else "")
        flag_ = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag_, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
            continue
        typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        choices = f.metadata.get("choices")
        metavar = None if choices else f.metadata.get("metavar") or {int: "N", float: "X"}.get(
            typ, f.name.split("_")[-1].upper())
        p.add_argument(flag_, type=typ, choices=choices, default=argparse.SUPPRESS, metavar=metavar, help=help_)
    return p


def parse_config(argv):
    """argv -> (cfg, explicit, flags, resume): the config (defaults <- preset <- flags), the names of the
    settings the user chose (through a preset or a flag), of those given as flags, and the --resume
    argument (or None)."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset", "default")
    resume = args.pop("resume", None)
    values = dict(PRESETS[preset][1])
    values.update(args)
    return TrainConfig(**{**asdict(TrainConfig()), **values}), set(values), set(args), resume


def parse_args(argv):
    """parse_config, then every check the command line alone allows; UserError here is a usage error."""
    cfg, explicit, flags, resume = parse_config(argv)
    check_config(cfg)
    if resume is not None and cfg.init_from:
        raise UserError("--init-from starts a new run from a checkpoint's weights and --resume continues a run: "
                        "pass one of them (a fine-tuning run resumes with --resume alone)")
    if resume is None and not cfg.init_from:
        model_config(cfg, max(cfg.vocab_size, 256))     # a bad model shape fails now, before data preparation
        if cfg.backend == "numpy":                      # and so does a size that cannot fit (vocab: a lower bound)
            check_memory(cfg, model_config(cfg, cfg.vocab_size if cfg.tokenizer == "bpe" else 1))
    if resume is None and not cfg.init_from and (cfg.lora_rank or cfg.sft):
        raise UserError(f"{'--lora-rank' if cfg.lora_rank else '--sft'} fine-tunes a model: pass --init-from CKPT "
                        f"(a checkpoint of train.py or export.py --import-hf)")
    if cfg.sft and "data" in flags:
        raise UserError("--sft FILE is the training data; --data names a text corpus: pass one of them")
    if resume is None and cfg.lora_merge and not cfg.lora_rank:
        raise UserError("--lora-merge merges a LoRA run's adapters: it needs --lora-rank R")
    return cfg, explicit, flags, resume


def check_config(cfg):
    for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "block_size", "batch_size", "grad_accum",
                 "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval", "sample_tokens", "eval_mc_limit"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if not (cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be > 0 and finite, and 0 <= --min-lr <= --lr; got lr {cfg.lr}, min-lr {cfg.min_lr}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not (cfg.eps > 0 and math.isfinite(cfg.eps)):
        raise UserError(f"--eps must be > 0, got {cfg.eps}")
    for name in ("weight_decay", "grad_clip", "bpe_sample_mb"):
        v = getattr(cfg, name)
        if not (v >= 0 and math.isfinite(v)):
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 and finite, got {v}")
    if not (cfg.bucket_mb >= 0 and math.isfinite(cfg.bucket_mb)):
        raise UserError(f"--bucket-mb must be >= 0, got {cfg.bucket_mb}")
    if not cfg.dist_timeout > 0:
        raise UserError(f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.seed < 0:
        raise UserError(f"--seed must be >= 0, got {cfg.seed}")
    if 0 < cfg.lr_decay_iters < cfg.warmup_iters:
        raise UserError(f"--lr-decay-iters ({cfg.lr_decay_iters}) must not end before --warmup-iters ({cfg.warmup_iters})")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        raise UserError(f"--vocab-size must be at least 257 for BPE (256 bytes + 1 special token), got {cfg.vocab_size}")
    if cfg.backend not in ("numpy", "cupy"):
        raise UserError(f"unknown backend {cfg.backend!r}: choose numpy or cupy")
    for name in ("tf32", "fused_kernels"):
        if getattr(cfg, name) and cfg.backend != "cupy":
            raise UserError(f"--{name.replace('_', '-')} is for --backend cupy (an NVIDIA GPU)")
    if cfg.lora_rank < 0:
        raise UserError(f"--lora-rank must be >= 0 (0: no LoRA), got {cfg.lora_rank}")
    lora_config(cfg)                                    # alpha, targets and dropout, when LoRA is on


def resume_config(cfg, explicit, flags, meta):
    """The checkpoint's config, with the flags that may change on resume applied; any other explicit flag
    that differs from the checkpoint is an error (it would silently make the run a different one)."""
    known = {f.name for f in fields(TrainConfig)}
    check_saved_config(meta["train_config"])
    saved = TrainConfig(**{**asdict(TrainConfig()), **{k: v for k, v in meta["train_config"].items() if k in known}})
    if saved.init_from:         # a fine-tuning run took its model and tokenizer from a checkpoint, not a preset
        explicit = (explicit - {*FROM_CHECKPOINT, "tokenizer"}) | (explicit & flags)
    clash = [k for k in sorted(explicit - RESUME_MAY_CHANGE) if getattr(cfg, k) != getattr(saved, k)]
    if clash:
        k = clash[0]
        raise UserError(f"cannot resume with a different config: --{k.replace('_', '-')} is "
                        f"{getattr(cfg, k)!r} here but {getattr(saved, k)!r} in the checkpoint"
                        + (f" (and {len(clash) - 1} more)" if len(clash) > 1 else "")
                        + "; drop the flag or start a new run in another --out-dir")
    for k in explicit & RESUME_MAY_CHANGE:
        setattr(saved, k, getattr(cfg, k))
    return saved


def check_saved_config(values):
    """A checkpoint's train_config: each known setting of its flag's type (an int may stand for a float),
    else FileFormatError naming it, before anything uses it."""
    for f in fields(TrainConfig):
        if f.default is None:                          # a setting that may be anything (none yet)
            continue
        v, want = values.get(f.name, f.default), type(f.default)
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) if want is float else type(v) is want
        if not ok:
            raise FileFormatError(f"the checkpoint's train_config has {f.name} = {json.dumps(v)[:60]}, expected "
                                  f"{want.__name__}")


def init_config(cfg, flags, ck):
    """A fine-tuning run's config and tokenizer: the checkpoint's model (FROM_CHECKPOINT) and tokenizer
    with this run's training settings. A flag that contradicts the checkpoint is an error; a preset's
    model settings simply give way."""
    try:
        mc, tok = ck.model_config(), ck.tokenizer()
    except UserError as e:
        raise UserError(f"cannot fine-tune from {ck.path}: it has no usable model config and tokenizer ({e}); "
                        f"expected a checkpoint of train.py or export.py --import-hf") from None
    for k in FROM_CHECKPOINT:
        if k in flags and getattr(cfg, k) != getattr(mc, k):
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)} conflicts with --init-from {ck.path}, whose "
                            f"model has {k} {getattr(mc, k)}: a fine-tuned model keeps its architecture; drop the flag")
    if "tokenizer" in flags:
        same = (cfg.tokenizer == tok.kind if cfg.tokenizer in ("char", "bpe")
                else load_tokenizer_file(cfg.tokenizer).to_text() == tok.to_text())
        if not same:
            raise UserError(f"--tokenizer {cfg.tokenizer} conflicts with --init-from {ck.path}, whose model comes "
                            f"with its own {tok.kind} tokenizer; drop the flag")
    if cfg.block_size > mc.max_seq_len:
        raise UserError(f"--block-size {cfg.block_size}{'' if 'block_size' in flags else ' (the preset or default)'}"
                        f" exceeds the context of --init-from {ck.path} (max_seq_len {mc.max_seq_len}); pass "
                        f"--block-size {mc.max_seq_len} or less")
    if tok.vocab_size > mc.vocab_size:
        raise UserError(f"cannot fine-tune from {ck.path}: its tokenizer has {tok.vocab_size} ids, its model {mc.vocab_size}")
    return replace(cfg, **{k: getattr(mc, k) for k in FROM_CHECKPOINT}), tok


def run(argv=None, log=print):
    """Everything main() does, raising UserError instead of exiting. Returns train()'s summary plus the
    data metadata."""
    return prepare_and_train(*parse_args(argv), log=log)


def prepare_and_train(cfg, explicit, flags, resume, log=print, comm=None):
    """From a parsed command line: the checkpoint to continue or start from, the corpus, the tokenizer,
    the token cache, then train(). `comm`: under mpiexec, dist.py's communicator (only rank 0 logs, and
    it prepares the data while the others wait, then read it)."""
    world = comm.size if comm is not None else 1
    if comm is not None and comm.rank != 0:
        log = lambda *a, **k: None                      # noqa: E731
    gm = load_backend(cfg.backend)                      # fail early on a missing GPU
    ck = init = tok = None
    if resume is not None:
        cfg, ck = open_resume(cfg, explicit, flags, resume, world)
        gm = load_backend(cfg.backend)
    elif cfg.init_from:
        init = load_checkpoint_for("--init-from", Path(cfg.init_from).expanduser())
        if "lora" in init.meta:
            raise UserError(f"--init-from {init.path} holds LoRA adapters, not a whole model: merge them first "
                            f"(train.py --resume {init.path.parent} --lora-merge writes merged.safetensors there) "
                            f"and start from that")
        cfg, tok = init_config(cfg, flags, init)
    if cfg.backend == "cupy":
        gm.enable_tf32(cfg.tf32)
        gm.use_fused_kernels(cfg.fused_kernels)
    if cfg.lora_merge and not cfg.lora_rank:
        raise UserError("--lora-merge merges a LoRA run's adapters, and this run has none (--lora-rank 0)")
    if not cfg.lr_decay_iters:
        cfg.lr_decay_iters = cfg.max_iters              # fixed now, so a longer resumed run keeps the schedule
    cfg.name = cfg.name or data_name(cfg.sft or cfg.data)
    cfg.out_dir = cfg.out_dir or default_out_dir(cfg)
    make_folders(cfg)
    # one process at a time writes a run folder (under mpiexec: rank 0 holds the lock for the job)
    with locked_folder(cfg.out_dir) if comm is None or comm.rank == 0 else nullcontext():
        load = load_sft if cfg.sft else load_corpus
        if comm is None:
            tok, data = load(cfg, ck, init, tok, log)
        else:                                           # rank 0 prepares it, the others then read it
            from lib import dist
            tok, data = dist.in_turn(comm, lambda: load(cfg, ck, init, tok, log))
        if ck is None and (Path(cfg.out_dir) / "ckpt.safetensors").is_file():
            old = read_meta(Path(cfg.out_dir) / "ckpt.safetensors")
            log(f"note: starting afresh; {cfg.out_dir}/ckpt.safetensors (step {old.get('step', '?') if old else '?'})"
                f" will be overwritten (use --resume to continue it instead)")
        if cfg.sample_tokens:
            encode_prompt(tok, cfg.sample_prompt)       # an unencodable --sample-prompt fails now, not mid-run
        result = train(cfg, data, tok, gm, resume=ck, log=log, init=init, comm=comm)
    result["data_meta"] = data["meta"]
    return result


def load_checkpoint_for(what, path):
    """load_checkpoint, its one-line error prefixed with the flag that named the file."""
    try:
        return load_checkpoint(path)
    except UserError as e:                              # missing, truncated or corrupt
        raise type(e)(f"{what}: {e}") from None


def open_resume(cfg, explicit, flags, resume, world=1):
    """--resume [CKPT]: the checkpoint and the config it continues (its own, plus the flags that may change)."""
    path = Path(cfg.out_dir or default_out_dir(cfg)) if resume == "latest" else Path(resume)
    ck = load_checkpoint(path)
    if "train_config" not in ck.meta:
        raise UserError(f"cannot resume from {ck.path}: it holds weights only, no training state")
    cfg = resume_config(cfg, explicit, flags, ck.meta)
    resume_world(cfg, explicit, ck.meta, world)
    if "out_dir" not in explicit:
        cfg.out_dir = str(ck.path.parent)
    check_config(cfg)
    return cfg, ck


def resume_world(cfg, explicit, meta, world):
    """A resumed run keeps its global batch, grad_accum x world micro-batches per step, at any number of
    ranks: grad_accum follows the world size (2 ranks x 1 -> 1 process x 2), or, given, must fit it."""
    saved = meta["train_config"].get("grad_accum", 1) * meta.get("world_size", 1)
    if "grad_accum" not in explicit:
        if saved % world:
            raise UserError(f"cannot resume on {world} ranks: the checkpoint's global batch is {saved} micro-batches "
                            f"of {cfg.batch_size} per step, which {world} ranks cannot share evenly; use a number "
                            f"of ranks that divides {saved}")
        cfg.grad_accum = saved // world
    elif cfg.grad_accum * world != saved:
        raise UserError(f"cannot resume with --grad-accum {cfg.grad_accum} on {world} rank(s): the checkpoint's "
                        f"global batch is {saved} micro-batches per step (grad_accum x ranks); pass --grad-accum "
                        f"{saved // world if saved % world == 0 else '?'} or drop the flag")


def make_folders(cfg):
    """The out dir and the data dir, each marked as this project's output (never read as a corpus)."""
    for flag_, folder in (("--out-dir", cfg.out_dir), ("--data-dir", cfg.data_dir)):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            mark_output_folder(folder)
        except OSError as e:
            raise UserError(f"{flag_} {folder!r} cannot be used as a folder: {e.strerror or e}") from None


def load_corpus(cfg, ck, init, tok, log):
    """The corpus's files, the tokenizer (a resumed run's own, a fine-tuning run's from init, or the
    cached or trained one) and the token cache: (tok, data)."""
    root, files = find_sources(cfg.data, cfg.data_dir, skip=(cfg.out_dir,))
    sources = digest_sources(root, files, Path(cfg.data_dir) / cfg.name / "sources.json")
    if sources["bytes"] == 0:
        raise UserError(f"empty corpus: {cfg.data} holds no text")
    log(f"data: {cfg.data} -> {len(files)} file(s), {sources['bytes'] / 1e6:.2f} MB (name {cfg.name!r})")
    if ck is not None:                                  # the checkpoint carries its tokenizer
        tok = ck.tokenizer()
    elif init is not None:
        # fine-tuning: the init checkpoint's tokenizer, saved in the out dir as a --tokenizer file, which
        # keys the data cache (data/<name>/tok-<sha>) and names the tokenizer in the saved config
        cfg.tokenizer = str(Path(cfg.out_dir) / f"tokenizer.{tok.kind}")
        write_text_atomic(cfg.tokenizer, tok.to_text())
    else:
        tok = get_tokenizer(cfg, cfg.name, root, files, sources, log)
    # checked before prepare_data, which would rebuild (overwrite) the cache of the checkpoint's own corpus
    if ck is not None and data_key(cfg, sources, tok) != ck.meta["data"]["key"]:
        raise UserError("cannot resume: the corpus (or its tokenization) differs from the checkpoint's "
                        f"(sources sha256 {sources['sha256'][:12]} now); restore the data or start a new run")
    data = prepare_data(cfg, cfg.name, root, files, sources, tok, log)
    return tok, data


def load_sft(cfg, ck, init, tok, log):
    """--sft: the tokenizer (as load_corpus: a resumed run's own, a fine-tuning run's from init, saved in
    the out dir), the chat template (a resumed run's own, else --chat-template, the checkpoint's or the
    default) and the encoded records (sft.prepare_sft): (tok, data), data["chat"] the template."""
    if ck is not None:
        tok, chat = ck.tokenizer(), sft.chat_template_for(ck.meta, ck.tokenizer())
    else:
        cfg.tokenizer = str(Path(cfg.out_dir) / f"tokenizer.{tok.kind}")
        write_text_atomic(cfg.tokenizer, tok.to_text())
        chat = sft.chat_template_for(init.meta, tok, cfg.chat_template or None)
    data = sft.prepare_sft(cfg.sft, tok, chat, cfg.block_size, cfg.val_fraction, cfg.seed, cfg.sft_train_on_prompt,
                           log)
    if ck is not None and data["meta"]["key"] != ck.meta["data"]["key"]:
        raise UserError(f"cannot resume: the records of --sft {cfg.sft} (or their rendering) differ from the "
                        f"checkpoint's; restore them or start a new run")
    data["chat"] = chat
    return tok, data


def default_out_dir(cfg):
    """out/<data>-<tokenizer>, or for a fine-tuning run out/<data>-from-<the checkpoint's folder or name>."""
    name = cfg.name or data_name(cfg.sft or cfg.data)
    if cfg.init_from:
        src = Path(cfg.init_from).expanduser().resolve()
        src = src.parent if src.name == "ckpt.safetensors" else src
        return str(Path("out") / f"{name}-from-{safe_name(src.name.removesuffix('.safetensors'))}")
    return str(Path("out") / f"{name}-{tokenizer_tag(cfg)}")


def main(argv=None):
    """Command-line entry: exit status 0 on success; `error: <one line>` and 2 for a bad command line,
    1 for a failure (a bad file, an empty corpus, a full disk ...); 130 on a second Ctrl-C."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)     # log lines show up at once, also in a file or a pipe
    world = mpi_world_size()
    try:
        args = parse_args(argv)
    except UserError as e:
        if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":   # once, not per rank
            print(f"error: {e}", file=sys.stderr)
        return 2
    comm = None
    try:
        if world > 1:                                   # under mpiexec: dist.py, and MPI, only now
            from lib import dist
            comm = dist.start(args[0].backend, args[0].dist_timeout)
        prepare_and_train(*args, comm=comm)
    except (UserError, OSError) as e:                   # OSError: disk full, permissions, a path that is not a folder
        if comm is not None:                            # the other ranks may be waiting for this one
            dist.report_and_abort(comm, f"error: {e}" if comm.rank == 0 else f"error: rank {comm.rank}: {e}", 1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if comm is not None:
            comm.abort(130)
        return 130
    except BaseException:
        if comm is None:
            raise
        import traceback                                # a bug: its traceback, then the job ends
        dist.report_and_abort(comm, f"rank {comm.rank}: " + traceback.format_exc().rstrip(), 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
