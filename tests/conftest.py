# Puts the repository root on sys.path, so tests import gpt_numpy, bpe, train... as a user would.
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"      # real text, never committed; tests skip without it


# ----------------------------------------------------------------------------------------------------
# Pipeline helpers (train.py, data.py, checkpoint.py, sample.py, export.py): tiny corpora, tiny runs,
# and one tiny trained run per session. Everything stays in pytest's temporary folders.

import numpy as np        # noqa: E402
import pytest             # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jovial programmer who writes numpy code").split()


def make_text(path, n_lines=400, seed=0):
    """A deterministic pseudo-English text file of ~n_lines lines (~16 KB for 400)."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 10))) + "." for _ in range(n_lines)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_args(tmp_path, data, *extra):
    """train.py argv for a tiny run (--preset tiny) whose caches and outputs stay inside tmp_path."""
    return ["--preset", "tiny", "--data", str(data), "--data-dir", str(tmp_path / "data"),
            "--out-dir", str(tmp_path / "out"), *map(str, extra)]


def run_quiet(argv):
    """train.run(argv) without its log lines: train()'s summary (raises UserError)."""
    import train
    return train.run(argv, log=lambda *a, **k: None)


def main_error(main, argv, capsys):
    """Run a program's main(argv), expect a failure reported in one line: (status, stderr)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return code, err


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny char-level run trained once per session (20 steps of --preset tiny): its out dir, holding
    ckpt.safetensors and log.jsonl; the corpus is ../text.txt. Read it; copy it before changing it."""
    d = tmp_path_factory.mktemp("tiny_run")
    run_quiet(tiny_args(d, make_text(d / "text.txt")))
    return d / "out"
