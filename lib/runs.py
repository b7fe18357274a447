"""
runs.py: how a training run starts, and what it is made of. train.py's loop begins where this file ends:
with the config settled, the backend loaded, the folders made and locked, the corpus (or --sft's records)
tokenized and cached, and a State to train, fresh or restored from the run's checkpoint.

    with runs.start(cfg, explicit, flags, resume, log) as s:   # train.parse_args's command line
        train(s.cfg, s.data, s.tok, s.gm, resume=s.resume, init=s.init)

Three ways to start, each with its rules:
- afresh: the config is the flags (over a --config file, over a preset, over the defaults); the tokenizer
  is trained or read from the corpus (data.get_tokenizer), the model is new. The out dir must not hold
  another run (check_out_dir_free), unless --force: its checkpoints and log then go (fresh_state).
- --resume [CKPT]: the run continues its own checkpoint. The config is the checkpoint's; a flag may change
  only what train_config.RESUME_MAY_CHANGE lists, and any other explicit flag that differs is an error (it
  would silently make it another run). The global batch (grad_accum x ranks) stays at any number of ranks,
  the tokenizer is the checkpoint's, and the corpus must hash to the checkpoint's data key. Where the run
  writes comes from the command line and the run's folder, never from the file. The state is the
  checkpoint's (resumed_state reads back what checkpoint_meta wrote), and log.jsonl is cut back to it (an
  incomplete last line, as a full disk leaves it, dropped with a warning).
- --init-from CKPT: a new run fine-tunes another checkpoint. The model (train_config.FROM_CHECKPOINT) and
  the tokenizer come from that checkpoint, a flag that contradicts them is an error; the training
  settings come from the flags. The tokenizer is saved in the out dir, where it keys the data cache.

A run's records: Run, what stays fixed while it trains (the config, the model config, the backend, the
data, the folder); State, what changes, all of it checkpointed (the weights, AdamW, the loss scaler, the
batch sampler's generator, the progress).

A run's folder: ckpt.safetensors (the latest checkpoint), best.safetensors (the weights of the best val
loss so far; best_meta), log.jsonl, config.toml (write_run_config) and, for a fine-tuning run, its
tokenizer file; a LoRA run with --lora-merge adds merged.safetensors. A start that fails removes the
folders it made if nothing was written in them (made_folders).
"""

import json
import textwrap
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

import gpt_numpy
from errors import FileFormatError, UserError
from lib import lora as lora_lib, mixed_precision, scoring, sft
from lib.backend import load_backend
from lib.checkpoint import (build_meta, load_adapters, load_checkpoint, load_lora_base, load_params, lora_base_ref,
                            read_meta)
from lib.data import data_key, data_name, digest_sources, find_sources, get_tokenizer, prepare_data, safe_name, tokenizer_tag
from lib.files import LOCK_NAME, OUTPUT_MARK, locked_folder, mark_output_folder, naming_errors, write_text_atomic
from lib.tokenizer import encode_prompt, load_tokenizer_file
from lib.train_config import (FROM_CHECKPOINT, RESUME_MAY_CHANGE, TrainConfig, check_config, check_saved_config,
                              config_summary, config_toml)


@dataclass
class Start:
    """What a run starts from (runs.start's)."""
    cfg: TrainConfig            # the settled config: out_dir, name and lr_decay_iters filled in
    gm: object                  # the backend module: gpt_numpy or gpt_cupy
    tok: object                 # the tokenizer
    data: dict                  # data.prepare_data's {"train", "val", "meta"}; --sft: sft.prepare_sft's, with "chat"
    resume: object = None       # --resume: the checkpoint.Checkpoint this run continues
    init: object = None         # --init-from: the checkpoint.Checkpoint a fine-tuning run starts from


@contextmanager
def start(cfg, explicit, flags, resume, log=print, comm=None, force=False):
    """From a parsed command line (cfg, the names of the settings chosen by a preset, the --config file or
    a flag, of those given in the file or as flags, the --resume argument or None, and --force): the
    checkpoint to continue or start from and the config, the backend, the folders, then the corpus, the
    tokenizer and the token cache. Yields a Start while it holds the run folder's lock: one process at a
    time trains in a folder (under mpiexec, `comm`: rank 0 holds it for the job, and prepares the data
    while the other ranks wait, then read it). A start that fails leaves no folder it made and wrote
    nothing into (made_folders)."""
    cfg, gm, ck, init, tok = on_every_rank(comm, lambda: settle(cfg, explicit, flags, resume, log, comm))
    with made_folders(cfg), locked_folder(cfg.out_dir) if comm is None or comm.rank == 0 else nullcontext():
        if ck is None:                                  # a new run: not over another one (but --force)
            on_every_rank(comm, lambda: check_out_dir_free(cfg.out_dir, force, init))
        load = load_sft if cfg.sft else load_corpus
        if comm is None:
            tok, data = load(cfg, ck, init, tok, log)
        else:                                           # rank 0 prepares it, the others then read it
            from lib import dist
            tok, data = dist.in_turn(comm, lambda: load(cfg, ck, init, tok, log))
        if cfg.sample_tokens:
            encode_prompt(tok, cfg.sample_prompt)       # an unencodable --sample-prompt fails now, not mid-run
        log(textwrap.fill(f"{config_summary(cfg)}; all of it in {Path(cfg.out_dir) / 'config.toml'}", 100,
                          initial_indent="config: ", subsequent_indent="  ", break_on_hyphens=False,
                          break_long_words=False))
        yield Start(cfg, gm, tok, data, ck, init)


def settle(cfg, explicit, flags, resume, log, comm):
    """start's first part, before any folder is made: the backend, the checkpoint a run continues
    (--resume) or starts from (--init-from), the config that follows, with its out dir. Returns (cfg, gm,
    the resumed checkpoint, the init checkpoint, its tokenizer)."""
    gm = load_backend(cfg.backend)                      # fail early on a missing GPU
    ck = init = tok = None
    if resume is not None:
        cfg, ck = open_resume(cfg, explicit, flags, resume, comm.size if comm is not None else 1, log)
        gm = load_backend(cfg.backend)
    elif cfg.init_from:
        cfg, init, tok = open_init(cfg, flags)
    if cfg.backend == "cupy":
        gm.enable_tf32(cfg.tf32)
        gm.use_fused_kernels(cfg.fused_kernels)
    if cfg.lora_merge and not cfg.lora_rank:
        raise UserError("--lora-merge merges a LoRA run's adapters, and this run has none (--lora-rank 0)")
    if not cfg.lr_decay_iters:
        cfg.lr_decay_iters = cfg.max_iters              # fixed now, so a longer resumed run keeps the schedule
    cfg.name = cfg.name or data_name(cfg.sft or cfg.data)
    cfg.out_dir = cfg.out_dir or default_out_dir(cfg)
    if ck is None:                                      # a new run
        warn_schedule(cfg, explicit, log)
    return cfg, gm, ck, init, tok


def on_every_rank(comm, fn):
    """fn(), which every rank runs alike; under mpiexec through dist.together, so that a failure they all
    meet (a checkpoint that cannot be resumed) ends the job with one line, and without MPI_Abort."""
    if comm is None:
        return fn()
    from lib import dist
    return dist.together(comm, fn)


def warn_schedule(cfg, explicit, log):
    """Warnings about a learning-rate schedule that is surely not what was meant: a run that ends inside
    its warmup, and an explicit --lr-decay-iters past --max-iters (the run ends before its decay)."""
    if 0 < cfg.max_iters < cfg.warmup_iters:
        peak = gpt_numpy.lr_schedule(cfg.max_iters - 1, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
        log(f"warning: --max-iters {cfg.max_iters} ends inside the warmup (--warmup-iters {cfg.warmup_iters}): the "
            f"learning rate climbs to {peak:.2e} of --lr {cfg.lr:g} and never decays; pass --warmup-iters "
            f"{max(1, cfg.max_iters // 10)} (a tenth of the run) or a larger --max-iters")
    elif 0 < cfg.max_iters < cfg.lr_decay_iters and "lr_decay_iters" in explicit:
        last = gpt_numpy.lr_schedule(cfg.max_iters - 1, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
        log(f"warning: --lr-decay-iters {cfg.lr_decay_iters} is past --max-iters {cfg.max_iters}: the run ends at lr "
            f"{last:.2e}, before its decay to --min-lr {cfg.min_lr:g} (fine for a run you will resume further; "
            f"else drop --lr-decay-iters: the decay then ends at --max-iters)")


# ----------------------------------------------------------------------------------------------------
# --resume: the run's own checkpoint and config

def open_resume(cfg, explicit, flags, resume, world=1, log=print):
    """--resume [CKPT]: the checkpoint and the config it continues (its own, plus the flags that may change).
    Where the run writes comes from the command line and the run's folder, never from the file: the out
    dir is the checkpoint's folder, the data dir the flag's (or its default)."""
    path = Path(cfg.out_dir or default_out_dir(cfg)) if resume == "latest" else Path(resume)
    ck = load_checkpoint(path)
    if "best" in ck.meta:
        raise UserError(f"cannot resume from {ck.path}: it holds the run's best weights, not its training state; "
                        f"--resume {ck.path.parent} continues the latest checkpoint, and --init-from {ck.path} "
                        f"starts a new run from these weights")
    if "train_config" not in ck.meta:
        raise UserError(f"cannot resume from {ck.path}: it holds weights only, no training state")
    cfg = resume_config(cfg, explicit, flags, ck.meta)
    resume_world(cfg, explicit, ck.meta, world)
    if "out_dir" not in explicit:
        cfg.out_dir = str(ck.path.parent)
    if "data_dir" not in explicit:
        saved, cfg.data_dir = cfg.data_dir, TrainConfig().data_dir
        if saved != cfg.data_dir:
            log(f"note: the run's data cache was under {saved}; a checkpoint never chooses where to write, so "
                f"this run uses --data-dir {cfg.data_dir} (pass --data-dir {saved} to use that cache)")
    if "name" not in explicit and not is_plain_name(cfg.name):
        raise FileFormatError(f"{ck.path}: the checkpoint's train_config has name = {json.dumps(cfg.name)[:60]}, "
                              f"which is not a plain folder name; pass --name NAME")
    check_config(cfg)
    return cfg, ck


def is_plain_name(name):
    """A name that stays one folder inside --data-dir: no separator, not '', '.' or '..'."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


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


# ----------------------------------------------------------------------------------------------------
# --init-from: another checkpoint's model and tokenizer, this run's training settings

def open_init(cfg, flags):
    """--init-from CKPT: (the config, the checkpoint, its tokenizer); a LoRA run's adapters are refused."""
    init = load_checkpoint_for("--init-from", Path(cfg.init_from).expanduser())
    if "lora" in init.meta:
        raise UserError(f"--init-from {init.path} holds LoRA adapters, not a whole model: merge them first "
                        f"(train.py --resume {init.path.parent} --lora-merge writes merged.safetensors there) "
                        f"and start from that")
    cfg, tok = init_config(cfg, flags, init)
    return cfg, init, tok


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


def load_checkpoint_for(what, path):
    """load_checkpoint, its one-line error prefixed with the flag that named the file."""
    try:
        return load_checkpoint(path)
    except UserError as e:                              # missing, truncated or corrupt
        raise type(e)(f"{what}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Folders and data

def default_out_dir(cfg):
    """out/<data>-<tokenizer>, or for a fine-tuning run out/<data>-from-<the checkpoint's folder or name>
    (a run's best.safetensors: <its folder>-best)."""
    name = cfg.name or data_name(cfg.sft or cfg.data)
    if cfg.init_from:
        src = Path(cfg.init_from).expanduser().resolve()
        src = {"ckpt.safetensors": src.parent, "best.safetensors": src.parent.with_name(src.parent.name + "-best")
               }.get(src.name, src)
        return str(Path("out") / f"{name}-from-{safe_name(src.name.removesuffix('.safetensors'))}")
    return str(Path("out") / f"{name}-{tokenizer_tag(cfg)}")


@contextmanager
def made_folders(cfg):
    """Inside: the out dir and the data dir, each marked as this project's output (never read as a corpus).
    If what is inside fails, the folders made here that still hold nothing but the marker and the lock go
    again, with the parents made for them: a run that could not start (Tiny Shakespeare not downloadable,
    a corpus too short) leaves no empty out/NAME behind."""
    made = []                                           # the folders this call creates, parents first
    for flag_, folder in (("--out-dir", cfg.out_dir), ("--data-dir", cfg.data_dir)):
        missing = [p for p in (Path(folder), *Path(folder).parents) if not p.exists()]
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            mark_output_folder(folder)
        except OSError as e:
            raise UserError(f"{flag_} {folder!r} cannot be used as a folder: {e.strerror or e}") from None
        made += [p for p in reversed(missing) if p not in made]
    try:
        yield
    except BaseException:
        for folder in reversed(made):                   # the deepest first
            remove_if_unused(folder)
        raise


def remove_if_unused(folder):
    """Remove a folder that holds nothing but this project's marker and lock (or nothing at all)."""
    try:
        entries = list(folder.iterdir())
        if any(p.name not in (OUTPUT_MARK, LOCK_NAME) or not p.is_file() for p in entries):
            return
        for p in entries:
            p.unlink()
        folder.rmdir()
    except OSError:                                     # another process (a rank) got there first
        pass


RUN_FILES = ("ckpt.safetensors", "best.safetensors", "merged.safetensors", "log.jsonl", "config.toml")


def check_out_dir_free(out_dir, force, init=None):
    """A new run's out dir must not hold another run, whose checkpoints and log it would replace: refused,
    naming that run, unless --force (fresh_state then deletes them); never the --init-from checkpoint. (A
    config.toml and an empty log alone are a run stopped before its first evaluation: no run.)"""
    there = [n for n in RUN_FILES if (Path(out_dir) / n).is_file() and n != "config.toml"
             and not (n == "log.jsonl" and (Path(out_dir) / n).stat().st_size == 0)]
    if init is not None and init.path.name in there and init.path.resolve().parent == Path(out_dir).resolve():
        raise UserError(f"--out-dir {out_dir} holds the --init-from checkpoint {init.path}, which a new run there "
                        f"would delete; choose another --out-dir")
    if there and not force:
        raise UserError(f"--out-dir {out_dir} holds another run ({describe_run(Path(out_dir), there)}); continue "
                        f"it with --resume {out_dir}, replace it with --force, or choose another --out-dir")


def describe_run(folder, there):
    """A few words on the run in folder (`there`: the names of its files): its data, step and time."""
    ck = folder / ("ckpt.safetensors" if "ckpt.safetensors" in there else there[0])
    meta = read_meta(ck) if ck.suffix == ".safetensors" else None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(ck.stat().st_mtime))
    if not meta:
        return f"{', '.join(there)}, written {when}"
    tc = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    data = (f"--sft {tc['sft']}" if tc.get("sft") else f"--data {tc['data']}" if tc.get("data") else
            f"imported from {meta['imported_from']}" if meta.get("imported_from") else "data unknown")
    return f"{data}, step {meta.get('step', '?')}, saved {when}"


def load_corpus(cfg, ck, init, tok, log):
    """The corpus's files, the tokenizer (a resumed run's own, a fine-tuning run's from init, or the
    cached or trained one) and the token cache: (tok, data)."""
    root, files = find_sources(cfg.data, cfg.data_dir, skip=(cfg.out_dir,), log=log)
    sources = digest_sources(root, files, Path(cfg.data_dir) / cfg.name / "sources.json", cfg.text_field)
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


def check_corpus_length(cfg, data):
    """Each split holds at least one sequence of block_size + 1 tokens."""
    for split in ("train", "val"):
        if len(data[split]) < cfg.block_size + 1:
            raise UserError(f"corpus too short: the {split} split has {len(data[split])} tokens, and one "
                            f"sequence needs block_size + 1 = {cfg.block_size + 1}; use more text or a "
                            f"smaller --block-size")


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


def open_out_dir(cfg):
    """The run's folder, without the temporary files of a process killed while saving."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ckpt", "best"):
        for stale in out_dir.glob(f".{name}.safetensors.tmp-*"):
            stale.unlink(missing_ok=True)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# The run and its state: what stays fixed while it trains (Run) and what changes, all of it checkpointed
# (State); a fresh state, the state a checkpoint of the run saved, and that checkpoint's metadata

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
    best_path = property(lambda self: self.out_dir / "best.safetensors")     # the weights of the best val loss
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
    best_val: float | None = None   # the best val loss so far, and its step (its weights: best.safetensors)
    best_step: int | None = None
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
    if run.rank == 0:                                   # a fresh run: a fresh log, no files of an older run
        for name in RUN_FILES:                          # (there only with --force: check_out_dir_free)
            (run.out_dir / name).unlink(missing_ok=True)
        with naming_errors(run.log_path):
            run.log_path.write_text("")
        write_run_config(run)
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
                  best_step=p.get("best_step"), last_eval=p.get("last_eval"), saved_step=int(meta["step"]),
                  trained_keys=list(trained))
    run.log(f"resumed from {ck.path} at step {state.step}")
    if run.rank != 0:
        return state
    # drop what the interrupted run logged after its checkpoint: those steps are about to be redone
    kept = log_lines_upto(run.log_path, state.step, run.log)
    write_text_atomic(run.log_path, "".join(line + "\n" for line in kept))
    append_jsonl(run.log_path, {"event": "resume", "step": state.step, "world_size": run.world})
    write_run_config(run)
    return state


def log_lines_upto(path, step, log=print):
    """The lines of log.jsonl (a file of JSON records) up to `step`. Its last line, if incomplete (the
    disk filled up, or the process was killed, while it was written), is dropped with a warning; a bad line
    before it is refused, naming it: a log damaged in its middle is not this program's to mend."""
    if not path.is_file():
        return []
    with naming_errors(path):
        lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":                                # the newline that ends the last record
        lines.pop()
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step", 0), (int, float))):
                raise ValueError("not a record with a numeric step")
        except (ValueError, RecursionError) as e:      # (UnicodeDecodeError is a ValueError)
            if n < len(lines):
                raise FileFormatError(f"{path}, line {n}: not a JSON record ({e}); the log is damaged before its "
                                      f"end: remove that line (or the whole log) and resume again") from None
            log(f"warning: {path}, line {n} (the last) is incomplete, as a disk that filled up or a killed process "
                f"leaves it ({e}): dropped")
            break
        if record.get("step", 0) <= step:
            kept.append(line.decode("utf-8"))
    return kept


def write_run_config(run):
    """The run's whole config as config.toml in its out dir, a file --config reads back."""
    header = (f"train.py's settings for the run in {run.out_dir} (written when it started; every setting with "
              f"its --help)\nRead it back with: python train.py --config {run.out_dir / 'config.toml'} --out-dir "
              f"NEW (flags override it)")
    write_text_atomic(run.out_dir / "config.toml", config_toml(run.cfg, header))


def checkpoint_meta(run, state):
    """The metadata of a checkpoint of the run (checkpoint.build_meta's, with the training state that
    resumed_state reads back): the config, the sampler's state, the data, the progress, and what a
    fine-tuning run adds."""
    cfg, d = run.cfg, run.data["meta"]
    sampler = ({"kind": "uniform random examples", "train_examples": len(run.data["train"])} if cfg.sft else
               {"kind": "uniform random windows", "train_tokens": len(run.data["train"])})
    return build_meta(
        run.mcfg, run.tok, step=state.step, adam_t=state.opt["t"], train_config=asdict(cfg),
        rng={"batch": state.rng.bit_generator.state}, loss_scaler=state.scaler,
        sampler={**sampler, "batch_size": cfg.batch_size, "block_size": cfg.block_size}, world_size=run.world,
        data={"name": d["name"], "key": d["key"], "train_tokens": d["train_tokens"], "val_tokens": d["val_tokens"],
              "val_bytes_per_token": d["val_bytes_per_token"]},
        progress={"elapsed_s": state.elapsed_now(), "tokens_seen": state.tokens_seen,
                  "best_val_loss": state.best_val, "best_step": state.best_step, "last_eval": state.last_eval},
        **fine_tuning_meta(run))


def best_meta(run, state, val_loss):
    """The metadata of best.safetensors, the weights of the run's best val loss: build_meta's, with the
    run's config, data and progress, and "best" (its step and val loss); no optimizer or sampler state,
    as --resume continues ckpt.safetensors only."""
    d = run.data["meta"]
    return build_meta(run.mcfg, run.tok, step=state.step, train_config=asdict(run.cfg), world_size=run.world,
                      data={"name": d["name"], "key": d["key"], "val_bytes_per_token": d["val_bytes_per_token"]},
                      best={"step": state.step, "val_loss": val_loss}, **fine_tuning_meta(run))


def fine_tuning_meta(run):
    """The metadata a fine-tuning run adds: "lora" (its config and base) and "chat" (the template)."""
    extra = {}
    if run.lora is not None:
        extra["lora"] = {"config": run.lora.to_dict(), "base": run.lora_base}
    if run.chat is not None:
        extra["chat"] = run.chat.to_meta()
    return extra


def append_jsonl(path, record):
    with naming_errors(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
