"""Tests for lib/hf.py and export.py: our model and tokenizer to a Hugging Face Llama directory and back.

Without transformers/torch (as in CI): the round trip is bit-exact (params, config, tokenizer), the
files have Hugging Face's names, layouts and fields, bfloat16/float16/sharded weights import, and every
unsupported feature is refused with an error naming it. With transformers and torch installed, also:
the exported model's logits equal ours within 1e-4 relative, greedy generation gives the same tokens,
AutoTokenizer gives the same ids, and a Llama directory written by transformers itself imports exactly.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import bpe
import export
import gpt_numpy as gn
from lib.checkpoint import build_meta, load_checkpoint, save_checkpoint
from conftest import ROOT
from lib.tokenizer import CharTokenizer
from errors import FileFormatError, UserError
from lib import generation, tokenizer_files
from lib.hf import bf16_to_f32, export_hf, import_hf, to_hf_tensors

# ----------------------------------------------------------------------------------------------------
# helpers

TOL = 1e-4          # float32 logits, ours against transformers: max |a - b| / max |b|

TRAIN_TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.\n"
              "def f(x):\n    return x ** 2  # 12345 squared\n\n" * 3
              + "Ünïcödé café naïve 日本語のテキスト 😀🎉 can't won't I'm\r\n\ttabs  and   spaces\n")
SAMPLES = ["", "a", "Hello world", "aaabdaaabac", "  leading and trailing  ", "line\nbreaks\r\n\n\ttab",
           "numbers 1234567 3.14159", "can't WON'T they'LL", "naïve café 日本語 😀🎉", "x" * 200,
           "one<|endoftext|>two", TRAIN_TEXT]


def rel_error(a, b):
    """max |a - b| / max |b|: relative to the logits' scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def config(tie=True, vocab_size=300, **kw):
    return gn.GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=4, d_model=32, d_ff=72, max_seq_len=48,
                        rope_theta=500.0, norm_eps=1e-5, tie_embeddings=tie, **kw)


def random_params(cfg, seed=0):
    """Weights well above init scale (std 0.3, norm gains around 1), so the logits are far from uniform
    and a wrong transpose, split or RoPE convention would show."""
    r = np.random.default_rng(seed)
    return {k: (1.0 + 0.2 * r.standard_normal(s) if len(s) == 1 else 0.3 * r.standard_normal(s)).astype(np.float32)
            for k, s in gn.param_shapes(cfg).items()}


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train([TRAIN_TEXT], 300, special_tokens=["<|endoftext|>"], progress=False)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request, tok, tmp_path_factory):
    """(params, cfg, tok, dir) of a small random model exported with its tokenizer."""
    cfg = config(tie=request.param, vocab_size=tok.vocab_size)
    params = random_params(cfg)
    d = tmp_path_factory.mktemp("hf")
    export_hf(params, cfg, tok, d)
    return params, cfg, tok, d


def encode(tok, text):
    return tok.encode(text, allowed_special="all")


def fake_hf_dir(src, dst, config_changes=None, drop=(), add=None):
    """Copy an exported directory, editing config.json (field -> value, None deletes) and the weights."""
    dst.mkdir()
    hf = json.loads((src / "config.json").read_text())
    hf.update(config_changes or {})
    hf = {k: v for k, v in hf.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(hf))
    w = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file({**w, **(add or {})}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    return dst


def write_safetensors_by_hand(path, tensors):
    """A safetensors file written byte by byte (8-byte header length, JSON header, data), for dtypes
    NumPy has no name for: tensors {name: (dtype string like "BF16", shape, raw bytes)}."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(len(h).to_bytes(8, "little") + h + b"".join(raw for _, _, raw in tensors.values()))


def to_bf16(a):
    """float32 -> bfloat16 bytes by truncation, and the float32 values those bytes stand for."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16
    return u.astype("<u2").tobytes(), (u << 16).astype(np.uint32).view(np.float32)


# ----------------------------------------------------------------------------------------------------
# the round trip and the files

def test_round_trip_is_bit_exact(exported):
    params, cfg, tok, d = exported
    params2, cfg2, tok2 = import_hf(d)
    assert cfg2 == cfg
    assert list(params2) == list(params)                  # gpt_numpy's key order
    for k in params:
        assert params2[k].dtype == np.float32 and np.array_equal(params2[k], params[k]), k
    assert (tok2.pattern, tok2.merges, tok2.byte_ids, tok2.special_tokens) == \
        (tok.pattern, tok.merges, tok.byte_ids, tok.special_tokens)
    assert tokenizer_files.mergeable_ranks(tok2) == tokenizer_files.mergeable_ranks(tok)
    for s in SAMPLES:
        assert encode(tok2, s) == encode(tok, s)


def test_files_have_hugging_face_names_and_layout(exported):
    params, cfg, tok, d = exported
    C, eot = cfg.d_model, tok.special_tokens["<|endoftext|>"]
    with safe_open(d / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}           # transformers refuses the file without it
    w = load_file(d / "model.safetensors")
    assert ("lm_head.weight" in w) == (not cfg.tie_embeddings)
    assert len(w) == 9 * cfg.n_layer + 2 + (not cfg.tie_embeddings)
    qkv = params["blocks.1.attn.qkv"]
    np.testing.assert_array_equal(w["model.layers.1.self_attn.q_proj.weight"], qkv[:, :C].T)
    np.testing.assert_array_equal(w["model.layers.1.self_attn.k_proj.weight"], qkv[:, C:2 * C].T)
    np.testing.assert_array_equal(w["model.layers.1.self_attn.v_proj.weight"], qkv[:, 2 * C:].T)
    np.testing.assert_array_equal(w["model.layers.0.mlp.down_proj.weight"], params["blocks.0.ffn.w_down"].T)
    np.testing.assert_array_equal(w["model.embed_tokens.weight"], params["tok_emb"])
    assert w["model.layers.0.mlp.gate_proj.weight"].shape == (cfg.d_ff, C)      # torch Linear: (out, in)
    hf = json.loads((d / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert (hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
            hf["num_key_value_heads"], hf["head_dim"], hf["vocab_size"], hf["max_position_embeddings"]) == \
        (C, cfg.d_ff, cfg.n_layer, cfg.n_head, cfg.n_head, cfg.head_size, cfg.vocab_size, cfg.max_seq_len)
    assert (hf["rms_norm_eps"], hf["rope_theta"], hf["rope_parameters"]["rope_theta"]) == (1e-5, 500.0, 500.0)
    assert hf["tie_word_embeddings"] == cfg.tie_embeddings and hf["hidden_act"] == "silu"
    assert not hf["attention_bias"] and not hf["mlp_bias"] and hf["rope_scaling"] is None
    assert hf["torch_dtype"] == "float32" and hf["bos_token_id"] == hf["eos_token_id"] == eot
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["model_max_length"] == cfg.max_seq_len
    assert tc["bos_token"] == tc["eos_token"] == "<|endoftext|>" and "unk_token" not in tc
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eot


def test_layernorm_model_is_refused(tmp_path, tok):
    cfg = config(norm="layernorm", vocab_size=tok.vocab_size)
    with pytest.raises(UserError, match="only RMSNorm models map to Hugging Face's Llama.*layernorm"):
        export_hf(random_params(cfg), cfg, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()                 # refused before anything is written


def test_export_checks_params_against_config(tmp_path, tok):
    cfg = config(vocab_size=tok.vocab_size)
    params = random_params(cfg)
    params["blocks.0.attn.proj"] = params["blocks.0.attn.proj"][:, :8]
    with pytest.raises(UserError, match=r"blocks.0.attn.proj has shape \(32, 8\), expected \(32, 32\)"):
        export_hf(params, cfg, tok, tmp_path)
    with pytest.raises(UserError, match="tokenizer has 300 ids but the model only 200"):
        cfg = config(vocab_size=200)
        export_hf(random_params(cfg), cfg, tok, tmp_path)


# ----------------------------------------------------------------------------------------------------
# import: what does not map is refused, naming the field

@pytest.mark.parametrize("changes, match", [
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3 .*it must divide num_attention_heads = 4"),
    ({"attention_bias": True}, "attention_bias = true"),
    ({"mlp_bias": True}, "mlp_bias = true"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling = .*llama3: low_freq_factor must be"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling = .*type 'dynamic' is not implemented"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters = .*yarn"),
    ({"hidden_act": "gelu"}, 'hidden_act = "gelu"'),
    ({"model_type": "mistral"}, 'model_type = "mistral"'),
    ({"head_dim": 16}, "head_dim = 16"),
    ({"hidden_size": None}, "hidden_size is missing"),
])
def test_import_refuses_unsupported_config(exported, tmp_path, changes, match):
    d = fake_hf_dir(exported[3], tmp_path / "hf", changes)
    with pytest.raises(FileFormatError, match="config.json: " + match):
        import_hf(d)


def test_import_refuses_wrong_weights(exported, tmp_path):
    src = exported[3]
    bias = {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}
    with pytest.raises(FileFormatError, match="unexpected weights .*q_proj.bias"):
        import_hf(fake_hf_dir(src, tmp_path / "a", add=bias))
    with pytest.raises(FileFormatError, match="weights missing .*model.norm.weight"):
        import_hf(fake_hf_dir(src, tmp_path / "b", drop=["model.norm.weight"]))
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(FileFormatError, match="no model.safetensors"):
        import_hf(tmp_path / "b")
    with pytest.raises(UserError, match="is not a directory"):
        import_hf(tmp_path / "nowhere")


def test_import_bf16_fp16_and_shards(exported, tmp_path):
    """bfloat16 and float16 weights widen to float32 exactly; shards named by an index are all read."""
    params, cfg, tok, src = exported
    w = load_file(src / "model.safetensors")
    names = sorted(w)
    d = fake_hf_dir(src, tmp_path / "hf")
    (d / "model.safetensors").unlink()
    half = len(names) // 2
    expect = {}
    bf16 = {}                                              # shard 1: bfloat16, written by hand
    for k in names[:half]:
        raw, expect[k] = to_bf16(w[k])
        bf16[k] = ("BF16", w[k].shape, raw)
    write_safetensors_by_hand(d / "model-00001-of-00002.safetensors", bf16)
    fp16 = {k: w[k].astype(np.float16) for k in names[half:]}   # shard 2: float16
    save_file(fp16, d / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    expect.update({k: v.astype(np.float32) for k, v in fp16.items()})
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                                            for i, k in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    params2, cfg2, _ = import_hf(d)
    assert cfg2 == cfg
    back = to_hf_tensors(params2, cfg2)
    for k in names:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], expect[k]), k
    assert 0 < rel_error(back[names[0]], w[names[0]]) < 1e-2   # really rounded to bf16


def test_bf16_conversion_is_exact():
    raw, f = to_bf16(np.array([1.0, -2.5, 3.140625, 1e-30, np.inf], np.float32))
    np.testing.assert_array_equal(bf16_to_f32(raw, (5,)), f)
    assert bf16_to_f32(b"\x80\x3f", (1,))[0] == 1.0


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["model"].update(type="WordPiece"), "model.type = 'WordPiece'"),
    (lambda t: t.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda t: t["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
    (lambda t: t.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "not byte-level BPE"),
    (lambda t: t["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda t: t["model"]["merges"].reverse(), "merges"),
])
def test_import_refuses_other_tokenizers(exported, tmp_path, edit, match):
    d = fake_hf_dir(exported[3], tmp_path / "hf")
    t = json.loads((d / "tokenizer.json").read_text())
    edit(t)
    (d / "tokenizer.json").write_text(json.dumps(t))
    with pytest.raises(FileFormatError, match="tokenizer.json: .*" + match):
        import_hf(d)


def test_char_tokenizer_round_trip(tmp_path):
    """data.py's character tokenizer exports as a WordLevel tokenizer.json and comes back."""
    tok = CharTokenizer(TRAIN_TEXT)
    cfg = config(vocab_size=tok.vocab_size)
    export_hf(random_params(cfg), cfg, tok, tmp_path)
    _, _, tok2 = import_hf(tmp_path)
    assert isinstance(tok2, CharTokenizer) and tok2.chars == tok.chars


# ----------------------------------------------------------------------------------------------------
# the command line, through train.py's checkpoint format

def write_train_checkpoint(path, params, cfg, tok):
    """A checkpoint laid out as train.py writes one (checkpoint.py's file, build_meta's metadata)."""
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    save_checkpoint(path, params, zeros, zeros, build_meta(cfg, tok, step=7, adam_t=7, train_config={}))


def test_cli_export_then_import(tmp_path, tok, capsys):
    cfg = config(tie=False, vocab_size=tok.vocab_size)
    params = random_params(cfg)
    write_train_checkpoint(tmp_path / "run" / "ckpt.safetensors", params, cfg, tok)
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert export.main(["--import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_checkpoint(tmp_path / "back" / "ckpt.safetensors")
    assert all(np.array_equal(back.params[k], params[k]) for k in params) and back.adam_m == back.adam_v == {}
    assert back.model_config() == cfg and back.meta["tokenizer"]["kind"] == "bpe"
    assert back.meta["tokenizer"]["text"] == tok.to_text() and back.meta["imported_from"] == str(tmp_path / "hf")
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match, status", [
    (["--ckpt", "no/such/ckpt.safetensors", "--out", "x"], "no checkpoint at no/such/ckpt.safetensors", 1),
    (["--import-hf", "no/such/dir", "--out", "x"], "no/such/dir is not a directory", 1),
    (["--import-hf", "{hf}", "--out", "x"], "has no tokenizer.json, and a checkpoint carries its tokenizer", 1),
    (["--ckpt", "a", "--out", "x", "--max-seq-len", "5"], "--block-size (--max-seq-len) applies to --import-hf and --import-gguf only", 2),
    (["--ckpt", "a"], "--ckpt needs --out (a Hugging Face folder) or --gguf", 2),
    (["--ckpt", "a", "--import-hf", "b", "--out", "x"], "not allowed with argument", 2),
])
def test_cli_errors_are_one_line(argv, match, status, tmp_path, capsys):
    cfg = config()
    export_hf(random_params(cfg), cfg, None, tmp_path)          # a model without a tokenizer
    assert export.main([a.format(hf=tmp_path) for a in argv]) == status       # 2: the command line is wrong
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_cli_help_and_bad_file_without_traceback(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "export.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path)
    r = run("--help")
    assert r.returncode == 0 and "--import-hf" in r.stdout and "--ckpt" in r.stdout
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    r = run("--ckpt", "junk.safetensors", "--out", "x")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "truncated or corrupt" in r.stderr


# ----------------------------------------------------------------------------------------------------
# the other libraries (skipped where they are not installed, as in CI)

def test_tiktoken_gives_the_same_ids(tok):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("ours", pat_str=tok.pattern, mergeable_ranks=tokenizer_files.mergeable_ranks(tok),
                            special_tokens=tok.special_tokens)
    for s in SAMPLES:
        assert enc.encode(s, allowed_special="all") == encode(tok, s)


def load_float32(transformers, torch, d):
    """AutoModelForCausalLM in float32 (the argument is `dtype` from transformers 4.56, `torch_dtype` before)."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(d, **{key: torch.float32}).eval()


def test_transformers_logits_and_greedy_generation(exported, hf):
    torch, transformers = hf
    params, cfg, tok, d = exported
    model = load_float32(transformers, torch, d)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    ours = gn.forward(params, ids, cfg)
    err = rel_error(ours, theirs)
    print(f"\nlogits ({'tied' if cfg.tie_embeddings else 'untied'}): max rel diff {err:.2e}, "
          f"max |logit| {np.abs(theirs).max():.1f}")
    assert err < TOL
    # greedy generation: transformers' generate(do_sample=False) against ours at temperature 0
    eot = tok.special_tokens["<|endoftext|>"]
    prompt = encode(tok, "First Citizen: Before")
    n = cfg.max_seq_len - len(prompt)                      # stay inside the context (ours crops beyond)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=eot)
    assert out[0].tolist() == generation.generate(gn, params, prompt, cfg, n, temperature=0, stop_ids=[eot])


def test_auto_tokenizer_gives_the_same_ids(exported, hf):
    _, transformers = hf
    _, cfg, tok, d = exported
    ht = transformers.AutoTokenizer.from_pretrained(d)
    assert ht.eos_token == ht.bos_token == "<|endoftext|>" and ht.model_max_length == cfg.max_seq_len
    for s in SAMPLES:
        ids = encode(tok, s)
        assert ht(s)["input_ids"] == ids, s
        assert ht.decode(ids) == tok.decode(ids)


def test_auto_tokenizer_char_level(tmp_path, hf):
    _, transformers = hf
    tok = CharTokenizer(TRAIN_TEXT)
    cfg = config(vocab_size=tok.vocab_size)
    export_hf(random_params(cfg), cfg, tok, tmp_path)
    ht = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode_ordinary(TRAIN_TEXT).tolist()
    assert ht(TRAIN_TEXT)["input_ids"] == ids and ht.decode(ids) == TRAIN_TEXT


@pytest.mark.parametrize("tie, dtype", [(False, "float32"), (True, "bfloat16")])
def test_llama_saved_by_transformers_imports(tmp_path, hf, tie, dtype):
    """A LlamaForCausalLM written by save_pretrained (sharded; bf16 as well) gives the same logits here."""
    torch, transformers = hf
    hcfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=40,
                                    rms_norm_eps=1e-5, rope_theta=300.0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hcfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.3 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    params, cfg, tok = import_hf(tmp_path)
    assert tok is None and cfg.tie_embeddings == tie and (cfg.rope_theta, cfg.max_seq_len) == (300.0, 40)
    ids = np.random.default_rng(2).integers(0, 96, (2, 40))
    # subtle: not model.float(): .to(bfloat16) also rounded RoPE's inv_freq buffer, which .float() keeps;
    # loading the files in float32 recomputes it, as a user of the directory would get it
    model = load_float32(transformers, torch, tmp_path)
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    err = rel_error(gn.forward(params, ids, cfg), theirs)
    print(f"\nimported {dtype} Llama: max rel diff {err:.2e}")
    assert err < TOL


def test_gpt2_tokenizer_json_from_hugging_face_imports(tmp_path, hf):
    """GPT-2's vocabulary, written as a tokenizer.json by Hugging Face tokenizers itself (ByteLevel with
    its own regex), imports with the same ids as Hugging Face gives."""
    from conftest import SHARED_DATA
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    g = SHARED_DATA / "gpt2"
    if not (g / "vocab.bpe").is_file():
        pytest.skip("needs shared/data/gpt2")
    ht = Tokenizer(models.BPE.from_file(str(g / "encoder.json"), str(g / "vocab.bpe")))
    ht.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ht.decoder = decoders.ByteLevel()
    ht.add_special_tokens(["<|endoftext|>"])
    ht.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer_files.from_hf_json(json.loads((tmp_path / "tokenizer.json").read_text()))
    assert tok.vocab_size == 50257 and tok.special_tokens == {"<|endoftext|>": 50256}
    for s in SAMPLES:
        assert ht.encode(s).ids == encode(tok, s), s


# ----------------------------------------------------------------------------------------------------
# grouped-query attention and RoPE scaling, against a Llama made by transformers itself

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}    # with head size 8 and theta 500: all three regimes


def random_gqa_llama(transformers, torch, tie, rope_type, seed=0):
    """A tiny LlamaForCausalLM with 6 query heads sharing 2 key/value heads, weights well above init scale."""
    rope = {"rope_type": "default", "rope_theta": 500.0}
    if rope_type == "llama3":
        rope = {**LLAMA3_ROPE, "rope_theta": 500.0}
    hcfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=tie,
                                    attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hcfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.3 * torch.randn_like(p))
    return model


def float64_forward(model, ids, torch, transformers, monkeypatch):
    """Logits of a float64 copy of `model`, computed in float64 throughout. subtle: transformers keeps
    three steps in float32 even in a float64 model: RoPE's inv_freq (computed with dtype=torch.float) and
    angles, LlamaRMSNorm (hidden_states.to(torch.float32)) and the attention softmax (dtype=torch.float32).
    So rerun its own inv_freq function, and its forward, with the names torch.float and torch.float32
    meaning float64; the formulas stay transformers' own."""
    model = model.double()
    emb = model.model.rotary_emb
    fn = (emb.compute_default_rope_parameters if emb.rope_type == "default"
          else transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[emb.rope_type])
    with monkeypatch.context() as m:
        m.setattr(torch, "float", torch.float64)
        m.setattr(torch, "float32", torch.float64)
        inv_freq, _ = fn(model.config)
        np.testing.assert_allclose(inv_freq.numpy(), emb.inv_freq.numpy(), rtol=1e-6)   # its float32 one
        emb.inv_freq = inv_freq                                         # float64 now
        with torch.no_grad():
            return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gqa_llama_from_transformers(tmp_path, hf, tie, rope_type, monkeypatch):
    """Logits within 1e-5 (float32) and 1e-10 (float64) relative, and the same greedy tokens; our export of
    the imported model loads in transformers with the same logits."""
    torch, transformers = hf
    model = random_gqa_llama(transformers, torch, tie, rope_type)
    model.save_pretrained(tmp_path / "hf")
    params, cfg, _ = import_hf(tmp_path / "hf")
    assert (cfg.n_head, cfg.n_kv_head, cfg.tie_embeddings) == (6, 2, tie)
    assert params["blocks.0.attn.qkv"].shape == (48, (6 + 2 * 2) * 8)
    assert cfg.rope_scaling == (None if rope_type == "default" else
                                {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}})
    ids = np.random.default_rng(2).integers(0, 96, (2, 100))        # past the original context of 64
    with torch.no_grad():
        theirs32 = model(torch.tensor(ids)).logits.numpy()
    err32 = rel_error(gn.forward(params, ids, cfg), theirs32)
    # float64: both models in double precision throughout
    theirs64 = float64_forward(model, ids, torch, transformers, monkeypatch)
    assert theirs64.dtype == np.float64
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    err64 = rel_error(gn.forward(p64, ids, cfg), theirs64)
    print(f"\nGQA 6/2 {rope_type} {'tied' if tie else 'untied'}: max rel diff float32 {err32:.1e}, float64 {err64:.1e}")
    assert err32 < 1e-5 and err64 < 1e-10
    # greedy generation, float32 both
    model = model.float()
    prompt = [5, 17, 42, 3]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, pad_token_id=0,
                             eos_token_id=None)
    assert out[0].tolist() == generation.generate(gn, params, prompt, cfg, 40, temperature=0)
    # and back: our export of it is a Llama transformers reads with the same logits
    export_hf(params, cfg, None, tmp_path / "back")
    back = load_float32(transformers, torch, tmp_path / "back")
    with torch.no_grad():
        assert rel_error(back(torch.tensor(ids)).logits.numpy(), theirs32) < 1e-5   # sdpa there, eager here
