"""
bench/tokenizer.py: how fast bpe.py trains and encodes, next to tiktoken (and Hugging Face's trainer) if
installed.

    python bench/tokenizer.py --corpus ../shared/data/gutenberg_mix.txt --vocab-size 32768 --trials 3
    python -m bench.tokenizer --trials 3 --hf             # the same program, run as a module

Run it from the repository root. --threads (default 1) sets the threads of Hugging Face's Rust trainer
(RAYON_NUM_THREADS) and of BLAS; bpe.py and tiktoken's encode_ordinary are single-threaded.

Prints one table: training time split into its two passes (count chunks, merge), merges/s, and encoding
speed in MB/s (1 MB = 10^6 bytes of UTF-8 input) for the tokenizer trained here and for GPT-2's, with
tiktoken's speed on the same text and whether its ids are identical. --prepare-workers 1,2 adds the
corpus preparation of train.py (data.tokenize_files: read, encode, write the ids) with the tokenizer
trained here and 1 or 2 encoding processes, on --prepare-data (anything train.py's --data takes; default
the Python standard library's sources, train.py's default corpus), and whether the ids are identical.
Each row is the best of --trials runs (min is the least noisy on a shared machine) with the median beside
it. Encoding starts from an empty chunk cache in every trial. The corpus is read from its path and never
copied.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # `python bench/tokenizer.py`: import from the repository root, not from bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench import common
from bench.common import SHARED
from errors import ArgumentParser, UserError, run_main


def timed(fn, trials):
    """(result of the last run, best seconds, median seconds) over trials runs of fn()."""
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times), statistics.median(times)


def parse_args(argv):
    p = ArgumentParser(prog="bench/tokenizer.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHARED / "gutenberg_mix.txt"),
                   help="UTF-8 text file to train and encode (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocab size to train to (default: %(default)s)")
    p.add_argument("--pattern", default="gpt4", help="split pattern, a name of bpe.PATTERNS (default: %(default)s)")
    p.add_argument("--gpt2-dir", default=str(SHARED / "gpt2"),
                   help="folder with GPT-2's encoder.json, vocab.bpe (default: %(default)s)")
    p.add_argument("--trials", type=int, default=3, help="runs per measurement (default: %(default)s)")
    common.add_threads_argument(p)
    p.add_argument("--hf", action="store_true", help="also time Hugging Face's Rust BPE trainer (tokenizers)")
    p.add_argument("--prepare-workers", default="", metavar="N,N",
                   help="also time data.tokenize_files with these numbers of encoding processes, e.g. 1,2 "
                        "(default: off)")
    p.add_argument("--prepare-data", default="stdlib",
                   help="--prepare-workers: the corpus, as train.py's --data (default: %(default)s)")
    args = p.parse_args(argv)
    common.check_threads(args.threads)
    common.set_threads(args.threads)                    # before bpe imports NumPy, and tiktoken starts
    import bpe
    if args.pattern not in bpe.PATTERNS:
        raise UserError(f"--pattern {args.pattern!r}: choose from {', '.join(sorted(bpe.PATTERNS))}")
    if args.trials < 1 or args.vocab_size < 256:
        raise UserError(f"need --trials >= 1 and --vocab-size >= 256, got {args.trials} and {args.vocab_size}")
    try:
        args.prepare_workers = [int(w) for w in args.prepare_workers.split(",") if w.strip()]
    except ValueError:
        raise UserError(f"--prepare-workers takes numbers separated by commas, got {args.prepare_workers!r}")
    return args


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure."""
    return run_main(parse_args, bench, argv)


def bench(args):
    import bpe                                          # (numpy: only now, after the thread count is set)
    from lib import tokenizer_files
    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise UserError(f"no corpus at {corpus} (pass --corpus)")
    text = corpus.read_text(encoding="utf-8", errors="surrogateescape")
    mb = corpus.stat().st_size / 1e6
    threads = {k: os.environ.get(k, "unset") for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "RAYON_NUM_THREADS")}
    print(f"corpus {corpus} ({mb:.2f} MB), vocab {args.vocab_size}, pattern {args.pattern}, trials {args.trials}")
    print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, threads: {threads} (bpe.py itself is single-threaded), load {common.loadavg()}")
    rows = []  # (what, best, median, unit)

    # train: pass 1 counts the chunks, pass 2 merges
    counts, best, med = timed(lambda: bpe.count_chunks([corpus], args.pattern, progress=False), args.trials)
    rows.append(("train: count chunks (s)", best, med))
    n_merges = args.vocab_size - 256
    merges, best_m, med_m = timed(lambda: bpe.train_merges(counts, n_merges, progress=False), args.trials)
    rows.append(("train: merges (s)", best_m, med_m))
    rows.append(("train: total (s)", best + best_m, med + med_m))
    rows.append(("train: merges/s", len(merges) / best_m, len(merges) / med_m))
    tok = bpe.Tokenizer(args.pattern, merges)
    print(f"{len(counts)} distinct chunks, {len(merges)} merges")

    def encode_speed(name, pattern, merges, special_tokens=None, byte_ids=None):
        """Rows for our encoder (fresh cache each trial) and tiktoken on the same ranks."""
        fresh = lambda: bpe.Tokenizer(pattern, merges, special_tokens, byte_ids)  # noqa: E731
        toks = [fresh() for _ in range(args.trials)]  # built outside the timing
        ids, best, med = timed(lambda: toks.pop().encode_ordinary(text), args.trials)
        rows.append((f"encode {name}: bpe.py (MB/s)", mb / best, mb / med))
        try:
            import tiktoken
        except ImportError:
            rows.append((f"encode {name}: tiktoken", "not installed", ""))
            return
        t = fresh()
        enc = tiktoken.Encoding(name, pat_str=t.pattern, mergeable_ranks=tokenizer_files.mergeable_ranks(t),
                                special_tokens=t.special_tokens)
        ref, best, med = timed(lambda: enc.encode_ordinary(text), args.trials)
        rows.append((f"encode {name}: tiktoken (MB/s)", mb / best, mb / med))
        rows.append((f"encode {name}: ids identical", "yes" if ids == ref else "NO", f"{len(ids)} ids"))

    encode_speed("trained", tok.pattern, tok.merges)
    gpt2 = Path(args.gpt2_dir)
    if (gpt2 / "encoder.json").is_file():
        g = tokenizer_files.from_gpt2_files(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
        encode_speed("gpt2", g.pattern, g.merges, g.special_tokens, g.byte_ids)
    else:
        rows.append(("encode gpt2", f"no files in {gpt2}", ""))

    if args.hf:
        try:
            import tokenizers
            from tokenizers import models, pre_tokenizers, trainers
        except ImportError:
            rows.append(("train: HF tokenizers (s)", "not installed", ""))
        else:
            def hf_train():
                hf = tokenizers.Tokenizer(models.BPE())
                hf.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(tokenizers.Regex(tokenizer_files.to_hf_json(tok)["pre_tokenizer"]["pretokenizers"][0]
                                                          ["pattern"]["Regex"]), "isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
                hf.train([str(corpus)], trainer)
            _, best, med = timed(hf_train, args.trials)
            rows.append(("train: HF tokenizers, Rust (s)", best, med))

    if args.prepare_workers:
        prepare_speed(rows, args.prepare_data, tok, args.prepare_workers, args.trials)

    print(f"\n| {'measurement':<34} | {'best':>10} | {'median':>10} |\n|{'-' * 36}|{'-' * 12}|{'-' * 12}|")
    for what, best, med in rows:
        fmt = lambda v: f"{v:10.2f}" if isinstance(v, float) else f"{v:>10}"  # noqa: E731
        print(f"| {what:<34} | {fmt(best)} | {fmt(med)} |")


def prepare_speed(rows, corpus, tok, workers, trials):
    """Rows for data.tokenize_files (train.py's corpus preparation: read, encode, write the ids) on the
    corpus (train.py's --data), with each number of encoding processes: a fresh pool every trial, its
    start-up included, and for 1 (no pool) a fresh copy of the tokenizer, so that no run starts with a
    warm chunk cache. The worker counts alternate within each trial, so the machine's load hits them
    alike. Also the CPU seconds of a run, this process and its workers together (what the run costs,
    whatever the machine's load), and whether every run wrote the same ids."""
    import hashlib
    import resource
    import tempfile
    from lib import data

    def cpu():
        return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                             resource.RUSAGE_CHILDREN)))
    digests, times, cpus = set(), {w: [] for w in workers}, {w: [] for w in workers}
    with tempfile.TemporaryDirectory() as tmp:
        root, files = data.find_sources(corpus, tmp)
        sources = data.digest_sources(root, files, Path(tmp) / "sources.json")
        out = Path(tmp) / "ids.bin"
        for _ in range(trials):
            for w in workers:
                fresh = data.tokenizer_from_text(tok.kind, tok.to_text())      # an empty chunk cache
                t0, c0 = time.perf_counter(), cpu()
                n = data.tokenize_files(files, sources, fresh, out, desc="tokenize", workers=w)
                times[w].append(time.perf_counter() - t0)
                cpus[w].append(cpu() - c0)
                digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    mb = sources["bytes"] / 1e6
    for w in workers:
        rows.append((f"prepare {corpus[:12]} {mb:.0f} MB, {w} worker(s) (MB/s)", mb / min(times[w]),
                     mb / statistics.median(times[w])))
        rows.append((f"prepare, {w} worker(s): CPU seconds", min(cpus[w]), statistics.median(cpus[w])))
    rows.append((f"prepare: {len(files)} file(s), ids identical", "yes" if len(digests) == 1 else "NO", f"{n} ids"))


if __name__ == "__main__":
    raise SystemExit(main())
