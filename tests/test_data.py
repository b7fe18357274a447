"""Tests for data.py: finding the corpus, the one file reader, the tokenizers' text and tokenizer.json
forms, the tokenizer and token caches (reused, rebuilt when a source changes, never trusted half-written),
the batch sampler, and the process-level helpers. data.py needs no train.py: its functions take any object
with the config fields they read."""

import io
import platform
from types import SimpleNamespace

import numpy as np
import pytest

import bpe
from lib import backend, data as D, files, tokenizer, tokenizer_files
import gpt_numpy as gn
from conftest import SHARED_DATA, make_text
from errors import FileFormatError, UserError

# ----------------------------------------------------------------------------------------------------
# helpers


def data_cfg(**kw):
    """The config fields data.py reads (train.TrainConfig has them all), with train.py's defaults."""
    return SimpleNamespace(**{"data": "stdlib", "tokenizer": "bpe", "vocab_size": 2048, "bpe_sample_mb": 20.0,
                              "val_fraction": 0.1, "data_dir": "data", **kw})


# ----------------------------------------------------------------------------------------------------
# the corpus and the file reader


def test_shakespeare_char_split_matches_nanogpt(tmp_path):
    src = SHARED_DATA / "tinyshakespeare.txt"
    if not src.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is absent")
    cfg = data_cfg(data=str(src), tokenizer="char", data_dir=str(tmp_path / "data"))
    root, files = D.find_sources(cfg.data, cfg.data_dir)
    sources = D.digest_sources(root, files, tmp_path / "data" / "sources.json")
    tok = D.get_tokenizer(cfg, "ts", root, files, sources, log=lambda *a: None)
    d = D.prepare_data(cfg, "ts", root, files, sources, tok, log=lambda *a: None)
    # nanoGPT's data/shakespeare_char/prepare.py: 65 characters, 1,003,854 train and 111,540 val tokens
    assert tok.vocab_size == 65
    assert (len(d["train"]), len(d["val"])) == (1003854, 111540)
    assert d["train"].dtype == np.uint16 and d["meta"]["val_bytes_per_token"] == 1.0


# ----------------------------------------------------------------------------------------------------
# the token cache


def prepare(tmp_path, data, tokenizer="char"):
    cfg = data_cfg(data=str(data), tokenizer=tokenizer, vocab_size=300, data_dir=str(tmp_path / "data"))
    name = D.data_name(cfg.data)
    root, files = D.find_sources(cfg.data, cfg.data_dir)
    sources = D.digest_sources(root, files, tmp_path / "data" / name / "sources.json")
    logs = []
    tok = D.get_tokenizer(cfg, name, root, files, sources, log=logs.append)
    d = D.prepare_data(cfg, name, root, files, sources, tok, log=logs.append)
    return d, logs


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_cache_reused_and_rebuilt_when_source_changes(tmp_path, tokenizer):
    if tokenizer == "bpe":
        pytest.importorskip("bpe")
    data = make_text(tmp_path / "text.txt")
    d1, logs = prepare(tmp_path, data, tokenizer)
    assert not any("reusing" in m for m in logs)
    d2, logs = prepare(tmp_path, data, tokenizer)
    assert any("reusing" in m for m in logs)
    assert np.array_equal(d1["train"], d2["train"])
    # a changed source rebuilds (same size, different content)
    text = data.read_text()
    data.write_text(text.replace("fox", "cat"))
    d3, logs = prepare(tmp_path, data, tokenizer)
    assert not any("reusing" in m for m in logs)
    assert d3["meta"]["sources_sha256"] != d1["meta"]["sources_sha256"]
    assert not np.array_equal(np.asarray(d3["train"]), np.asarray(d1["train"]))
    # a preparation that died before meta.json was written is never trusted
    meta_files = list((tmp_path / "data" / "text").glob("*/meta.json"))
    assert len(meta_files) == 1
    meta_files[0].unlink()
    _, logs = prepare(tmp_path, data, tokenizer)
    assert not any("reusing" in m for m in logs) and meta_files[0].is_file()


def test_folder_and_glob_sources(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    make_text(folder / "b.txt", 50)
    make_text(folder / "sub" / "a.md", 50, seed=2)
    (folder / "image.bin").write_bytes(b"\x89PNG\0\0\0")               # binary: skipped
    (folder / ".hidden.txt").write_text("secret")                       # hidden: skipped
    root, files = D.find_sources(str(folder), str(tmp_path / "data"))
    assert [p.relative_to(folder).as_posix() for p in files] == ["b.txt", "sub/a.md"]
    root, files = D.find_sources(str(folder / "**" / "*.md"), str(tmp_path / "data"))
    assert [p.name for p in files] == ["a.md"]


def test_stdlib_sources_leave_out_tests():
    root, files = D.stdlib_sources()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 100 and "os.py" in rel
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for r in rel for part in r.split("/"))


def test_pieces_cut_safely_for_bpe(tmp_path):
    bpe = pytest.importorskip("bpe")
    path = make_text(tmp_path / "text.txt", 300)
    tok = bpe.Tokenizer.train([path.read_text()], 300, special_tokens=[tokenizer.EOT], progress=False)
    whole = tok.encode_ordinary(path.read_text())
    pieces = list(bpe.read_text_blocks(path, 500, cut=tok.cut, errors=tok.file_errors))   # as tokenize_files
    assert len(pieces) > 5 and sum(n for _, n in pieces) == path.stat().st_size
    assert [i for text, _ in pieces for i in tok.encode_ordinary(text)] == whole


def test_reader_hashes_while_it_reads(tmp_path):
    import hashlib
    path = make_text(tmp_path / "text.txt", 100)
    h = hashlib.sha256()
    pieces = list(bpe.read_text_blocks(path, 300, cut=tokenizer.CharTokenizer.cut, errors="replace", hasher=h))
    assert "".join(t for t, _ in pieces) == path.read_text() and len(pieces) > 5
    assert h.hexdigest() == D.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_write_replaces_or_keeps(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    files.write_text_atomic(path, "one")
    def crash(tmp):
        raise OSError("disk full")
    with pytest.raises(OSError):
        files.atomic_write(path, b"two", before_replace=crash)
    assert path.read_text() == "one" and not list(path.parent.glob(".*tmp*"))


# ----------------------------------------------------------------------------------------------------
# tokenizers


@pytest.mark.parametrize("text", ["", "a", "hello world\n", "naïve café 日本語 😀"])
def test_char_tokenizer_round_trips_and_keeps_its_forms(text):
    tok = tokenizer.CharTokenizer("hello world\n" + "naïve café 日本語 😀a")
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()
    assert tok.kind == "char" and tok.dtype == np.uint16
    again = tokenizer.tokenizer_from_text("char", tok.to_text())
    assert again.chars == tok.chars
    assert tokenizer_files.from_hf_json(tokenizer_files.to_hf_json(tok)).chars == tok.chars
    with pytest.raises(UserError, match="not in the char vocabulary"):
        tok.encode_ordinary("Z")


def test_hello_example():
    tok = tokenizer.CharTokenizer("hello")
    assert tok.chars == "ehlo" and tok.encode_ordinary("hello").tolist() == [1, 0, 2, 2, 3]


def test_tokenizer_text_forms_and_files(tmp_path):
    bpe_tok = bpe.Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20], 270,
                                  special_tokens=[tokenizer.EOT], progress=False)
    again = tokenizer.tokenizer_from_text("bpe", bpe_tok.to_text())
    assert (again.merges, again.special_tokens) == (bpe_tok.merges, bpe_tok.special_tokens)
    assert tokenizer.eot_id(again) == 269 and tokenizer.eot_id(tokenizer.CharTokenizer("ab")) is None
    bpe_tok.save(tmp_path / "t.bpe")
    (tmp_path / "t.char").write_text(tokenizer.CharTokenizer("ab").to_text())
    assert tokenizer.load_tokenizer_file(str(tmp_path / "t.bpe")).merges == bpe_tok.merges
    assert tokenizer.load_tokenizer_file(str(tmp_path / "t.char")).chars == "ab"
    (tmp_path / "bad.bpe").write_text("not a tokenizer\n")
    with pytest.raises(FileFormatError, match="could not load the tokenizer"):
        tokenizer.load_tokenizer_file(str(tmp_path / "bad.bpe"))
    with pytest.raises(UserError, match="expected 'char', 'bpe' or a saved tokenizer file"):
        tokenizer.load_tokenizer_file(str(tmp_path / "missing"))
    for kind, text in [("char", "{not json"), ("bpe", "junk"), ("wordpiece", "")]:
        with pytest.raises(FileFormatError):
            tokenizer.tokenizer_from_text(kind, text)


def test_encode_prompt_falls_back():
    tok = tokenizer.CharTokenizer("ab\n")
    assert tokenizer.encode_prompt(tok, "ab") == [1, 2] and tokenizer.encode_prompt(tok, "") == [0]
    assert tokenizer.encode_prompt(tokenizer.CharTokenizer("ab"), "\n") == [0]          # no newline in the vocabulary
    with pytest.raises(UserError):
        tokenizer.encode_prompt(tok, "z")


# ----------------------------------------------------------------------------------------------------
# the batch sampler and the process-level helpers


def test_get_batch_example():
    x, y = D.get_batch(np.array([5, 6, 7, 8], np.uint16), 1, 2, SimpleNamespace(integers=lambda lo, hi, size: [1]))
    assert x.tolist() == [[6, 7]] and y.tolist() == [[7, 8]] and x.dtype == np.int64


def test_keep_freed_memory_is_harmless():
    # it works on glibc (returns True), says False elsewhere, and training still gives finite losses
    ok = backend.keep_freed_memory()
    assert ok is (platform.libc_ver()[0] == "glibc")
    cfg = gn.GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=8, d_ff=16, max_seq_len=8)
    params = gn.init_params(cfg)
    ids = np.random.default_rng(0).integers(0, 16, (2, 8))
    loss, _ = gn.loss_and_grads(params, ids, ids, cfg)
    assert np.isfinite(loss)


def test_load_backend():
    assert backend.load_backend("numpy") is gn
    with pytest.raises(UserError, match="unknown backend"):
        backend.load_backend("tpu")


def test_get_batch_read_false_moves_the_sampler_alike():
    """A rank draws the other ranks' micro-batches without reading them: the generator ends where it
    would have, and the next batch is the same."""
    d = np.arange(100)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    D.get_batch(d, 3, 4, r1)
    assert D.get_batch(d, 3, 4, r2, read=False) is None
    assert all(np.array_equal(a, b) for a, b in zip(D.get_batch(d, 3, 4, r1), D.get_batch(d, 3, 4, r2)))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_parallel_tokenizing_writes_the_serial_ids(tmp_path, kind):
    """tokenize_files with 2 encoding processes and small blocks (many in flight, several files, the
    end-of-text ids between them): byte for byte the ids of the serial path."""
    files = [make_text(tmp_path / f"{i}.txt", n_lines=150, seed=i) for i in range(3)]
    sources = D.digest_sources(tmp_path, files, tmp_path / "sources.json")
    text = "".join(f.read_text() for f in files)
    tok = (tokenizer.CharTokenizer(text) if kind == "char" else
           bpe.Tokenizer.train([text], 300, pattern="gpt4", special_tokens=[tokenizer.EOT]))
    n1 = D.tokenize_files(files, sources, tok, tmp_path / "serial.bin", "t", workers=1, block_bytes=700)
    n2 = D.tokenize_files(files, sources, tok, tmp_path / "pool.bin", "t", workers=2, block_bytes=700)
    assert n1 == n2 > 1000
    assert (tmp_path / "serial.bin").read_bytes() == (tmp_path / "pool.bin").read_bytes()
    assert D.encode_workers(1 << 20) == 1                      # small corpora: no pool


def test_read_jsonl_numbers_lines_and_names_bad_ones(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n\n  \n[2]\n', encoding="utf-8")
    assert list(files.read_jsonl(p)) == [(1, f"{p}, line 1", {"a": 1}), (4, f"{p}, line 4", [2])]
    p.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(FileFormatError, match=r"r.jsonl, line 2: not valid JSON"):
        list(files.read_jsonl(p))
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(FileFormatError, match="is not UTF-8 text"):
        list(files.read_jsonl(p))
    with pytest.raises(UserError, match="cannot read .*none.jsonl"):
        list(files.read_jsonl(tmp_path / "none.jsonl"))


def test_fetch_once_downloads_once_and_fails_in_one_line(tmp_path, monkeypatch):
    import urllib.request
    calls = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

    def fake(url, timeout=None):
        calls.append(url)
        return Response(b"the text")
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    dest = tmp_path / "d" / "f.txt"
    for _ in range(2):
        assert files.fetch_once("http://x/f.txt", dest, "F", "do this instead", log=lambda s: None) == dest
    assert calls == ["http://x/f.txt"] and dest.read_bytes() == b"the text"

    def offline(url, timeout=None):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"could not download G \(OSError: network is unreachable\); do this instead"):
        files.fetch_once("http://x/g.txt", tmp_path / "g.txt", "G", "do this instead", log=lambda s: None)
    assert not (tmp_path / "g.txt").exists()
