"""
plot.py: draw training runs from their log.jsonl into one PNG: the train loss (every log line), the train
and val loss of each evaluation, and, when the run was trained with --eval-mc, the multiple-choice
accuracy (acc, acc_norm) on a second panel.

    python plot.py out/stdlib-bpe2048                           # -> out/stdlib-bpe2048/plot.png
    python plot.py out/run-a out/run-b --out compare.png        # several runs on the same axes
    python plot.py out/run-a/log.jsonl --logy                   # a log file works too; log-scale loss

Needs matplotlib, an optional dependency (pip install matplotlib); nothing else in the project does.
Exit status 0; a bad command line prints `error: <one line>` and exits 2, a failure (no log, a broken
line, no matplotlib) exits 1.
"""

import json
from pathlib import Path

from errors import ArgumentParser, FileFormatError, UserError, run_main
from lib.files import read_jsonl


def log_path(run):
    """A run folder or a log.jsonl -> the log file's path (UserError if there is none)."""
    p = Path(run)
    p = p / "log.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"no log at {p} (expected a run folder holding log.jsonl, or the file itself)")
    return p


def read_log(path):
    """The records of a log.jsonl, as train.py writes it: {"train": [(step, loss)], "eval": [records]}.
    A record of either kind without the numbers it is drawn with is a FileFormatError naming its line
    (an eval record's mc_acc and mc_acc_norm come together, or not at all)."""
    out = {"train": [], "eval": []}
    for _, where, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise FileFormatError(f"{where}: expected a JSON object")
        if rec.get("event") == "train" and rec.get("loss") is not None:
            need(rec, ("step", "loss"), where, "a train record")
            out["train"].append((rec["step"], rec["loss"]))
        elif rec.get("event") == "eval":
            need(rec, ("step", "train_loss", "val_loss") + (("mc_acc", "mc_acc_norm") if "mc_acc" in rec else ()),
                 where, "an eval record")
            out["eval"].append(rec)
    if not out["train"] and not out["eval"]:
        raise FileFormatError(f"{path} holds no training or evaluation records")
    return out


def need(rec, keys, where, what):
    """FileFormatError unless every key of rec holds a number (nan allowed: a diverged run logs one)."""
    for k in keys:
        v = rec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FileFormatError(f"{where}: {what} needs a number {k}, got {json.dumps(v)[:40]}")


def run_name(path):
    """The run's folder name (the parent of log.jsonl)."""
    return path.parent.name or str(path)


def plot(runs, out, logy=False):
    """runs: [(name, read_log's dict)] -> a PNG at `out`. Returns out."""
    try:
        import matplotlib
        matplotlib.use("Agg")                               # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot.py needs matplotlib, an optional dependency: pip install matplotlib") from None
    has_acc = any("mc_acc" in r for _, log in runs for r in log["eval"])
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    for k, (name, log) in enumerate(runs):
        color = f"C{k % 10}"
        if log["train"]:
            steps, loss = zip(*log["train"])
            ax.plot(steps, loss, color=color, alpha=0.45, lw=1, label=f"{name} train (log lines)")
        ev = log["eval"]
        if ev:
            ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color=color, ms=3,
                    label=f"{name} val")
            ax.plot([r["step"] for r in ev], [r["train_loss"] for r in ev], "s--", color=color, ms=2.5, lw=1,
                    alpha=0.8, label=f"{name} train (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_acc:
        ax = axes[0, 1]
        for k, (name, log) in enumerate(runs):
            ev = [r for r in log["eval"] if "mc_acc" in r]
            if not ev:
                continue
            steps = [r["step"] for r in ev]
            ax.plot(steps, [r["mc_acc"] for r in ev], "o-", color=f"C{k % 10}", ms=3, label=f"{name} acc")
            ax.plot(steps, [r["mc_acc_norm"] for r in ev], "s--", color=f"C{k % 10}", ms=2.5, lw=1,
                    label=f"{name} acc_norm")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_title("multiple choice (--eval-mc)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp")     # what --out may be; matplotlib writes each


def parse_args(argv):
    p = ArgumentParser(prog="plot.py", description="Plot train/val loss (and --eval-mc accuracy) of training "
                                                   "runs from their log.jsonl into an image (needs matplotlib).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (holding log.jsonl) or a log.jsonl file")
    p.add_argument("--out", metavar="FILE", help="the image to write, by its extension one of "
                                                 f"{', '.join(FORMATS)}; a folder gets plot.png inside it "
                                                 "(default: RUN/plot.png for one run, plot.png for several)")
    p.add_argument("--logy", action="store_true", help="log-scale loss axis")
    args = p.parse_args(argv)
    if args.out is not None and not Path(args.out).is_dir():
        ext = Path(args.out).suffix.lstrip(".").lower()
        if ext not in FORMATS:
            raise UserError(f"--out {args.out}: expected a file name ending in one of "
                            f"{', '.join('.' + f for f in FORMATS)}, or a folder")
    return args


def run(args):
    paths = [log_path(r) for r in args.runs]
    runs = [(run_name(p), read_log(p)) for p in paths]
    out = args.out or (paths[0].parent / "plot.png" if len(paths) == 1 else "plot.png")
    if Path(out).is_dir():
        out = Path(out) / "plot.png"
    print(f"wrote {plot(runs, out, args.logy)}")


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure; 130 on Ctrl-C."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
