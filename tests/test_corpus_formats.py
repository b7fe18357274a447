"""Training data in the formats corpora ship in (issue #23, item 9): JSON Lines (.jsonl, .jsonl.gz) with
a --text-field, Parquet (pyarrow, optional), plain text as before. The same documents give the same
token cache, byte for byte, whatever the format; the files a folder holds in no format are named;
--text-field is part of the corpus's identity; files stream in bounded memory."""

import gzip
import json
import sys
import tracemalloc

import numpy as np
import pytest

import train
from conftest import WORDS, run_quiet, tiny_args
from errors import FileFormatError, UserError
from lib import data as D
from test_data import data_cfg

DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "Ünïcödé café naïve 日本語のテキスト 😀 can't won't\r\n\ttabs  and   spaces",
        "def f(x):\n    return x ** 2  # squared\n" * 20,
        "",                                                         # an empty document still ends with EOT
        "the quick brown fox " * 50]


def write_corpora(d, docs=DOCS, field="text"):
    """The same documents as a folder of text files, a .jsonl, a .jsonl.gz and (with pyarrow) a .parquet."""
    (d / "plain").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (d / "plain" / f"doc{i:02d}.txt").write_bytes(doc.encode("utf-8"))
    lines = "".join(json.dumps({"id": i, field: doc}) + "\n" for i, doc in enumerate(docs))
    (d / "corpus.jsonl").write_text(lines, encoding="utf-8")
    (d / "corpus.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8")))
    out = {"plain": d / "plain", "jsonl": d / "corpus.jsonl", "jsonl.gz": d / "corpus.jsonl.gz"}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return out
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), d / "corpus.parquet", row_group_size=2)
    out["parquet"] = d / "corpus.parquet"
    return out


def prepare(tmp_path, data, tokenizer, text_field="text", logs=None):
    cfg = data_cfg(data=str(data), tokenizer=tokenizer, vocab_size=300, data_dir=str(tmp_path / "data"),
                   text_field=text_field)
    name = D.data_name(cfg.data)
    logs = [] if logs is None else logs
    root, files = D.find_sources(cfg.data, cfg.data_dir, log=logs.append)
    sources = D.digest_sources(root, files, tmp_path / "data" / name / "sources.json", text_field)
    tok = D.get_tokenizer(cfg, name, root, files, sources, log=logs.append)
    d = D.prepare_data(cfg, name, root, files, sources, tok, log=logs.append)
    cache = tmp_path / "data" / name / D.tokenizer_tag(cfg)
    return tok, (cache / "train.bin").read_bytes(), (cache / "val.bin").read_bytes(), d


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_every_format_gives_the_token_cache_of_the_plain_text(tmp_path, tokenizer):
    corpora = write_corpora(tmp_path / "src")
    if "parquet" not in corpora:
        pytest.skip("needs pyarrow (requirements-test.txt) for the Parquet corpus")
    tok, train_bin, val_bin, d = prepare(tmp_path / "plain", corpora["plain"], tokenizer)
    assert len(train_bin) > 1000 and len(val_bin) > 0
    # the char vocabulary and the BPE were built from the documents, not from the JSON around them
    assert tok.to_text() == prepare(tmp_path / "j", corpora["jsonl"], tokenizer)[0].to_text()
    for fmt in ("jsonl", "jsonl.gz", "parquet"):
        t, tb, vb, _ = prepare(tmp_path / fmt, corpora[fmt], tokenizer)
        assert (t.to_text(), tb, vb) == (tok.to_text(), train_bin, val_bin), fmt
    ids = np.concatenate([d["train"], d["val"]])
    eot = D.eot_id(tok)
    if eot is not None:                                     # BPE: one <|endoftext|> after each document
        assert (ids == eot).sum() == len(DOCS)
    text = tok.decode([i for i in ids.tolist() if i != eot])
    assert text == "".join(DOCS)


def test_a_folder_names_the_files_it_skips(tmp_path):
    corpora = write_corpora(tmp_path / "src")
    folder = corpora["plain"]
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0" * 10)
    (folder / "notes.txt.gz").write_bytes(gzip.compress(b"some notes\n"))
    (folder / "sub").mkdir()
    (folder / "sub" / "more.jsonl").write_text(json.dumps({"text": "more text"}) + "\n")
    logs = []
    root, files = D.find_sources(str(folder), str(tmp_path / "data"), log=logs.append)
    assert [p.name for p in files] == [f"doc{i:02d}.txt" for i in range(len(DOCS))] + ["more.jsonl"]
    assert logs == ["data: skipped notes.txt.gz: compressed (only .jsonl.gz is read compressed; decompress it to "
                    "read it as text)",
                    "data: skipped photo.png: not text (NUL bytes in its first 8 KiB: a binary file?)"]
    for i in range(12):
        (folder / f"blob{i:02d}.bin").write_bytes(b"\0" * 10)
    logs = []
    D.find_sources(str(folder), str(tmp_path / "data"), log=logs.append)
    assert len(logs) == 11 and logs[-1] == "data: ... and 4 more files skipped (not text, JSONL or Parquet)"
    with pytest.raises(UserError, match="is not a text file, nor JSONL or Parquet: not text"):
        D.find_sources(str(folder / "photo.png"), str(tmp_path / "data"))


def test_text_field_names_the_field_and_is_part_of_the_corpus(tmp_path):
    corpora = write_corpora(tmp_path / "src", field="content")
    with pytest.raises(FileFormatError, match=r"corpus.jsonl, line 1: no 'text' field \(its fields: id, content\); "
                                              r"name the field that holds the text with --text-field"):
        prepare(tmp_path / "a", corpora["jsonl"], "char")
    tok, tb, vb, d = prepare(tmp_path / "b", corpora["jsonl"], "char", text_field="content")
    assert tok.decode(np.concatenate([d["train"], d["val"]]).tolist()) == "".join(DOCS)
    # another field is another corpus: the corpus hash, so the token cache's key and a checkpoint's, change
    root, files = D.find_sources(str(corpora["jsonl"]), str(tmp_path / "data"))
    hashes = {f: D.digest_sources(root, files, tmp_path / f"s-{f}.json", f)["sha256"] for f in ("text", "content", "id")}
    assert len(set(hashes.values())) == 3
    # a corpus of text files keeps the hash it always had, whatever the flag says
    root, files = D.find_sources(str(corpora["plain"]), str(tmp_path / "data"))
    assert (D.digest_sources(root, files, tmp_path / "p1.json", "text")["sha256"]
            == D.digest_sources(root, files, tmp_path / "p2.json", "content")["sha256"])
    if "parquet" in corpora:
        with pytest.raises(FileFormatError, match=r"no column 'text' \(its columns: id, content\)"):
            prepare(tmp_path / "c", corpora["parquet"], "char")
        with pytest.raises(FileFormatError, match="the column 'id' holds int64, not strings"):
            prepare(tmp_path / "d", corpora["parquet"], "char", text_field="id")


@pytest.mark.parametrize("lines, match", [
    (['{"text": "a"}', '{"text": oops}'], r"x.jsonl, line 2: not valid JSON"),
    (['{"text": "a"}', '', '["text"]'], r"x.jsonl, line 3: expected a JSON object with a 'text' field, got list"),
    (['{"text": 42}'], r"x.jsonl, line 1: the 'text' field is int, not a string"),
])
def test_bad_jsonl_records_are_named(tmp_path, lines, match):
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FileFormatError, match=match):
        prepare(tmp_path, tmp_path / "x.jsonl", "char")


def test_a_jsonl_line_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_RECORD_BYTES", 100)
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "a" * 200}) + "\n")
    with pytest.raises(FileFormatError, match=r"x.jsonl, line 1: longer than 0 MB \(not JSON Lines\?"):
        list(D.read_documents(tmp_path / "x.jsonl"))
    (tmp_path / "y.jsonl.gz").write_bytes(b"\x1f\x8b\x08\0broken")
    with pytest.raises(FileFormatError, match="y.jsonl.gz: not a readable gzip file"):
        list(D.read_documents(tmp_path / "y.jsonl.gz"))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "c.parquet").write_bytes(b"PAR1" + b"\0" * 20 + b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"reading .parquet files needs pyarrow, an optional dependency: pip install "
                                        r"pyarrow"):
        D.find_sources(str(tmp_path / "c.parquet"), str(tmp_path / "data"))
    with pytest.raises(UserError, match="needs pyarrow"):                  # a folder holding one, too
        D.find_sources(str(tmp_path), str(tmp_path / "data"))


def test_progress_bytes_add_up_to_the_file(tmp_path):
    corpora = write_corpora(tmp_path / "src")
    for fmt in ("jsonl", "jsonl.gz", "parquet"):
        if fmt in corpora:
            pieces = list(D.read_documents(corpora[fmt], block_size=64))
            assert sum(n for _, n, _ in pieces) == corpora[fmt].stat().st_size, fmt
            assert sum(end for _, _, end in pieces) == len(DOCS)
            assert max(len(t) for t, _, _ in pieces) <= 64                  # long documents come in pieces


def test_the_bpe_sample_reads_documents_not_json(tmp_path):
    corpora = write_corpora(tmp_path / "src", docs=DOCS * 40)
    for fmt in ("jsonl", "jsonl.gz", "parquet"):
        if fmt in corpora:
            root, files = D.find_sources(str(corpora[fmt]), str(tmp_path / "data"))
            size = files[0].stat().st_size
            texts = D.spread_sample(root, files, size, size // 4)
            assert len(texts) == 1 and texts[0].startswith(DOCS[0] + "<|endoftext|>") and '"text"' not in texts[0]
            if fmt != "jsonl.gz":                   # (gzip is read in compressed chunks of 32 KB: coarser)
                assert len(DOCS) * 40 / 8 < texts[0].count("<|endoftext|>") < len(DOCS) * 40 / 2


def test_jsonl_streams_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:                              # ~6 MB: 12,000 documents of ~500 characters
        for _ in range(12_000):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=80))}) + "\n")
    from lib.tokenizer import CharTokenizer
    tok = CharTokenizer(" " + "".join(sorted(set("".join(WORDS)))))
    root, files = D.find_sources(str(path), str(tmp_path / "data"))
    sources = D.digest_sources(root, files, tmp_path / "s.json")
    tracemalloc.start()
    try:
        n = D.tokenize_files(files, sources, tok, tmp_path / "ids.bin", "t", block_bytes=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n > 5_000_000 and peak < 2_000_000, peak        # a few 64 KB jobs, never the file


def test_train_py_reads_a_jsonl_corpus(tmp_path, capsys):
    corpora = write_corpora(tmp_path / "src", docs=DOCS * 30)
    logs = []
    train.run(tiny_args(tmp_path, corpora["jsonl"], "--max-iters", "2", "--eval-interval", "2"), log=logs.append)
    text = "\n".join(map(str, logs))
    assert "data: " in text and "corpus.jsonl" in text
    meta = json.loads(next((tmp_path / "data" / "corpus").glob("*/meta.json")).read_text())
    assert meta["num_files"] == 1 and meta["sources"][0]["path"] == "corpus.jsonl"
    # the run's vocabulary is the documents' characters: no JSON braces or quotes leaked in
    assert "{" not in json.loads((tmp_path / "data" / "corpus" / "char.json").read_text())["chars"]
