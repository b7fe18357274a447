"""
train.py with a fault at a given step, for the kill-and-resume tests (test_train.py, test_dist.py):

    python tests/train_runner.py FAULT [train.py's arguments ...]      # the exit status is train.py's

FAULT is KIND:K, what happens to this process at step K:
    step:K     SIGKILL as step K ends: nothing is saved; the last complete checkpoint stays
    save:K     SIGKILL inside step K's checkpoint write, when the temporary file is complete but has not
               replaced the last good checkpoint
    sigint:K   SIGINT (Ctrl-C) as step K ends: the run saves step K and exits 130 (saved, not done)
    hang:K     SIGSTOP as step K ends: a rank that hangs, under mpiexec
    quit:K     SIGINT twice as step K ends: a second Ctrl-C quits at once, without saving (exit status 130)
    bug:K      RuntimeError("injected bug") as step K ends: a bug, which keeps its traceback

train.py knows nothing of this: the runner wraps train.train_step (the loop calls it by its module-global
name) and train.save_checkpoint (whose before_replace hook runs once the temporary file is complete,
before it replaces the checkpoint), then calls train.main, as `python train.py` would.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # the repository root, where train.py is

import train  # noqa: E402  (after the path above)

SIGNALS = {"step": [signal.SIGKILL], "sigint": [signal.SIGINT], "hang": [signal.SIGSTOP],
           "quit": [signal.SIGINT, signal.SIGINT]}


def signal_self(signals):
    """Send each signal to this process, and let Python run its handler before the next one (two SIGINTs
    pending at once would run the handler once)."""
    for sig in signals:
        os.kill(os.getpid(), sig)
        for _ in range(20):                         # the handler runs between bytecodes, here at the latest
            time.sleep(0.005)


def inject(fault):
    """Wrap train's step or save function so that FAULT (KIND:K) happens at step K."""
    kind, _, k = fault.partition(":")
    if kind not in {*SIGNALS, "save", "bug"} or not k.isdigit():
        raise SystemExit(f"train_runner.py: bad fault {fault!r}: expected KIND:K, KIND one of "
                         f"{', '.join([*SIGNALS, 'save', 'bug'])}")
    k = int(k)
    if kind == "save":
        real_save = train.save_checkpoint

        def save_checkpoint(path, params, adam_m, adam_v, meta, **kw):
            if Path(path).name == "ckpt.safetensors" and meta.get("step") == k:
                kw["before_replace"] = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)
            return real_save(path, params, adam_m, adam_v, meta, **kw)
        train.save_checkpoint = save_checkpoint
    else:
        real_step = train.train_step

        def train_step(run, state):
            out = real_step(run, state)
            if state.step == k and kind == "bug":
                raise RuntimeError("injected bug")
            if state.step == k:
                signal_self(SIGNALS[kind])
            return out
        train.train_step = train_step


if __name__ == "__main__":
    inject(sys.argv[1])
    raise SystemExit(train.main(sys.argv[2:]))
