"""Tests for export.py --gguf (lib/gguf_model.write_gguf, lib/tokenizer_files.to_gguf_fields): a model
trained here as a GGUF file that llama.cpp runs (issue #23 item 11).

The three equalities the issue asks for, measured on tiny models written here (and, in the slow tests,
on SmolLM2-135M-Instruct):
  - our --import-gguf of an F32 export gives back the weights bit for bit, the config (norm_eps as the
    float32 GGUF stores), the tokenizer's vocabulary, merges, special tokens and ids, the chat template
    and the special ids;
  - transformers' own GGUF loader gives our logits within 1e-5 of the largest logit (F32), and for F16
    and Q8_0 files the logits of the weights the file holds (within 1e-5 of our import of the same file);
  - a Q8_0 export's logits are within Q8_0_TOL of the float32 model's largest logit (F16: F16_TOL).
And llama.cpp itself (llama-cpp-python, where installed) tokenizes as we do and gives our logits and
greedy tokens from the F32 file.
"""

import json

import numpy as np
import pytest

import bpe
import export
import gpt_numpy as gn
from conftest import SHARED_DATA, main_error, smollm2_file
from errors import UserError
from lib import generation, gguf_model, tokenizer_files
from lib import chat_template as chat
from lib.checkpoint import build_meta, load_checkpoint, save_checkpoint
from lib.files import mark_output_folder
from lib.tokenizer import CharTokenizer

F32_TOL = 1e-5      # max |ours - theirs| / max |ours|: transformers or llama.cpp on the F32 file
F16_TOL = 5e-3      # an F16 export against the float32 model (measured: 3.3e-4 tiny, 0.9e-3 to 1.1e-3 SmolLM2)
Q8_0_TOL = 5e-2     # a Q8_0 export against the float32 model (measured: 8.2e-3 tiny, 1.6e-2 to 3.7e-2 SmolLM2)

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "def f(x):\n    return x ** 2  # 12345 squared, 3.14159\n") * 4 + "Ünïcödé café naïve 日本語 😀 can't won't\r\n\ttabs\n"
SAMPLES = ["Hello world", "First Citizen:\nBefore we proceed", "numbers 1234567 3.14159", "can't WON'T they'LL",
           "naïve café 日本語 😀🎉", "  leading and   spaces\n\n\ttab", "one<|endoftext|>two", "x" * 50,
           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def corpus():
    if (SHARED_DATA / "tinyshakespeare.txt").is_file():
        return (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30000] + TEXT
    return TEXT * 20


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tok(request):
    return bpe.Tokenizer.train([corpus()], 400, pattern=request.param, special_tokens=SPECIALS, progress=False)


def tiny(tok, tie=False, n_kv=2, scaling=None, init=False, vocab_size=None, d_ff=128):
    cfg = gn.GPTConfig(vocab_size=vocab_size or tok.vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv, d_model=64,
                       d_ff=d_ff, max_seq_len=64, rope_theta=500000.0 if scaling else 10000.0, rope_scaling=scaling,
                       tie_embeddings=tie)
    if init:                                            # init scale (std 0.02): logits as a fresh model's
        return gn.init_params(cfg, seed=0), cfg
    r = np.random.default_rng(0)                        # well above init scale: a wrong layout would show
    return {k: (1.0 + 0.2 * r.standard_normal(s) if len(s) == 1 else 0.3 * r.standard_normal(s)).astype(np.float32)
            for k, s in gn.param_shapes(cfg).items()}, cfg


def chat_of(tok, add_bos=False):
    sp = tok.special_tokens
    return chat.chat_info(TEMPLATE, tok, bos_id=sp["<|im_start|>"], eos_id=sp["<|endoftext|>"], add_bos=add_bos)


def ids_of(tok, text):
    return np.array([tok.encode(text, allowed_special="all")])


def float32_config(cfg):
    """cfg as a GGUF file holds it: norm_eps and rope_theta are float32 there (llama.cpp reads them so)."""
    return gn.GPTConfig(**{**cfg.to_dict(), "norm_eps": float(np.float32(cfg.norm_eps)),
                           "rope_theta": float(np.float32(cfg.rope_theta))})


# ----------------------------------------------------------------------------------------------------
# our import of the export: the same model

LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("tie, n_kv, scaling", [(False, 2, None), (True, 4, None), (False, 1, {"type": "linear", "factor": 4.0}),
                                                (True, 2, LLAMA3)], ids=["untied-gqa", "tied-mha", "mqa-linear", "llama3"])
def test_f32_export_imports_back_bit_for_bit(tmp_path, tok, tie, n_kv, scaling):
    params, cfg = tiny(tok, tie, n_kv, scaling)
    info = chat_of(tok, add_bos=tie)
    counts = gguf_model.write_gguf(tmp_path / "m.gguf", params, cfg, tok, info)
    assert set(counts) == {"F32"}
    imp = gguf_model.read_gguf(tmp_path / "m.gguf")
    assert imp.cfg == float32_config(cfg) and list(imp.params) == list(params)
    for k in params:
        assert imp.params[k].dtype == np.float32 and np.array_equal(imp.params[k], params[k]), k
    # the tokenizer: the same vocabulary, merges and special tokens; the same ids on every sample
    back = imp.tok
    assert (back.token_bytes(), back.merges, back.byte_ids, back.special_tokens) == \
        (tok.token_bytes(), tok.merges, tok.byte_ids, tok.special_tokens)
    for s in SAMPLES + [corpus()[:5000]]:
        assert back.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all"), s
    # the chat template and the special ids
    for key in ("template", "bos_token", "eos_token", "bos_id", "add_bos", "stop_ids"):
        assert imp.chat[key] == info[key], key
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40))
    np.testing.assert_allclose(gn.forward(imp.params, ids, imp.cfg), gn.forward(params, ids, cfg), rtol=1e-5, atol=1e-5)


def test_split_patterns_map_to_llama_cpp_names(tok):
    """gpt2 -> llama.cpp's "gpt-2" (the same regex); gpt4 -> "llama-bpe", Llama 3's regex, which splits
    every text as GPT-4's pattern does except whitespace that ends the text after a newline."""
    pre = tokenizer_files.to_gguf_fields(tok)["tokenizer.ggml.pre"]
    if tok.pattern == bpe.GPT2_PATTERN:
        assert pre == "gpt-2" and tokenizer_files.PRE_PATTERNS[pre][0] == tok.pattern
        return
    assert pre == "llama-bpe"
    theirs = bpe.regex.compile(tokenizer_files.PRE_PATTERNS[pre][0])
    ours = bpe.regex.compile(tok.pattern)
    for s in SAMPLES + [corpus()[:20000], "a\n b", "x \n\n", "end  "]:
        assert ours.findall(s) == theirs.findall(s), s
    assert ours.findall("a\n  ") == ["a", "\n  "] and theirs.findall("a\n  ") == ["a", "\n", "  "]   # the one difference


def test_vocabulary_padded_beyond_the_tokenizer(tmp_path, tok):
    """A model whose vocabulary is larger than its tokenizer's (padded to a round size): the ids past it
    are [PAD<id>] tokens of type UNUSED, as llama.cpp's converter pads; the import drops them again."""
    params, cfg = tiny(tok, vocab_size=tok.vocab_size + 16)
    fields = tokenizer_files.to_gguf_fields(tok, cfg.vocab_size)
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size and fields["tokenizer.ggml.token_type"][-1] == 5
    gguf_model.write_gguf(tmp_path / "m.gguf", params, cfg, tok)
    imp = gguf_model.read_gguf(tmp_path / "m.gguf")
    assert imp.cfg.vocab_size == cfg.vocab_size and imp.tok.vocab_size == tok.vocab_size
    assert np.array_equal(imp.params["tok_emb"], params["tok_emb"])


def test_q8_0_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path, tok):
    """Q8_0 stores rows in blocks of 32 numbers: ffn_down's rows of d_ff = 72 go to F16, as llama.cpp's
    converter does; 1-D tensors (norms) stay F32."""
    params, cfg = tiny(tok, d_ff=72)
    counts = gguf_model.write_gguf(tmp_path / "m.gguf", params, cfg, tok, qtype="q8_0")
    assert counts == {"Q8_0": 1 + 6 * 2 + 1, "F16": 2, "F32": 5}          # embedding, 6 per block, output
    imp = gguf_model.read_gguf(tmp_path / "m.gguf")
    down = params["blocks.0.ffn.w_down"]
    np.testing.assert_array_equal(imp.params["blocks.0.ffn.w_down"], down.astype(np.float16).astype(np.float32))


def test_permute_rows_inverts_unpermute_rows():
    w = np.arange(6 * 8 * 3).reshape(6 * 8, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(gguf_model.unpermute_rows(gguf_model.permute_rows(w, heads), heads), w)
    assert list(gguf_model.permute_rows(np.arange(4)[:, None], 1)[:, 0]) == [0, 2, 1, 3]


@pytest.mark.parametrize("qtype, tol", [("f16", F16_TOL), ("q8_0", Q8_0_TOL)])
def test_quantized_export_logits_within_tolerance(tmp_path, tok, qtype, tol):
    """The stated tolerance, on a model at init scale (the random large weights of the tests above amplify
    any rounding, as no trained model does); the file holds the weights llama.cpp's quantizer gives."""
    import gguf
    params, cfg = tiny(tok, init=True)
    gguf_model.write_gguf(tmp_path / "m.gguf", params, cfg, tok, qtype=qtype)
    imp = gguf_model.read_gguf(tmp_path / "m.gguf")
    t = gguf.GGMLQuantizationType[qtype.upper()]
    w = params["blocks.1.ffn.w_up"].T                    # (out, in), as the file stores it
    np.testing.assert_array_equal(imp.params["blocks.1.ffn.w_up"].T,
                                  gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w), t), t))
    ids = ids_of(tok, corpus()[:200])[:, :cfg.max_seq_len]
    err = rel_error(gn.forward(imp.params, ids, imp.cfg), gn.forward(params, ids, cfg))
    print(f"\n{qtype}: logits within {err:.1e} of the float32 model's largest (tolerance {tol:g})")
    assert 0 < err < tol


# ----------------------------------------------------------------------------------------------------
# transformers' GGUF loader (its own reader, dequantization and un-permutation)

@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_transformers_gguf_loader_gives_our_logits(tmp_path, tok, qtype):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    params, cfg = tiny(tok, tie=False)
    gguf_model.write_gguf(tmp_path / "m.gguf", params, cfg, tok, qtype=qtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = ids_of(tok, corpus()[:300])[:, :cfg.max_seq_len]
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    imp = gguf_model.read_gguf(tmp_path / "m.gguf")
    assert rel_error(theirs, gn.forward(imp.params, ids, imp.cfg)) < F32_TOL        # the weights the file holds
    if qtype == "f32":
        assert rel_error(theirs, gn.forward(params, ids, cfg)) < F32_TOL


# ----------------------------------------------------------------------------------------------------
# llama.cpp itself

def llama_cpp_model(path, n_ctx):
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 keys and values in its cache (the default, float16, rounds them: 3e-3 here instead of 2e-6)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1,
                           type_k=0, type_v=0)


def llama_cpp_matches(llm, imp, prompts, n_new):
    """For each prompt: llama.cpp's token ids, logits and greedy continuation against ours."""
    for p in prompts:
        ours = imp.tok.encode(p, allowed_special="all")
        assert llm.tokenize(p.encode("utf-8"), add_bos=False, special=True) == ours, p
        llm.reset()
        llm.eval(ours)
        theirs = np.array(llm.scores[:len(ours)])
        assert rel_error(theirs, gn.forward(imp.params, np.array([ours]), imp.cfg)[0]) < F32_TOL, p
        greedy = []
        for t in llm.generate(ours, temp=0.0, top_k=1, reset=True):
            greedy.append(int(t))
            if len(greedy) == n_new:
                break
        mine = generation.generate(gn, imp.params, ours, imp.cfg, n_new, temperature=0)[len(ours):]
        assert greedy == mine, p


def test_llama_cpp_runs_the_f32_export(tmp_path, tok):
    params, cfg = tiny(tok, tie=False)
    gguf_model.write_gguf(tmp_path / "m.gguf", params, cfg, tok, chat_of(tok))
    llm = llama_cpp_model(tmp_path / "m.gguf", cfg.max_seq_len)
    imp = gguf_model.read_gguf(tmp_path / "m.gguf")
    prompts = [s for s in SAMPLES if s.strip()] + [corpus()[1000:1100]]
    llama_cpp_matches(llm, imp, [p for p in prompts if len(imp.tok.encode(p, allowed_special="all")) < 40], 12)
    meta = llm.metadata
    assert meta["tokenizer.ggml.pre"] in ("gpt-2", "llama-bpe") and "tokenizer.chat_template" in meta
    assert int(meta["tokenizer.ggml.eot_token_id"]) == tok.special_tokens["<|im_end|>"]


# ----------------------------------------------------------------------------------------------------
# the command line

def train_run(folder, params, cfg, tok, chat_meta=None):
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    more = {"chat": chat_meta} if chat_meta else {}
    save_checkpoint(folder / "ckpt.safetensors", params, zeros, zeros, build_meta(cfg, tok, step=5, adam_t=5, **more))
    mark_output_folder(folder)
    return folder


def test_cli_gguf_export(tmp_path, tok, capsys):
    params, cfg = tiny(tok, tie=False)
    run = train_run(tmp_path / "run", params, cfg, tok, chat_of(tok))
    out = tmp_path / "export" / "model.gguf"
    assert export.main(["--ckpt", str(run), "--gguf", str(out), "--type", "q8_0"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}: llama GGUF, q8_0" in err and "chat template" in err and "byte-level BPE" in err
    # an existing file is refused without --force, replaced with it
    code, err = main_error(export.main, ["--ckpt", str(run), "--gguf", str(out)], capsys)
    assert code == 1 and "exists; pass --force" in err
    assert export.main(["--ckpt", str(run), "--gguf", str(out), "--out", str(tmp_path / "hf"), "--force"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    imp = gguf_model.read_gguf(out)
    assert all(np.array_equal(imp.params[k], params[k]) for k in params)            # f32 by default
    assert not list(out.parent.glob(".*tmp*"))                                      # no temporary file left
    # and it imports back as a checkpoint every program reads
    assert export.main(["--import-gguf", str(out), "--out", str(tmp_path / "back")]) == 0
    assert load_checkpoint(tmp_path / "back").meta["chat"]["template"] == TEMPLATE


@pytest.mark.parametrize("argv, match", [
    (["--type", "q8_0", "--out", "{t}/hf"], "--type applies to --gguf"),
    (["--gguf", "{t}/a.gguf", "--out", "{t}/a.gguf"], "--out {t}/a.gguf is --gguf {t}/a.gguf"),
    (["--type", "q4_k", "--gguf", "{t}/a.gguf"], "invalid choice: 'q4_k'"),
])
def test_cli_gguf_usage_errors(tmp_path, capsys, argv, match):
    code, err = main_error(export.main, ["--ckpt", str(tmp_path)] + [a.format(t=tmp_path) for a in argv], capsys)
    assert code == 2 and err.startswith("error: ") and match.format(t=tmp_path) in err, err


def test_cli_gguf_refuses_a_char_model_and_a_folder(tmp_path, capsys):
    """llama.cpp's vocabularies are byte-level BPE: a character-level model is refused in one line."""
    ctok = CharTokenizer("abcdefgh \n")
    cfg = gn.GPTConfig(vocab_size=ctok.vocab_size, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16)
    run = train_run(tmp_path / "run", gn.init_params(cfg), cfg, ctok)
    code, err = main_error(export.main, ["--ckpt", str(run), "--gguf", str(tmp_path / "c.gguf")], capsys)
    assert code == 1 and "a char tokenizer cannot be written as llama.cpp's vocabulary" in err
    assert not (tmp_path / "c.gguf").exists() and not list(tmp_path.glob(".c.gguf*"))
    (tmp_path / "dir").mkdir()
    code, err = main_error(export.main, ["--ckpt", str(run), "--gguf", str(tmp_path / "dir")], capsys)
    assert code == 1 and "is a folder" in err
    with pytest.raises(UserError, match="only RMSNorm"):
        lcfg = gn.GPTConfig(**{**cfg.to_dict(), "norm": "layernorm"})
        gguf_model.write_gguf(tmp_path / "l.gguf", gn.init_params(lcfg), lcfg, bpe.Tokenizer("gpt2", []))


# ----------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (slow): imported, exported, run by llama.cpp and transformers

@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    return gguf_model.read_gguf(smollm2_file())


SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little",
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.slow
def test_smollm2_export_round_trip_and_llama_cpp(smollm2, tmp_path):
    imp = smollm2
    gguf_model.write_gguf(tmp_path / "f32.gguf", imp.params, imp.cfg, imp.tok, imp.chat)
    back = gguf_model.read_gguf(tmp_path / "f32.gguf")
    assert back.tok.to_text() == imp.tok.to_text() and back.chat == imp.chat and back.cfg == imp.cfg
    assert all(np.array_equal(back.params[k], imp.params[k]) for k in imp.params)
    llama_cpp_matches(llama_cpp_model(tmp_path / "f32.gguf", 256), imp, SMOL_PROMPTS, 20)


@pytest.mark.slow
@pytest.mark.parametrize("qtype, tol", [("f16", F16_TOL), ("q8_0", Q8_0_TOL)])
def test_smollm2_quantized_export_logits(smollm2, tmp_path, qtype, tol):
    imp = smollm2
    gguf_model.write_gguf(tmp_path / "m.gguf", imp.params, imp.cfg, imp.tok, imp.chat, qtype=qtype)
    q = gguf_model.read_gguf(tmp_path / "m.gguf")
    errs, agree = [], []
    for p in SMOL_PROMPTS:
        ids = np.array([imp.tok.encode(p, allowed_special="all")])
        ours, theirs = gn.forward(imp.params, ids, imp.cfg), gn.forward(q.params, ids, q.cfg)
        errs.append(rel_error(theirs, ours))
        agree.append(float(np.mean(theirs.argmax(-1) == ours.argmax(-1))))
    print(f"\nSmolLM2 {qtype}: max relative logit error {', '.join(f'{e:.1e}' for e in errs)}; "
          f"top-1 agreement {', '.join(f'{a:.2f}' for a in agree)}")
    assert max(errs) < tol


def test_export_json_of_llama_cpp_metadata_is_valid(tmp_path, tok):
    """What llama.cpp reads besides the tensors: the keys and their GGUF types its loader requires."""
    gguf = pytest.importorskip("gguf")
    params, cfg = tiny(tok)
    gguf_model.write_gguf(tmp_path / "m.gguf", params, cfg, tok, chat_of(tok, add_bos=True))
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    T = gguf.GGUFValueType
    want = {"general.architecture": T.STRING, "llama.block_count": T.UINT32, "llama.context_length": T.UINT32,
            "llama.embedding_length": T.UINT32, "llama.feed_forward_length": T.UINT32,
            "llama.attention.head_count": T.UINT32, "llama.attention.head_count_kv": T.UINT32,
            "llama.rope.freq_base": T.FLOAT32, "llama.attention.layer_norm_rms_epsilon": T.FLOAT32,
            "tokenizer.ggml.model": T.STRING, "tokenizer.ggml.pre": T.STRING, "tokenizer.ggml.tokens": T.ARRAY,
            "tokenizer.ggml.token_type": T.ARRAY, "tokenizer.ggml.merges": T.ARRAY,
            "tokenizer.ggml.bos_token_id": T.UINT32, "tokenizer.ggml.eos_token_id": T.UINT32,
            "tokenizer.ggml.eot_token_id": T.UINT32, "tokenizer.ggml.add_bos_token": T.BOOL,
            "tokenizer.chat_template": T.STRING}
    for key, t in want.items():
        assert r.fields[key].types[0] == t, key
    assert r.fields["tokenizer.ggml.token_type"].types[1] == T.INT32
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert json.dumps(r.fields["tokenizer.chat_template"].contents()) == json.dumps(TEMPLATE)
