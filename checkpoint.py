"""
checkpoint.py: the training checkpoint file: one safetensors file, written atomically, verified on load.

Layout of `ckpt.safetensors` (any safetensors reader opens it):

    tensors   params.<name>    the model's weights, float32, SPEC.md's names and shapes
              adam.m.<name>    AdamW's first moment, one per parameter (absent in a weights-only file)
              adam.v.<name>    AdamW's second moment (likewise)
    metadata  "format"         "gpt-numpy-checkpoint"
              "version"        "1"
              "meta"           JSON: step, adam_t, model and training config, the batch sampler's RNG state,
                               the tokenizer (its file's text), data identity, progress (see train.py)
              "tensors_sha256" sha256 over every tensor (name, dtype, shape, bytes, in sorted name order)

Tensors are stored as host (NumPy) float32 arrays, so a checkpoint written on the GPU loads on the CPU
and back. A file that is truncated, corrupt, or whose tensors do not hash to the recorded sha256 is
refused with CheckpointError and never loaded.

Writing is atomic: the bytes go to a temporary file in the same folder, which is flushed, fsync'ed and
then renamed over the old file (os.replace), and the folder is fsync'ed. A process killed at any moment
leaves either the old checkpoint or the new one, never a mix; a stray `.ckpt.safetensors.tmp-*` file is
ignored.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "gpt-numpy-checkpoint"
VERSION = "1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or of another format."""


def atomic_write(path, data, before_replace=None):
    """Write bytes to `path` so that a crash leaves either the old file or the complete new one.

    tmp file in the same folder -> write, flush, fsync -> os.replace -> fsync the folder. (A rename is
    atomic only within one file system, hence the same folder.) `before_replace` is a hook for tests.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder):
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    from safetensors.numpy import save
    tensors = {}
    for prefix, group in (("params.", params), ("adam.m.", adam_m), ("adam.v.", adam_v)):
        for k, a in group.items():
            tensors[prefix + k] = np.ascontiguousarray(a, dtype=np.float32)
    metadata = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta),
                "tensors_sha256": tensors_sha256(tensors)}
    atomic_write(path, save(tensors, metadata=metadata), before_replace)


def load_checkpoint(path):
    """Read and verify a checkpoint: returns (params, adam_m, adam_v, meta) with NumPy arrays.

    Raises CheckpointError (a one-line message) for a missing, truncated or corrupt file.
    """
    from safetensors.numpy import load
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    try:
        # a safetensors file: 8-byte little-endian header length, a JSON header, then the tensor bytes
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + n > len(data):
            raise ValueError("the header runs past the end of the file")
        header = json.loads(data[8:8 + n])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != len(data):
            raise ValueError(f"expected {8 + n + end} bytes, found {len(data)}")
        tensors = load(data)
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt and was not loaded ({e})") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gpt-numpy training checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {metadata.get('version')!r}; "
                              f"this code reads version {VERSION}")
    if tensors_sha256(tensors) != metadata.get("tensors_sha256"):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the sha256 recorded in it; "
                              f"it was not loaded")
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt: unreadable metadata ({e})") from None
    groups = {"params.": {}, "adam.m.": {}, "adam.v.": {}}
    for name, a in tensors.items():
        for prefix, group in groups.items():
            if name.startswith(prefix):
                group[name[len(prefix):]] = np.array(a, copy=True)   # own, aligned, writable memory
                break
        else:
            raise CheckpointError(f"{path} has an unexpected tensor {name!r}")
    params, m, v = groups.values()
    if not params:
        raise CheckpointError(f"{path} holds no parameters")
    if (m or v) and (set(m) != set(params) or set(v) != set(params)):   # none at all: a weights-only file
        raise CheckpointError(f"{path} is corrupt: the optimizer state does not match the parameters")
    return params, m, v, meta


def read_meta(path):
    """Only the JSON metadata of a checkpoint, without verifying the tensors (cheap; for messages)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return json.loads(header["__metadata__"]["meta"])
    except Exception:
        return None
