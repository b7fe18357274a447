"""Tests for train.py, checkpoint.py and sample.py: a tiny end-to-end run, bit-exact resume after SIGKILL
(dropout and gradient accumulation on), the data cache, checkpoint verification, clear errors for bad
input, and streaming samples. Everything runs in tmp_path on a few KB of generated text."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import train
import sample
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import ROOT, SHARED_DATA

# ----------------------------------------------------------------------------------------------------
# helpers

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jovial programmer who writes numpy code").split()


def make_text(path, n_lines=400, seed=0):
    """A deterministic pseudo-English text file of ~n_lines lines (~16 KB for 400)."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 10))) + "." for _ in range(n_lines)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_args(tmp_path, data, *extra):
    """argv for a tiny run whose caches and outputs stay inside tmp_path."""
    return ["--preset", "tiny", "--data", str(data), "--data-dir", str(tmp_path / "data"),
            "--out-dir", str(tmp_path / "out"), *map(str, extra)]


def run_quiet(argv):
    return train.run(argv, log=lambda *a, **k: None)


def run_cli(argv, cwd, env_extra=None):
    """train.py as a subprocess with one BLAS thread (so runs are bit-comparable)."""
    env = {k: v for k, v in os.environ.items() if k != "TRAIN_TEST_KILL"}
    env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def main_error(argv, capsys):
    """Run train.main(argv), expect a clean exit with status != 0; return (status, stderr)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


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
    params, m, v, meta = load_checkpoint(out / "ckpt.safetensors")
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
    _, _, _, ck = load_checkpoint(tmp_path / "out" / "ckpt.safetensors")
    tok = train.tokenizer_from_text("bpe", ck["tokenizer"]["text"])     # self-contained checkpoint
    assert tok.vocab_size == 300 and tok.decode(tok.encode_ordinary("lazy dog")) == "lazy dog"


def test_shakespeare_char_split_matches_nanogpt(tmp_path):
    src = SHARED_DATA / "tinyshakespeare.txt"
    if not src.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is absent")
    cfg = train.TrainConfig(data=str(src), tokenizer="char", data_dir=str(tmp_path / "data"))
    root, files = train.find_sources(cfg.data, cfg.data_dir)
    sources = train.digest_sources(root, files, tmp_path / "data" / "sources.json")
    tok = train.get_tokenizer(cfg, "ts", root, files, sources, log=lambda *a: None)
    d = train.prepare_data(cfg, "ts", root, files, sources, tok, log=lambda *a: None)
    # nanoGPT's data/shakespeare_char/prepare.py: 65 characters, 1,003,854 train and 111,540 val tokens
    assert tok.vocab_size == 65
    assert (len(d["train"]), len(d["val"])) == (1003854, 111540)
    assert d["train"].dtype == np.uint16 and d["meta"]["val_bytes_per_token"] == 1.0


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
    first = run_cli(common + ["--out-dir", "b"], tmp_path, {"TRAIN_TEST_KILL": kill})
    if kill.startswith("sigint"):
        assert first.returncode == 0 and "interrupted at step 13" in first.stdout + first.stderr
        expect_step = 13
    else:
        assert first.returncode == -signal.SIGKILL
        expect_step = 10                        # the last checkpoint that was complete before the kill
    assert load_checkpoint(tmp_path / "b" / "ckpt.safetensors")[3]["step"] == expect_step
    if kill.startswith("save"):
        assert list((tmp_path / "b").glob(".ckpt.safetensors.tmp-*"))     # the kill left its temporary file
    resumed = run_cli(common + ["--out-dir", "b", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((tmp_path / "b").glob(".*tmp*"))                         # ... which the resume removed
    a = load_checkpoint(tmp_path / "a" / "ckpt.safetensors")
    b = load_checkpoint(tmp_path / "b" / "ckpt.safetensors")
    assert a[3]["step"] == b[3]["step"] == 30
    for group in range(3):                      # params, adam m, adam v
        for k in a[0]:
            assert np.array_equal(a[group][k], b[group][k]), (group, k)
    assert a[3]["rng"] == b[3]["rng"]
    # the resumed log holds each step once, as the straight run's does (plus one "resume" line)
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    steps = lambda log: [(r["event"], r["step"]) for r in log if r["event"] != "resume"]   # noqa: E731
    assert steps(log_a) == steps(log_b)
    assert [r["val_loss"] for r in log_a if r["event"] == "eval"] == [r["val_loss"] for r in log_b if r["event"] == "eval"]


def test_resume_in_process_and_longer_run(tmp_path):
    """Resume with a raised --max-iters continues the same schedule (lr_decay_iters was fixed at the start)."""
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 10))
    res = run_quiet(tiny_args(tmp_path, data, "--resume", "--max-iters", 14))
    assert res["step"] == 14
    meta = load_checkpoint(tmp_path / "out" / "ckpt.safetensors")[3]
    assert meta["train_config"]["lr_decay_iters"] == 10 and meta["train_config"]["max_iters"] == 14


def test_resume_with_incompatible_config_is_refused(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 4))
    code, err = main_error(tiny_args(tmp_path, data, "--resume", "--n-layer", 2), capsys)
    assert code == 1 and "cannot resume with a different config: --n-layer" in err
    # a changed corpus is refused too
    make_text(data, seed=1)
    code, err = main_error(tiny_args(tmp_path, data, "--resume"), capsys)
    assert code == 1 and "corpus" in err and "differs from the checkpoint" in err


# ----------------------------------------------------------------------------------------------------
# checkpoints


def small_checkpoint(path):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.ones(3, np.float32)}
    zeros = {k: np.zeros_like(p) for k, p in params.items()}
    save_checkpoint(path, params, zeros, zeros, {"step": 1})
    return params


def test_checkpoint_roundtrip_and_atomic_write(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    params = small_checkpoint(path)
    p, m, v, meta = load_checkpoint(path)
    assert meta == {"step": 1} and all(np.array_equal(p[k], params[k]) for k in params)
    assert not list(tmp_path.glob(".*tmp*"))                          # no temporary file left behind

    def crash(tmp):
        raise OSError("disk full")
    with pytest.raises(OSError):
        save_checkpoint(path, {"a": np.zeros((4, 3), np.float32)}, {}, {}, {"step": 2}, before_replace=crash)
    assert load_checkpoint(path)[3]["step"] == 1                      # the good checkpoint survives
    assert not list(tmp_path.glob(".*tmp*"))


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
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_checkpoint(path)


def test_corrupt_checkpoint_resume_gives_clear_error(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 4))
    ck = tmp_path / "out" / "ckpt.safetensors"
    ck.write_bytes(ck.read_bytes()[:1000])
    code, err = main_error(tiny_args(tmp_path, data, "--resume"), capsys)
    assert code == 1 and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# the data cache


def prepare(tmp_path, data, tokenizer="char"):
    cfg = train.TrainConfig(data=str(data), tokenizer=tokenizer, vocab_size=300, data_dir=str(tmp_path / "data"))
    name = train.data_name(cfg.data)
    root, files = train.find_sources(cfg.data, cfg.data_dir)
    sources = train.digest_sources(root, files, tmp_path / "data" / name / "sources.json")
    logs = []
    tok = train.get_tokenizer(cfg, name, root, files, sources, log=logs.append)
    d = train.prepare_data(cfg, name, root, files, sources, tok, log=logs.append)
    return d, logs


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_cache_reused_and_rebuilt_when_source_changes(tmp_path, tokenizer):
    if tokenizer == "bpe":
        pytest.importorskip("bpe")
    data = make_text(tmp_path / "text.txt")
    d1, logs = prepare(tmp_path, data, tokenizer)
    assert not any("reusing" in m for m in logs)
    d2, logs = prepare(tmp_path, data, tokenizer)
    assert any("reusing" in m for m in logs)
    assert np.array_equal(d1["train"], d2["train"])
    # a changed source rebuilds (same size, different content)
    text = data.read_text()
    data.write_text(text.replace("fox", "cat"))
    d3, logs = prepare(tmp_path, data, tokenizer)
    assert not any("reusing" in m for m in logs)
    assert d3["meta"]["sources_sha256"] != d1["meta"]["sources_sha256"]
    assert not np.array_equal(np.asarray(d3["train"]), np.asarray(d1["train"]))
    # a preparation that died before meta.json was written is never trusted
    meta_files = list((tmp_path / "data" / "text").glob("*/meta.json"))
    assert len(meta_files) == 1
    meta_files[0].unlink()
    _, logs = prepare(tmp_path, data, tokenizer)
    assert not any("reusing" in m for m in logs) and meta_files[0].is_file()


def test_folder_and_glob_sources(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    make_text(folder / "b.txt", 50)
    make_text(folder / "sub" / "a.md", 50, seed=2)
    (folder / "image.bin").write_bytes(b"\x89PNG\0\0\0")               # binary: skipped
    (folder / ".hidden.txt").write_text("secret")                       # hidden: skipped
    root, files = train.find_sources(str(folder), str(tmp_path / "data"))
    assert [p.relative_to(folder).as_posix() for p in files] == ["b.txt", "sub/a.md"]
    root, files = train.find_sources(str(folder / "**" / "*.md"), str(tmp_path / "data"))
    assert [p.name for p in files] == ["a.md"]


def test_stdlib_sources_leave_out_tests():
    root, files = train.stdlib_sources()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 100 and "os.py" in rel
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for r in rel for part in r.split("/"))


def test_pieces_cut_safely_for_bpe(tmp_path):
    bpe = pytest.importorskip("bpe")
    path = make_text(tmp_path / "text.txt", 300)
    tok = bpe.Tokenizer.train([path.read_text()], 300, special_tokens=[train.EOT], progress=False)
    whole = tok.encode_ordinary(path.read_text())
    pieces = list(train.read_pieces(path, piece_bytes=500, **train.piece_options(tok)))
    assert len(pieces) > 5 and sum(n for _, n in pieces) == path.stat().st_size
    assert [i for text, _ in pieces for i in tok.encode_ordinary(text)] == whole


# ----------------------------------------------------------------------------------------------------
# bad input: one clear line, no traceback


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    code, err = main_error(tiny_args(tmp_path, tmp_path / "missing.txt"), capsys)
    assert code == 1 and "no such file" in err
    (tmp_path / "empty.txt").write_text("")
    code, err = main_error(tiny_args(tmp_path, tmp_path / "empty.txt"), capsys)
    assert code == 1 and "empty corpus" in err
    (tmp_path / "short.txt").write_text("a few words, far too short.\n")
    code, err = main_error(tiny_args(tmp_path, tmp_path / "short.txt"), capsys)
    assert code == 1 and "corpus too short" in err and "block_size + 1" in err
    code, err = main_error(tiny_args(tmp_path, data, "--backend", "tpu"), capsys)
    assert code == 2 and "invalid choice: 'tpu'" in err
    code, err = main_error(["--preset", "huge"], capsys)
    assert code == 2 and "invalid choice: 'huge'" in err
    code, err = main_error(tiny_args(tmp_path, data, "--n-head", 3), capsys)
    assert code == 1 and "bad model config" in err
    code, err = main_error(tiny_args(tmp_path, data, "--resume", str(tmp_path / "nothing.safetensors")), capsys)
    assert code == 1 and "no checkpoint at" in err
    for line in err.strip().splitlines():
        assert line.startswith("error:")


def test_missing_cupy_or_gpu_is_one_line(tmp_path, capsys):
    try:
        import gpt_cupy  # noqa: F401
        pytest.skip("CuPy and a GPU are present")
    except RuntimeError:
        pass
    code, err = main_error(tiny_args(tmp_path, make_text(tmp_path / "t.txt"), "--backend", "cupy"), capsys)
    assert code == 1 and err.startswith("error: the cupy backend needs") and len(err.strip().splitlines()) == 1


def test_nonfinite_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    data = make_text(tmp_path / "text.txt")
    real = train.gpt_numpy.loss_and_grads
    calls = {"n": 0}

    def poisoned(params, ids, targets, cfg, seed=0):
        calls["n"] += 1
        loss, grads = real(params, ids, targets, cfg, seed)
        return (float("nan") if calls["n"] == 13 else loss), grads      # step 12's loss is nan
    monkeypatch.setattr(train.gpt_numpy, "loss_and_grads", poisoned)
    with pytest.raises(train.UserError, match=r"non-finite loss .* at step 12: stopping; the last good "
                                              r"checkpoint .* \(step 10\) is kept"):
        run_quiet(tiny_args(tmp_path, data))
    assert load_checkpoint(tmp_path / "out" / "ckpt.safetensors")[3]["step"] == 10
    calls["n"] = 0
    res = run_quiet(tiny_args(tmp_path, data, "--skip-nonfinite"))
    assert res["step"] == 20
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "skip"] == [12]


def test_help_lists_presets_and_flags():
    text = train.build_parser().format_help()
    for word in list(train.PRESETS) + ["--grad-accum", "--checkpoint-activations", "--eval-interval",
                                       "--resume", "--backend", "--skip-nonfinite", "--tokenizer"]:
        assert word in text


def test_preset_then_flags_override():
    cfg, explicit, resume = train.parse_config(["--preset", "shakespeare-char", "--max-iters", "7"])
    assert cfg.tokenizer == "char" and cfg.block_size == 64 and cfg.max_iters == 7 and resume is None
    assert {"max_iters", "block_size"} <= explicit


# ----------------------------------------------------------------------------------------------------
# sample.py


def test_sample_streams_from_a_tiny_checkpoint(tmp_path, capsys):
    data = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, data, "--max-iters", 4))
    ck = str(tmp_path / "out" / "ckpt.safetensors")
    argv = ["--ckpt", ck, "--prompt", "the ", "--max-new-tokens", "30", "--seed", "3", "--top-p", "0.9"]
    assert sample.main(argv) == 0
    out1 = capsys.readouterr().out
    assert out1.startswith("the ") and len(out1) == len("the ") + 30 + 1      # chars: one per token, + "\n"
    sample.main(argv)
    assert capsys.readouterr().out == out1                                    # seeded: reproducible
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ck, "--prompt", "€"])                         # not in the char vocabulary
    assert e.value.code == 1 and "not in the char vocabulary" in capsys.readouterr().err


def test_sample_decodes_utf8_split_across_tokens():
    """A byte-level tokenizer splits "é" and an emoji into several tokens: the stream must print each
    character whole, once its last byte arrives, never U+FFFD."""
    bpe = pytest.importorskip("bpe")
    tok = bpe.Tokenizer("gpt4", [])                                           # bytes only
    new = list("é😀".encode())                                               # 2 + 4 byte tokens
    fake = SimpleNamespace(generate_stream=lambda *a, **k: iter(new))
    writes = []
    out = SimpleNamespace(write=writes.append, flush=lambda: None)
    sample.stream(None, None, tok, fake, "a", 6, 1.0, None, None, 0, out=out)
    assert "".join(writes) == "aé😀\n"
    assert "é" in writes and "😀" in writes                                  # each printed whole
