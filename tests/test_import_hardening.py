"""Tests for issue #22's import and export defects (export.py, lib/hf.py, lib/gguf_model.py,
lib/tokenizer_files.py, lib/checkpoint.check_importable): every bad file is one line `error: ...` naming
the file (once) and the key or tensor, exit 1; a bad command line is exit 2; an import succeeds only where
every loader then succeeds; export.py never writes where it reads.

The files are written here: a tiny Hugging Face folder (lib.hf.export_hf) and a tiny GGUF file written
with gguf.GGUFWriter directly, as llama.cpp's converter lays one out, then damaged one way per test.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bpe
import export
import gpt_numpy as gn
from conftest import main_error
from errors import FileFormatError, UserError
from lib import data, lora as lora_lib, tokenizer_files
from lib.checkpoint import build_meta, load_checkpoint, lora_base_ref, save_checkpoint
from lib.files import OUTPUT_MARK, file_sha256, mark_output_folder
from lib.hf import export_hf, import_hf

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.\n"
        "def f(x):\n    return x ** 2  # 12345 squared\n\n") * 3


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>", "<|im_end|>"], progress=False)


@pytest.fixture(scope="module")
def model(tok):
    """(params, cfg): a tiny untied grouped-query Llama with random weights."""
    cfg = gn.GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                       max_seq_len=32, tie_embeddings=False)
    return gn.init_params(cfg, seed=0), cfg


def one_line_error(argv, capsys, status=1):
    """export.main(argv) fails in one line `error: ...` with this status: the line."""
    code, err = main_error(export.main, [str(a) for a in argv], capsys)
    assert code == status and err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------------------------------
# GGUF files, written with gguf.GGUFWriter as llama.cpp's converter writes them, then damaged

def gguf_kv(cfg, tok):
    """[(key, value, GGUFValueType, array element type)] of a llama GGUF: what llama.cpp's converter writes."""
    import gguf
    T = gguf.GGUFValueType
    b2u, tb, sp = tokenizer_files.bytes_to_unicode(), tok.token_bytes(), set(tok.special_tokens.values())
    spell = lambda t: "".join(b2u[b] for b in t)        # noqa: E731
    f = {"tokenizer.ggml.tokens": [t.decode() if i in sp else spell(t) for i, t in enumerate(tb)],
         "tokenizer.ggml.token_type": [3 if i in sp else 1 for i in range(len(tb))],
         "tokenizer.ggml.merges": [f"{spell(tb[a])} {spell(tb[b])}" for a, b in tok.merges]}
    return [("general.architecture", "llama", T.STRING, None),
            ("llama.block_count", cfg.n_layer, T.UINT32, None),
            ("llama.context_length", cfg.max_seq_len, T.UINT32, None),
            ("llama.embedding_length", cfg.d_model, T.UINT32, None),
            ("llama.feed_forward_length", cfg.d_ff, T.UINT32, None),
            ("llama.attention.head_count", cfg.n_head, T.UINT32, None),
            ("llama.attention.head_count_kv", cfg.n_kv_head, T.UINT32, None),
            ("llama.rope.freq_base", cfg.rope_theta, T.FLOAT32, None),
            ("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps, T.FLOAT32, None),
            ("tokenizer.ggml.model", "gpt2", T.STRING, None),
            ("tokenizer.ggml.pre", "llama-bpe", T.STRING, None),
            ("tokenizer.ggml.tokens", f["tokenizer.ggml.tokens"], T.ARRAY, T.STRING),
            ("tokenizer.ggml.token_type", f["tokenizer.ggml.token_type"], T.ARRAY, T.INT32),
            ("tokenizer.ggml.merges", f["tokenizer.ggml.merges"], T.ARRAY, T.STRING),
            ("tokenizer.ggml.bos_token_id", tok.special_tokens["<|endoftext|>"], T.UINT32, None),
            ("tokenizer.ggml.eos_token_id", tok.special_tokens["<|endoftext|>"], T.UINT32, None)]


def llama_cpp_permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arrays(params, cfg):
    """{GGUF name: float32 array (out, in)} of our params, q and k rows permuted."""
    C, hs, nh, nkv = cfg.d_model, cfg.head_size, cfg.n_head, cfg.n_kv_head
    out = {"token_embd.weight": params["tok_emb"]}
    for i in range(cfg.n_layer):
        p, b, qkv = f"blocks.{i}.", f"blk.{i}.", params[f"blocks.{i}.attn.qkv"]
        out.update({b + "attn_norm.weight": params[p + "norm1.weight"],
                    b + "attn_q.weight": llama_cpp_permute(qkv[:, :C].T, nh),
                    b + "attn_k.weight": llama_cpp_permute(qkv[:, C:C + nkv * hs].T, nkv),
                    b + "attn_v.weight": qkv[:, C + nkv * hs:].T, b + "attn_output.weight": params[p + "attn.proj"].T,
                    b + "ffn_norm.weight": params[p + "norm2.weight"], b + "ffn_gate.weight": params[p + "ffn.w_gate"].T,
                    b + "ffn_up.weight": params[p + "ffn.w_up"].T, b + "ffn_down.weight": params[p + "ffn.w_down"].T})
    out["output_norm.weight"] = params["norm_f.weight"]
    out["output.weight"] = params["lm_head"].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_gguf(path, params, cfg, tok, kv=None, tensors=None, f16=()):
    """A GGUF file of the model; kv: {key: None (dropped) or (value, GGUFValueType, element type)} replacing
    or adding metadata; tensors: {GGUF name: array} replacing tensors; f16: names stored as float16."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    entries = {k: (v, t, s) for k, v, t, s in gguf_kv(cfg, tok)}
    entries.update(kv or {})
    for key, e in entries.items():
        if e is not None and key != "general.architecture":
            w.add_key_value(key, e[0], e[1], sub_type=e[2])
    if "general.architecture" in (kv or {}):
        w.add_key_value("general.architecture", kv["general.architecture"][0], kv["general.architecture"][1])
    for name, a in {**gguf_arrays(params, cfg), **(tensors or {})}.items():
        with np.errstate(over="ignore"):                # a float16 overflow is what a test may want
            w.add_tensor(name, a.astype(np.float16) if name in f16 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_info_positions(path, name):
    """Byte positions in the file of tensor `name`'s type id (uint32) and data offset (uint64)."""
    import gguf
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    sizes = [int(p.nbytes) for p in t.field.parts]      # name length, name, n_dims, dims, type, offset
    type_at = t.field.offset + sum(sizes[:4])
    return type_at, type_at + sizes[4]


def patch(path, at, value, nbytes):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(int(value).to_bytes(nbytes, "little"))


@pytest.fixture()
def good_gguf(tmp_path, tok, model):
    pytest.importorskip("gguf")
    params, cfg = model
    return write_gguf(tmp_path / "m.gguf", params, cfg, tok)


def test_good_gguf_imports(good_gguf, tmp_path, model, tok, capsys):
    """The file the tests below damage imports, and gives back the weights."""
    params, cfg = model
    assert export.main(["--import-gguf", str(good_gguf), "--out", str(tmp_path / "run")]) == 0
    ck = load_checkpoint(tmp_path / "run")
    assert all(np.array_equal(ck.params[k], params[k]) for k in params)


def gguf_refusal(path, tmp_path, capsys, *match):
    """--import-gguf path: one line naming the file exactly once and each of `match`; nothing written."""
    err = one_line_error(["--import-gguf", path, "--out", tmp_path / "run"], capsys)
    assert err.count(str(path)) == 1, err
    for m in match:
        assert m in err, err
    assert not (tmp_path / "run").exists()
    return err


@pytest.mark.parametrize("layers", [2 ** 31, 10 ** 6])
def test_gguf_layer_count_beyond_its_tensors_is_refused_at_once(tmp_path, tok, model, capsys, monkeypatch, layers):
    """#22 High 2: llama.block_count = 2^31 in a tiny file built name tables for a minute, then MemoryError.
    The count is compared with the file's tensors before any per-layer table is built."""
    gguf = pytest.importorskip("gguf")
    params, cfg = model
    real = gn.param_shapes
    monkeypatch.setattr(gn, "param_shapes", lambda c: real(c) if c.n_layer < 1000 else pytest.fail("table built"))
    path = write_gguf(tmp_path / "m.gguf", params, cfg, tok,
                      kv={"llama.block_count": (layers, gguf.GGUFValueType.UINT32, None)})
    t = time.perf_counter()
    err = gguf_refusal(path, tmp_path, capsys, f"llama.block_count = {layers:,}", "2 blocks")
    assert time.perf_counter() - t < 5, err


def test_gguf_nan_weight_and_float16_overflow_are_refused(tmp_path, tok, model, capsys):
    """#22 Medium 5: a NaN weight, or a float16 that overflowed to inf, imported and every loader then
    refused the checkpoint with the hint "a run that diverged?"."""
    pytest.importorskip("gguf")
    params, cfg = model
    w = gguf_arrays(params, cfg)["blk.1.ffn_up.weight"].copy()
    w[3, 5] = np.nan
    path = write_gguf(tmp_path / "nan.gguf", params, cfg, tok, tensors={"blk.1.ffn_up.weight": w})
    err = gguf_refusal(path, tmp_path, capsys, "blk.1.ffn_up.weight", "NaN or infinite")
    assert "diverged" not in err
    big = gguf_arrays(params, cfg)["token_embd.weight"].copy()
    big[7, 0] = 70000.0                                 # beyond float16's 65504: inf in the file
    path = write_gguf(tmp_path / "inf.gguf", params, cfg, tok, tensors={"token_embd.weight": big},
                      f16={"token_embd.weight"})
    gguf_refusal(path, tmp_path, capsys, "token_embd.weight", "NaN or infinite", "F16")


def test_gguf_misaligned_and_overlapping_tensor_data_is_refused(tmp_path, tok, model, capsys):
    """#22 Medium 5: a tensor offset of 3 (misaligned, overlapping another tensor) imported as garbage."""
    pytest.importorskip("gguf")
    params, cfg = model
    path = write_gguf(tmp_path / "m.gguf", params, cfg, tok)
    _, offset_at = tensor_info_positions(path, "blk.1.attn_k.weight")
    patch(path, offset_at, 3, 8)
    gguf_refusal(path, tmp_path, capsys, "blk.1.attn_k.weight", "not a multiple of the file's alignment")
    path = write_gguf(tmp_path / "m2.gguf", params, cfg, tok)
    _, offset_at = tensor_info_positions(path, "blk.1.attn_k.weight")
    patch(path, offset_at, 0, 8)                        # aligned, on top of the first tensor's data
    gguf_refusal(path, tmp_path, capsys, "overlaps")


def test_gguf_tensor_type_changed_to_read_across_others_is_refused(tmp_path, tok, model, capsys):
    """#22 Medium 5: token_embd's type id changed from F16 to F32 reads twice its bytes, across the
    tensors after it."""
    pytest.importorskip("gguf")
    params, cfg = model
    path = write_gguf(tmp_path / "m.gguf", params, cfg, tok, f16={"token_embd.weight"})
    type_at, _ = tensor_info_positions(path, "token_embd.weight")
    patch(path, type_at, 0, 4)                          # GGML type 0: F32
    gguf_refusal(path, tmp_path, capsys, "overlaps")


@pytest.mark.slow
def test_real_smollm2_with_token_embd_type_changed_is_refused(tmp_path, capsys):
    """The issue's case on the real file: SmolLM2's Q8_0 token_embd re-typed as F16 reads 56 MB, across the
    tensors after it (as F32 it would run past the end of the file, which the gguf reader itself refuses)."""
    from conftest import smollm2_file
    pytest.importorskip("gguf")
    path = tmp_path / "smollm2.gguf"
    shutil.copyfile(smollm2_file(), path)
    type_at, _ = tensor_info_positions(path, "token_embd.weight")
    patch(path, type_at, 1, 4)                          # GGML type 1: F16
    t = time.perf_counter()
    gguf_refusal(path, tmp_path, capsys, "token_embd.weight", "overlaps")
    assert time.perf_counter() - t < 60


def test_gguf_context_beyond_the_limit(tmp_path, tok, model, capsys):
    """#22 Medium 5: context_length = 2^32 - 1 imported, and every loader refused the checkpoint; with a
    --block-size it is not used and the file imports."""
    import gguf
    params, cfg = model
    path = write_gguf(tmp_path / "m.gguf", params, cfg, tok,
                      kv={"llama.context_length": (2 ** 32 - 1, gguf.GGUFValueType.UINT32, None)})
    gguf_refusal(path, tmp_path, capsys, "llama.context_length = 4,294,967,295", "--block-size")
    assert export.main(["--import-gguf", str(path), "--out", str(tmp_path / "ok"), "--block-size", "16"]) == 0
    assert load_checkpoint(tmp_path / "ok").model_config().max_seq_len == 16


@pytest.mark.parametrize("flag, value", [("--max-seq-len", "4294967296"), ("--max-seq-len", "-5"),
                                         ("--block-size", "0"), ("--block-size", "many")])
def test_context_flag_out_of_range_is_a_usage_error(tmp_path, capsys, flag, value):
    """#22 Low: --max-seq-len -5 exited 1, 4294967296 imported a checkpoint no loader reads: exit 2 now."""
    err = one_line_error(["--import-gguf", tmp_path / "m.gguf", "--out", tmp_path / "run", flag, value], capsys, 2)
    assert "--block-size" in err


@pytest.mark.parametrize("token_type", [3, 4], ids=["control", "user-defined"])
def test_gguf_empty_special_token_is_refused(tmp_path, tok, model, capsys, token_type):
    """#22 Medium 5: an empty CONTROL or USER_DEFINED token imported; bpe.py's file refuses it on load."""
    import gguf
    params, cfg = model
    T = gguf.GGUFValueType
    kv = dict((k, (v, t, s)) for k, v, t, s in gguf_kv(cfg, tok))
    tokens, types = list(kv["tokenizer.ggml.tokens"][0]), list(kv["tokenizer.ggml.token_type"][0])
    i = tok.special_tokens["<|im_end|>"]
    tokens[i], types[i] = "", token_type
    path = write_gguf(tmp_path / "m.gguf", params, cfg, tok, kv={"tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
                                                               "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32)})
    gguf_refusal(path, tmp_path, capsys, "tokenizer.ggml.tokens", f"token {i} is an empty")


def mistyped(key, kind):
    """A GGUF metadata entry of the wrong type for key."""
    import gguf
    T = gguf.GGUFValueType
    return {"int array": ([1, 2, 3], T.ARRAY, T.INT32), "string": ("5", T.STRING, None),
            "string array": (["gpt2"], T.ARRAY, T.STRING), "uint32 array": ([64, 64], T.ARRAY, T.UINT32),
            "string false": ("false", T.STRING, None), "float 2.5": (2.5, T.FLOAT32, None),
            "inf": (float("inf"), T.FLOAT32, None), "uint32": (7, T.UINT32, None)}[kind]


@pytest.mark.parametrize("key, kind", [
    ("tokenizer.ggml.tokens", "int array"),            # #22 Medium 7: tracebacks
    ("tokenizer.ggml.merges", "int array"),
    ("tokenizer.ggml.bos_token_id", "string"),
    ("tokenizer.ggml.pre", "string array"),
    ("llama.context_length", "uint32 array"),
    ("llama.attention.head_count_kv", "uint32 array"),
    ("tokenizer.ggml.add_bos_token", "string false"),  # #22 Low: silent coercions
    ("llama.block_count", "float 2.5"),
    ("llama.rope.freq_base", "inf"),
    ("tokenizer.chat_template", "uint32"),
])
def test_gguf_mistyped_metadata_is_one_line_naming_the_key(tmp_path, tok, model, capsys, key, kind):
    pytest.importorskip("gguf")
    params, cfg = model
    path = write_gguf(tmp_path / "m.gguf", params, cfg, tok, kv={key: mistyped(key, kind)})
    gguf_refusal(path, tmp_path, capsys, key)


@pytest.mark.parametrize("damage", ["integer tensor", "pre-tokenizer", "truncated", "architecture", "shape"])
def test_gguf_refusals_name_the_file_once(tmp_path, tok, model, capsys, damage):
    """#22 Low: some GGUF refusals named no file (a tensor's type, the tokenizer's fields), some named it
    twice (`X.gguf: X.gguf: ...`): each names it once now."""
    import gguf
    params, cfg = model
    path = tmp_path / "m.gguf"
    if damage == "integer tensor":
        write_gguf(path, params, cfg, tok, tensors={"blk.1.ffn_up.weight": np.zeros((cfg.d_ff, cfg.d_model), np.int32)})
    elif damage == "pre-tokenizer":
        write_gguf(path, params, cfg, tok, kv={"tokenizer.ggml.pre": ("no-such-pre", gguf.GGUFValueType.STRING, None)})
    elif damage == "truncated":
        write_gguf(path, params, cfg, tok)
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "architecture":
        write_gguf(path, params, cfg, tok, kv={"general.architecture": ("qwen2", gguf.GGUFValueType.STRING, None)})
    else:
        write_gguf(path, params, cfg, tok, tensors={"output_norm.weight": np.ones(5, np.float32)})
    gguf_refusal(path, tmp_path, capsys)


# ----------------------------------------------------------------------------------------------------
# Hugging Face folders

@pytest.fixture()
def hf_dir(tmp_path, tok, model):
    params, cfg = model
    d = tmp_path / "hf"
    export_hf(params, cfg, tok, d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    conf["chat_template"] = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    return d


def hf_refusal(d, tmp_path, capsys, *match):
    err = one_line_error(["--import-hf", d, "--out", tmp_path / "run"], capsys)
    for m in match:
        assert m in err, err
    assert not (tmp_path / "run").exists()
    return err


def test_good_hf_folder_imports(hf_dir, tmp_path, model, capsys):
    params, _ = model
    assert export.main(["--import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    ck = load_checkpoint(tmp_path / "run")
    assert all(np.array_equal(ck.params[k], params[k]) for k in params) and ck.meta["chat"]["template"]


def edit_json(path, change):
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(change(obj) if callable(change) else change))


def set_key(key, value):
    def change(obj):
        obj[key] = value
        return obj
    return change


def to_shards(d):
    """model.safetensors -> two shards named by model.safetensors.index.json."""
    w = load_file(d / "model.safetensors")
    names = sorted(w)
    parts = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ks in parts.items():
        save_file({k: w[k] for k in ks}, d / f, metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))


NON_UTF8 = b'{"model_type": "llama", "x": "\xff\xfe"}'

# #22 Medium 6: the 21 mistyped Hugging Face files, each (file, damage, what the line must name)
HF_CASES = {
    "config list": ("config.json", [1, 2, 3], "must hold a JSON object"),
    "config null": ("config.json", None, "must hold a JSON object"),
    "config not utf-8": ("config.json", NON_UTF8, "not UTF-8"),
    "config nested": ("config.json", b"[" * 10 ** 5, "nested too deeply"),
    "config no heads": ("config.json", set_key("num_attention_heads", 0), "num_attention_heads"),
    "config eps list": ("config.json", set_key("rms_norm_eps", [1]), "rms_norm_eps"),
    "index list": ("model.safetensors.index.json", [1, 2], "must hold a JSON object"),
    "index weight_map list": ("model.safetensors.index.json", {"weight_map": ["a", "b"]}, "weight_map"),
    "index int shard": ("model.safetensors.index.json", {"weight_map": {"model.norm.weight": 5}}, "weight_map"),
    "tokenizer list": ("tokenizer.json", [1, 2, 3], "must be a JSON object"),
    "tokenizer vocab list": ("tokenizer.json", lambda o: {**o, "model": {**o["model"], "vocab": ["a", "b"]}}, "model.vocab"),
    "tokenizer merges ints": ("tokenizer.json", lambda o: {**o, "model": {**o["model"], "merges": [1, 2]}}, "model.merges"),
    "tokenizer pre int": ("tokenizer.json", set_key("pre_tokenizer", 5), "pre_tokenizer"),
    "tokenizer pre string": ("tokenizer.json", set_key("pre_tokenizer", "ByteLevel"), "pre_tokenizer"),
    "tokenizer not utf-8": ("tokenizer.json", NON_UTF8, "not UTF-8"),
    "tokenizer_config list": ("tokenizer_config.json", [1], "must hold a JSON object"),
    "chat_template ints": ("tokenizer_config.json", set_key("chat_template", [1, 2]), "chat_template"),
    "bos_token list": ("tokenizer_config.json", set_key("bos_token", ["<s>"]), "bos_token"),
    "jinja not utf-8": ("chat_template.jinja", b"{{ '\xff' }}", "not UTF-8"),
    "config /dev/zero": ("config.json", "/dev/zero", "not a regular file"),
    "tokenizer /dev/zero": ("tokenizer.json", "/dev/zero", "not a regular file"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_mistyped_hf_files_are_one_line_naming_file_and_key(hf_dir, tmp_path, capsys, case):
    name, damage, match = HF_CASES[case]
    if name.startswith("model.safetensors.index"):
        to_shards(hf_dir)
    path = hf_dir / name
    if isinstance(damage, str) and damage.startswith("/dev/"):
        if not os.path.exists(damage):
            pytest.skip(f"no {damage}")
        path.unlink()
        path.symlink_to(damage)
    elif isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        edit_json(path, damage) if callable(damage) else path.write_text(json.dumps(damage))
    hf_refusal(hf_dir, tmp_path, capsys, name, match)


def test_hf_files_are_read_up_to_a_limit(hf_dir, tmp_path, capsys, monkeypatch):
    """A config.json larger than any real one is refused before it is read (here with a 4 KiB limit;
    TEXT_LIMIT is 256 MiB)."""
    from lib import hf
    monkeypatch.setattr(hf, "TEXT_LIMIT", 4096)
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", "pad": " " * 5000}))
    hf_refusal(hf_dir, tmp_path, capsys, "config.json is larger than")


def test_save_imported_runs_the_loaders_checks(tmp_path, tok, model):
    """The net under every importer: what a loader refuses is refused before anything is written."""
    from lib.checkpoint import save_imported
    params, cfg = model
    bad = {**params, "norm_f.weight": np.full_like(params["norm_f.weight"], np.nan)}
    with pytest.raises(FileFormatError, match="src.gguf holds non-finite values: .* in norm_f.weight; it was not imported"):
        save_imported(tmp_path / "a", bad, cfg, tok, "src.gguf")
    empty = bpe.Tokenizer(tok.pattern, tok.merges, {"": tok.vocab_size - 2, "<|im_end|>": tok.vocab_size - 1})
    with pytest.raises(FileFormatError, match="its tokenizer cannot be saved and read back"):
        save_imported(tmp_path / "b", params, cfg, empty, "src.gguf")
    long = gn.GPTConfig(**{**cfg.to_dict(), "max_seq_len": 2 ** 32})
    with pytest.raises(FileFormatError, match="max_seq_len 4,294,967,296"):
        save_imported(tmp_path / "c", params, long, tok, "src.gguf")
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "a/../../b.safetensors"])
def test_index_shard_names_stay_inside_the_folder(hf_dir, tmp_path, capsys, shard):
    to_shards(hf_dir)
    edit_json(hf_dir / "model.safetensors.index.json",
              lambda o: {**o, "weight_map": {**o["weight_map"], "model.norm.weight": shard}})
    shutil.copyfile(hf_dir / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    hf_refusal(hf_dir, tmp_path, capsys, "model.safetensors.index.json", "not a file name inside")


@pytest.mark.parametrize("layers", [10 ** 6, 2 ** 31])
def test_hf_layer_count_beyond_its_tensors_is_refused_at_once(hf_dir, tmp_path, capsys, monkeypatch, layers):
    """#22 High 2: num_hidden_layers = 10^6 took 43 s and 2.4 GB before its error."""
    real = gn.param_shapes
    monkeypatch.setattr(gn, "param_shapes", lambda c: real(c) if c.n_layer < 1000 else pytest.fail("table built"))
    edit_json(hf_dir / "config.json", set_key("num_hidden_layers", layers))
    t = time.perf_counter()
    hf_refusal(hf_dir, tmp_path, capsys, f"num_hidden_layers = {layers:,}", "2 blocks")
    assert time.perf_counter() - t < 5


def test_hf_nan_weight_is_refused(hf_dir, tmp_path, capsys):
    """#22 Medium 5: HF safetensors with a NaN imported, then every loader refused it."""
    w = load_file(hf_dir / "model.safetensors")
    w["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(w, hf_dir / "model.safetensors", metadata={"format": "pt"})
    err = hf_refusal(hf_dir, tmp_path, capsys, "model.layers.1.mlp.up_proj.weight", "model.safetensors", "nan/inf")
    assert "diverged" not in err


def test_hf_context_beyond_the_limit(hf_dir, tmp_path, capsys):
    """#22 Medium 5: max_position_embeddings = 2^40 imported; with --block-size it is not used."""
    edit_json(hf_dir / "config.json", set_key("max_position_embeddings", 2 ** 40))
    hf_refusal(hf_dir, tmp_path, capsys, "config.json", "max_position_embeddings", "--block-size")
    assert export.main(["--import-hf", str(hf_dir), "--out", str(tmp_path / "ok"), "--max-seq-len", "16"]) == 0


def test_hf_empty_special_token_is_refused(hf_dir, tmp_path, capsys):
    edit_json(hf_dir / "tokenizer.json", lambda o: {**o, "added_tokens": [
        {**t, "content": ""} if t["content"] == "<|im_end|>" else t for t in o["added_tokens"]]})
    hf_refusal(hf_dir, tmp_path, capsys, "tokenizer.json", "content must be a non-empty string")


def test_hf_tie_word_embeddings_as_a_string_is_refused(hf_dir, tmp_path, capsys):
    """#22 Low: "tie_word_embeddings": "false" tied an untied model and dropped lm_head.weight."""
    edit_json(hf_dir / "config.json", set_key("tie_word_embeddings", "false"))
    hf_refusal(hf_dir, tmp_path, capsys, "config.json", "tie_word_embeddings must be true or false")


def test_hf_weights_missing_names_the_folder(hf_dir, tmp_path, capsys):
    """#22 Low: "weights missing from the checkpoint" had no path."""
    w = load_file(hf_dir / "model.safetensors")
    del w["model.norm.weight"]
    save_file(w, hf_dir / "model.safetensors", metadata={"format": "pt"})
    hf_refusal(hf_dir, tmp_path, capsys, f"weights missing from {hf_dir}", "model.norm.weight")


def test_export_refuses_a_non_finite_rope_theta(tmp_path, tok, model, capsys):
    """#22 Low: rope.freq_base = inf was accepted and export wrote "rope_theta": Infinity (invalid JSON).
    Imports refuse it now (above); a checkpoint holding it is refused on export, and nothing is written."""
    params, cfg = model
    bad = gn.GPTConfig(**{**cfg.to_dict(), "rope_theta": float("inf")})
    with pytest.raises(UserError, match="rope_theta is inf"):
        export_hf(params, bad, tok, tmp_path / "x")
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    save_checkpoint(tmp_path / "run" / "ckpt.safetensors", params, zeros, zeros, build_meta(bad, tok, step=1))
    one_line_error(["--ckpt", tmp_path / "run", "--out", tmp_path / "hf"], capsys)
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------------
# export.py: outputs never where it reads; the flags' one vocabulary; export folders marked

def train_run(folder, params, cfg, tok):
    """A run folder as train.py leaves one: its checkpoint (with AdamW moments), log and marker."""
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    save_checkpoint(folder / "ckpt.safetensors", params, zeros, zeros, build_meta(cfg, tok, step=3, adam_t=3))
    (folder / "log.jsonl").write_text('{"step": 3, "loss": 4.2}\n')
    mark_output_folder(folder)
    return folder


def lora_run(folder, base, cfg, tok):
    """A LoRA run's folder: the adapters and the reference to its base checkpoint (train.py's layout)."""
    lora = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("qkv", "down"))
    adapters = lora_lib.init(gn, cfg, lora, seed=1)
    r = np.random.default_rng(2)
    for k in adapters:
        if k.endswith("lora_B"):
            adapters[k] += r.normal(0, 0.05, adapters[k].shape).astype(np.float32)
    zeros = {k: np.zeros_like(v) for k, v in adapters.items()}
    meta = build_meta(cfg, tok, step=2, adam_t=2, lora={"config": lora.to_dict(),
                                                        "base": lora_base_ref(load_checkpoint(base), folder)})
    save_checkpoint(folder / "ckpt.safetensors", adapters, zeros, zeros, meta)
    mark_output_folder(folder)
    return folder


def folder_hashes(d):
    return {p.name: file_sha256(p) for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("where", ["the run", "its parent", "inside the run"])
def test_out_where_the_run_is_is_refused(tmp_path, tok, model, capsys, where):
    """#22 Medium 9: `export.py --ckpt RUN --out RUN --force` deleted the run it exported."""
    params, cfg = model
    run = train_run(tmp_path / "out" / "run", params, cfg, tok)
    before = folder_hashes(run)
    out = {"the run": run, "its parent": run.parent, "inside the run": run / "hf"}[where]
    err = one_line_error(["--ckpt", run, "--out", out, "--force"], capsys, 2)
    assert "never writes where it reads" in err and str(out) in err
    assert folder_hashes(run) == before and not (run / "hf").exists()
    err = one_line_error(["--ckpt", run, "--gguf", run / "ckpt.safetensors", "--force"], capsys, 2)
    assert folder_hashes(run) == before


def test_lora_run_export_never_writes_over_the_run_or_its_base(tmp_path, tok, model, capsys):
    """#22 Medium 9, for a LoRA run: its folder and its base's are sources too."""
    params, cfg = model
    base = train_run(tmp_path / "base", params, cfg, tok)
    run = lora_run(tmp_path / "lora", base, cfg, tok)
    before = {**folder_hashes(base), **{"lora/" + k: v for k, v in folder_hashes(run).items()}}
    for argv in (["--out", base], ["--out", tmp_path / "m", "--peft-adapter", run],
                 ["--out", tmp_path / "m", "--peft-adapter", tmp_path / "a", "--peft-base", base]):
        one_line_error(["--ckpt", run, *argv, "--force"], capsys, 2)
    assert {**folder_hashes(base), **{"lora/" + k: v for k, v in folder_hashes(run).items()}} == before


def test_out_and_peft_adapter_in_one_folder_is_refused(tmp_path, tok, model, capsys):
    """#22 Low: `--out D --peft-adapter D --force` kept only the adapter and said both were written."""
    params, cfg = model
    base = train_run(tmp_path / "base", params, cfg, tok)
    run = lora_run(tmp_path / "lora", base, cfg, tok)
    err = one_line_error(["--ckpt", run, "--out", tmp_path / "d", "--peft-adapter", tmp_path / "d", "--force"], capsys, 2)
    assert "--out" in err and "--peft-adapter" in err and not (tmp_path / "d").exists()


def test_import_out_where_the_source_is_is_refused(hf_dir, good_gguf, tmp_path, capsys):
    before = folder_hashes(hf_dir)
    one_line_error(["--import-hf", hf_dir, "--out", hf_dir, "--force"], capsys, 2)
    one_line_error(["--import-hf", hf_dir, "--out", hf_dir / "ckpt.safetensors", "--force"], capsys, 2)
    assert folder_hashes(hf_dir) == before
    one_line_error(["--import-gguf", good_gguf, "--out", good_gguf.parent, "--force"], capsys, 2)
    assert good_gguf.is_file()


def test_export_folders_are_marked_and_left_out_of_corpora(tmp_path, tok, model, capsys):
    """#22 Low: a folder corpus included export folders (tokenizer.json, config.json)."""
    params, cfg = model
    run = train_run(tmp_path / "out" / "run", params, cfg, tok)
    assert export.main(["--ckpt", str(run), "--out", str(tmp_path / "corpus" / "export")]) == 0
    (tmp_path / "corpus" / "notes.txt").write_text("some text to train on\n")
    assert (tmp_path / "corpus" / "export" / OUTPUT_MARK).is_file()
    _, files = data.find_sources(str(tmp_path / "corpus"), str(tmp_path / "data"))
    assert [f.name for f in files] == ["notes.txt"]


def test_peft_adapter_names_its_base(tmp_path, tok, model, capsys):
    """#23 item 5: adapter_config.json had "base_model_name_or_path": null, so AutoPeftModelForCausalLM
    went to the Hub. --peft-base DIR writes the base there and names it (an absolute path: PEFT reads a
    relative one from the current folder); without it, a base imported from a Hugging Face folder is named
    by that folder; any other is null, with a note saying how to name one."""
    params, cfg = model
    base = train_run(tmp_path / "base", params, cfg, tok)
    run = lora_run(tmp_path / "lora", base, cfg, tok)
    assert export.main(["--ckpt", str(run), "--out", str(tmp_path / "merged"), "--peft-adapter",
                        str(tmp_path / "adapter"), "--peft-base", str(tmp_path / "hfbase")]) == 0
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str((tmp_path / "hfbase").resolve())
    back, _, _ = import_hf(tmp_path / "hfbase")
    assert all(np.array_equal(back[k], params[k]) for k in params)
    assert (tmp_path / "adapter" / OUTPUT_MARK).is_file() and (tmp_path / "hfbase" / OUTPUT_MARK).is_file()
    assert "written to" in capsys.readouterr().err
    # without --peft-base: null, and a note
    assert export.main(["--ckpt", str(run), "--out", str(tmp_path / "m2"), "--peft-adapter", str(tmp_path / "a2")]) == 0
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert "note: " in capsys.readouterr().err
    # a base imported from a Hugging Face folder: that folder
    assert export.main(["--import-hf", str(tmp_path / "hfbase"), "--out", str(tmp_path / "base2")]) == 0
    run2 = lora_run(tmp_path / "lora2", tmp_path / "base2", cfg, tok)
    assert export.main(["--ckpt", str(run2), "--out", str(tmp_path / "m3"), "--peft-adapter", str(tmp_path / "a3")]) == 0
    conf = json.loads((tmp_path / "a3" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str((tmp_path / "hfbase").resolve())
    # and peft finds the base by itself: AutoPeftModelForCausalLM gives PeftModel(base, adapter)'s logits
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
    model_ = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        theirs = model_(torch.as_tensor(ids)).logits.numpy()
    merged, _, _ = import_hf(tmp_path / "merged")
    ours = gn.forward(merged, ids, cfg)
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()


def test_block_size_is_the_context_flag_and_max_seq_len_its_alias(good_gguf, tmp_path, capsys):
    """#23 item 7: one vocabulary: --block-size as in train.py; --max-seq-len keeps working."""
    for flag, n in (("--block-size", 16), ("--max-seq-len", 24)):
        assert export.main(["--import-gguf", str(good_gguf), "--out", str(tmp_path / flag), flag, str(n)]) == 0
        assert load_checkpoint(tmp_path / flag).model_config().max_seq_len == n
    with pytest.raises(SystemExit):
        export.parse_args(["--help"])
    assert "--block-size N, --max-seq-len N" in capsys.readouterr().out
    err = one_line_error(["--ckpt", tmp_path / "x", "--out", tmp_path / "y", "--block-size", "8"], capsys, 2)
    assert err.startswith("error: --block-size")


def test_error_prefix_is_the_same_as_every_programs(capsys):
    """#23 item 7: export.py printed `export.py: error:` where every other program prints `error:`."""
    err = one_line_error(["--ckpt"], capsys, 2)
    assert err.startswith("error: argument --ckpt")
