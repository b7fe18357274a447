"""What a newcomer meets at the command line (issue #23, items 5 and 7): one error prefix in every
program, progress that stays readable in a log file, an install hint that works, one vocabulary for the
multiple-choice subset."""

import importlib
import subprocess
import sys

import pytest

import bpe
import eval as eval_py
from conftest import ROOT, main_error, make_text


def test_bpe_errors_have_the_prefix_of_every_program(tmp_path, capsys):
    # a bad command line: exit 2, `error: ...` as train.py, sample.py, eval.py and export.py print it
    code, err = main_error(bpe.main, ["encode", "--tokenizer", "x.bpe"], capsys)
    assert code == 2 and err == "error: one of the arguments --input --text is required\n"
    # a failure while working: exit 1, the same prefix
    code, err = main_error(bpe.main, ["encode", "--tokenizer", str(tmp_path / "missing.bpe"), "--text", "hi"], capsys)
    assert code == 1 and err.startswith("error: cannot read ") and "missing.bpe" in err


def test_bpe_train_into_a_log_file_writes_plain_lines(tmp_path):
    corpus = make_text(tmp_path / "corpus.txt", n_lines=2000)
    with open(tmp_path / "log", "w") as log:               # stderr is a file, not a terminal
        r = subprocess.run([sys.executable, str(ROOT / "bpe.py"), "train", "--input", str(corpus), "--vocab-size",
                            "300", "--out", str(tmp_path / "tok.bpe")], stdout=log, stderr=subprocess.STDOUT)
    assert r.returncode == 0
    text = (tmp_path / "log").read_text()
    lines = text.splitlines()
    assert "\r" not in text                                 # no bar redrawn over itself
    assert any(x.startswith("count chunks: ") for x in lines)
    merges = [x for x in lines if x.startswith("merges: ")]
    assert 1 <= len(merges) <= 11 and merges[-1].startswith("merges: 44 of 44 merges")
    assert lines[-1].startswith("wrote ") and len(lines) < 20


def test_line_progress_counts_to_the_end():
    import io
    out = io.StringIO()
    with bpe.LineProgress(total=100, desc="work", unit="step", file=out) as bar:
        for _ in range(100):
            bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("work: 100 of 100 steps")


def test_cupy_install_hint_names_the_ctk_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` raises ImportError
    monkeypatch.delitem(sys.modules, "gpt_cupy", raising=False)
    with pytest.raises(RuntimeError) as e:
        importlib.import_module("gpt_cupy")
    assert 'pip install "cupy-cuda12x[ctk]"' in str(e.value) and 'pip install "cupy-cuda13x[ctk]"' in str(e.value)


def test_eval_mc_limit_and_its_old_spelling(tiny_run, tmp_path, capsys):
    from test_eval import last_json, mc_file
    p = mc_file(tmp_path / "mc.jsonl")
    for flag in ("--mc-limit", "--limit"):                  # --limit: the old spelling, kept for scripts
        assert eval_py.main(["--ckpt", str(tiny_run), "--mc", str(p), "--json", flag, "3"]) == 0
        assert last_json(capsys.readouterr().out)["items"] == 3
    code, err = main_error(eval_py.main, ["--ckpt", "r", "--text", "t", "--mc-limit", "4"], capsys)
    assert code == 2 and "--mc-limit applies to --mc only" in err
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--help"], capture_output=True, text=True)
    assert "--mc-limit N, --limit N" in r.stdout
