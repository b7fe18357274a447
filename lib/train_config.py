"""
train_config.py: what a training run is configured by. TrainConfig's fields are train.py's flags, each
documented once, in its field (build_parser, at the end, makes train.py's command line and --help from
them; parse_args reads one); PRESETS are named sets of values; the checks here refuse a setting that
cannot work before any data is prepared.

    cfg = TrainConfig(**{**asdict(TrainConfig()), **PRESETS["tiny"][1], "data": "notes.txt"})
    check_config(cfg)                           # UserError naming the flag, e.g. "--lr must be > 0 ..."
    mcfg = model_config(cfg, vocab_size=65)     # the GPTConfig of a new run

What a resumed run may change (RESUME_MAY_CHANGE), what a fine-tuning run takes from its checkpoint
(FROM_CHECKPOINT) and which settings follow another unless given (FOLLOWS: min_lr = lr / 10) are written
here too, beside the fields they name; train.py and runs.py apply them. So is the --config file's form
(read_config_file, config_toml): TOML, one `name = value` per field.
"""

import argparse
import difflib
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import gpt_numpy
from errors import ArgumentParser, FileFormatError, UserError
from lib import lora as lora_lib, memory
from lib.checkpoint import CHECKPOINT_HELP


# ----------------------------------------------------------------------------------------------------
# The config: the defaults are the default job (stdlib + BPE); a preset overrides some; flags override both.
# Each field is one flag (--n-layer for n_layer), documented once, here: its help is the --help text.

def flag(default, help, **argparse_extras):
    """A TrainConfig field: its default, its --help text and argparse extras (choices, metavar)."""
    return field(default=default, metadata={"help": help, **argparse_extras})


@dataclass
class TrainConfig:
    # data
    data: str = flag("stdlib", "corpus: 'stdlib' (Python's own .py sources), 'shakespeare' (downloaded once), "
                     "a text file, a folder of text files, or a glob such as 'src/**/*.py'")
    text_field: str = flag("text", "the field of a .jsonl / .jsonl.gz record, or the column of a .parquet file, that "
                           "holds the text (one document per record or row); plain text files are read whole",
                           metavar="NAME")
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
    init_from: str = flag("", f"fine-tune: start a new run from this checkpoint, {CHECKPOINT_HELP} (an earlier "
                          "run's, or export.py --import-hf's): its weights, model and tokenizer; the optimizer, "
                          "step and sampler start afresh, the training settings come from the flags and --preset "
                          "(--block-size at most the model's context; model flags must match it)", metavar="CKPT")
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
                                 "NumPy has no float16 BLAS (~100x slower steps)")
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
    min_lr: float = flag(2e-4, "final learning rate", default_help="--lr / 10 unless given, e.g. 3e-6 for --lr "
                         "3e-5; a preset's min_lr too gives way to --lr")
    warmup_iters: int = flag(50, "linear warmup steps")
    lr_decay_iters: int = flag(0, "the cosine decay ends here (0: at --max-iters, fixed when the run starts, so a "
                               "resumed run that goes further keeps its schedule and trains on at min_lr); a "
                               "preset's value gives way to --max-iters unless this flag is given too")
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
    eval_mc_limit: int = flag(0, "score only the first N items of --eval-mc (0: all); eval.py's --mc-limit (the "
                              "eval- prefix marks a setting of the evaluations during training)")
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
    threads: int = flag(1, "threads of a training step, e.g. the number of cores: each micro-batch is cut into N "
                        "shards of batch_size / N sequences, computed at once, one per thread with one BLAS thread "
                        "each, their gradients summed in shard order, AdamW split among them too: the run is bit for "
                        "bit the one with --batch-size B/N --grad-accum G*N on one thread (lib/parallel.py). 1: "
                        "no shards, the BLAS's own threads (OPENBLAS_NUM_THREADS) in the matmuls only")
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
                     "grad_accum",      # grad_accum: as long as the global batch stays (resume_world)
                     "threads"}         # the same batches; the gradients equal up to float rounding (train_step)

# What a fine-tuning run (--init-from) takes from its checkpoint instead of from the preset and flags, with
# the tokenizer; an explicit flag that differs is an error. (block_size is a flag, up to its max_seq_len.)
FROM_CHECKPOINT = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "norm")

# Settings that follow another one unless they are given themselves (as a flag or in the --config file),
# in a new run (a resumed run keeps its checkpoint's): the default or a preset's min_lr would otherwise
# stay above a smaller --lr (refused), and a preset's lr_decay_iters would keep the schedule of the
# preset's length in a run shortened with --max-iters (shakespeare-char with --max-iters 300: lr still
# 9.8e-4 of 1e-3 at the last step, no decay at all).
FOLLOWS = {"min_lr": ("lr", "lr / 10", lambda lr: float(f"{lr / 10:.6g}")),   # 3e-4 for 3e-3, not 3.0000000000000003e-4
           "lr_decay_iters": ("max_iters", "max_iters", lambda max_iters: max_iters)}


def followers(given):
    """The settings that follow one in `given` (the names and values the user gave) and are not given
    themselves: followers({"lr": 3e-5}) -> {"min_lr": 3e-6}."""
    return {k: rule(given[leader]) for k, (leader, _, rule) in FOLLOWS.items() if leader in given and k not in given}


def follows(cfg, name):
    """Does cfg's setting `name` hold what it would follow (min_lr = lr / 10)?"""
    return name in FOLLOWS and getattr(cfg, name) == FOLLOWS[name][2](getattr(cfg, FOLLOWS[name][0]))


# ----------------------------------------------------------------------------------------------------
# Checks: a bad setting is refused with one line naming its flag

def check_command_line(cfg, flags, resume):
    """Every check a command line allows before any file is read: check_config, flags that cannot go
    together, and a new model that cannot be built or cannot fit. flags: the names of the settings given as
    flags; resume: --resume's argument, or None."""
    check_config(cfg)
    # (given, not followed: --max-iters 3 under a warmup of 50 is a run inside its warmup, which
    # runs.warn_schedule warns of; and a resumed run keeps its checkpoint's schedule, whatever it is)
    if resume is None and "lr_decay_iters" in flags and 0 < cfg.lr_decay_iters < cfg.warmup_iters:
        raise UserError(f"--lr-decay-iters ({cfg.lr_decay_iters}) must not end before --warmup-iters ({cfg.warmup_iters})")
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


def check_config(cfg):
    """Every check a config allows by itself: ranges, and settings that cannot go together."""
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
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        raise UserError(f"--vocab-size must be at least 257 for BPE (256 bytes + 1 special token), got {cfg.vocab_size}")
    if cfg.backend not in ("numpy", "cupy"):
        raise UserError(f"unknown backend {cfg.backend!r}: choose numpy or cupy")
    for name in ("tf32", "fused_kernels"):
        if getattr(cfg, name) and cfg.backend != "cupy":
            raise UserError(f"--{name.replace('_', '-')} is for --backend cupy (an NVIDIA GPU)")
    if cfg.threads < 1:
        raise UserError(f"--threads must be at least 1, got {cfg.threads}")
    if cfg.threads > 1 and cfg.backend != "numpy":
        raise UserError(f"--threads {cfg.threads} is for --backend numpy (the CPU; a GPU runs the batch whole): "
                        f"pass --threads 1")
    if cfg.batch_size % cfg.threads:
        raise UserError(f"--batch-size {cfg.batch_size} does not divide into --threads {cfg.threads} equal shards: "
                        f"pass a --batch-size that is a multiple of {cfg.threads}")
    if cfg.lora_rank < 0:
        raise UserError(f"--lora-rank must be >= 0 (0: no LoRA), got {cfg.lora_rank}")
    lora_config(cfg)                                    # alpha, targets and dropout, when LoRA is on


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


def check_memory(cfg, mcfg, gm=None):
    """Refuse a run whose weights, AdamW state and activations cannot fit in the machine's memory (the
    GPU's for gm = gpt_cupy): memory.py's estimate, one line naming it, instead of an out-of-memory kill."""
    need = memory.training_bytes(mcfg, cfg.batch_size, cfg.block_size, cfg.mixed_precision)
    if cfg.threads > 1 and not cfg.lora_rank:
        # the shards' activations add up to the batch's, but each shard has its own gradients until they are
        # summed (a LoRA run's: its adapters', small)
        need["the other shards' gradients"] = 4 * (cfg.threads - 1) * memory.count_params(mcfg)[0]
    memory.check_fits(need, f"this run ({mcfg.n_layer} layers, d_model {mcfg.d_model}, batch {cfg.batch_size} x "
                            f"{cfg.block_size} tokens)", gm,
                      hint="use a smaller model, --batch-size or --block-size (or --checkpoint-activations)")



# ----------------------------------------------------------------------------------------------------
# The --config file (TOML): `name = value` for any of TrainConfig's fields, and `preset = "NAME"`; the
# flags override it, it overrides the preset. A run writes its whole config in the same form, each setting
# under its help as a comment (RUN/config.toml: --config reads it back).

CONFIG_MAX_BYTES = 1 << 20              # a config file is a few KB; more is not a config file


def read_config_file(path):
    """The settings of a --config TOML file, {name: value}, each a known setting of its flag's type (an int
    may stand for a float), or UserError naming the file and the key. Python 3.10 has no tomllib: there,
    the tomli package, or a one-line error saying so."""
    try:
        import tomllib
    except ImportError:                                 # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError("--config needs Python 3.11 or later (its tomllib reads TOML), or on 3.10 the tomli "
                            "package: pip install tomli") from None
    where = f"--config {path}"
    try:
        if not Path(path).is_file():
            raise UserError(f"{where}: {'no such file' if not Path(path).exists() else 'not a regular file'}")
        with open(path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise UserError(f"{where}: cannot be read: {e.strerror or e}") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise UserError(f"{where}: larger than {CONFIG_MAX_BYTES >> 20} MB; a config file holds a few settings")
    try:
        values = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{where}: not usable TOML (nested too deeply)") from None
    return {key: config_value(where, key, v) for key, v in values.items()}


def config_value(where, key, v):
    """One setting of a --config file, checked: its value (a float setting's as a float)."""
    known = {f.name: f for f in fields(TrainConfig)}
    if key == "preset":
        if v not in PRESETS:
            raise UserError(f"{where}: preset = {json.dumps(v)[:60]} is not a preset; choose from {', '.join(PRESETS)}")
        return v
    if isinstance(v, dict):
        raise UserError(f"{where}: [{key}] is a table; write each setting as name = value, outside any table")
    if key not in known:
        near = difflib.get_close_matches(key.replace("-", "_"), [*known, "preset"], n=1)
        raise UserError(f"{where}: unknown setting {key!r}" + (f" (did you mean {near[0]}?)" if near else
                                                              "; the settings are train.py's flags, with _ for -"))
    f = known[key]
    want = type(f.default)
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) if want is float else type(v) is want
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[want]
        raise UserError(f"{where}: {key} = {json.dumps(v, default=str)[:60]} should be {what}")
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        raise UserError(f"{where}: {key} = {json.dumps(v)[:60]} should be one of {', '.join(map(str, choices))}")
    return float(v) if want is float else v


def config_toml(cfg, header):
    """cfg as a --config file: `header` (comment lines), then every setting, its help above it. A setting
    that holds what it follows (min_lr = lr / 10) is commented out, so that it follows again when the file
    is read back with another --lr."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        setting = f"{f.name} = {toml_value(float(value) if type(f.default) is float else value)}"
        if follows(cfg, f.name):
            setting = f"# {setting}    (follows {FOLLOWS[f.name][1]}; remove the # to fix it)"
        lines += ["", *textwrap.wrap(f.metadata["help"], 98, initial_indent="# ", subsequent_indent="# "), setting]
    return "\n".join(lines) + "\n"


def toml_value(v):
    """A bool, int, float or str in TOML: JSON's string escapes are TOML's (DEL aside, which TOML escapes)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)                                  # 1e-05, inf and nan are TOML floats too
    text = json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")     # a lone surrogate (argv's bad bytes)


def config_summary(cfg):
    """The settings of cfg that differ from the defaults, as `name=value` words (printed at the start)."""
    return ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(TrainConfig)
                     if getattr(cfg, f.name) != f.default)


# ----------------------------------------------------------------------------------------------------
# train.py's command line: the parser built from TrainConfig's fields, and parse_args (its UserErrors are
# usage errors: exit 2)

def build_parser():
    p = ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the NumPy GPT of gpt_numpy.py on a text corpus (default: the Python standard "
                    "library's sources, with a BPE tokenizer).",
        epilog=f"presets (--preset NAME; explicit flags override the preset's values):\n{presets_help()}\n\n"
               "examples:\n  python train.py\n"
               "  python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare.txt\n"
               "  python train.py --preset tiny --data notes.txt --out-dir out/tiny\n"
               "  python train.py --resume\n"
               "  python train.py --config my_run.toml --max-iters 100   # the file's settings, a flag over them\n"
               "  mpiexec -n 2 python train.py --preset tiny --data notes.txt --zero 1     # 2 ranks\n\n"
               "fine-tuning (--init-from: the weights, model and tokenizer of a checkpoint; a fresh optimizer):\n"
               "  python export.py --import-hf path/to/hf-llama --out out/imported --max-seq-len 256\n"
               "  python train.py --init-from out/imported --data notes.txt --lr 3e-4 \\\n"
               "      --warmup-iters 20 --max-iters 200      # writes out/notes-from-imported\n"
               "  python train.py --resume out/notes-from-imported      # continue it after Ctrl-C\n"
               "  python sample.py --ckpt out/notes-from-imported --prompt \"Once\"\n"
               "  python sample.py --ckpt out/notes-from-imported/best.safetensors   # its best-val weights\n\n"
               "LoRA and instruction data (docs/finetuning.md):\n"
               "  python train.py --init-from out/stdlib-bpe2048 --sft docs/examples/python_howto.jsonl \\\n"
               "      --lora-rank 8 --lr 3e-3 --max-iters 300 --sample-prompt \"How do I sort a list?\" --lora-merge\n"
               "  python export.py --ckpt out/python_howto-from-stdlib-bpe2048 --out export/merged --peft-adapter export/adapter")
    p.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                   help="start from a named configuration (listed below)")
    p.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                   help="read settings from a TOML file, `name = value` per line (the flags' names with _ for -, "
                        "and preset = \"NAME\"): over the preset, under the flags. Every run writes its whole "
                        "config as config.toml in its out dir, which this reads back")
    p.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, metavar="CKPT",
                   help="continue the run in --out-dir (its latest checkpoint, ckpt.safetensors), or in the run "
                        "folder or checkpoint file CKPT")
    p.add_argument("--force", action="store_true", default=argparse.SUPPRESS,
                   help="start afresh in an out dir that holds another run: its checkpoints and log are "
                        "deleted (without --force such a folder is refused, naming the run in it)")
    for f in fields(TrainConfig):
        default = f.metadata.get("default_help", repr(f.default) if f.default != "" else None)
        help_ = f.metadata["help"] + (f" (default: {default})" if default else "")
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


def presets_help():
    """The presets for --help's epilog: each name, its description wrapped beside it, its values below."""
    width = max(map(len, PRESETS)) + 4
    indent = " " * (width + 2)
    return "\n".join(textwrap.fill(desc, 100, initial_indent=f"  {name:<{width}}", subsequent_indent=indent) + "\n"
                     + textwrap.fill(" ".join(f"{n}={v}" for n, v in values.items()) or "the defaults above", 100,
                                     initial_indent=indent, subsequent_indent=indent)
                     for name, (desc, values) in PRESETS.items())


class CommandLine(NamedTuple):
    """A parsed command line (parse_config's)."""
    cfg: TrainConfig        # defaults <- preset <- --config file <- flags, with the settings that follow (FOLLOWS)
    explicit: set           # the names of the settings the user chose: through a preset, the file or a flag
    flags: set              # ... of those given in the file or as flags
    resume: str = None      # --resume's argument ("latest" without one), or None
    force: bool = False     # --force: a fresh run may replace the run in its out dir


def parse_config(argv):
    """argv -> CommandLine. The config is the defaults, under the preset (--preset, or the file's preset =),
    under the --config file, under the flags; a setting that follows another (min_lr follows lr) and is not
    given itself follows it."""
    args = vars(build_parser().parse_args(argv))
    resume, force = args.pop("resume", None), args.pop("force", False)
    given = read_config_file(Path(args.pop("config")).expanduser()) if "config" in args else {}
    preset = args.pop("preset", given.pop("preset", "default"))
    given.update(args)
    follow = followers(given)                   # (not the user's choice: a resumed run keeps its checkpoint's)
    values = {**PRESETS[preset][1], **follow, **given}
    return CommandLine(TrainConfig(**{**asdict(TrainConfig()), **values}), set(values) - set(follow), set(given),
                       resume, force)


def parse_args(argv):
    """parse_config, then every check the command line alone allows (train_config.check_command_line);
    UserError here is a usage error."""
    cl = parse_config(argv)
    check_command_line(cl.cfg, cl.flags, cl.resume)
    if cl.force and cl.resume is not None:
        raise UserError("--force starts a new run over the one in the out dir and --resume continues it: pass one")
    return cl
