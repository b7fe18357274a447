"""Tests for train.py: a tiny end-to-end run, bit-exact resume after SIGKILL (dropout and gradient
accumulation on), fine-tuning, clear errors for bad input and flags (exit 2 for the command line, 1 for
the rest). Everything runs in tmp_path on a few KB of generated text. (data.py, checkpoint.py and
sample.py have their own test files.)"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from lib import data
import gpt_numpy
import sample
import train
from lib.checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, main_error, make_text, run_quiet, tiny_args
from errors import UserError
from lib import mixed_precision, tokenizer_files

# ----------------------------------------------------------------------------------------------------
# helpers (the shared ones are in conftest.py)


def run_cli(argv, cwd, fault=None):
    """train.py as a subprocess with one BLAS thread (so runs are bit-comparable); with a fault ("step:K",
    "save:K", "sigint:K", "hang:K"), tests/train_runner.py runs it and injects that fault at step K."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    program = [str(ROOT / "train.py")] if fault is None else [str(ROOT / "tests" / "train_runner.py"), fault]
    return subprocess.run([sys.executable, *program, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def train_error(argv, capsys):
    return main_error(train.main, argv, capsys)


# ----------------------------------------------------------------------------------------------------
# end to end


def test_tiny_run_end_to_end(tmp_path):
    data = make_text(tmp_path / "text.txt")
    res = run_quiet(tiny_args(tmp_path, data, "--max-iters", 40, "--eval-interval", 20))
    assert res["status"] == "done" and res["step"] == 40
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5          # it learns
    # bits per byte: 1 byte per character here, so val_bpb = val_loss / ln 2
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / np.log(2))
    assert any(r["event"] == "train" and r["tokens_per_s"] > 0 for r in records)
    ck = load_checkpoint(out / "ckpt.safetensors")
    params, m, v, meta = ck.params, ck.adam_m, ck.adam_v, ck.meta
    assert meta["step"] == 40 and meta["adam_t"] == 40
    assert meta["train_config"]["n_layer"] == 1 and meta["model_config"]["vocab_size"] == res["data_meta"]["vocab_size"]
    assert meta["tokenizer"]["kind"] == "char"
    for k, a in res["params"].items():
        assert np.array_equal(params[k], a) and params[k].dtype == np.float32
    assert set(m) == set(params) == set(v)
    assert isinstance(res["sample"], str) and len(res["sample"]) > 10


def test_tiny_run_bpe(tmp_path):
    pytest.importorskip("bpe")
    data = make_text(tmp_path / "text.txt")
    res = run_quiet(tiny_args(tmp_path, data, "--tokenizer", "bpe", "--vocab-size", 300, "--max-iters", 4))
    meta = res["data_meta"]
    assert meta["vocab_size"] == 300 and meta["tokenizer"]["kind"] == "bpe"
    assert meta["train_bytes_per_token"] > 1.5                          # merges compress the text
    # the files are separated by <|endoftext|>, the last id
    ids = np.fromfile(tmp_path / "data" / "text" / "bpe300" / "val.bin", dtype=np.uint16)
    assert ids[-1] == 299
    tok = load_checkpoint(tmp_path / "out" / "ckpt.safetensors").tokenizer()     # self-contained checkpoint
    assert tok.vocab_size == 300 and tok.decode(tok.encode_ordinary("lazy dog")) == "lazy dog"


# ----------------------------------------------------------------------------------------------------
# resume: SIGKILL partway, resume, compare with a straight run bit for bit


@pytest.mark.parametrize("kill", ["step:17", "save:20", "sigint:13"])
def test_resume_after_kill_is_bit_identical(tmp_path, kill):
    data = make_text(tmp_path / "text.txt")
    common = ["--preset", "tiny", "--data", str(data), "--data-dir", str(tmp_path / "data"), "--dropout", 0.1,
              "--grad-accum", 2, "--max-iters", 30, "--ckpt-interval", 10, "--sample-tokens", 0,
              "--n-layer", 2, "--d-model", 32, "--n-head", 4, "--d-ff", 64, "--grad-clip", 0.5]
    common = list(map(str, common))
    straight = run_cli(common + ["--out-dir", "a"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    first = run_cli(common + ["--out-dir", "b"], tmp_path, fault=kill)
    if kill.startswith("sigint"):
        assert first.returncode == 130 and "interrupted at step 13" in first.stdout + first.stderr
        assert "done:" not in first.stdout                                   # saved, but not done (#23 item 4)
        expect_step = 13
    else:
        assert first.returncode == -signal.SIGKILL
        expect_step = 10                        # the last checkpoint that was complete before the kill
    assert load_checkpoint(tmp_path / "b" / "ckpt.safetensors").step == expect_step
    if kill.startswith("save"):
        assert list((tmp_path / "b").glob(".ckpt.safetensors.tmp-*"))     # the kill left its temporary file
    resumed = run_cli(common + ["--out-dir", "b", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((tmp_path / "b").glob(".*tmp*"))                         # ... which the resume removed
    a = load_checkpoint(tmp_path / "a" / "ckpt.safetensors")
    b = load_checkpoint(tmp_path / "b" / "ckpt.safetensors")
    assert a.step == b.step == 30
    for group in ("params", "adam_m", "adam_v"):
        for k in a.params:
            assert np.array_equal(getattr(a, group)[k], getattr(b, group)[k]), (group, k)
    assert a.meta["rng"] == b.meta["rng"]
    # the resumed log holds each step once, as the straight run's does (plus one "resume" line)
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    steps = lambda log: [(r["event"], r["step"]) for r in log if r["event"] != "resume"]   # noqa: E731
    assert steps(log_a) == steps(log_b)
    assert [r["val_loss"] for r in log_a if r["event"] == "eval"] == [r["val_loss"] for r in log_b if r["event"] == "eval"]


@pytest.mark.parametrize("fault, status, last_line", [("quit:3", 130, "interrupted"),
                                                       ("bug:3", 1, "RuntimeError: injected bug")])
def test_a_second_ctrl_c_quits_at_once_and_a_bug_keeps_its_traceback(tmp_path, fault, status, last_line):
    """The exit rules train.py adds to errors.run_main's: a second Ctrl-C quits without saving (130 and
    "interrupted"); a bug is not a one-line error: it keeps its traceback (exit status 1)."""
    r = run_cli(tiny_args(tmp_path, make_text(tmp_path / "text.txt"), "--sample-tokens", 0), tmp_path, fault=fault)
    assert r.returncode == status and r.stderr.strip().splitlines()[-1] == last_line, r.stderr[-2000:]
    assert ("Traceback" in r.stderr) == fault.startswith("bug")
    assert not (tmp_path / "out" / "ckpt.safetensors").exists()            # step 3: no checkpoint was due


def test_resume_in_process_and_longer_run(tmp_path):
    """Resume with a raised --max-iters continues the same schedule (lr_decay_iters was fixed at the start)."""
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 10))
    res = run_quiet(tiny_args(tmp_path, data, "--resume", "--max-iters", 14))
    assert res["step"] == 14
    meta = load_checkpoint(tmp_path / "out" / "ckpt.safetensors").meta
    assert meta["train_config"]["lr_decay_iters"] == 10 and meta["train_config"]["max_iters"] == 14


def test_mixed_precision_run_skips_overflows_and_resumes_bit_exactly(tmp_path, monkeypatch):
    # start from a loss scale far too large for float16, so the first steps overflow and are skipped
    monkeypatch.setattr(mixed_precision, "loss_scaler_init", lambda scale=2.0 ** 40: {"scale": scale, "good_steps": 0})
    data = make_text(tmp_path / "text.txt")
    common = ["--mixed-precision", "--lr-decay-iters", 40, "--sample-tokens", 0, "--eval-interval", 20]
    res = run_quiet(tiny_args(tmp_path, data, *common, "--max-iters", 40, "--out-dir", tmp_path / "a"))
    assert res["status"] == "done"
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    overflows = [r for r in log if r["event"] == "overflow"]
    assert 5 <= len(overflows) < 30 and overflows[-1]["scale"] < 2.0 ** 40
    evals = [r for r in log if r["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]                   # it still learns
    run_quiet(tiny_args(tmp_path, data, *common, "--max-iters", 25, "--out-dir", tmp_path / "b"))
    run_quiet(tiny_args(tmp_path, data, *common, "--max-iters", 40, "--out-dir", tmp_path / "b", "--resume"))
    a = load_checkpoint(tmp_path / "a" / "ckpt.safetensors")
    b = load_checkpoint(tmp_path / "b" / "ckpt.safetensors")
    assert a.meta["loss_scaler"] == b.meta["loss_scaler"]
    for group in ("params", "adam_m", "adam_v"):
        for k in a.params:
            x, y = getattr(a, group)[k], getattr(b, group)[k]
            assert x.dtype == np.float32 and np.array_equal(x, y), (group, k)


def test_resume_with_incompatible_config_is_refused(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 4))
    code, err = train_error(tiny_args(tmp_path, data, "--resume", "--n-layer", 2), capsys)
    assert code == 1 and "cannot resume with a different config: --n-layer" in err
    # a changed corpus is refused too
    make_text(data, seed=1)
    code, err = train_error(tiny_args(tmp_path, data, "--resume"), capsys)
    assert code == 1 and "corpus" in err and "differs from the checkpoint" in err


def test_corrupt_checkpoint_resume_gives_clear_error(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 4))
    ck = tmp_path / "out" / "ckpt.safetensors"
    ck.write_bytes(ck.read_bytes()[:1000])
    code, err = train_error(tiny_args(tmp_path, data, "--resume"), capsys)
    assert code == 1 and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# bad input: one clear line, no traceback


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    code, err = train_error(tiny_args(tmp_path, tmp_path / "missing.txt"), capsys)
    assert code == 1 and "no such file" in err
    (tmp_path / "empty.txt").write_text("")
    code, err = train_error(tiny_args(tmp_path, tmp_path / "empty.txt"), capsys)
    assert code == 1 and "empty corpus" in err
    (tmp_path / "short.txt").write_text("a few words, far too short.\n")
    code, err = train_error(tiny_args(tmp_path, tmp_path / "short.txt"), capsys)
    assert code == 1 and "corpus too short" in err and "block_size + 1" in err
    code, err = train_error(tiny_args(tmp_path, data, "--backend", "tpu"), capsys)
    assert code == 2 and "invalid choice: 'tpu'" in err
    code, err = train_error(["--preset", "huge"], capsys)
    assert code == 2 and "invalid choice: 'huge'" in err
    code, err = train_error(tiny_args(tmp_path, data, "--n-head", 3), capsys)
    assert code == 2 and "bad model config" in err              # the flags alone are wrong: a usage error
    code, err = train_error(tiny_args(tmp_path, data, "--resume", str(tmp_path / "nothing.safetensors")), capsys)
    assert code == 1 and "no checkpoint at" in err
    for line in err.strip().splitlines():
        assert line.startswith("error:")


@pytest.mark.parametrize("flags, message", [
    (["--seed", -1], "--seed must be >= 0"),
    (["--beta1", 2], "--beta1 must be in [0, 1)"),
    (["--eps", -1], "--eps must be > 0"),
    (["--grad-clip", -1], "--grad-clip must be >= 0"),
    (["--bpe-sample-mb", "nan"], "--bpe-sample-mb must be >= 0 and finite"),
    (["--dropout", 1.0], "--dropout must be in [0, 1)"),
    (["--lr", 1e-3, "--min-lr", 1], "0 <= --min-lr <= --lr"),
    (["--lr-decay-iters", 5, "--warmup-iters", 10], "must not end before --warmup-iters"),
    (["--tf32"], "--tf32 is for --backend cupy"),
    (["--fused-kernels"], "--fused-kernels is for --backend cupy"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, flags, message):
    data = make_text(tmp_path / "text.txt")
    code, err = train_error(tiny_args(tmp_path, data, *flags), capsys)
    assert code == 2 and message in err                         # a usage error
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())   # no data prepared


def test_unusable_paths_and_binary_data_are_one_line_errors(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    code, err = train_error(tiny_args(tmp_path, data, "--out-dir", data), capsys)
    assert code == 1 and "--out-dir" in err and "cannot be used as a folder" in err
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    code, err = train_error(tiny_args(tmp_path, tmp_path / "blob.bin"), capsys)
    assert code == 1 and "is not a text file" in err


def test_sample_prompt_is_checked_before_training(tmp_path, capsys):
    # a prompt the char vocabulary cannot encode fails before step 1, not at the first evaluation
    data = make_text(tmp_path / "text.txt")
    code, err = train_error(tiny_args(tmp_path, data, "--sample-prompt", "\u03b6"), capsys)
    assert code == 1 and "not in the char vocabulary" in err
    assert not (tmp_path / "out" / "ckpt.safetensors").exists()


def test_default_prompt_falls_back_without_newlines(tmp_path):
    # a corpus without "\n": the default sample prompt cannot be encoded and falls back to id 0
    (tmp_path / "one_line.txt").write_text("the quick brown fox " * 200, encoding="utf-8")
    res = run_quiet(tiny_args(tmp_path, tmp_path / "one_line.txt", "--max-iters", 4))
    assert res["status"] == "done"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")       # lr 1e30 overflows on purpose
def test_nonfinite_stop_does_not_claim_an_older_runs_checkpoint(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 2))                  # leaves out/ckpt.safetensors
    code, err = train_error(tiny_args(tmp_path, data, "--lr", 1e30, "--max-iters", 3, "--force"), capsys)
    assert code == 1 and "non-finite" in err and "no checkpoint of this run was written" in err


def test_missing_cupy_or_gpu_is_one_line(tmp_path, capsys):
    try:
        import gpt_cupy  # noqa: F401
        pytest.skip("CuPy and a GPU are present")
    except RuntimeError:
        pass
    code, err = train_error(tiny_args(tmp_path, make_text(tmp_path / "t.txt"), "--backend", "cupy"), capsys)
    assert code == 1 and err.startswith("error: the cupy backend needs") and len(err.strip().splitlines()) == 1


def test_nonfinite_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    data = make_text(tmp_path / "text.txt")
    real = gpt_numpy.loss_and_grads
    calls = {"n": 0}

    def poisoned(params, ids, targets, cfg, seed=0, **kw):
        calls["n"] += 1
        loss, grads = real(params, ids, targets, cfg, seed, **kw)
        return (float("nan") if calls["n"] == 13 else loss), grads      # step 12's loss is nan
    monkeypatch.setattr(gpt_numpy, "loss_and_grads", poisoned)
    with pytest.raises(UserError, match=r"non-finite loss .* at step 12: stopping; the last good "
                                              r"checkpoint .* \(step 10\) is kept"):
        run_quiet(tiny_args(tmp_path, data))
    assert load_checkpoint(tmp_path / "out" / "ckpt.safetensors").step == 10
    calls["n"] = 0
    res = run_quiet(tiny_args(tmp_path, data, "--skip-nonfinite", "--force"))
    assert res["step"] == 20
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "skip"] == [12]


def test_process_exit_status_is_2_for_the_command_line_and_1_for_failures(tmp_path):
    r = run_cli(["--n-layer", "0"], tmp_path)
    assert r.returncode == 2 and r.stderr == "error: --n-layer must be at least 1, got 0\n"
    r = run_cli(["--preset", "tiny", "--data", "missing.txt"], tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: --data 'missing.txt': no such file")
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_each_flag_is_documented_once_in_the_config():
    """--help is made from TrainConfig's field metadata: every field is a flag with its own help text."""
    text = train.build_parser().format_help()
    for f in dataclasses.fields(train.TrainConfig):
        assert "--" + f.name.replace("_", "-") in text and len(f.metadata["help"]) > 10, f.name


def test_help_lists_presets_and_flags():
    text = train.build_parser().format_help()
    for word in list(train.PRESETS) + ["--grad-accum", "--checkpoint-activations", "--eval-interval",
                                       "--resume", "--backend", "--skip-nonfinite", "--tokenizer", "--init-from"]:
        assert word in text


def test_preset_then_flags_override():
    cfg, explicit, flags, resume, force = train.parse_config(["--preset", "shakespeare-char", "--max-iters", "7"])
    assert cfg.tokenizer == "char" and cfg.block_size == 64 and cfg.max_iters == 7 and resume is None
    assert {"max_iters", "block_size"} <= explicit and flags == {"max_iters"} and not force
    assert cfg.lr_decay_iters == 7          # the preset's 2000 follows --max-iters


# ----------------------------------------------------------------------------------------------------
# fine-tuning: --init-from a checkpoint


def finetune_args(tmp_path, data, out, *extra):
    """argv for a tiny fine-tuning run of tmp_path/base (the preset's model settings give way to it)."""
    return tiny_args(tmp_path, data, "--init-from", tmp_path / "base", "--out-dir", tmp_path / out, *extra)


@pytest.fixture
def base(tmp_path):
    """A tiny 2-layer model (not the preset's 1 layer) trained on one text, in tmp_path/base; and a
    second text with the same characters to fine-tune it on."""
    run_quiet(tiny_args(tmp_path, make_text(tmp_path / "a.txt"), "--max-iters", 40, "--out-dir", tmp_path / "base",
                        "--n-layer", 2, "--d-model", 32, "--n-head", 4, "--d-ff", 64))
    return make_text(tmp_path / "b.txt", 300, seed=1)


def step0_eval(out):
    return next(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "eval")


def test_init_from_loads_weights_model_and_tokenizer(tmp_path, base):
    res = run_quiet(finetune_args(tmp_path, base, "ft", "--max-iters", 6, "--sample-tokens", 0))
    assert res["status"] == "done" and res["step"] == 6
    src = load_checkpoint(tmp_path / "base")
    ft = load_checkpoint(tmp_path / "ft" / "ckpt.safetensors")
    p, meta = ft.params, ft.meta
    # the model and tokenizer came from the checkpoint, the training settings from the preset
    assert meta["model_config"] == src.meta["model_config"]
    assert (meta["train_config"]["n_layer"], meta["train_config"]["d_model"]) == (2, 32)
    assert meta["tokenizer"]["text"] == src.meta["tokenizer"]["text"]
    assert meta["train_config"]["init_from"] == str(tmp_path / "base")
    assert meta["train_config"]["batch_size"] == 4 and meta["train_config"]["max_iters"] == 6
    # ... a fresh optimizer and step counter, and weights that moved from the loaded ones
    assert meta["step"] == meta["adam_t"] == 6
    assert not np.array_equal(p["tok_emb"], src.params["tok_emb"])
    # the weights were loaded: the step-0 evaluation is exactly the loss of the base model's weights ...
    cfg = train.TrainConfig(**meta["train_config"])
    cache = tmp_path / "data" / "b" / data.tokenizer_tag(cfg)
    splits = data.open_data(cache, json.loads((cache / "meta.json").read_text()))
    mcfg = ft.model_config(dropout=cfg.dropout, checkpoint=cfg.checkpoint_activations)
    expect = train.estimate_loss(gpt_numpy, src.params, splits, cfg, mcfg)
    first = step0_eval(tmp_path / "ft")
    assert (first["train_loss"], first["val_loss"]) == (expect["train"], expect["val"])
    # ... far below a fresh model's of the same shape
    run_quiet(tiny_args(tmp_path, base, "--max-iters", 1, "--out-dir", tmp_path / "fresh", "--sample-tokens", 0,
                        "--n-layer", 2, "--d-model", 32, "--n-head", 4, "--d-ff", 64))
    assert first["val_loss"] < step0_eval(tmp_path / "fresh")["val_loss"] - 0.5


def test_init_from_conflicts_give_clear_errors(tmp_path, base, capsys):
    for extra, match in [(["--n-layer", 3], "--n-layer 3 conflicts with --init-from"),
                         (["--vocab-size", 500], "--vocab-size 500 conflicts with --init-from"),
                         (["--tokenizer", "bpe"], "--tokenizer bpe conflicts with --init-from"),
                         (["--block-size", 32], "--block-size 32 exceeds the context of --init-from"),
                         (["--resume"], "--init-from starts a new run"),
                         ]:
        code, err = train_error(finetune_args(tmp_path, base, "ft", *extra), capsys)
        usage = extra == ["--resume"]                           # two flags that cannot go together: exit 2
        assert code == (2 if usage else 1) and match in err and len(err.strip().splitlines()) == 1, (extra, err)
    # the default block_size (128) is longer than the tiny model's context (16) too
    code, err = train_error(["--init-from", str(tmp_path / "base"), "--data", str(base), "--data-dir",
                            str(tmp_path / "data"), "--out-dir", str(tmp_path / "ft")], capsys)
    assert code == 1 and "--block-size 128 (the preset or default) exceeds" in err and "--block-size 16 or less" in err
    # flags that agree with the checkpoint are fine
    run_quiet(finetune_args(tmp_path, base, "ft", "--n-layer", 2, "--tokenizer", "char", "--max-iters", 1))
    # a missing, corrupt or weights-only checkpoint
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((tmp_path / "base" / "ckpt.safetensors").read_bytes()[:1000])
    save_checkpoint(tmp_path / "weights.safetensors", {"a": np.ones((4, 3), np.float32)}, {}, {}, {"step": 1})
    for path, match in [(tmp_path / "nothing", "--init-from: no checkpoint at"), (bad, "truncated or corrupt"),
                        (tmp_path / "weights.safetensors", "no usable model config and tokenizer")]:
        code, err = train_error(tiny_args(tmp_path, base, "--init-from", path), capsys)
        assert code == 1 and match in err and len(err.strip().splitlines()) == 1, (path, err)


def test_init_from_run_resumes_bit_exactly_and_samples_and_exports(tmp_path, base, capsys):
    extra = ["--dropout", 0.1, "--lr-decay-iters", 12, "--ckpt-interval", 0, "--sample-tokens", 0]
    run_quiet(finetune_args(tmp_path, base, "straight", "--max-iters", 12, *extra))
    run_quiet(finetune_args(tmp_path, base, "ft", "--max-iters", 6, *extra))
    # the same command line with --resume instead of --init-from (the preset's 1-layer model gives way)
    argv = tiny_args(tmp_path, base, "--out-dir", tmp_path / "ft", "--max-iters", 12, "--resume", *extra)
    res = run_quiet(argv)
    assert res["step"] == 12
    a = load_checkpoint(tmp_path / "straight" / "ckpt.safetensors")
    b = load_checkpoint(tmp_path / "ft" / "ckpt.safetensors")
    for group in ("params", "adam_m", "adam_v"):
        for k in a.params:
            assert np.array_equal(getattr(a, group)[k], getattr(b, group)[k]), (group, k)
    assert a.meta["rng"] == b.meta["rng"] and a.meta["adam_t"] == b.meta["adam_t"] == 12
    # a model flag that differs from the fine-tuned run's is still refused on resume
    code, err = train_error(argv + ["--n-layer", "1"], capsys)
    assert code == 1 and "cannot resume with a different config: --n-layer" in err
    # sample.py and export.py read the fine-tuned checkpoint
    assert sample.main(["--ckpt", str(tmp_path / "ft"), "--prompt", "the ", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    export = pytest.importorskip("export")
    assert export.main(["--ckpt", str(tmp_path / "ft"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2


def test_init_from_a_hugging_face_llama(tmp_path):
    """A LlamaForCausalLM saved by transformers (untied, its own RoPE theta and norm eps, a vocabulary
    padded past the tokenizer's), imported by export.py, fine-tunes, resumes and samples."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    bpe = pytest.importorskip("bpe")
    export = pytest.importorskip("export")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    corpus = make_text(tmp_path / "text.txt")
    tok = bpe.Tokenizer.train([corpus.read_text()], 300, special_tokens=[data.EOT], progress=False)
    hcfg = transformers.LlamaConfig(vocab_size=304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                    rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(hcfg).save_pretrained(hf_dir)
    tokenizer_files.save_hf_tokenizer_json(tok, hf_dir / "tokenizer.json")
    assert export.main(["--import-hf", str(hf_dir), "--out", str(tmp_path / "imported")]) == 0
    argv = tiny_args(tmp_path, corpus, "--init-from", tmp_path / "imported", "--max-iters", 16, "--eval-interval", 8,
                     "--sample-tokens", 0)
    res = run_quiet(argv)
    assert res["step"] == 16
    meta = load_checkpoint(tmp_path / "out" / "ckpt.safetensors").meta
    mc = meta["model_config"]
    assert (mc["vocab_size"], mc["max_seq_len"], mc["rope_theta"], mc["norm_eps"], mc["tie_embeddings"]) == \
        (304, 32, 500.0, 1e-6, False)
    assert res["data_meta"]["vocab_size"] == 300 and meta["tokenizer"]["kind"] == "bpe"
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in log if r["event"] == "eval"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(304), abs=0.3)              # a fresh HF init: near uniform
    assert losses[2] < losses[1] < losses[0] - 0.5                        # it learns
    res = run_quiet(tiny_args(tmp_path, corpus, "--resume", "--max-iters", 18, "--eval-interval", 8,
                              "--sample-tokens", 0))
    assert res["step"] == 18
    assert sample.main(["--ckpt", str(tmp_path / "out"), "--prompt", "the ", "--max-new-tokens", "5"]) == 0


