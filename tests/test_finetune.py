"""Tests for fine-tuning through the programs: train.py --lora-rank and --sft (adapter checkpoints that
name their base, frozen weights, bit-exact resume, merge), sample.py and export.py on a LoRA run, the
PEFT adapter against peft itself, and one-line errors. Tiny runs in tmp_path."""

import json

import numpy as np
import pytest

import export
import gpt_numpy as gn
import sample
import train
from lib.checkpoint import load_checkpoint, load_model
from conftest import main_error, make_text, run_quiet, tiny_args
from errors import UserError
from lib import lora as lora_lib
from lib.hf import export_hf
from lib.peft_adapter import export_peft_adapter, to_peft_tensors

QUESTIONS = ["the fox", "a dog", "seven wizards", "the lazy programmer", "quick code", "every jovial dog",
             "numpy hex", "a brown fox", "lazy wizards", "the quick dog", "who writes", "over a dog"]


def write_chats(path, n=12, alpaca_every=4):
    """n tiny chat records (every alpaca_every-th an Alpaca record) in the vocabulary of conftest's text."""
    lines = []
    for i, q in enumerate(QUESTIONS[:n]):
        a = f"the {q.split()[-1]} jumps over."
        if alpaca_every and i % alpaca_every == alpaca_every - 1:
            lines.append({"instruction": q, "input": "", "output": a})
        else:
            lines.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 2-layer BPE model with grouped-query attention, trained briefly: folder/base, and the chats."""
    d = tmp_path_factory.mktemp("ft")
    text = make_text(d / "text.txt")
    run_quiet(tiny_args(d, text, "--out-dir", d / "base", "--tokenizer", "bpe", "--vocab-size", 300, "--max-iters", 30,
                        "--n-layer", 2, "--d-model", 32, "--n-head", 4, "--d-ff", 64, "--block-size", 48,
                        "--sample-tokens", 0))
    ck = load_checkpoint(d / "base")
    assert ck.model_config().n_kv_head == 4            # train.py makes multi-head models; GQA is tested below
    return d, write_chats(d / "chats.jsonl")


def lora_args(d, out, *extra):
    return list(map(str, ["--init-from", d / "base", "--sft", d / "chats.jsonl", "--data-dir", d / "data",
                          "--out-dir", d / out, "--batch-size", 4, "--block-size", 48, "--lr", 1e-2, "--min-lr", 1e-3,
                          "--warmup-iters", 2, "--eval-interval", 10, "--eval-iters", 2, "--log-interval", 5,
                          "--sample-tokens", 8, "--sample-prompt", "the fox", *extra]))


# ----------------------------------------------------------------------------------------------------
# train.py --lora-rank --sft

def test_lora_sft_run_trains_adapters_only(base):
    d, _ = base
    res = run_quiet(lora_args(d, "lora", "--lora-rank", 4, "--lora-targets", "qkv,down", "--max-iters", 20))
    assert res["status"] == "done" and res["step"] == 20
    # tokens counted as the padded rows' real length (the longest example drawn), not block_size
    assert 20 * 4 * 8 < res["tokens_seen"] < 20 * 4 * 48
    rates = [json.loads(x)["tokens_per_s"] for x in (d / "lora" / "log.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "train"]
    assert rates and all(r > 0 for r in rates)
    b = load_checkpoint(d / "base")
    ck = load_checkpoint(d / "lora")
    cfg = ck.model_config()
    lora = lora_lib.LoraConfig(rank=4, targets="qkv,down")
    # the checkpoint holds the adapters and their AdamW moments, not a second copy of the base ...
    assert set(ck.params) == set(lora_lib.shapes(cfg, lora)) and set(ck.adam_m) == set(ck.params)
    assert ck.meta["lora"]["config"] == lora.to_dict()
    base_ref = ck.meta["lora"]["base"]
    assert base_ref["path"] == str((d / "base" / "ckpt.safetensors").resolve())
    from lib.checkpoint import tensors_sha256
    assert base_ref["params_sha256"] == tensors_sha256(b.params)
    # ... whose weights stayed bit-identical through training, while the adapters moved
    for k, v in b.params.items():
        assert np.array_equal(res["params"][k], v), k
    assert all(np.abs(ck.params[k]).max() > 0 for k in ck.params if k.endswith("lora_B"))
    # the loss fell; the step-0 evaluation is the base model's (B = 0), on the assistant tokens only
    log = [json.loads(x) for x in (d / "lora" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    tcfg = train.TrainConfig(**ck.meta["train_config"])
    data = train.sft.prepare_sft(d / "chats.jsonl", ck.tokenizer(), train.sft.chat_template_for(ck.meta, ck.tokenizer()),
                                 48, tcfg.val_fraction, tcfg.seed, log=lambda *a: None)
    expect = train.estimate_sft_loss(gn, b.params, data, tcfg, cfg)
    assert (evals[0]["train_loss"], evals[0]["val_loss"]) == (expect["train"], expect["val"])
    assert ck.meta["chat"]["source"] == "default" and ck.meta["sampler"]["kind"] == "uniform random examples"
    assert isinstance(res["sample"], str)


def test_lora_run_resumes_bit_exactly(base):
    d, _ = base
    extra = ["--lora-rank", 2, "--lora-dropout", 0.2, "--dropout", 0.1, "--grad-accum", 2, "--lr-decay-iters", 12,
             "--ckpt-interval", 0, "--sample-tokens", 0, "--checkpoint-activations"]
    run_quiet(lora_args(d, "straight", "--max-iters", 12, *extra))
    run_quiet(lora_args(d, "part", "--max-iters", 7, *extra))
    argv = ["--resume", str(d / "part"), "--max-iters", "12"]
    assert run_quiet(argv)["step"] == 12
    a, b = load_checkpoint(d / "straight"), load_checkpoint(d / "part")
    assert set(a.params) == set(b.params)
    for group in ("params", "adam_m", "adam_v"):
        for k in a.params:
            assert np.array_equal(getattr(a, group)[k], getattr(b, group)[k]), (group, k)
    assert a.meta["rng"] == b.meta["rng"] and a.meta["adam_t"] == b.meta["adam_t"] == 12


def test_sample_and_export_load_base_plus_adapters(base, tmp_path, capsys):
    d, _ = base
    run_quiet(lora_args(d, "lora2", "--lora-rank", 4, "--max-iters", 10, "--lora-merge", "--sample-tokens", 0))
    merged_path = d / "lora2" / "merged.safetensors"
    merged = load_checkpoint(merged_path)
    assert not merged.adam_m and merged.meta["merged_from"]["base"].endswith("base/ckpt.safetensors")
    # load_model merges a LoRA run: the same weights as merged.safetensors, and the LoRA forward's logits
    m = load_model(d / "lora2")
    for k, v in merged.params.items():
        np.testing.assert_array_equal(m.params[k], v)
    ck = load_checkpoint(d / "lora2")
    lora = lora_lib.LoraConfig(**ck.meta["lora"]["config"])
    ids = np.random.default_rng(0).integers(0, m.cfg.vocab_size, (2, 16))
    want = gn.forward({**load_checkpoint(d / "base").params, **ck.params}, ids, m.cfg, lora=lora)
    assert np.abs(gn.forward(m.params, ids, m.cfg) - want).max() <= 1e-6 * np.abs(want).max()
    # sample.py reads the adapter run and its merge alike
    outs = []
    for path in (d / "lora2", merged_path):
        assert sample.main(["--ckpt", str(path), "--prompt", "the ", "--max-new-tokens", "8", "--temperature", "0"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("the ")
    # export.py --ckpt of a LoRA run: the merged model
    assert export.main(["--ckpt", str(d / "lora2"), "--out", str(tmp_path / "hf")]) == 0
    from safetensors.numpy import load_file
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    np.testing.assert_array_equal(hf["model.layers.1.mlp.down_proj.weight"], merged.params["blocks.1.ffn.w_down"].T)


def test_moved_or_changed_base_is_found_or_refused(base, tmp_path, capsys):
    import shutil
    d, _ = base
    run_quiet(lora_args(d, "lora3", "--lora-rank", 2, "--max-iters", 2, "--sample-tokens", 0))
    # both folders moved together: the base is found by its relative path
    shutil.copytree(d / "base", tmp_path / "base")
    shutil.copytree(d / "lora3", tmp_path / "lora3")
    (d / "base" / "ckpt.safetensors").rename(d / "base" / "away.safetensors")
    try:
        assert sample.main(["--ckpt", str(tmp_path / "lora3"), "--max-new-tokens", "2"]) == 0
        capsys.readouterr()
        shutil.rmtree(tmp_path / "base")
        code, err = main_error(sample.main, ["--ckpt", str(tmp_path / "lora3")], capsys)
        assert code == 1 and "holds LoRA adapters for the base checkpoint" in err and "not there" in err
        # a base whose weights changed is refused
        ck = load_checkpoint(d / "base" / "away.safetensors")
        ck.params["norm_f.weight"][0] += 1.0
        from lib.checkpoint import save_checkpoint
        (tmp_path / "base").mkdir()
        save_checkpoint(tmp_path / "base" / "ckpt.safetensors", ck.params, ck.adam_m, ck.adam_v, ck.meta)
        code, err = main_error(sample.main, ["--ckpt", str(tmp_path / "lora3")], capsys)
        assert code == 1 and "whose weights have changed since" in err
    finally:
        (d / "base" / "away.safetensors").rename(d / "base" / "ckpt.safetensors")


def test_full_sft_and_train_on_prompt(base):
    d, _ = base
    r1 = run_quiet(lora_args(d, "full", "--max-iters", 3, "--sample-tokens", 0))
    r2 = run_quiet(lora_args(d, "prompt", "--max-iters", 3, "--sample-tokens", 0, "--sft-train-on-prompt"))
    assert r2["data_meta"]["train_tokens"] > 2 * r1["data_meta"]["train_tokens"]
    ck = load_checkpoint(d / "full")
    assert "lora" not in ck.meta and set(ck.params) == set(load_checkpoint(d / "base").params)


def test_sample_chat_talks_to_an_sft_run(base, capsys):
    """sample.py --chat on a model fine-tuned here: the run's template, its end of turn from the
    metadata's eos_token (an --sft run records the template's strings; the ids are derived on load)."""
    d, _ = base
    run_quiet(lora_args(d, "chat-run", "--lora-rank", 2, "--max-iters", 20, "--sample-tokens", 0))
    capsys.readouterr()
    assert sample.main(["--ckpt", str(d / "chat-run"), "--chat", "--prompt", "what does the fox do?",
                        "--temperature", "0", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    from lib import chat_template
    ck = load_checkpoint(d / "chat-run")
    tok = ck.tokenizer()
    info = chat_template.from_meta(ck.meta, tok)
    assert info["stop_ids"] == [tok.special_tokens["<|endoftext|>"]] and info["template"] == ck.meta["chat"]["template"]


@pytest.mark.parametrize("extra, code, message", [
    (["--lora-rank", 4, "--init-from", ""], 2, "--lora-rank fine-tunes a model: pass --init-from"),
    (["--init-from", "", "--lora-rank", 0], 2, "--sft fine-tunes a model: pass --init-from"),
    (["--data", "x.txt"], 2, "--sft FILE is the training data; --data names a text corpus"),
    (["--lora-rank", 4, "--lora-targets", "qkv,lm_head"], 2, "bad LoRA setting: LoRA targets must be"),
    (["--lora-rank", -1], 2, "--lora-rank must be >= 0"),
    (["--lora-rank", 4, "--lora-alpha", 0], 2, "LoRA alpha must be a positive number"),
    (["--lora-merge"], 2, "--lora-merge merges a LoRA run's adapters: it needs --lora-rank"),
    (["--sft", "missing.jsonl"], 1, "--sft missing.jsonl: no such file"),
    (["--chat-template", "missing.jinja"], 1, "--chat-template missing.jinja: cannot read it"),
])
def test_bad_fine_tuning_flags_are_one_line_errors(base, capsys, monkeypatch, extra, code, message):
    d, _ = base
    monkeypatch.chdir(d)
    argv = lora_args(d, "bad", "--max-iters", 1)
    got, err = main_error(train.main, argv + list(map(str, extra)), capsys)
    assert got == code and message in err, err


def test_bad_records_are_one_line_errors_with_line_numbers(base, capsys, tmp_path):
    d, chats = base
    good = chats.read_text().splitlines()
    for bad, message in [('{"messages": [{"role": "user", "content": "x"}', "bad.jsonl, line 3: not valid JSON"),
                         ('{"messages": [{"role": "wizard", "content": "x"}]}', "bad.jsonl, line 3: message 0 has unknown role 'wizard'"),
                         ('{"messages": []}', "bad.jsonl, line 3: 'messages' must be a non-empty list"),
                         ('{"messages": [{"role": "user", "content": "the fox"}]}', "bad.jsonl, line 3: the record renders to zero assistant tokens")]:
        (tmp_path / "bad.jsonl").write_text("\n".join(good[:2] + [bad] + good[2:]) + "\n")
        argv = lora_args(d, "bad", "--max-iters", 1) + ["--sft", str(tmp_path / "bad.jsonl")]
        got, err = main_error(train.main, argv, capsys)
        assert got == 1 and message in err, err


def test_init_from_an_adapter_checkpoint_is_refused(base, capsys):
    d, _ = base
    run_quiet(lora_args(d, "lora4", "--lora-rank", 2, "--max-iters", 1, "--sample-tokens", 0))
    argv = lora_args(d, "x", "--max-iters", 1) + ["--init-from", str(d / "lora4")]
    got, err = main_error(train.main, argv, capsys)
    assert got == 1 and "holds LoRA adapters, not a whole model: merge them first" in err


# ----------------------------------------------------------------------------------------------------
# the PEFT adapter against peft itself

@pytest.mark.parametrize("n_kv, tie", [(4, True), (2, False), (1, True)])
def test_peft_adapter_gives_our_logits(tmp_path, n_kv, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = gn.GPTConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=n_kv, d_model=32, d_ff=48, max_seq_len=16,
                       tie_embeddings=tie)
    lora = lora_lib.LoraConfig(rank=4, alpha=6.0)
    base = gn.init_params(cfg, seed=1)
    adapters = lora_lib.init(gn, cfg, lora, seed=2)
    r = np.random.default_rng(3)
    for k in adapters:
        if k.endswith("lora_B"):
            adapters[k] += r.normal(0, 0.05, adapters[k].shape).astype(np.float32)   # a trained adapter
    export_hf(base, cfg, None, tmp_path / "base")
    export_peft_adapter(adapters, lora, cfg, tmp_path / "adapter")
    shapes = {k: v.shape for k, v in to_peft_tensors(adapters, lora, cfg).items()}
    kv = n_kv * 8
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (kv, 4)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] == (4, 48)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    ours = gn.forward({**base, **adapters}, ids, cfg, lora=lora)
    plain = gn.forward(base, ids, cfg)
    scale = np.abs(ours).max()
    assert np.abs(ours - plain).max() > 1e-3 * scale                   # the adapter changes the logits ...
    assert np.abs(theirs - ours).max() <= 1e-5 * scale                 # ... and peft's agree with ours
    # and peft's merge equals our merged export
    merged = model.merge_and_unload()
    with torch.no_grad():
        theirs_merged = merged(torch.as_tensor(ids)).logits.numpy()
    ours_merged = gn.forward(lora_lib.merge({**base, **adapters}, lora), ids, cfg)
    assert np.abs(theirs_merged - ours_merged).max() <= 1e-5 * scale


def test_export_peft_adapter_of_a_run(base, tmp_path, capsys):
    d, _ = base
    run_quiet(lora_args(d, "lora5", "--lora-rank", 2, "--lora-targets", "qkv,proj", "--max-iters", 3,
                        "--sample-tokens", 0))
    assert export.main(["--ckpt", str(d / "lora5"), "--out", str(tmp_path / "merged"),
                        "--peft-adapter", str(tmp_path / "adapter")]) == 0
    cfgj = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfgj["peft_type"], cfgj["r"], cfgj["lora_alpha"]) == ("LORA", 2, 16.0)
    assert cfgj["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    capsys.readouterr()
    # a second export to the same folders is refused without --force, and replaces them whole with it
    again = ["--ckpt", str(d / "lora5"), "--out", str(tmp_path / "merged"), "--peft-adapter", str(tmp_path / "adapter")]
    code, err = main_error(export.main, again, capsys)
    assert code == 1 and "is not empty" in err
    (tmp_path / "adapter" / "stale.txt").write_text("from before")
    assert export.main(again + ["--force"]) == 0
    assert not (tmp_path / "adapter" / "stale.txt").exists() and (tmp_path / "adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    code, err = main_error(export.main, ["--ckpt", str(d / "base"), "--out", str(tmp_path / "m2"),
                                         "--peft-adapter", str(tmp_path / "a2")], capsys)
    assert code == 1 and "is not a LoRA run's checkpoint" in err
    code, err = main_error(export.main, ["--import-hf", str(tmp_path), "--out", str(tmp_path / "x"),
                                         "--peft-adapter", str(tmp_path / "a3")], capsys)
    assert code == 2 and "--peft-adapter applies to --ckpt" in err


def test_user_error_types():
    assert issubclass(UserError, ValueError)
