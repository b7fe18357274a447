"""Tests for checkpoint.py: the file (round trip, atomic write, corrupt files refused), the metadata's one
builder and one reader, and load_model, which every program uses to read a model back."""

import json
import shutil

import numpy as np
import pytest

import gpt_numpy as gn
from lib.checkpoint import Checkpoint, Model, build_meta, load_checkpoint, load_model, load_params, read_meta, save_checkpoint
from lib.tokenizer import CharTokenizer
from errors import FileFormatError, UserError

# ----------------------------------------------------------------------------------------------------
# helpers


def small_checkpoint(path):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.ones(3, np.float32)}
    zeros = {k: np.zeros_like(p) for k, p in params.items()}
    save_checkpoint(path, params, zeros, zeros, {"step": 1})
    return params


def tiny_model_config(**kw):
    return gn.GPTConfig(**{"vocab_size": 8, "n_layer": 1, "n_head": 2, "d_model": 8, "d_ff": 16, "max_seq_len": 8,
                           **kw})


# ----------------------------------------------------------------------------------------------------
# the file


def test_checkpoint_roundtrip_and_atomic_write(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    params = small_checkpoint(path)
    ck = load_checkpoint(path)
    assert isinstance(ck, Checkpoint) and ck.path == path
    assert ck.meta == {"step": 1} and ck.step == 1 and all(np.array_equal(ck.params[k], params[k]) for k in params)
    assert set(ck.adam_m) == set(ck.adam_v) == set(params) and not ck.adam_m["a"].any()
    assert not list(tmp_path.glob(".*tmp*"))                          # no temporary file left behind
    assert load_checkpoint(tmp_path).path == path                     # a folder means its ckpt.safetensors

    def crash(tmp):
        raise OSError("disk full")
    with pytest.raises(OSError):
        save_checkpoint(path, {"a": np.zeros((4, 3), np.float32)}, {}, {}, {"step": 2}, before_replace=crash)
    assert load_checkpoint(path).step == 1                            # the good checkpoint survives
    assert not list(tmp_path.glob(".*tmp*"))
    assert read_meta(path) == {"step": 1} and read_meta(tmp_path / "none") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
    path = tmp_path / "ckpt.safetensors"
    small_checkpoint(path)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:len(raw) - 7]
    elif damage == "flip":
        raw[-5] ^= 0x40                                               # a bit inside the tensor data
    elif damage == "garbage":
        raw = bytearray(b"not a checkpoint at all" * 10)
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="corrupt|truncated"):
        load_checkpoint(path)


def test_other_safetensors_and_missing_files_are_refused(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(2, np.float32)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(FileFormatError, match="not a gpt-numpy training checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(FileFormatError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")
    assert issubclass(FileFormatError, UserError) and issubclass(UserError, ValueError)


# ----------------------------------------------------------------------------------------------------
# the metadata: one builder, one reader


def test_build_meta_is_read_back(tmp_path):
    cfg, tok = tiny_model_config(rope_theta=500.0), CharTokenizer("abcdefgh")
    meta = build_meta(cfg, tok, step=3, adam_t=2, progress={"tokens_seen": 9})
    assert meta["step"] == 3 and meta["adam_t"] == 2 and meta["progress"] == {"tokens_seen": 9}
    assert meta["tokenizer"]["kind"] == "char" and meta["tokenizer"]["text"] == tok.to_text()
    params = gn.init_params(cfg)
    save_checkpoint(tmp_path / "c.safetensors", params, {}, {}, meta)
    ck = load_checkpoint(tmp_path / "c.safetensors")
    assert ck.model_config() == cfg and ck.model_config(dropout=0.5).dropout == 0.5
    assert ck.tokenizer().chars == "abcdefgh" and not ck.has_training_state       # weights only


@pytest.mark.parametrize("meta, match", [
    ({"step": 1}, "no usable model config"),
    ({"step": 1, "model_config": {"vocab_size": 8, "norm": "batchnorm"}}, "no usable model config"),
    ({"step": 1, "model_config": "not a dict", "tokenizer": {"kind": "char"}}, "no usable model config"),
])
def test_unusable_model_config_is_one_error(tmp_path, meta, match):
    small_checkpoint(tmp_path / "c.safetensors")
    ck = load_checkpoint(tmp_path / "c.safetensors")
    ck.meta = meta
    with pytest.raises(FileFormatError, match=match):
        ck.model_config()
    with pytest.raises(FileFormatError, match="no usable tokenizer"):
        ck.tokenizer()


def test_load_params_checks_shapes_once_and_keeps_the_key_order():
    cfg = tiny_model_config()
    params = gn.init_params(cfg)
    shuffled = dict(reversed(list(params.items())))
    assert list(load_params(gn, shuffled, cfg)) == list(gn.param_shapes(cfg))    # gpt_numpy's order
    bad = {**params, "blocks.0.attn.proj": params["blocks.0.attn.proj"][:, :4]}
    with pytest.raises(FileFormatError, match=r"parameter blocks.0.attn.proj has shape \(8, 4\), expected \(8, 8\)"):
        load_params(gn, bad, cfg)
    with pytest.raises(FileFormatError, match="parameter norm_f.weight is missing"):
        load_params(gn, {k: v for k, v in params.items() if k != "norm_f.weight"}, cfg)
    with pytest.raises(FileFormatError, match="unexpected parameter lm_head"):
        load_params(gn, {**params, "lm_head": np.zeros((8, 8), np.float32)}, cfg)


# ----------------------------------------------------------------------------------------------------
# load_model: what sample.py, export.py (and an eval.py) read


def test_load_model_of_a_trained_run(tiny_run):
    m = load_model(tiny_run)
    assert isinstance(m, Model) and m.path == tiny_run / "ckpt.safetensors" and m.gm is gn
    assert m.cfg.dropout == 0.0 and not m.cfg.checkpoint and m.meta["step"] == 20
    assert list(m.params) == list(gn.param_shapes(m.cfg)) and m.tokenizer.kind == "char"
    assert m.tokenizer.vocab_size <= m.cfg.vocab_size
    logits = gn.forward(m.params, np.zeros((1, 4), np.int64), m.cfg)
    assert logits.shape == (1, 4, m.cfg.vocab_size) and np.isfinite(logits).all()


def test_load_model_refuses_a_checkpoint_that_does_not_fit_its_config(tiny_run, tmp_path):
    shutil.copy(tiny_run / "ckpt.safetensors", tmp_path / "ckpt.safetensors")
    ck = load_checkpoint(tmp_path)
    meta = {**ck.meta, "model_config": {**ck.meta["model_config"], "d_ff": 64}}
    save_checkpoint(tmp_path / "ckpt.safetensors", ck.params, ck.adam_m, ck.adam_v, meta)
    with pytest.raises(FileFormatError, match="does not fit its model config: parameter blocks.0.ffn.w_gate"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="unknown backend"):
        load_model(tmp_path, backend="tpu")


def test_checkpoint_written_before_the_record_still_loads(tiny_run, tmp_path):
    """The file format did not change: a checkpoint whose metadata was written as a plain JSON dict (as
    train.py and export.py wrote them before build_meta) loads, and the record reads every field."""
    ck = load_checkpoint(tiny_run)
    old_style = json.loads(json.dumps(ck.meta))             # the same keys, built by hand
    save_checkpoint(tmp_path / "ckpt.safetensors", ck.params, ck.adam_m, ck.adam_v, old_style)
    again = load_checkpoint(tmp_path)
    assert again.meta == ck.meta and again.has_training_state
    assert again.model_config() == ck.model_config()
