"""
bench/common.py: what the bench programs share: where things are, the thread count, the machine's load,
peak memory, children that report one RESULT line, and a few formats.

Nothing here imports NumPy (nor anything that does): a bench sets its thread count in the environment
(set_threads, or thread_env for a child process) before NumPy starts its BLAS thread pool, which reads it
once, at import.
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from errors import UserError

ROOT = Path(__file__).resolve().parents[1]             # the repository root
SHARED = ROOT.parent / "shared" / "data"                # real data beside the checkout, never committed
EXPORT = ROOT / "export.py"                             # run as a program, by path

# The thread counts of the libraries a bench runs: OpenBLAS (NumPy), OpenMP and MKL (PyTorch's CPU
# kernels), Rayon (Hugging Face's tokenizers, tiktoken). Each reads its variable once, when it starts.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")
DEFAULT_THREADS = 1


def add_threads_argument(parser):
    """The one --threads flag of every bench: the same meaning and default everywhere."""
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                        help="threads of NumPy's BLAS, PyTorch and the Rust tokenizers: "
                             "OPENBLAS/OMP/MKL/RAYON_NUM_THREADS, set before NumPy starts, in this process "
                             "and its children, and torch.set_num_threads (default: %(default)s)")


def check_threads(threads):
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")


def thread_env(threads, env=None):
    """A copy of the environment (os.environ by default) with every thread variable set to `threads`:
    for a child process, whose NumPy then starts with that many threads."""
    return {**(os.environ if env is None else env), **{v: str(threads) for v in THREAD_VARS}}


def set_threads(threads):
    """Set every thread variable in this process, for the libraries it has not imported yet. NumPy
    imported already has its thread pool: say so on stderr (the run goes on, with what NumPy took)."""
    os.environ.update({v: str(threads) for v in THREAD_VARS})
    if "numpy" in sys.modules:
        print("warning: NumPy was imported before the thread count was set", file=sys.stderr)


def loadavg():
    """The machine's 1, 5 and 15 minute load averages, "0.52 0.61 0.70" (Linux), else "n/a"."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------------
# Peak memory of this process

def peak_rss_mib():
    """The peak resident memory of this process, MiB: VmHWM of /proc/self/status (reset_peak_rss starts
    it afresh). Elsewhere getrusage's ru_maxrss, which Linux carries across exec: a child forked from a
    big parent starts at the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024                      # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Start VmHWM (the peak RSS) afresh from the current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# Children: a bench runs each measurement in a fresh process, which prints one `RESULT {json}` line

def print_result(out):
    """The child's side: its one line for the parent."""
    print("RESULT " + json.dumps(out), flush=True)


def run_child(cmd, threads, what, cwd=None):
    """The parent's side: run cmd (with `threads` threads, from cwd) and return the dict of its RESULT
    line. Without one, its output goes to stderr and the failure is one UserError line."""
    p = subprocess.run([str(c) for c in cmd], env=thread_env(threads), capture_output=True, text=True, cwd=cwd)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(p.stdout + p.stderr)
    raise UserError(f"{what} failed (exit {p.returncode})")


# ----------------------------------------------------------------------------------------------------
# Formats

def fmt_mib(nbytes, width=8):
    """Bytes as MiB, one decimal, right-aligned in `width`: 3145728 -> '     3.0 MiB'."""
    return f"{nbytes / 2**20:{width}.1f} MiB"
