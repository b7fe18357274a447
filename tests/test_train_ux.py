"""Tests for train.py as a real user meets it (issues #22 and #23): a resume after a full disk, write
locations never taken from a checkpoint, a short run that can be extended, a failed start that leaves no
folders; --min-lr and --lr-decay-iters that follow --lr and --max-iters, evaluations with a progress bar
and a time estimate, a folder that holds another run refused unless --force, Ctrl-C's exit status, the
warnings a schedule needs, the help's wording and layout, the best checkpoint, and --config FILE.toml.
Each test fails on the code before its fix (new names are imported inside the tests, so that each fails on
its own). Everything runs in tmp_path on a few KB of generated text."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eval as eval_py
import export
import sample
import train
from conftest import ROOT, main_error, make_text, run_quiet, tiny_args
from lib.checkpoint import load_checkpoint, read_meta, save_checkpoint
from lib.train_config import TrainConfig
from test_hardening import one_line_failure, run_limited

# ----------------------------------------------------------------------------------------------------
# helpers


def run_cli(argv, cwd=ROOT, fault=None, timeout=120):
    """train.py as a subprocess (one BLAS thread); with a fault ("sigint:K", ...), through
    tests/train_runner.py, which injects it at step K."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    program = [str(ROOT / "train.py")] if fault is None else [str(ROOT / "tests" / "train_runner.py"), fault]
    return subprocess.run([sys.executable, *program, *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_logged(argv):
    """train.run(argv) in this process: (its summary, the lines it logged)."""
    logs = []
    return train.run(list(map(str, argv)), log=logs.append), logs


def log_records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# #22 High 3: --resume after a disk-full failure (a real file-size limit, RLIMIT_FSIZE)


def test_resume_after_a_full_disk_drops_the_incomplete_last_log_line(tmp_path):
    text = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, text, "--max-iters", 0, "--out-dir", tmp_path / "warm"))   # the data cache
    out = tmp_path / "out"
    argv = ["train.py", *tiny_args(tmp_path, text, "--max-iters", 1000, "--log-interval", 1, "--eval-interval", 50,
                                   "--ckpt-interval", 50, "--sample-tokens", 0, "--force")]
    for fsize in (50_000, 50_001):          # a limit that fell between two lines leaves none half-written
        line = one_line_failure(run_limited(argv, fsize=fsize))
        assert "[Errno 27] File too large" in line and "log.jsonl" in line, line
        if not (out / "log.jsonl").read_bytes().endswith(b"\n"):
            break
    assert not (out / "log.jsonl").read_bytes().endswith(b"\n")           # its last line is cut short
    step = load_checkpoint(out).step                                      # the checkpoint is intact
    assert step > 0 and step % 50 == 0
    r = run_cli(["--resume", out, "--max-iters", step + 20, "--data-dir", tmp_path / "data"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"warning: {out / 'log.jsonl'}, line" in r.stdout and "(the last) is incomplete" in r.stdout
    records = log_records(out)                                            # every line whole again
    steps = [rec["step"] for rec in records if rec["event"] == "train"]
    assert steps == list(range(1, step + 21)) and load_checkpoint(out).step == step + 20


def test_a_bad_line_inside_the_log_is_refused_naming_it(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:2] + ['{"event": "train", "st'] + lines[2:]) + "\n")
    code, err = main_error(train.main, ["--resume", str(run), "--max-iters", "30"], capsys)
    assert code == 1 and f"{run / 'log.jsonl'}, line 3: not a JSON record" in err
    assert len((run / "log.jsonl").read_text().splitlines()) == len(lines) + 1      # left as it was


# ----------------------------------------------------------------------------------------------------
# #22 Low: write locations; a run shorter than its warmup; a failed start; MPI (in test_dist.py)


def test_resume_takes_no_write_location_from_the_checkpoint(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    ck = load_checkpoint(run)
    evil = tmp_path / "elsewhere" / "deep"
    meta = {**ck.meta, "train_config": {**ck.meta["train_config"], "data_dir": str(evil), "out_dir": str(evil)}}
    save_checkpoint(run / "ckpt.safetensors", ck.params, ck.adam_m, ck.adam_v, meta)
    os.chdir(tmp_path)                      # (the default --data-dir, data/, is relative to it)
    try:
        res, logs = run_logged(["--resume", run, "--max-iters", 22])
    finally:
        os.chdir(ROOT)
    assert res["step"] == 22 and not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "data").is_dir() and load_checkpoint(run).step == 22
    assert any(line.startswith(f"note: the run's data cache was under {evil}") for line in logs), logs
    # a name that is not one plain folder is refused, not followed
    for name in ("../../escape", "/abs"):
        meta = {**ck.meta, "train_config": {**ck.meta["train_config"], "name": name}}
        save_checkpoint(run / "ckpt.safetensors", ck.params, ck.adam_m, ck.adam_v, meta)
        code, err = main_error(train.main, ["--resume", str(run), "--data-dir", str(tmp_path / "data")], capsys)
        assert code == 1 and "not a plain folder name" in err, err


def test_a_run_shorter_than_its_warmup_can_be_extended(tmp_path):
    text = make_text(tmp_path / "text.txt")
    argv = tiny_args(tmp_path, text, "--warmup-iters", 50, "--sample-tokens", 0)
    res, logs = run_logged(argv + ["--max-iters", 3])
    assert res["step"] == 3
    assert any(line.startswith("warning: --max-iters 3 ends inside the warmup") for line in logs), logs
    res, _ = run_logged(argv + ["--resume", "--max-iters", 4])        # refused before: lr_decay_iters 3 < 50
    assert res["step"] == 4
    # its schedule goes on: the warmup continues where it stopped
    last = [r for r in log_records(tmp_path / "out") if r["event"] == "train"][-1]
    assert last["step"] == 4 and last["lr"] == pytest.approx(1e-2 * 4 / 50)        # step 3's: 4/50 of lr


def test_a_start_that_fails_leaves_no_folders_behind(tmp_path, monkeypatch, capsys):
    import urllib.request

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    code, err = main_error(train.main, ["--preset", "shakespeare-char"], capsys)
    assert code == 1 and "could not download Tiny Shakespeare" in err
    assert list(tmp_path.iterdir()) == []                             # no out/shakespeare-char, no data/
    # a corpus too short fails after data preparation: the cache stays, the empty out dir goes
    (tmp_path / "short.txt").write_text("far too short\n")
    code, err = main_error(train.main, ["--preset", "tiny", "--data", "short.txt"], capsys)
    assert code == 1 and "corpus too short" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "short.txt"]
    # a folder that was there before stays, even empty
    (tmp_path / "mine").mkdir()
    main_error(train.main, ["--preset", "tiny", "--data", "short.txt", "--out-dir", "mine"], capsys)
    assert (tmp_path / "mine").is_dir()


# ----------------------------------------------------------------------------------------------------
# #23 item 1 and item 6: settings that follow --lr and --max-iters; warnings about the schedule


def test_min_lr_follows_lr_unless_given(tiny_run, tmp_path, capsys):
    for argv, lr, min_lr in [(["--lr", "3e-5"], 3e-5, 3e-6),                     # the default's 2e-4 gives way
                             (["--preset", "tiny", "--lr", "3e-5"], 3e-5, 3e-6),   # so does the preset's 1e-3
                             (["--preset", "tiny"], 1e-2, 1e-3),
                             (["--lr", "3e-5", "--min-lr", "0"], 3e-5, 0.0)]:
        cfg = train.parse_args(argv).cfg
        assert (cfg.lr, cfg.min_lr) == (lr, pytest.approx(min_lr)), argv
    code, err = main_error(train.main, ["--lr", "3e-5", "--min-lr", "1e-4"], capsys)   # given: still checked
    assert code == 2 and "0 <= --min-lr <= --lr" in err
    # a resumed run keeps its schedule: a new --lr is refused as such, and --max-iters moves nothing else
    run = shutil.copytree(tiny_run, tmp_path / "run")
    code, err = main_error(train.main, ["--resume", str(run), "--lr", "3e-5"], capsys)
    assert code == 1 and "cannot resume with a different config: --lr is 3e-05 here but 0.01" in err
    res, _ = run_logged(["--preset", "tiny", "--resume", run, "--max-iters", 22])
    assert res["step"] == 22 and load_checkpoint(run).meta["train_config"]["lr_decay_iters"] == 20


def test_fine_tuning_with_a_small_lr_runs(tmp_path):
    """The documented fine-tuning line (docs/pretrained.md), on a tiny base: --lr 3e-5 alone."""
    text = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, text, "--out-dir", tmp_path / "base", "--max-iters", 2))
    res, _ = run_logged(["--init-from", tmp_path / "base", "--data", text, "--block-size", 16, "--lr", "3e-5",
                         "--max-iters", 2, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "ft"])
    saved = load_checkpoint(tmp_path / "ft").meta["train_config"]
    assert res["step"] == 2 and saved["min_lr"] == pytest.approx(3e-6)


def test_lr_decay_follows_a_shortened_preset(tmp_path):
    cfg = train.parse_args(["--preset", "shakespeare-char", "--max-iters", "300"]).cfg
    assert cfg.lr_decay_iters == 300                     # the decay ends at 300, not at the preset's 2000
    assert train.get_lr(299, cfg) == pytest.approx(cfg.min_lr, rel=1e-3)
    cfg = train.parse_args(["--preset", "shakespeare-char", "--max-iters", "300", "--lr-decay-iters", "2000"]).cfg
    assert cfg.lr_decay_iters == 2000                    # given: kept


def test_schedule_and_mixed_precision_warnings(tmp_path):
    text = make_text(tmp_path / "text.txt")
    _, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 30, "--warmup-iters", 50, "--sample-tokens", 0))
    assert [line for line in logs if line.startswith("warning:")] == [
        "warning: --max-iters 30 ends inside the warmup (--warmup-iters 50): the learning rate climbs to 6.00e-03 of "
        "--lr 0.01 and never decays; pass --warmup-iters 3 (a tenth of the run) or a larger --max-iters"]
    _, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 30, "--lr-decay-iters", 300, "--force"))
    assert any(line.startswith("warning: --lr-decay-iters 300 is past --max-iters 30: the run ends at lr")
               for line in logs), logs
    _, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 1, "--mixed-precision", "--force"))
    assert any(line.startswith("warning: --mixed-precision on --backend numpy is far slower") for line in logs), logs
    _, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 30, "--force"))
    assert not [line for line in logs if line.startswith("warning:")]


# ----------------------------------------------------------------------------------------------------
# #23 item 2: evaluations show progress; a time estimate after the first steps


def test_a_slow_evaluation_prints_progress_off_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "PLAIN_PROGRESS_S", 0.0)   # as if each batch took longer than the interval
    text = make_text(tmp_path / "text.txt")
    _, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 0, "--eval-iters", 3))
    progress = [line for line in logs if line.startswith("step 0: evaluating:")]
    assert [line.split(" in ")[0] for line in progress] == [f"step 0: evaluating: {k}/6 batches" for k in range(1, 6)]


def test_an_evaluation_shows_a_bar_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    text = make_text(tmp_path / "text.txt")
    run_logged(tiny_args(tmp_path, text, "--max-iters", 0))
    assert "step 0: evaluating:   0%|" in sys.stderr.getvalue() and "| 0/4 [" in sys.stderr.getvalue()


def test_the_run_says_how_long_it_will_take(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "ESTIMATE_MIN_S", 0.0)
    text = make_text(tmp_path / "text.txt")
    _, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 25))
    lines = [line for line in logs if line.startswith("time:")]
    # after step 3 of 25: 22 steps and the evaluations at 10, 20 and 25 to go
    assert len(lines) == 1 and "the 22 steps to go and 3 evaluation(s) of ~" in lines[0], logs
    assert logs.index(lines[0]) < next(i for i, line in enumerate(logs) if line.startswith("step 5/25"))
    monkeypatch.setattr(train, "ESTIMATE_MIN_S", 10.0)   # a run of seconds: no such line
    _, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 25, "--force"))
    assert not [line for line in logs if line.startswith("time:")]


# ----------------------------------------------------------------------------------------------------
# #23 item 3: a folder that holds another run


def test_a_second_run_does_not_replace_the_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_text(tmp_path / "notes.txt")
    (tmp_path / "notes").mkdir()
    make_text(tmp_path / "notes" / "a.txt", seed=2)
    assert train.main(["--preset", "tiny", "--data", "notes.txt", "--max-iters", "4"]) == 0
    before = (tmp_path / "out" / "notes-char" / "ckpt.safetensors").read_bytes()
    capsys.readouterr()
    code, err = main_error(train.main, ["--preset", "tiny", "--data", "notes/", "--max-iters", "4"], capsys)
    assert code == 1 and "--out-dir out/notes-char holds another run (--data notes.txt, step 4, saved " in err
    assert "continue it with --resume out/notes-char, replace it with --force" in err
    assert (tmp_path / "out" / "notes-char" / "ckpt.safetensors").read_bytes() == before
    # --force replaces it whole: no best.safetensors of the old run stays with the new one
    assert train.main(["--preset", "tiny", "--data", "notes/", "--max-iters", "0", "--force"]) == 0
    best = read_meta(tmp_path / "out" / "notes-char" / "best.safetensors")
    assert best["step"] == 0 and best["train_config"]["data"] == "notes/"
    assert [r["step"] for r in log_records(tmp_path / "out" / "notes-char")] == [0]
    # --resume continues it, as before; with --force it is refused as a contradiction
    assert train.main(["--preset", "tiny", "--data", "notes/", "--max-iters", "2", "--resume"]) == 0
    code, err = main_error(train.main, ["--resume", "--force"], capsys)
    assert code == 2 and "--force starts a new run" in err


# ----------------------------------------------------------------------------------------------------
# #23 item 4: Ctrl-C


def test_ctrl_c_saves_and_exits_130_without_a_done_line(tmp_path):
    text = make_text(tmp_path / "text.txt")
    r = run_cli(tiny_args(tmp_path, text, "--sample-tokens", 0), tmp_path, fault="sigint:3")
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stdout.rstrip().splitlines()[-1].startswith("interrupted at step 3: checkpoint saved to")
    assert "done:" not in r.stdout and "Traceback" not in r.stderr
    assert load_checkpoint(tmp_path / "out").step == 3


def test_ctrl_c_stops_a_long_evaluation(tmp_path, monkeypatch):
    """Ctrl-C during an evaluation (minutes, fine-tuning a 135M model on a CPU) stops it at its next
    batch, instead of finishing it first; the step is saved and the run ends as after any Ctrl-C."""
    import signal
    import gpt_numpy
    real, calls = gpt_numpy.loss_fn, []

    def loss_fn(*a, **k):
        calls.append(1)
        if len(calls) == 5:                           # the first batch of step 10's evaluation (step 0: 4)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(gpt_numpy, "loss_fn", loss_fn)
    res, logs = run_logged(tiny_args(tmp_path, make_text(tmp_path / "text.txt"), "--sample-tokens", 0))
    assert res["status"] == "interrupted" and res["step"] == 10 and len(calls) == 5
    assert "step 10: evaluation stopped (Ctrl-C)" in logs and load_checkpoint(tmp_path / "out").step == 10
    assert [r["step"] for r in log_records(tmp_path / "out") if r["event"] == "eval"] == [0]


# ----------------------------------------------------------------------------------------------------
# #23 items 5 and 7: --help's layout and words


def test_help_lays_out_presets_and_names_checkpoints_alike(capsys):
    text = train.build_parser().format_help()
    presets = text[text.index("presets (--preset NAME"):text.index("examples:")]
    for name in train.PRESETS:
        assert f"  {name}  " in presets, name                            # never run into its description
    assert max(len(line) for line in presets.splitlines()) <= 100
    flat = " ".join(text.split())
    assert "eval.py's --mc-limit" in flat                                # one vocabulary across programs
    assert "ckpt.safetensors" in flat and "best.safetensors" in flat
    for program in (sample, eval_py, export):
        with pytest.raises(SystemExit):
            program.main(["--help"])
        assert "best.safetensors" in " ".join(capsys.readouterr().out.split()), program.__name__


# ----------------------------------------------------------------------------------------------------
# #23 item 10: the best checkpoint


def val_losses_that_overfit(monkeypatch, values):
    """train's estimate_loss giving these val losses, one per evaluation, in order (the train loss too)."""
    it = iter(values)

    def fake(*a, **k):
        v = next(it)
        return {"train": v, "val": v}
    monkeypatch.setattr(train, "estimate_loss", fake)


def test_the_best_checkpoint_is_kept_beside_the_latest(tmp_path, monkeypatch, capsys):
    text = make_text(tmp_path / "text.txt")
    common = ["--sample-tokens", 0, "--lr-decay-iters", 30]
    val_losses_that_overfit(monkeypatch, [3.0, 2.0, 2.5, 2.6])          # steps 0, 10, 20, 30: best at 10
    res, logs = run_logged(tiny_args(tmp_path, text, "--max-iters", 30, *common))
    out = tmp_path / "out"
    best = load_checkpoint(out / "best.safetensors")
    assert best.meta["best"] == {"step": 10, "val_loss": 2.0} and best.step == 10 and not best.adam_m
    assert [r["best"] for r in log_records(out) if r["event"] == "eval"] == [True, True, False, False]
    assert logs[-1].endswith(f"; best val loss 2.0000 at step 10: {out / 'best.safetensors'}")
    # its weights are the run's at step 10: those of a run stopped there (the same schedule and seed)
    val_losses_that_overfit(monkeypatch, [3.0, 2.0])
    run_quiet(tiny_args(tmp_path, text, "--max-iters", 10, "--out-dir", tmp_path / "ten", *common))
    ten = load_checkpoint(tmp_path / "ten")
    assert all(np.array_equal(best.params[k], ten.params[k]) for k in ten.params)
    # every program that takes a checkpoint takes it
    capsys.readouterr()
    assert sample.main(["--ckpt", str(out / "best.safetensors"), "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert eval_py.main(["--ckpt", str(out / "best.safetensors"), "--text", str(text)]) == 0
    assert export.main(["--ckpt", str(out / "best.safetensors"), "--out", str(tmp_path / "hf")]) == 0
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)                                          # (the default out dir is out/...)
    res, _ = run_logged(["--init-from", out / "best.safetensors", "--data", text, "--block-size", 16, "--max-iters", 1,
                         "--data-dir", tmp_path / "data", "--sample-tokens", 0])
    assert res["ckpt"] == str(Path("out") / "text-from-out-best" / "ckpt.safetensors")
    # --resume stays on the latest, and names the way when given the best file
    capsys.readouterr()
    code, err = main_error(train.main, ["--resume", str(out / "best.safetensors")], capsys)
    assert code == 1 and f"--resume {out} continues the latest checkpoint" in err
    val_losses_that_overfit(monkeypatch, [2.7, 1.5])                     # steps 40 (no better), 50 (best)
    res, _ = run_logged(["--resume", out, "--max-iters", 50, "--data-dir", tmp_path / "data"])
    assert res["step"] == 50 and read_meta(out / "best.safetensors")["best"] == {"step": 50, "val_loss": 1.5}


def test_a_lora_runs_best_checkpoint_holds_its_adapters(tmp_path, capsys):
    text = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, text, "--out-dir", tmp_path / "base", "--max-iters", 2))
    run_quiet(tiny_args(tmp_path, text, "--init-from", tmp_path / "base", "--lora-rank", 2, "--max-iters", 10,
                        "--sample-tokens", 0))
    best = load_checkpoint(tmp_path / "out" / "best.safetensors")
    assert "lora" in best.meta and all(".lora_" in k for k in best.params)
    assert sample.main(["--ckpt", str(tmp_path / "out" / "best.safetensors"), "--max-new-tokens", "3"]) == 0


# ----------------------------------------------------------------------------------------------------
# #23 item 12: --config FILE.toml


def test_a_config_file_under_the_flags(tmp_path):
    text = make_text(tmp_path / "text.txt")
    conf = tmp_path / "my_run.toml"
    conf.write_text(f'preset = "tiny"\ndata = "{text}"\nmax_iters = 8\nlr = 0.005\ndropout = 0\n'
                    f'data_dir = "{tmp_path / "data"}"\nout_dir = "{tmp_path / "out"}"\nsample_tokens = 0\n')
    cl = train.parse_args(["--config", str(conf), "--max-iters", "6"])
    assert (cl.cfg.n_layer, cl.cfg.max_iters, cl.cfg.lr, cl.cfg.min_lr) == (1, 6, 0.005, pytest.approx(5e-4))
    assert isinstance(cl.cfg.dropout, float)
    res, logs = run_logged(["--config", conf, "--max-iters", 6])
    assert res["step"] == 6
    config_line = " ".join(line for line in logs if line.startswith(("config:", "  ")))
    assert "max_iters=6" in config_line and "lr=0.005" in config_line and "config.toml" in config_line
    # the run's config.toml: every setting, read back as the same config; those that follow another
    # (min_lr = lr / 10, lr_decay_iters = max_iters) are commented out, and follow again
    saved = tmp_path / "out" / "config.toml"
    back = train.parse_args(["--config", str(saved)]).cfg
    assert back == TrainConfig(**load_checkpoint(tmp_path / "out").meta["train_config"])
    assert "\n# min_lr = 0.0005    (follows lr / 10; remove the # to fix it)\n" in saved.read_text()
    assert "\n# lr_decay_iters = 6    (follows max_iters; remove the # to fix it)\n" in saved.read_text()
    res, _ = run_logged(["--config", saved, "--out-dir", tmp_path / "again", "--lr", "0.002", "--max-iters", 4])
    again = load_checkpoint(tmp_path / "again").meta["train_config"]
    assert res["step"] == 4 and (again["lr"], again["min_lr"], again["lr_decay_iters"]) == (0.002, 0.0002, 4)


@pytest.mark.parametrize("content, message", [
    ("n_layers = 2\n", "unknown setting 'n_layers' (did you mean n_layer?)"),
    ("n-layer = 2\n", "unknown setting 'n-layer' (did you mean n_layer?)"),
    ('n_layer = "2"\n', 'n_layer = "2" should be an integer'),
    ("n_layer = 2.0\n", "n_layer = 2.0 should be an integer"),
    ("lr = true\n", "lr = true should be a number"),
    ("data = 3\n", "data = 3 should be a string"),
    ("checkpoint_activations = 1\n", "checkpoint_activations = 1 should be true or false"),
    ('norm = "batchnorm"\n', 'norm = "batchnorm" should be one of rmsnorm, layernorm'),
    ('preset = "huge"\n', 'preset = "huge" is not a preset'),
    ("[model]\nn_layer = 2\n", "[model] is a table"),
    ("n_layer = \n", "not valid TOML"),
    pytest.param("x = " + "[" * 100_000 + "\n", "TOML", id="nested-100000-deep"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, content, message):
    (tmp_path / "c.toml").write_text(content)
    code, err = main_error(train.main, ["--config", str(tmp_path / "c.toml")], capsys)
    assert code == 2 and err.startswith(f"error: --config {tmp_path / 'c.toml'}: ") and message in err, err


def test_config_files_that_are_not_files(tmp_path, capsys):
    for path, message in [(tmp_path / "none.toml", "no such file"), ("/dev/zero", "not a regular file")]:
        code, err = main_error(train.main, ["--config", str(path)], capsys)
        assert code == 2 and message in err
    (tmp_path / "big.toml").write_text("# " + "x" * (2 << 20) + "\n")
    code, err = main_error(train.main, ["--config", str(tmp_path / "big.toml")], capsys)
    assert code == 2 and "larger than 1 MB" in err


def test_without_tomllib_config_says_what_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.toml").write_text("n_layer = 2\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)                    # Python 3.10: no tomllib ...
    monkeypatch.setitem(sys.modules, "tomli", None)                      # ... and no tomli
    code, err = main_error(train.main, ["--config", str(tmp_path / "c.toml")], capsys)
    assert code == 2 and "--config needs Python 3.11 or later" in err and "pip install tomli" in err


def test_config_toml_round_trips_every_kind_of_value(tmp_path):
    from lib.train_config import config_toml, read_config_file
    cfg = TrainConfig(sample_prompt='a "quoted"\n\ttab \x7f \\ é', lr=1e-5, dropout=0.0, tf32=True, n_layer=3)
    (tmp_path / "c.toml").write_text(config_toml(cfg, "a header\nof two lines"), encoding="utf-8")
    assert TrainConfig(**{**vars(TrainConfig()), **read_config_file(tmp_path / "c.toml")}) == cfg
