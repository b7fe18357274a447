"""
eval.py: score a checkpoint on a text (perplexity, bits per byte) or on a multiple-choice benchmark
(HellaSwag or any file in the generic format), with the numbers lm-evaluation-harness would give: its
loglikelihood_rolling and wikitext metrics for a text (the default "rolling" procedure), its
multiple-choice scoring for --mc. Today's other text procedure, "strided" (windows overlapping by one
token, or a sliding window with --stride, no BOS), is kept under its name.

    python eval.py --ckpt out/stdlib-bpe2048 --text notes.txt                 # word/byte perplexity, bits/byte
    python eval.py --ckpt out/imported --text notes.txt --block-size 512 --stride 256      # strided
    python eval.py --ckpt out/imported --download hellaswag --mc-limit 500      # fetched once into data/hellaswag/
    python eval.py --ckpt out/imported --mc my_questions.jsonl --per-item items.jsonl --json

The rules (windows, the harness's tokenization, truncation, the metrics) live in lib/scoring.py, which
train.py --eval-mc uses as well; docs/eval.md has the formats and measured results. Exit status 0; a bad
command line prints `error: <one line>` and exits 2, a failure (a missing or malformed file) exits 1.
"""

import argparse
import json
import math
import time
from pathlib import Path

from errors import ArgumentParser, UsageError, UserError, run_main
from lib import inference, scoring
from lib.checkpoint import CHECKPOINT_HELP, load_model
from lib.files import atomic_write
from lib.tokenizer import token_byte_lengths

EPILOG = """text (--text): a text file is one document; a .jsonl / .jsonl.gz file gives one per line and a
  .parquet file one per row (their --text-field, as train.py reads a corpus). Two procedures:
  rolling (the default): lm-evaluation-harness's loglikelihood_rolling, as its wikitext task runs it.
    Each document is read after the model's BOS, so its first token is scored too, in disjoint windows of
    N predictions (N = --block-size, by default the model's context), each window after the first reading
    one token of context before them; the last, shorter window is right-aligned so that its k tokens keep up
    to N - k tokens of context. Metrics over the documents (the harness's): word_perplexity = exp(-total
    log-likelihood / words), words as re.split(r"\\s+", document) counts them; byte_perplexity =
    exp(-total / UTF-8 bytes); bits_per_byte = -total / bytes / ln 2; and per token, loss and ppl.
    The default because these are the numbers published for models (wikitext in the harness).
  strided (--procedure strided, or any --stride): the documents' tokens as one stream (joined by
    <|endoftext|> where the tokenizer has it, as train.py's cache is), cut into windows of N + 1 tokens that
    overlap by one token, so every token but the first is scored exactly once, given the earlier tokens of
    its window; no BOS. With --stride S < N each window starts S tokens after the previous one and scores
    only its last S tokens, each then seen with at least N - S tokens of context (Hugging Face's
    sliding-window perplexity). loss: mean nats per scored token; ppl = exp(loss); bits_per_byte = total
    nats / ln 2 / UTF-8 bytes of the scored tokens: train.py's val bits per byte.
  Every report names its procedure (and --json has it as "procedure").

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
  python eval.py --ckpt out/imported --text wiki.jsonl --text-field page           # one document per line
  python eval.py --ckpt out/imported --text notes.txt --procedure strided --stride 256
  python eval.py --download hellaswag                          # just fetch it into --data-dir
  python eval.py --ckpt out/imported --download hellaswag --mc-limit 100 --per-item hs.jsonl"""


def parse_args(argv):
    p = ArgumentParser(prog="eval.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Score a checkpoint: perplexity and bits per byte on a text, or accuracy on "
                                   "a multiple-choice benchmark (lm-evaluation-harness's scoring).")
    p.add_argument("--ckpt", metavar="PATH", help=f"the checkpoint: {CHECKPOINT_HELP}")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--text", metavar="FILE", help="score the perplexity of this text file (or the documents "
                                                        "of a .jsonl, .jsonl.gz or .parquet file)")
    what.add_argument("--mc", metavar="FILE", help="score this multiple-choice JSONL file")
    what.add_argument("--download", choices=["hellaswag"],
                      help="fetch HellaSwag's validation file once into --data-dir (and score it if --ckpt is given)")
    p.add_argument("--procedure", choices=["rolling", "strided"],
                   help="text: rolling (lm-evaluation-harness's loglikelihood_rolling, the default) or strided "
                        "(windows overlapping by one token, or by N - S with --stride; the default with --stride); "
                        "see below")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="text: the field of a .jsonl record, or column of a .parquet file, that holds a document "
                        "(default: %(default)s)")
    p.add_argument("--block-size", type=int, metavar="N", help="text: window length (default: the model's context)")
    p.add_argument("--stride", type=int, metavar="S", help="text, strided: score only the last S tokens of each "
                                                           "window after the first (1 <= S <= N; default N)")
    p.add_argument("--delimiter", default=" ", metavar="STR",
                   help="mc: text between the context and each choice (default: one space, the harness's)")
    p.add_argument("--mc-limit", "--limit", type=int, metavar="N", dest="mc_limit",
                   help="mc: score only the first N items (train.py --eval-mc-limit's name; --limit, the old "
                        "spelling, still works)")
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
                               ("--procedure", args.procedure, args.text),
                               ("--text-field", args.text_field != "text", args.text),
                               ("--mc-limit", args.mc_limit, mc), ("--per-item", args.per_item, mc),
                               ("--delimiter", args.delimiter != " ", mc)):
        if value and not needs:
            raise UserError(f"{flag} applies to {'--mc' if flag in ('--mc-limit', '--per-item', '--delimiter') else '--text'} "
                            f"only")
    for flag, value in (("--block-size", args.block_size), ("--stride", args.stride), ("--mc-limit", args.mc_limit)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.stride and args.procedure == "rolling":
        raise UserError("--stride is the strided procedure's; the rolling one's windows are disjoint (drop --stride, "
                        "or pass --procedure strided)")
    if args.text and args.procedure is None:
        args.procedure = "strided" if args.stride else "rolling"
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


def read_text_documents(m, args):
    """--text -> [(document text, its ids)]: a text file is one document, a .jsonl / .jsonl.gz line or a
    .parquet row one each (their --text-field), read as train.py reads a corpus (lib/data.read_documents)."""
    import numpy as np
    from lib.data import check_readers, read_documents, skip_reason
    tok = m.tokenizer
    if Path(args.text).is_file():
        why = skip_reason(args.text)
        if why:
            raise UserError(f"--text {args.text}: {why}")
        check_readers([args.text])
    docs, texts, ids = [], [], []
    for text, _, end in read_documents(args.text, args.text_field, 1 << 20, cut=tok.cut, errors=tok.file_errors):
        try:
            ids.append(np.asarray(tok.encode_ordinary(text), dtype=np.int64))
        except UserError as e:                          # e.g. a character the char vocabulary lacks
            raise UserError(f"{args.text}: {e}") from None
        texts.append(text)
        if end:
            docs.append(("".join(texts), np.concatenate(ids)))
            texts, ids = [], []
    return docs


def eval_text(m, args):
    """--text: read and encode the documents (the tokenizer's own way of reading files), score them by
    the rolling procedure (the harness's) or the strided one."""
    import numpy as np
    from lib import chat_template as chat
    from lib.tokenizer import eot_id
    N = args.block_size or m.cfg.max_seq_len
    if args.block_size and args.block_size > m.cfg.max_seq_len:
        raise UsageError(f"--block-size {args.block_size} exceeds the model's context of {m.cfg.max_seq_len} tokens")
    if args.stride and args.stride > N:
        raise UsageError(f"--stride {args.stride} exceeds the block size {N} (the model's context, without "
                         f"--block-size)")
    docs = read_text_documents(m, args)
    t0 = time.time()
    if args.procedure == "rolling":
        info = m.meta.get("chat")                       # tokenizer(doc): BOS first where the model's adds one
        docs = [(text, np.asarray(chat.with_bos(info, ids.tolist()), np.int64)) for text, ids in docs]
        prefix = scoring.start_ids(m.tokenizer, m.meta)
        r = scoring.score_rolling(m.gm, m.params, m.cfg, docs, prefix, args.block_size, progress=True)
        r.pop("loglikelihoods")
    else:                                               # one stream: documents joined as train.py joins them
        eot, parts = eot_id(m.tokenizer), []
        for k, (_, d) in enumerate(docs):
            if k and eot is not None:
                parts.append(np.asarray([eot], np.int64))
            parts.append(d)
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        r = scoring.score_text(m.gm, m.params, m.cfg, ids, args.block_size, args.stride,
                               token_byte_lengths(m.tokenizer), progress=True)
    r["seconds"] = round(time.time() - t0, 3)
    if r["procedure"] == "rolling":
        print(f"{args.text}: {r['documents']:,} document(s), {r['tokens']:,} tokens scored ({r['bytes']:,} bytes, "
              f"{r['words']:,} words) in {r['windows']} windows of {r['block_size']} tokens ({r['seconds']:.1f} s)")
        print("  procedure: rolling (lm-evaluation-harness's loglikelihood_rolling: each document after the "
              "model's BOS, every token scored)")
        print(f"  word perplexity {r['word_perplexity']:.4f}")
        print(f"  byte perplexity {r['byte_perplexity']:.4f}")
        print(f"  bits per byte   {r['bits_per_byte']:.4f}")
        print(f"  loss            {r['loss']:.4f} nats/token (perplexity {r['ppl']:.4f})")
    else:
        print(f"{args.text}: {r['tokens']:,} tokens scored ({r['bytes']:,} bytes) in {r['windows']} windows of "
              f"{r['block_size']} tokens, stride {r['stride']} ({r['seconds']:.1f} s)")
        print("  procedure: strided (windows overlapping by " + (f"{r['block_size'] - r['stride']} tokens" if
              r["stride"] < r["block_size"] else "one token") + ", no BOS: the first token is not scored)")
        print(f"  loss            {r['loss']:.4f} nats/token")
        print(f"  perplexity      {r['ppl']:.4f}")
        print(f"  bits per byte   {r['bits_per_byte']:.4f}")
    return r


def eval_mc(m, args, path):
    """--mc (or the downloaded file): read, encode, score, report; --per-item writes the details."""
    items = scoring.read_mc(path, args.mc_limit)
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
    inference.pack_for_inference(m.gm, m.params, m.cfg)    # the weights laid out for inference
    r = eval_text(m, args) if args.text else eval_mc(m, args, path)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}))


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure; 130 on Ctrl-C."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
