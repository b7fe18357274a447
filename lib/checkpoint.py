"""
checkpoint.py: the checkpoint file, one safetensors file written atomically and verified on load, and the
one way every program builds, reads and loads it:

    meta = build_meta(model_cfg, tok, step=..., **training_state)    # the metadata, train.py and export.py
    save_checkpoint(path, params, adam_m, adam_v, meta)
    save_imported(path, params, cfg, tok, source, chat)   # a weights-only file of an imported model
    ck = load_checkpoint(path)        # Checkpoint(path, params, adam_m, adam_v, meta): host arrays, verified
    ck.model_config(), ck.tokenizer() # the metadata read back, with one-line errors
    model = load_model(path, "numpy") # Model(path, params on the device, cfg, tokenizer, meta, gm): sampling,
                                      # export, evaluation (a LoRA run's adapters merged into its base)

Layout of `ckpt.safetensors` (any safetensors reader opens it):

    tensors   params.<name>    the model's weights, float32, SPEC.md's names and shapes
              adam.m.<name>    AdamW's first moment, one per parameter (absent in a weights-only file)
              adam.v.<name>    AdamW's second moment (likewise)
    metadata  "format"         "gpt-numpy-checkpoint"
              "version"        "2"
              "meta"           JSON: step, adam_t, model and training config, the batch sampler's RNG state,
                               the tokenizer (its file's text), data identity, progress (build_meta)
              "sha256"         sha256 over every tensor (name, dtype, shape, bytes, in sorted name order),
                               then over the "meta" text: the metadata is covered too

Version 1 recorded "tensors_sha256" instead, over the tensors alone; such a file
still loads, its metadata unverified, with a note on stderr. A file saved now is always version 2.

A LoRA run's checkpoint (train.py --lora-rank) holds its adapters as the params (<weight>.lora_A and
.lora_B) with their AdamW moments, and names its base checkpoint by path and weights hash in the metadata
("lora"; see the LoRA section at the end).

Tensors are stored as host (NumPy) float32 arrays, so a checkpoint written on the GPU loads on the CPU
and back. A file that is truncated, corrupt, or that does not hash to the recorded sha256 is refused with
errors.FileFormatError and never loaded; so is one with tensors that are not float32 or not finite, or
metadata that does not fit the schema below (META_SCHEMA: a wrong type is one line, not a traceback), or
a model config that cannot be this file's (a tensor count or a context length that no file here has).

Writing is atomic: the bytes go to a temporary file in the same folder, which is flushed, fsync'ed and
then renamed over the old file (os.replace), and the folder is fsync'ed. A process killed at any moment
leaves either the old checkpoint or the new one, never a mix; a stray `.ckpt.safetensors.tmp-*` file is
ignored.

A run folder holds two checkpoints: ckpt.safetensors, the latest, which --resume continues, and
best.safetensors, the weights of the best val loss so far (train.py writes it when an evaluation improves
on it): the same format, weights only (no adam.* tensors), its metadata with "best": {"step", "val_loss"}.
Every program that reads a checkpoint (CHECKPOINT_HELP) takes either.
"""

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import gpt_numpy
from errors import FileFormatError
from lib import memory
from lib.backend import load_backend
from lib.files import atomic_write, text_sha256
from lib.lora import LoraConfig, merge as lora_merge, shapes as lora_shapes
from lib.tokenizer import tokenizer_from_text

FORMAT = "gpt-numpy-checkpoint"
VERSION = "2"                   # written; "1" is still read (its metadata unverified)

# What every program's checkpoint argument (sample.py, eval.py, export.py --ckpt; train.py --init-from)
# takes, in the words of their --help
CHECKPOINT_HELP = ("a run folder (its latest checkpoint, ckpt.safetensors) or a checkpoint file, such as the "
                   "run's best.safetensors (the weights of its best val loss) or merged.safetensors")


def tensors_sha256(tensors, h=None):
    """sha256 of a {name: array} dict: name, dtype, shape and little-endian bytes, names sorted.
    (Version 1's hash; version 2 goes on to hash the metadata, see checkpoint_sha256.)"""
    h = h or hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def checkpoint_sha256(tensors, meta_text):
    """Version 2's hash: the tensors as tensors_sha256, then the metadata's JSON text, so that a step or a
    sampler state changed by one byte is refused like a changed weight."""
    h = hashlib.sha256()
    tensors_sha256(tensors, h)
    h.update(b"meta\0" + meta_text.encode("utf-8"))
    return h.hexdigest()


def save_checkpoint(path, params, adam_m, adam_v, meta, before_replace=None):
    """Write params, AdamW's moments (host NumPy arrays) and the JSON-able `meta` dict to `path`."""
    tensors = {}
    for prefix, group in (("params.", params), ("adam.m.", adam_m), ("adam.v.", adam_v)):
        for k, a in group.items():
            tensors[prefix + k] = np.ascontiguousarray(a, dtype=np.float32)
    text = json.dumps(meta)
    metadata = {"format": FORMAT, "version": VERSION, "meta": text, "sha256": checkpoint_sha256(tensors, text)}
    atomic_write(path, safetensors_chunks(tensors, metadata), before_replace)


# safetensors' dtype names <-> NumPy's, for the tensors the streamed writer and reader below handle
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                      "I8": "i1", "U8": "u1", "BOOL": "?"}


def safetensors_chunks(tensors, metadata):
    """The bytes of a safetensors file of `tensors` (contiguous NumPy arrays) as a list of chunks: the
    8-byte header length, the JSON header (padded with spaces to 8 bytes, as safetensors pads it), then
    each tensor's buffer, no copy. safetensors.numpy.save would copy every tensor into one bytes object
    (twice the model in memory; for a 135M-parameter import, 1.1 GB on top of the weights)."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return [len(h).to_bytes(8, "little"), h, *(memoryview(a).cast("B") for a in tensors.values() if a.nbytes)]


def read_safetensors_file(path):
    """(metadata, {name: NumPy array}) of a safetensors file, each tensor read straight into its own array
    (no second copy of the file in memory). ValueError for a file that is truncated, overlong or whose
    header does not add up (the caller says which file)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        end = 0
        for name, e in entries:
            dtype = np.dtype(SAFETENSORS_DTYPES[e["dtype"]]) if e["dtype"] in SAFETENSORS_DTYPES else None
            if dtype is None:
                raise ValueError(f"tensor {name} has dtype {e['dtype']}")
            begin, stop = e["data_offsets"]
            if begin != end or stop - begin != dtype.itemsize * int(np.prod(e["shape"], dtype=np.int64)):
                raise ValueError(f"tensor {name}'s data_offsets {e['data_offsets']} do not fit its shape or its place")
            end = stop
        if 8 + n + end != size:
            raise ValueError(f"expected {8 + n + end} bytes, found {size}")
        tensors = {}
        for name, e in entries:                             # in file order: one sequential read
            a = np.empty(e["shape"], SAFETENSORS_DTYPES[e["dtype"]])
            if a.nbytes and f.readinto(memoryview(a).cast("B")) != a.nbytes:
                raise ValueError("the file ended early")
            tensors[name] = a
    return metadata, tensors


def load_checkpoint(path):
    """Read and verify a checkpoint (a file, or a folder holding ckpt.safetensors): a Checkpoint record
    with NumPy arrays.

    Raises FileFormatError (a one-line message) for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.safetensors"
    if not path.is_file():
        raise FileFormatError(f"no checkpoint at {path}")     # a path the user gave: still a bad file
    try:
        # a safetensors file: 8-byte little-endian header length, a JSON header, then the tensor bytes
        metadata, tensors = read_safetensors_file(path)
    except Exception as e:
        raise FileFormatError(f"{path} is truncated or corrupt and was not loaded ({e})") from None
    if metadata.get("format") != FORMAT:
        raise FileFormatError(f"{path} is not a gpt-numpy training checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r})")
    verify_hash(path, tensors, metadata)
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError) as e:
        raise FileFormatError(f"{path} is corrupt: unreadable metadata ({e})") from None
    check_meta(meta, path)
    check_tensors(tensors, path)                        # before the loop below empties `tensors`
    groups = {"params.": {}, "adam.m.": {}, "adam.v.": {}}
    for name in list(tensors):
        a = tensors.pop(name)   # each tensor's buffer goes once it is copied
        for prefix, group in groups.items():
            if name.startswith(prefix):
                group[name[len(prefix):]] = a                        # own, aligned, writable memory
                break
        else:
            raise FileFormatError(f"{path} has an unexpected tensor {name!r}")
    params, m, v = groups.values()
    if not params:
        raise FileFormatError(f"{path} holds no parameters")
    if (m or v) and (set(m) != set(params) or set(v) != set(params)):   # none at all: a weights-only file
        raise FileFormatError(f"{path} is corrupt: the optimizer state does not match the parameters")
    return Checkpoint(path, params, m, v, meta)


def verify_hash(path, tensors, metadata):
    """Version 2: the tensors and the metadata against "sha256". Version 1: the tensors against
    "tensors_sha256", the metadata unverified (a note says so). Any other version is refused."""
    version = metadata.get("version")
    if version == VERSION:
        if checkpoint_sha256(tensors, metadata.get("meta", "")) != metadata.get("sha256"):
            raise FileFormatError(f"{path} is corrupt: its tensors or metadata do not match the sha256 recorded "
                                  f"in it; it was not loaded")
    elif version == "1":
        if tensors_sha256(tensors) != metadata.get("tensors_sha256"):
            raise FileFormatError(f"{path} is corrupt: its tensors do not match the sha256 recorded in it; "
                                  f"it was not loaded")
        print(f"note: {path} is a version-1 checkpoint: its hash covers the tensors, not the metadata, which is "
              f"used unverified (a checkpoint saved now is version {VERSION})", file=sys.stderr)
    else:
        raise FileFormatError(f"{path} has checkpoint version {version!r}; this code reads versions 1 and "
                              f"{VERSION}")


DIVERGED = " (a run that diverged? resume from an earlier checkpoint, with a lower --lr)"


def check_tensors(tensors, path, what="it was not loaded", hint=DIVERGED):
    """Every tensor float32 and finite: an int32 tensor would fail later with a traceback (or be cast in
    silence), a nan weight would sample nan probabilities. Importers run it too (save_imported), with
    their own `what` and no hint about diverged runs."""
    for name, a in tensors.items():
        if a.dtype != np.float32:
            raise FileFormatError(f"{path}: tensor {name} has dtype {a.dtype}, expected float32; {what}")
    for name, a in tensors.items():
        check_finite(a, name, path, what, hint)


def check_finite(a, name, path, what="it was not loaded", hint=""):
    """FileFormatError naming the file and the tensor unless every value of the array a is finite."""
    if not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise FileFormatError(f"{path} holds non-finite values: {bad:,} nan/inf in {name}; {what}{hint}")


# ----------------------------------------------------------------------------------------------------
# The metadata's schema: for each key build_meta and train.py write, what its value must be. A key may
# be absent (a weights-only file has no training state); what a use needs is checked by that use
# (Checkpoint.model_config, .tokenizer, .missing_training_state).

def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v, nan_ok=False):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (nan_ok or math.isfinite(v))


def _pcg64_state(v):
    try:
        np.random.PCG64().state = v                     # the sampler's own check of the state
        return True
    except (TypeError, ValueError, KeyError, OverflowError):
        return False


def _progress(v):
    return (isinstance(v, dict) and _number(v.get("elapsed_s", 0)) and _count(v.get("tokens_seen", 0))
            and (v.get("best_val_loss") is None or _number(v["best_val_loss"], nan_ok=True))
            and (v.get("best_step") is None or _count(v["best_step"]))
            and (v.get("last_eval") is None or isinstance(v["last_eval"], dict)))


META_SCHEMA = {
    "step": (_count, "a non-negative integer"),
    "adam_t": (_count, "a non-negative integer"),
    "model_config": (lambda v: isinstance(v, dict), "an object (GPTConfig's fields)"),
    "tokenizer": (lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str) and isinstance(v.get("text"), str),
                  "an object with a kind and a text"),
    "train_config": (lambda v: isinstance(v, dict), "an object (train.py's TrainConfig)"),
    "rng": (lambda v: isinstance(v, dict) and _pcg64_state(v.get("batch")), "an object whose batch is a PCG64 state"),
    "loss_scaler": (lambda v: isinstance(v, dict) and _number(v.get("scale")) and v["scale"] > 0
                    and _count(v.get("good_steps")), "an object with a positive scale and a good_steps count"),
    "sampler": (lambda v: isinstance(v, dict), "an object"),
    "data": (lambda v: isinstance(v, dict) and isinstance(v.get("key"), dict), "an object with the data cache's key"),
    "progress": (_progress, "an object with elapsed_s, tokens_seen, best_val_loss and last_eval"),
    "imported_from": (lambda v: isinstance(v, str), "a string"),
    "best": (lambda v: isinstance(v, dict) and _count(v.get("step")) and _number(v.get("val_loss"), nan_ok=True),
             "an object with the step and val_loss of a run's best weights"),
}
TRAINING_STATE = ("step", "adam_t", "train_config", "rng", "data", "progress")   # what --resume reads
PROGRESS = ("elapsed_s", "tokens_seen", "best_val_loss")                          # ... and in progress


def check_meta(meta, path):
    """FileFormatError (one line naming the key) unless meta is an object whose known keys hold values
    of the schema's types."""
    if not isinstance(meta, dict):
        raise FileFormatError(f"{path}: the checkpoint's metadata is {type(meta).__name__}, expected an object; "
                              f"it was not loaded")
    for key, (ok, what) in META_SCHEMA.items():
        if key in meta and not ok(meta[key]):
            raise FileFormatError(f"{path}: the checkpoint's metadata has {key} = {json.dumps(meta[key])[:80]}, "
                                  f"expected {what}; it was not loaded")


def read_meta(path):
    """Only the JSON metadata of a checkpoint, without verifying the tensors (cheap; for messages)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        meta = json.loads(header["__metadata__"]["meta"])
    except Exception:
        return None
    return meta if isinstance(meta, dict) else None


# ----------------------------------------------------------------------------------------------------
# The metadata: built here, read here

def build_meta(model_cfg, tok, step=0, adam_t=0, **more):
    """A checkpoint's "meta": the step, AdamW's step count, the model config and the tokenizer (its kind,
    text form and that text's sha256), plus `more`: train.py's training state (train_config, rng,
    loss_scaler, sampler, data, progress) or save_imported's imported_from.

    Example: build_meta(GPTConfig(...), CharTokenizer("ab")) -> {"step": 0, "adam_t": 0, "model_config":
    {...}, "tokenizer": {"kind": "char", "sha256": "...", "text": '{"type": "char", ...}'}}.
    """
    text = tok.to_text()
    return {"step": step, "adam_t": adam_t, "model_config": model_cfg.to_dict(),
            "tokenizer": {"kind": tok.kind, "sha256": text_sha256(text), "text": text}, **more}


def save_imported(path, params, cfg, tok, source, chat=None):
    """An imported model (a Hugging Face folder, a GGUF file) as a checkpoint for sample.py and fine-tuning:
    the weights alone (no AdamW moments: a fine-tuning run starts its optimizer afresh, and zero moments
    would triple the file), step 0, the model config, the tokenizer, imported_from=source and, for a chat
    model, chat_template.chat_info's dict. path: a .safetensors file, or a folder for ckpt.safetensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "ckpt.safetensors"
    check_importable(params, cfg, tok, source)
    more = {"chat": chat} if chat and chat.get("template") else {}
    save_checkpoint(path, params, {}, {}, build_meta(cfg, tok, imported_from=str(source), **more))
    return path


def check_importable(params, cfg, tok, source):
    """The checks every loader runs on a checkpoint, run on an import before it is written, so that an
    import succeeds only where sample.py, train.py --init-from and export.py --ckpt will succeed: the
    context and tensor count (check_model_fits_file), float32 finite weights of the config's shapes, a
    tokenizer that fits the model and reads back from its text form (bpe.py's file refuses, e.g., an
    empty special token). FileFormatError naming the source file and what does not fit."""
    what = "it was not imported"
    check_model_fits_file(cfg, params, source)
    check_tensors(params, source, what, hint="")
    try:
        check_param_shapes(params, cfg)
    except ValueError as e:
        raise FileFormatError(f"{source} does not fit its model config: {e}; {what}") from None
    check_tokenizer_fits(tok, cfg, source)
    try:
        tokenizer_from_text(tok.kind, tok.to_text())
    except ValueError as e:
        raise FileFormatError(f"{source}: its tokenizer cannot be saved and read back ({e}); {what}") from None


@dataclass
class Checkpoint:
    """A saved run as load_checkpoint reads it: host (NumPy) arrays and the JSON metadata."""
    path: Path
    params: dict                # name -> float32 array, SPEC.md's names and shapes
    adam_m: dict                # AdamW's moments, same keys; {} in a weights-only file
    adam_v: dict
    meta: dict                  # build_meta's dict

    @property
    def step(self):
        return self.meta.get("step")

    @property
    def has_training_state(self):
        """Does it hold what --resume needs: the optimizer, the sampler and the training config?"""
        return not self.missing_training_state()

    def missing_training_state(self):
        """What --resume needs and this file lacks: [] for a complete training checkpoint."""
        progress = self.meta.get("progress", {})
        return ((["the optimizer state"] if not self.adam_m else []) + [k for k in TRAINING_STATE if k not in self.meta]
                + [f"progress.{k}" for k in PROGRESS if "progress" in self.meta and k not in progress])

    def model_config(self, **override):
        """The model's GPTConfig, with `override` applied (e.g. a run's dropout); FileFormatError if the
        metadata holds none that is usable, or one that cannot be this file's (check_model_fits_file).
        Keys a newer GPTConfig dropped are ignored."""
        known = set(gpt_numpy.GPTConfig.__dataclass_fields__)
        try:
            saved = {k: v for k, v in self.meta["model_config"].items() if k in known}
            cfg = gpt_numpy.GPTConfig(**{**saved, **override})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FileFormatError(f"{self.path}: no usable model config in the checkpoint ({e})") from None
        check_model_fits_file(cfg, self.params, self.path, lora_config_of(self))
        return cfg

    def tokenizer(self):
        """The tokenizer embedded in the metadata; FileFormatError if there is none, it is unreadable or
        its text does not match its recorded sha256."""
        try:
            t = self.meta["tokenizer"]
            if "sha256" in t and text_sha256(t["text"]) != t["sha256"]:
                raise ValueError("its text does not match its sha256")
            return tokenizer_from_text(t["kind"], t["text"])
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{self.path}: no usable tokenizer in the checkpoint ({e})") from None


def check_model_fits_file(cfg, params, path, lora=None):
    """Refuse, before anything is built from it, a model config that cannot describe these tensors: a
    context beyond memory.LONGEST_CONTEXT, or a tensor count that differs from the file's (n_layer = 10**9
    would otherwise build a table of 10**10 names). Shapes are compared later, by load_params. A LoRA
    run's file (lora: its LoraConfig) holds two adapter tensors per target and block instead."""
    if cfg.max_seq_len > memory.LONGEST_CONTEXT:
        raise FileFormatError(f"{path}: the model config says max_seq_len {cfg.max_seq_len:,}, beyond any context "
                              f"this code runs (at most {memory.LONGEST_CONTEXT:,}); damaged metadata?")
    n = memory.count_params(cfg)[1] if lora is None else 2 * len(lora.targets) * cfg.n_layer
    if n != len(params):
        raise FileFormatError(f"{path} does not fit its model config: n_layer {cfg.n_layer:,} means {n:,} weight "
                              f"tensors, and the file holds {len(params):,}")


def check_layer_count(n_layer, names, block, path, key):
    r"""Refuse, before any per-layer table is built, a layer count that the file's tensors do not have: a
    tiny file whose metadata says 2^31 layers would otherwise build name tables for minutes and run out of
    memory. names: the file's tensor names; block: a regex whose group 1 is a block's index (GGUF's
    r"blk\.(\d+)\.", Hugging Face's r"model\.layers\.(\d+)\."); key: the metadata's name for the count;
    path: the file or folder for the message (None: the caller names it).
    Example: key llama.block_count = 2147483648, tensors of blocks 0 and 1 -> FileFormatError."""
    found = {int(g) for n in names if (m := re.match(block, n)) and len(g := m.group(1)) < 10}
    if len(found) != n_layer or (found and max(found) != n_layer - 1):
        held = f"{len(found):,} blocks" + (f" (numbered {min(found)} to {max(found)})" if found else "")
        where = f"{path}: " if path else ""
        raise FileFormatError(f"{where}{key} = {n_layer:,}, but the tensors are those of {held}")


def check_tokenizer_fits(tok, cfg, path):
    """A tokenizer with more ids than the model, or a character tokenizer with fewer (every id of a char
    model is a character; a sampled id past the vocabulary would have no text): FileFormatError.
    A BPE tokenizer may have fewer ids (a Hugging Face model's vocabulary padded to a round size)."""
    if tok.vocab_size > cfg.vocab_size or (tok.kind == "char" and tok.vocab_size != cfg.vocab_size):
        raise FileFormatError(f"{path}: its {tok.kind} tokenizer has {tok.vocab_size} ids but its model "
                              f"{cfg.vocab_size}; it cannot be sampled or trained")


def check_param_shapes(params, cfg):
    """Raise ValueError unless params has exactly the keys and shapes of gpt_numpy.param_shapes(cfg); the
    message names the first wrong, missing or extra key. Every loader of saved weights calls it.

    Example: params["blocks.0.attn.proj"] of shape (32, 8) for d_model 32 ->
    "parameter blocks.0.attn.proj has shape (32, 8), expected (32, 32)".
    """
    shapes = gpt_numpy.param_shapes(cfg)
    for k, shape in shapes.items():
        if k not in params:
            raise ValueError(f"parameter {k} is missing (expected shape {shape})")
        if tuple(params[k].shape) != shape:
            raise ValueError(f"parameter {k} has shape {tuple(params[k].shape)}, expected {shape}")
    for k in params:
        if k not in shapes:
            raise ValueError(f"unexpected parameter {k} (shape {tuple(params[k].shape)}): not in this config")


def load_params(gm, host_params, cfg, path="the checkpoint"):
    """A checkpoint's weights -> gm's device arrays, checked against cfg's shapes (FileFormatError naming
    the first wrong, missing or extra key)."""
    try:
        check_param_shapes(host_params, cfg)
    except ValueError as e:
        raise FileFormatError(f"{path} does not fit its model config: {e}") from None
    # subtle: keep gpt_numpy's key order; clip_grad_norm sums the squares in dict order, so another
    # order would change the norm in its last bits and a resumed run would drift from the original.
    return {k: gm.to_device(host_params[k]) for k in gm.param_shapes(cfg)}


# ----------------------------------------------------------------------------------------------------
# A model ready to run, for every program that reads a checkpoint (sample.py, export.py, an eval.py)

@dataclass
class Model:
    path: Path                  # the checkpoint file
    params: dict                # on gm's device, gpt_numpy's key order
    cfg: gpt_numpy.GPTConfig    # the checkpoint's model, without dropout or activation checkpointing
    tokenizer: object           # data.CharTokenizer or bpe.Tokenizer
    meta: dict                  # build_meta's dict
    gm: object = field(repr=False)   # the backend module: gpt_numpy or gpt_cupy


def load_model(path, backend="numpy"):
    """A checkpoint (a file or its folder) as a Model on `backend` ("numpy" or "cupy"). A LoRA run's
    checkpoint loads its base checkpoint and merges the adapters into it: W + (alpha / r) A @ B."""
    gm = load_backend(backend)
    ck = load_checkpoint(path)
    if lora_config_of(ck) is not None:
        base, adapters, lora, cfg = open_lora_run(ck, gm)
        return Model(ck.path, lora_merge({**base, **adapters}, lora), cfg, ck.tokenizer(), ck.meta, gm)
    cfg = ck.model_config(dropout=0.0, checkpoint=False)
    tok = ck.tokenizer()
    check_tokenizer_fits(tok, cfg, ck.path)
    params = load_params(gm, ck.params, cfg, ck.path)
    return Model(ck.path, params, cfg, tok, ck.meta, gm)


# ----------------------------------------------------------------------------------------------------
# LoRA runs (train.py --lora-rank): the checkpoint holds the adapters (params.<weight>.lora_A / .lora_B)
# and their AdamW moments, not a second copy of the base weights. Its metadata names the base:
#     "lora": {"config": {rank, alpha, targets, dropout},
#              "base": {"path": absolute path, "relpath": path from the adapter file's folder,
#                       "params_sha256": tensors_sha256 of the base's params}}
# Loading finds the base by relpath (so a run folder and its base can move together), then by path, and
# refuses it unless its weights hash to params_sha256.

def lora_base_ref(base_ck, out_dir):
    """The "base" entry of a LoRA run's metadata, for the base checkpoint base_ck and the run's folder."""
    base = Path(base_ck.path).resolve()
    return {"path": str(base), "relpath": os.path.relpath(base, Path(out_dir).resolve()),
            "params_sha256": tensors_sha256(base_ck.params)}


def lora_config_of(ck):
    """The LoraConfig of a LoRA run's checkpoint, or None for any other checkpoint."""
    if "lora" not in ck.meta:
        return None
    try:
        return LoraConfig(**ck.meta["lora"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{ck.path}: unusable LoRA config in the checkpoint ({e})") from None


def lora_base_path(ck):
    """Where the base checkpoint of the LoRA run `ck` is: by its path relative to the run, then by its
    absolute path; FileFormatError if it is in neither place."""
    ref = ck.meta["lora"].get("base") or {}
    tries = [Path(os.path.normpath(Path(ck.path).parent / ref["relpath"]))] if ref.get("relpath") else []
    tries += [Path(ref["path"])] if ref.get("path") else []
    found = next((p for p in tries if p.is_file()), None)
    if found is None:
        raise FileFormatError(f"{ck.path} holds LoRA adapters for the base checkpoint {ref.get('path')}, which is "
                              f"not there (nor at {tries[0] if tries else '?'}); put it back to use the adapters")
    return found


def load_lora_base(ck):
    """The base checkpoint of the LoRA run `ck`, verified against the hash recorded in it."""
    ref = ck.meta["lora"].get("base") or {}
    found = lora_base_path(ck)
    base = load_checkpoint(found)
    if tensors_sha256(base.params) != ref.get("params_sha256"):
        raise FileFormatError(f"{ck.path} holds LoRA adapters for the base checkpoint {found}, whose weights have "
                              f"changed since (params sha256 {tensors_sha256(base.params)[:12]}, expected "
                              f"{str(ref.get('params_sha256'))[:12]}); the adapters fit only the original")
    return base


def load_adapters(gm, host_adapters, cfg, lora, path="the checkpoint"):
    """A LoRA checkpoint's adapters -> gm's device arrays in lora_shapes order, checked against it."""
    shapes = lora_shapes(cfg, lora)
    for k, shape in shapes.items():
        if k not in host_adapters or tuple(host_adapters[k].shape) != shape:
            got = tuple(host_adapters[k].shape) if k in host_adapters else "missing"
            raise FileFormatError(f"{path}: adapter {k} is {got}, expected {shape} for its LoRA config")
    extra = sorted(set(host_adapters) - set(shapes))
    if extra:
        raise FileFormatError(f"{path}: unexpected tensor {extra[0]} in a LoRA checkpoint")
    return {k: gm.to_device(host_adapters[k]) for k in shapes}


def open_lora_run(ck, gm):
    """A LoRA run's checkpoint `ck`, unmerged: (base params, adapters, LoraConfig, cfg), on gm's device
    (the base found and verified by load_lora_base). export.py --peft-adapter reads the adapters this way;
    load_model merges them."""
    lora = lora_config_of(ck)
    if lora is None:
        raise FileFormatError(f"{ck.path} is not a LoRA run's checkpoint (it has no adapters; train one with "
                              f"train.py --init-from CKPT --lora-rank R)")
    cfg = ck.model_config(dropout=0.0, checkpoint=False)
    base = load_lora_base(ck)
    return load_params(gm, base.params, cfg, base.path), load_adapters(gm, ck.params, cfg, lora, ck.path), lora, cfg
