"""Tests for scoring.py, the library under eval.py and train.py --eval-mc: reading multiple-choice files
(HellaSwag's preprocessing, every bad input named by its line), the harness's tokenization of (context,
continuation) and its left-truncation, a closed-form case (uniform logits) for acc, acc_norm,
acc_token_norm and their standard errors, the batched KV-cache scoring against a plain forward of each
choice, and the text windows. transformers' numbers are in test_eval.py."""

import json
import math
import re

import numpy as np
import pytest

import gpt_numpy
from lib import scoring
from conftest import rel_err, small_cfg
from lib.tokenizer import CharTokenizer
from errors import FileFormatError, UserError


# ----------------------------------------------------------------------------------------------------
# helpers

def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def harness_hellaswag(doc):
    """lm-evaluation-harness's hellaswag process_docs (lm_eval/tasks/hellaswag/utils.py), transcribed as
    the oracle: (query, choices, gold)."""
    def preprocess(text):
        text = text.strip()
        text = text.replace(" [title]", ". ")
        text = re.sub("\\[.*?\\]", "", text)
        text = text.replace("  ", " ")
        return text
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return preprocess(doc["activity_label"] + ": " + ctx), [preprocess(e) for e in doc["endings"]], int(doc["label"])


HELLASWAG_DOCS = [   # shaped like hellaswag_val.jsonl, with the WikiHow artifacts the preprocessing removes
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "x"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to grow herbs [title] Choose a pot.",
     "ctx_b": "Then Fill It With SOIL", "ctx": "", "label": "1",
     "endings": ["[step] Water it  daily.", " Keep it  sunny [substeps] always. ", "x [title] y", "Done"]},
    {"activity_label": "Running", "ctx_a": "She ties her shoes  and", "ctx_b": "", "label": 0,
     "endings": ["runs.", "sleeps.", "reads."]},
]


# ----------------------------------------------------------------------------------------------------
# reading files

def test_hellaswag_records_are_preprocessed_as_the_harness_does(tmp_path):
    items = scoring.read_mc(write_jsonl(tmp_path / "hs.jsonl", HELLASWAG_DOCS))
    for item, doc in zip(items, HELLASWAG_DOCS):
        query, choices, gold = harness_hellaswag(doc)
        assert (item.context, item.choices, item.label) == (query, choices, gold)
    # the rules visible: capitalize() lowers the rest of ctx_b, [title] -> ". ", brackets dropped, and
    # what the harness leaves: a space where a leading [step] was, a double space from "  [x] "
    assert items[1].context == "Home and Garden: How to grow herbs. Choose a pot. Then fill it with soil"
    assert items[1].choices[:3] == [" Water it daily.", "Keep it sunny always.", "x. y"]
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"


def test_generic_and_minimal_hellaswag_records(tmp_path):
    p = write_jsonl(tmp_path / "mc.jsonl", [
        {"context": "2 + 2 =", "choices": ["4", "5"], "label": 0},
        "",                                                           # blank lines are skipped
        {"ctx": "A dog  [step] runs", "endings": ["fast", "slow"], "label": 1},   # no ctx_a, no activity_label
    ])
    a, b = scoring.read_mc(p)
    assert (a.context, a.choices, a.label, a.line) == ("2 + 2 =", ["4", "5"], 0, 1)
    assert (b.context, b.choices, b.label, b.line) == ("A dog  runs", ["fast", "slow"], 1, 3)
    assert len(scoring.read_mc(p, limit=1)) == 1


@pytest.mark.parametrize("line, match", [
    ('{"context": "a", "choices": ["x", "y"], "label": 0', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', r"line 2: label 2 is out of range for 2 choices \(0 .. 1\)"),
    ('{"context": "a", "choices": ["x", "y"], "label": -1}', "line 2: label -1 is out of range"),
    ('{"context": "a", "choices": ["x", ""], "label": 0}', "line 2: choice 1 is empty"),
    ('{"ctx": "a", "endings": ["x", "[step]"], "label": 0}', "line 2: choice 1 is empty after HellaSwag's preprocessing"),
    ('{"context": "a", "choices": ["x"], "label": 0}', "line 2: 1 choice.* needs at least 2"),
    ('{"context": "a", "choices": ["x", "y"], "label": true}', "line 2: `label` must be the index"),
    ('{"context": "a", "choices": ["x", "y"]}', "line 2: `label` must be the index of the right choice, got null"),
    ('{"context": 3, "choices": ["x", "y"], "label": 0}', "line 2: `context` must be a string"),
    ('{"context": "a", "choices": "xy", "label": 0}', "line 2: `choices` must be a list of strings"),
    ('{"ctx": "a", "endings": [1, 2], "label": 0}', "line 2: `endings` must be a list of strings"),
    ('{"question": "a", "answers": ["x", "y"], "label": 0}', "line 2: expected HellaSwag's fields"),
])
def test_bad_lines_are_named(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"context": "ok", "choices": ["x", "y"], "label": 1}\n' + line + "\n")
    with pytest.raises(FileFormatError, match=re.escape(str(p)) + ", " + match):
        scoring.read_mc(p)


def test_empty_missing_and_binary_files(tmp_path):
    with pytest.raises(FileFormatError, match="holds no items"):
        scoring.read_mc(write_jsonl(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(UserError, match="cannot read"):
        scoring.read_mc(tmp_path / "none.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"context": "\xff"}\n')
    with pytest.raises(FileFormatError, match="not UTF-8"):
        scoring.read_mc(tmp_path / "b.jsonl")


# ----------------------------------------------------------------------------------------------------
# the harness's tokenization and truncation

CHARS = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz")          # id = position: "\n" 0, " " 1, "a" 2 ...


def ids(s):
    return [CHARS.chars.index(c) for c in s]


def test_encode_pair_moves_trailing_space_and_uses_a_start_token():
    assert scoring.encode_pair(CHARS, "ab", " c") == (ids("ab"), ids(" c"))
    assert scoring.encode_pair(CHARS, "ab  ", "c") == (ids("ab"), ids("  c"))     # whitespace moves over
    assert scoring.encode_pair(CHARS, "", " c") == (ids("\n"), ids(" c"))        # no EOT: the newline
    assert scoring.encode_pair(CHARS, "", "\nc") == (ids("\n"), ids("c"))        # starts with it already


def test_encode_pair_splits_the_joint_tokenization():
    """A merge across the boundary: the continuation is what the joint encoding holds after the context's
    own token count, as in the harness, not the continuation encoded alone. One merge, "a" + "b" -> 256:
    "xa" -> [x, a]; "xabc" -> [x, ab, c]; so the continuation "bc" is scored as [c] alone."""
    bpe = pytest.importorskip("bpe")
    tok = bpe.Tokenizer("gpt4", [(ord("a"), ord("b"))])
    assert tok.encode_ordinary("xabc") == [ord("x"), 256, ord("c")]
    assert scoring.encode_pair(tok, "xa", "bc") == ([ord("x"), ord("a")], [ord("c")])
    assert scoring.encode_pair(tok, "xy", " ab") == ([ord("x"), ord("y")], [ord(" "), 256])


def test_left_truncation_as_the_harness_and_counted():
    item = scoring.MCItem("abcdefghij", ["xy", "z"], 0, 1)        # ctx 10 tokens, conts " xy" 3, " z" 2
    (r,) = scoring.encode_items(CHARS, [item], window=8)
    whole = [ids("abcdefghij") + ids(" xy"), ids("abcdefghij") + ids(" z")]
    for (ctx, cont), w in zip(r.inputs, whole):
        assert ctx + cont == w[-9:]                                # the last N + 1 tokens
    assert r.inputs[0][1] == ids(" xy") and r.truncated
    (r,) = scoring.encode_items(CHARS, [item], window=13)
    assert not r.truncated and r.inputs[0][0] == ids("abcdefghij")
    with pytest.raises(UserError, match=r"line 1, choice 0: the choice is 3 tokens long, more than the model's window of 2"):
        scoring.encode_items(CHARS, [item], window=2)


def test_a_choice_without_tokens_of_its_own_is_refused():
    bpe = pytest.importorskip("bpe")
    tok = bpe.Tokenizer("gpt4", [(ord("a"), ord("b"))])              # "xa" + "b" -> [x, ab]: nothing left
    item = scoring.MCItem("xa", ["b", "c"], 0, 7, "f.jsonl")
    with pytest.raises(UserError, match=r"f.jsonl, line 7, choice 0: the choice has no tokens of its own"):
        scoring.encode_items(tok, [item], window=16, delimiter="")


def test_unencodable_text_names_the_item():
    with pytest.raises(UserError, match="line 3, choice 0: characters not in the char vocabulary: 'X'"):
        scoring.encode_items(CHARS, [scoring.MCItem("aX", ["b", "c"], 0, 3)], window=16)


# ----------------------------------------------------------------------------------------------------
# closed form: zero weights give uniform logits, so every token has log-probability -ln V

def uniform_model(vocab_size, max_seq_len=32):
    cfg = gpt_numpy.GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=8, d_ff=12, max_seq_len=max_seq_len)
    return cfg, {k: np.zeros(s, np.float32) for k, s in gpt_numpy.param_shapes(cfg).items()}


def test_uniform_logits_give_the_hand_computed_metrics():
    """A choice of L characters is " " + L characters = L + 1 tokens, so its log-likelihood is -(L + 1) ln V:
    acc picks the shortest choice, acc_norm (per character, -(1 + 1/L) ln V) the longest, acc_token_norm
    (-ln V for all) ties and takes the first."""
    cfg, params = uniform_model(CHARS.vocab_size)
    items = [scoring.MCItem(c, ch, lab, n) for n, (c, ch, lab) in enumerate([
        ("ab", ["ab", "abcd", "a"], 2),          # acc hit (shortest), acc_norm miss (longest 1), token miss (0)
        ("", ["abc", "ab", "abcde"], 2),         # acc miss, acc_norm hit, token miss
        ("abc d", ["abc", "abc", "a b"], 0),     # all tie: every metric picks 0, a hit
        ("x", ["ab", "a", "abc"], 1),            # acc hit, acc_norm miss (2), token miss
        ("yz", ["abcd", "ab"], 1),               # acc hit, acc_norm miss (0), token miss (0)
    ], 1)]
    results = scoring.score_requests(gpt_numpy, params, cfg, scoring.encode_items(CHARS, items, cfg.max_seq_len))
    lnV = math.log(CHARS.vocab_size)
    for r, item in zip(results, items):
        assert r.tokens == [len(c) + 1 for c in item.choices] and r.chars == [len(c) for c in item.choices]
        np.testing.assert_allclose(r.loglikelihoods, [-(len(c) + 1) * lnV for c in item.choices], rtol=1e-6)
    assert [r.pred for r in results] == [2, 1, 0, 1, 1]
    assert [r.pred_norm for r in results] == [1, 2, 0, 2, 0]
    assert [r.pred_token_norm for r in results] == [0, 0, 0, 0, 0]
    m = scoring.mc_metrics(results)
    # acc 4/5, acc_norm 2/5, acc_token_norm 1/5; stderr = sqrt(p (1 - p) / (n - 1)), n = 5
    assert (m["acc"], m["acc_norm"], m["acc_token_norm"], m["items"], m["truncated"]) == (0.8, 0.4, 0.2, 5, 0)
    assert m["acc_stderr"] == pytest.approx(0.2, rel=1e-12)                 # sqrt(0.16 / 4)
    assert m["acc_norm_stderr"] == pytest.approx(math.sqrt(0.06), rel=1e-12)  # sqrt(0.24 / 4)
    assert m["acc_token_norm_stderr"] == pytest.approx(0.2, rel=1e-12)


def test_uniform_logits_give_the_hand_computed_perplexity():
    cfg, params = uniform_model(CHARS.vocab_size, max_seq_len=8)
    x = np.asarray(ids("the quick brown fox jumps"), np.int64)               # 25 tokens, one byte each
    r = scoring.score_text(gpt_numpy, params, cfg, x, token_bytes=np.ones(CHARS.vocab_size, np.int64))
    lnV = math.log(CHARS.vocab_size)
    assert (r["tokens"], r["bytes"], r["windows"]) == (24, 24, 3)            # 8 + 8 + 8 targets
    assert r["loss"] == pytest.approx(lnV, rel=1e-6) and r["ppl"] == pytest.approx(CHARS.vocab_size, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(math.log2(CHARS.vocab_size), rel=1e-6)


def test_standard_error_of_one_item_is_undefined():
    assert scoring.mean_stderr([1.0]) is None and scoring.mean_stderr([1.0, 0.0]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------
# the batched KV-cache scoring against a plain forward of each (context + choice)

def plain_loglikelihood(params, cfg, ctx, cont):
    """The harness's loop for one choice: forward ctx + cont[:-1], sum log softmax at the cont tokens."""
    x = np.asarray([(ctx + cont)[:-1]])
    logits = gpt_numpy.forward(params, x, cfg)[0].astype(np.float64)               # (T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))


@pytest.mark.parametrize("window", [24, 12])         # 12: some contexts are cut, and differ between choices
def test_kv_cache_batch_equals_a_plain_forward_of_each_choice(window):
    cfg = small_cfg(vocab_size=CHARS.vocab_size, max_seq_len=window)
    params = gpt_numpy.init_params(cfg, seed=3, dtype=np.float64)
    params = {k: v * 8 if v.ndim == 2 else v for k, v in params.items()}           # far from uniform
    items = [scoring.MCItem("the fox", ["jumps over", "a", "dog", "sleeps"], 0, 1),
             scoring.MCItem("z", ["abcdef", "ab"], 1, 2),
             scoring.MCItem("", ["quick", "lazy dog"], 1, 3)]
    reqs = scoring.encode_items(CHARS, items, window)
    results = scoring.score_requests(gpt_numpy, params, cfg, reqs)
    for req, r in zip(reqs, results):
        for (ctx, cont), ll in zip(req.inputs, r.loglikelihoods):
            assert rel_err(ll, plain_loglikelihood(params, cfg, ctx, cont)) < 1e-12
    assert [r.truncated for r in results] == ([False] * 3 if window == 24 else [True, False, False])
    if window == 12:
        assert len({tuple(ctx) for ctx, _ in reqs[0].inputs}) == 3     # " jumps over", " sleeps" cut it


@pytest.mark.parametrize("limits, calls", [(dict(), [2, 1, 3, 1, 1, 1]),
                                           (dict(batch_tokens=40), [1, 1, 2, 1, 1, 1, 1, 1]),
                                           (dict(batch_bytes=1), [1] * 9)])
def test_items_of_one_context_length_score_together_as_each_alone(monkeypatch, limits, calls):
    # score_requests batches the items whose context has the same length: their contexts as rows of one
    # prefill, all their choices as rows of one batch. Each choice must still equal the harness's plain
    # forward of ctx + cont (float64: to rounding), the results come back in the items' order, and an item
    # whose choices see different (left-truncated) contexts, between them, goes alone. batch_tokens=40
    # splits two of the batches; batch_bytes=1 leaves every item alone.
    window = 12
    cfg = small_cfg(vocab_size=CHARS.vocab_size, max_seq_len=window)
    params = gpt_numpy.init_params(cfg, seed=4, dtype=np.float64)
    params = {k: v * 8 if v.ndim == 2 else v for k, v in params.items()}           # far from uniform
    items = [scoring.MCItem("a cat", ["sat", "ran off"], 0, 1),
             scoring.MCItem("the dog", ["barks", "b"], 1, 2),
             scoring.MCItem("big ox", ["eats", "x", "runs"], 2, 3),
             scoring.MCItem("the fox", ["jumps over", "a", "dog", "sleeps"], 0, 4),    # cut: contexts differ
             scoring.MCItem("a hen", ["lays", "clucks"], 1, 5),
             scoring.MCItem("my ant", ["hi"], 0, 6),
             scoring.MCItem("an elk", ["is", "was", "z"], 2, 7)]
    reqs = scoring.encode_items(CHARS, items, window)
    assert len({tuple(ctx) for ctx, _ in reqs[3].inputs}) > 1
    assert sorted(len(r.inputs[0][0]) for r in reqs if r is not reqs[3]) == [5, 5, 6, 6, 6, 7]
    seen, score = [], scoring.score_continuations

    def spy(gm, params, cfg, ctxs, conts):
        seen.append(len(ctxs))
        return score(gm, params, cfg, ctxs, conts)
    monkeypatch.setattr(scoring, "score_continuations", spy)
    results = scoring.score_requests(gpt_numpy, params, cfg, reqs, **limits)
    # contexts per call, in order: items 0 and 4 (length 5), item 1 (length 7), items 2, 5 and 6 (length 6),
    # item 3's three distinct contexts one by one; with batch_tokens=40 the rows' KV positions split them
    # (item 4 leaves item 0: 4 rows x 12 > 40; item 6 leaves items 2 and 5: 7 rows x 10)
    assert seen == calls
    assert [r.index for r in results] == list(range(7)) and [r.line for r in results] == list(range(1, 8))
    for req, r in zip(reqs, results):
        assert len(r.loglikelihoods) == len(req.inputs)
        for (ctx, cont), ll in zip(req.inputs, r.loglikelihoods):
            assert rel_err(ll, plain_loglikelihood(params, cfg, ctx, cont)) < 1e-12


# ----------------------------------------------------------------------------------------------------
# text windows

@pytest.mark.parametrize("n, N, S", [(2, 4, None), (9, 4, None), (10, 4, None), (50, 7, 3), (50, 7, 1), (8, 8, 5)])
def test_text_windows_score_every_token_but_the_first_once(n, N, S):
    seen = []
    windows = scoring.text_windows(n, N, S)
    for k, (start, end, first) in enumerate(windows):
        assert end - start <= N and start < first <= end + 1
        seen += list(range(first, end + 1))
        if k:                                          # context of each scored token: at least N - S
            assert first - start >= N - (S or N)
    assert seen == list(range(1, n))


def test_text_windows_overlap_by_one_token():
    assert scoring.text_windows(9, 4) == [(0, 4, 1), (4, 8, 5)]
    assert scoring.text_windows(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 9, 9)]
    assert scoring.text_windows(9, 4, 2) == [(0, 4, 1), (2, 6, 5), (4, 8, 7)]
    with pytest.raises(ValueError, match="stride must be in"):
        scoring.text_windows(9, 4, 5)


def test_score_text_equals_a_plain_forward_per_window():
    cfg = small_cfg(vocab_size=CHARS.vocab_size, max_seq_len=8)
    params = gpt_numpy.init_params(cfg, seed=1, dtype=np.float64)
    params = {k: v * 8 if v.ndim == 2 else v for k, v in params.items()}
    x = np.asarray(ids("the quick brown fox jumps over a lazy dog"), np.int64)
    for S in (None, 3):
        r = scoring.score_text(gpt_numpy, params, cfg, x, stride=S, batch_bytes=1)     # one window a batch
        total = 0.0
        for start, end, first in scoring.text_windows(x.size, 8, S):
            for t in range(first, end + 1):          # target t, read with ids[start:t]
                total -= plain_loglikelihood(params, cfg, list(x[start:t]), [int(x[t])])
        assert r["tokens"] == x.size - 1 and rel_err(r["loss"], total / (x.size - 1)) < 1e-12
        r2 = scoring.score_text(gpt_numpy, params, cfg, x, stride=S)                     # batched windows
        assert rel_err(r2["loss"], r["loss"]) < 1e-12
    with pytest.raises(UserError, match="at least 2 are needed"):
        scoring.score_text(gpt_numpy, params, cfg, x[:1])
    with pytest.raises(UserError, match="exceeds the model's context"):
        scoring.score_text(gpt_numpy, params, cfg, x, block_size=9)


def test_an_empty_context_starts_with_the_models_bos():
    """The harness's prefix token for an empty context: the model's BOS, else its EOS (the metadata of an
    imported model names them), else <|endoftext|>; a continuation that starts with it gives it up."""
    import bpe
    tok = bpe.Tokenizer("gpt4", [], {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258})
    chat = {"template": "x", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert scoring.start_ids(tok, {"chat": chat}) == [257]
    assert scoring.start_ids(tok, {"chat": {**chat, "bos_token": None}}) == [258]
    assert scoring.start_ids(tok, {}) == scoring.start_ids(tok, None) == [256]
    assert scoring.encode_pair(tok, "", " a", [257]) == ([257], [32, 97])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_token_logprobs_by_row_blocks_equal_one_block_and_the_log_softmax(dtype):
    # the CPU form runs exp over blocks of rows; 7 rows of 3 * 5 positions leave a short last block, and the
    # result must not depend on the block size, nor differ from log softmax computed in float64
    rng = np.random.default_rng(0)
    V = 50
    logits = (rng.standard_normal((3, 5, V)) * 4).astype(dtype)
    targets = rng.integers(0, V, (3, 5))
    targets[2, 3:] = -1                                                       # padding scores 0
    whole = scoring.token_logprobs(gpt_numpy, logits, targets, block_bytes=1 << 30)
    for rows in (1, 2, 7):
        got = scoring.token_logprobs(gpt_numpy, logits, targets, block_bytes=rows * V * logits.itemsize)
        np.testing.assert_array_equal(got, whole)
    x = logits.astype(np.float64)
    ref = x - x.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    ref = np.where(targets >= 0, np.take_along_axis(ref, np.maximum(targets, 0)[..., None], -1)[..., 0], 0.0)
    assert (whole[2, 3:] == 0).all() and (whole[:2] < 0).all()
    np.testing.assert_allclose(whole, ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
