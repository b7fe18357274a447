"""
runs.py: how a training run starts, and what it is made of. train.py's loop begins where this file ends:
with the config settled, the backend loaded, the folders made and locked, the corpus (or --sft's records)
tokenized and cached, and a State to train, fresh or restored from the run's checkpoint.

    with runs.start(cfg, explicit, flags, resume, log) as s:   # train.parse_args's command line
        train(s.cfg, s.data, s.tok, s.gm, resume=s.resume, init=s.init)

Three ways to start, each with its rules:
- afresh: the config is the flags (over a preset, over the defaults); the tokenizer is trained or read
  from the corpus (data.get_tokenizer), the model is new.
- --resume [CKPT]: the run continues its own checkpoint. The config is the checkpoint's; a flag may change
  only what train_config.RESUME_MAY_CHANGE lists, and any other explicit flag that differs is an error (it
  would silently make it another run). The global batch (grad_accum x ranks) stays at any number of ranks,
  the tokenizer is the checkpoint's, and the corpus must hash to the checkpoint's data key. The state is
  the checkpoint's (resumed_state reads back what checkpoint_meta wrote), and log.jsonl is cut back to it.
- --init-from CKPT: a new run fine-tunes another checkpoint. The model (train_config.FROM_CHECKPOINT) and
  the tokenizer come from that checkpoint, a flag that contradicts them is an error; the training
  settings come from the flags. The tokenizer is saved in the out dir, where it keys the data cache.

A run's records: Run, what stays fixed while it trains (the config, the model config, the backend, the
data, the folder); State, what changes, all of it checkpointed (the weights, AdamW, the loss scaler, the
batch sampler's generator, the progress).
"""

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

import gpt_numpy
from errors import UserError
from lib import lora as lora_lib, mixed_precision, scoring, sft
from lib.backend import load_backend
from lib.checkpoint import (build_meta, load_adapters, load_checkpoint, load_lora_base, load_params, lora_base_ref,
                            read_meta)
from lib.data import data_key, data_name, digest_sources, find_sources, get_tokenizer, prepare_data, safe_name, tokenizer_tag
from lib.files import locked_folder, mark_output_folder, naming_errors, write_text_atomic
from lib.tokenizer import encode_prompt, load_tokenizer_file
from lib.train_config import FROM_CHECKPOINT, RESUME_MAY_CHANGE, TrainConfig, check_config, check_saved_config


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
def start(cfg, explicit, flags, resume, log=print, comm=None):
    """From a parsed command line (cfg, the names of the settings chosen by a preset or a flag, of those
    given as flags, and the --resume argument or None): the checkpoint to continue or start from and the
    config, the backend, the folders, then the corpus, the tokenizer and the token cache. Yields a Start
    while it holds the run folder's lock: one process at a time trains in a folder (under mpiexec, `comm`:
    rank 0 holds it for the job, and prepares the data while the other ranks wait, then read it)."""
    gm = load_backend(cfg.backend)                      # fail early on a missing GPU
    ck = init = tok = None
    if resume is not None:
        cfg, ck = open_resume(cfg, explicit, flags, resume, comm.size if comm is not None else 1)
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
    make_folders(cfg)
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
        yield Start(cfg, gm, tok, data, ck, init)


# ----------------------------------------------------------------------------------------------------
# --resume: the run's own checkpoint and config

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
    """out/<data>-<tokenizer>, or for a fine-tuning run out/<data>-from-<the checkpoint's folder or name>."""
    name = cfg.name or data_name(cfg.sft or cfg.data)
    if cfg.init_from:
        src = Path(cfg.init_from).expanduser().resolve()
        src = src.parent if src.name == "ckpt.safetensors" else src
        return str(Path("out") / f"{name}-from-{safe_name(src.name.removesuffix('.safetensors'))}")
    return str(Path("out") / f"{name}-{tokenizer_tag(cfg)}")


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
    for stale in out_dir.glob(".ckpt.safetensors.tmp-*"):
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
                  "best_val_loss": state.best_val, "last_eval": state.last_eval}, **fine_tuning_meta(run))


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
