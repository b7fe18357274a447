"""
eval.py: score a checkpoint on a text (perplexity, bits per byte) or on a multiple-choice benchmark
(HellaSwag or any file in the generic format), with the numbers lm-evaluation-harness would give.

    python eval.py --ckpt out/stdlib-bpe2048 --text notes.txt                 # loss, perplexity, bits/byte
    python eval.py --ckpt out/imported --text notes.txt --block-size 512 --stride 256
    python eval.py --ckpt out/imported --download hellaswag --limit 500      # fetched once into data/hellaswag/
    python eval.py --ckpt out/imported --mc my_questions.jsonl --per-item items.jsonl --json

The rules (windows, the harness's tokenization, truncation, the metrics) live in scoring.py, which
train.py --eval-mc uses as well; docs/eval.md has the formats and measured results. Exit status 0; a bad
command line prints `error: <one line>` and exits 2, a failure (a missing or malformed file) exits 1.
"""

import argparse
import json
import math
import time
from pathlib import Path

from errors import ArgumentParser, UsageError, UserError, run_main
from lib import scoring
from lib.checkpoint import CHECKPOINT_HELP, load_model
from lib.files import atomic_write
from lib.tokenizer import token_byte_lengths

EPILOG = """text (--text): the file's tokens are cut into windows of N + 1 tokens (N = --block-size, by default
  the model's context) that overlap by one token, so every token but the first is scored exactly once,
  given the earlier tokens of its window. With --stride S < N each window starts S tokens after the
  previous one and scores only its last S tokens, each then seen with at least N - S tokens of context
  (Hugging Face's sliding-window perplexity). loss: mean nats per scored token; ppl = exp(loss);
  bits_per_byte = total nats / ln 2 / UTF-8 bytes of the scored tokens.

multiple choice (--mc): JSONL, one item a line, either HellaSwag's own records
  {"ctx": ..., "endings": [...], "label": 0} (with ctx_a, ctx_b, activity_label when present, as in
  hellaswag_val.jsonl; preprocessed as lm-evaluation-harness's hellaswag task does) or generic ones
  {"context": ..., "choices": [...], "label": 0}. Each choice is scored as the harness scores it: the
  summed log-likelihood of the choice's tokens after the context, context + delimiter + choice tokenized
  together and split at the context's token length; contexts too long for the window are cut from the
  left (counted as truncated).
  acc: highest log-likelihood; acc_norm: highest log-likelihood per character of the choice (the
  harness's); acc_token_norm: highest mean log-likelihood per token (llm.c's); *_stderr: the harness's
  standard error of the mean.

examples:
  python eval.py --ckpt out/stdlib-bpe2048 --text ../shared/data/tinyshakespeare.txt --json
  python eval.py --download hellaswag                          # just fetch it into --data-dir
  python eval.py --ckpt out/imported --download hellaswag --limit 100 --per-item hs.jsonl"""


def parse_args(argv):
    p = ArgumentParser(prog="eval.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Score a checkpoint: perplexity and bits per byte on a text, or accuracy on "
                                   "a multiple-choice benchmark (lm-evaluation-harness's scoring).")
    p.add_argument("--ckpt", metavar="PATH", help=f"the checkpoint: {CHECKPOINT_HELP}")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--text", metavar="FILE", help="score the perplexity of this text file")
    what.add_argument("--mc", metavar="FILE", help="score this multiple-choice JSONL file")
    what.add_argument("--download", choices=["hellaswag"],
                      help="fetch HellaSwag's validation file once into --data-dir (and score it if --ckpt is given)")
    p.add_argument("--block-size", type=int, metavar="N", help="text: window length (default: the model's context)")
    p.add_argument("--stride", type=int, metavar="S", help="text: score only the last S tokens of each window "
                                                           "after the first (1 <= S <= N; default N)")
    p.add_argument("--delimiter", default=" ", metavar="STR",
                   help="mc: text between the context and each choice (default: one space, the harness's)")
    p.add_argument("--limit", type=int, metavar="N", help="mc: score only the first N items")
    p.add_argument("--per-item", metavar="OUT", help="mc: write every item's log-likelihoods, token and "
                                                      "character counts and predictions to this JSONL file "
                                                      "(a new file, or an existing one with --force)")
    p.add_argument("--force", action="store_true", help="let --per-item replace an existing file (never one of "
                                                        "the inputs)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON record on the last line")
    p.add_argument("--data-dir", default="data", metavar="DIR", help="where --download puts its file (default: data)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="numpy (CPU) or cupy (GPU)")
    args = p.parse_args(argv)
    mc = args.mc or args.download
    if not (args.text or mc):
        raise UserError("nothing to score: pass --text FILE, --mc FILE or --download hellaswag")
    if not args.ckpt and not args.download:
        raise UserError("--ckpt is required (the checkpoint to score)")
    for flag, value, needs in (("--block-size", args.block_size, args.text), ("--stride", args.stride, args.text),
                               ("--limit", args.limit, mc), ("--per-item", args.per_item, mc),
                               ("--delimiter", args.delimiter != " ", mc)):
        if value and not needs:
            raise UserError(f"{flag} applies to {'--text' if flag in ('--block-size', '--stride') else '--mc'} only")
    for flag, value in (("--block-size", args.block_size), ("--stride", args.stride), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.stride and args.block_size and args.stride > args.block_size:
        raise UserError(f"--stride {args.stride} exceeds --block-size {args.block_size}")
    if args.per_item:
        check_output(args)
    return args


def check_output(args):
    """--per-item names a new file, or with --force an existing one; never a folder, and never one of the
    inputs (the checkpoint, the --mc or --text file), --force or not."""
    out = Path(args.per_item)
    if out.is_dir():
        raise UserError(f"--per-item {out} is a folder; expected a file name")
    ckpt = Path(args.ckpt) / "ckpt.safetensors" if args.ckpt and Path(args.ckpt).is_dir() else args.ckpt
    for flag, path in (("--ckpt", ckpt), ("--mc", args.mc), ("--text", args.text)):
        if path and out.exists() and Path(path).exists() and out.samefile(path):
            raise UserError(f"--per-item {out} is the file of {flag}: it would be overwritten; choose another name")
    if out.exists() and not args.force:
        raise UserError(f"--per-item {out} exists; pass --force to replace it, or choose another name")


def eval_text(m, args):
    """--text: read and encode the file (the tokenizer's own way of reading files), score the windows."""
    from bpe import read_text_blocks
    import numpy as np
    tok = m.tokenizer
    if args.block_size and args.block_size > m.cfg.max_seq_len:
        raise UsageError(f"--block-size {args.block_size} exceeds the model's context of {m.cfg.max_seq_len} tokens")
    if args.stride and args.stride > (args.block_size or m.cfg.max_seq_len):
        raise UsageError(f"--stride {args.stride} exceeds the block size {args.block_size or m.cfg.max_seq_len} "
                         f"(the model's context, without --block-size)")
    ids = []
    for text, _ in read_text_blocks(args.text, 1 << 20, cut=tok.cut, errors=tok.file_errors):
        try:
            ids.append(np.asarray(tok.encode_ordinary(text), dtype=np.int64))
        except UserError as e:                          # e.g. a character the char vocabulary lacks
            raise UserError(f"{args.text}: {e}") from None
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    t0 = time.time()
    r = scoring.score_text(m.gm, m.params, m.cfg, ids, args.block_size, args.stride, token_byte_lengths(tok),
                           progress=True)
    r["seconds"] = round(time.time() - t0, 3)
    print(f"{args.text}: {r['tokens']:,} tokens scored ({r['bytes']:,} bytes) in {r['windows']} windows of "
          f"{r['block_size']} tokens, stride {r['stride']} ({r['seconds']:.1f} s)")
    print(f"  loss            {r['loss']:.4f} nats/token")
    print(f"  perplexity      {r['ppl']:.4f}")
    print(f"  bits per byte   {r['bits_per_byte']:.4f}")
    return r


def eval_mc(m, args, path):
    """--mc (or the downloaded file): read, encode, score, report; --per-item writes the details."""
    items = scoring.read_mc(path, args.limit)
    reqs = scoring.encode_items(m.tokenizer, items, m.cfg.max_seq_len, args.delimiter, scoring.start_ids(m.tokenizer, m.meta))
    t0 = time.time()
    results = scoring.score_requests(m.gm, m.params, m.cfg, reqs, progress=True)
    seconds = time.time() - t0
    r = scoring.mc_metrics(results)
    r.update(seconds=round(seconds, 3), items_per_s=len(results) / max(seconds, 1e-9))
    if args.per_item:                                   # atomic: a crash leaves the old file or the new one
        atomic_write(args.per_item, "".join(json.dumps(res.record()) + "\n" for res in results).encode())
    n_choices = sorted({len(i.choices) for i in items})
    print(f"{path}: {r['items']} items, {'/'.join(map(str, n_choices))} choices each, {r['truncated']} "
          f"left-truncated to the window of {m.cfg.max_seq_len} tokens ({seconds:.1f} s, "
          f"{r['items_per_s']:.2f} items/s)")
    print(f"  {'metric':<16}{'value':>8}{'stderr':>9}")
    for k in ("acc", "acc_norm", "acc_token_norm"):
        se = r[k + "_stderr"]
        print(f"  {k:<16}{r[k]:>8.4f}{('%9.4f' % se) if se is not None else '      n/a'}")
    return r


def run(args):
    path = args.mc
    if args.download:
        path = scoring.fetch_hellaswag(args.data_dir)
        if not args.ckpt:
            print(f"{path} is ready: score it with --ckpt RUN --mc {path}")
            return
    m = load_model(args.ckpt, args.backend)
    r = eval_text(m, args) if args.text else eval_mc(m, args, path)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}))


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure; 130 on Ctrl-C."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
