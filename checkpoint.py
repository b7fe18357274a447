"""
checkpoint.py: the checkpoint file, one safetensors file written atomically and verified on load, and the
one way every program builds, reads and loads it:

    meta = build_meta(model_cfg, tok, step=..., **training_state)    # the metadata, train.py and export.py
    save_checkpoint(path, params, adam_m, adam_v, meta)
    ck = load_checkpoint(path)        # Checkpoint(path, params, adam_m, adam_v, meta): host arrays, verified
    ck.model_config(), ck.tokenizer() # the metadata read back, with one-line errors
    model = load_model(path, "numpy") # Model(path, params on the device, cfg, tokenizer, meta, gm): sampling,
                                      # export, evaluation

Layout of `ckpt.safetensors` (any safetensors reader opens it):

    tensors   params.<name>    the model's weights, float32, SPEC.md's names and shapes
              adam.m.<name>    AdamW's first moment, one per parameter (absent in a weights-only file)
              adam.v.<name>    AdamW's second moment (likewise)
    metadata  "format"         "gpt-numpy-checkpoint"
              "version"        "1"
              "meta"           JSON: step, adam_t, model and training config, the batch sampler's RNG state,
                               the tokenizer (its file's text), data identity, progress (build_meta)
              "tensors_sha256" sha256 over every tensor (name, dtype, shape, bytes, in sorted name order)

Tensors are stored as host (NumPy) float32 arrays, so a checkpoint written on the GPU loads on the CPU
and back. A file that is truncated, corrupt, or whose tensors do not hash to the recorded sha256 is
refused with errors.FileFormatError and never loaded.

Writing is atomic: the bytes go to a temporary file in the same folder, which is flushed, fsync'ed and
then renamed over the old file (os.replace), and the folder is fsync'ed. A process killed at any moment
leaves either the old checkpoint or the new one, never a mix; a stray `.ckpt.safetensors.tmp-*` file is
ignored.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import gpt_numpy
from data import atomic_write, load_backend, text_sha256, tokenizer_from_text
from errors import FileFormatError

FORMAT = "gpt-numpy-checkpoint"
VERSION = "1"


def tensors_sha256(tensors):
    """sha256 of a {name: array} dict: name, dtype, shape and little-endian bytes, names sorted."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path, params, adam_m, adam_v, meta, before_replace=None):
    """Write params, AdamW's moments (host NumPy arrays) and the JSON-able `meta` dict to `path`."""
    tensors = {}
    for prefix, group in (("params.", params), ("adam.m.", adam_m), ("adam.v.", adam_v)):
        for k, a in group.items():
            tensors[prefix + k] = np.ascontiguousarray(a, dtype=np.float32)
    metadata = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta),
                "tensors_sha256": tensors_sha256(tensors)}
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
    if metadata.get("version") != VERSION:
        raise FileFormatError(f"{path} has checkpoint version {metadata.get('version')!r}; "
                              f"this code reads version {VERSION}")
    if tensors_sha256(tensors) != metadata.get("tensors_sha256"):
        raise FileFormatError(f"{path} is corrupt: its tensors do not match the sha256 recorded in it; "
                              f"it was not loaded")
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError) as e:
        raise FileFormatError(f"{path} is corrupt: unreadable metadata ({e})") from None
    groups = {"params.": {}, "adam.m.": {}, "adam.v.": {}}
    for name, a in tensors.items():
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


def read_meta(path):
    """Only the JSON metadata of a checkpoint, without verifying the tensors (cheap; for messages)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return json.loads(header["__metadata__"]["meta"])
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------
# The metadata: built here, read here

def build_meta(model_cfg, tok, step=0, adam_t=0, **more):
    """A checkpoint's "meta": the step, AdamW's step count, the model config and the tokenizer (its kind,
    text form and that text's sha256), plus `more`: train.py's training state (train_config, rng,
    loss_scaler, sampler, data, progress) or export.py's imported_from.

    Example: build_meta(GPTConfig(...), CharTokenizer("ab")) -> {"step": 0, "adam_t": 0, "model_config":
    {...}, "tokenizer": {"kind": "char", "sha256": "...", "text": '{"type": "char", ...}'}}.
    """
    text = tok.to_text()
    return {"step": step, "adam_t": adam_t, "model_config": model_cfg.to_dict(),
            "tokenizer": {"kind": tok.kind, "sha256": text_sha256(text), "text": text}, **more}


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
        return bool(self.adam_m) and "rng" in self.meta and "train_config" in self.meta

    def model_config(self, **override):
        """The model's GPTConfig, with `override` applied (e.g. a run's dropout); FileFormatError if the
        metadata holds none that is usable. Keys a newer GPTConfig dropped are ignored."""
        known = set(gpt_numpy.GPTConfig.__dataclass_fields__)
        try:
            saved = {k: v for k, v in self.meta["model_config"].items() if k in known}
            return gpt_numpy.GPTConfig(**{**saved, **override})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FileFormatError(f"{self.path}: no usable model config in the checkpoint ({e})") from None

    def tokenizer(self):
        """The tokenizer embedded in the metadata; FileFormatError if there is none or it is unreadable."""
        try:
            t = self.meta["tokenizer"]
            return tokenizer_from_text(t["kind"], t["text"])
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{self.path}: no usable tokenizer in the checkpoint ({e})") from None


def load_params(gm, host_params, cfg, path="the checkpoint"):
    """A checkpoint's weights -> gm's device arrays, checked against cfg's shapes (FileFormatError naming
    the first wrong, missing or extra key)."""
    try:
        gm.check_param_shapes(host_params, cfg)
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
    """A checkpoint (a file or its folder) as a Model on `backend` ("numpy" or "cupy")."""
    gm = load_backend(backend)
    ck = load_checkpoint(path)
    cfg = ck.model_config(dropout=0.0, checkpoint=False)
    params = load_params(gm, ck.params, cfg, ck.path)
    return Model(ck.path, params, cfg, ck.tokenizer(), ck.meta, gm)
