"""Issue #22, hardening round 3: the defects a hostile review found in the newer surfaces, each with the
test that failed before its fix (the chat templates' own are in test_chat_template.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_text, run_quiet, tiny_args
from errors import FileFormatError, UserError
from lib import sft
from lib.checkpoint import build_meta, load_checkpoint, save_checkpoint
from lib.files import read_jsonl, write_folder
from lib.tokenizer import CharTokenizer


# ----------------------------------------------------------------------------------------------------
# SFT: a huge record is cut before it is tokenized

@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    bpe = pytest.importorskip("bpe")
    d = tmp_path_factory.mktemp("tok")
    return bpe.Tokenizer.train([str(make_text(d / "t.txt"))], 300, special_tokens=["<|endoftext|>"], progress=False)


def test_encode_prefix_gives_the_whole_texts_first_ids(bpe_tok):
    rng = np.random.default_rng(0)
    words = ["the", "fox", " ", "  ", "\n", "jumps.", "über", "42", "!!", "\t"]
    for _ in range(30):
        text = "".join(rng.choice(words, size=int(rng.integers(50, 3000))))
        whole = sft.encode_text(bpe_tok, text)
        for need in (1, 5, 40):
            got = sft.encode_prefix(bpe_tok, text, need)
            assert got == whole[:len(got)] and len(got) >= min(need, len(whole))
    char = CharTokenizer("ab ")
    assert sft.encode_prefix(char, "ab " * 10000, 7)[:7] == [int(i) for i in char.encode_ordinary("ab ab ab")[:7]]


def test_a_huge_sft_record_is_cut_before_tokenizing(bpe_tok, tmp_path, monkeypatch):
    """A 4 MB answer at --block-size 64: the same example as tokenizing it whole and cutting, but only a
    few thousand characters go through the tokenizer (the review: a 20 MB record took 2.0 GB to encode)."""
    answer = ("the quick brown fox jumps over a lazy dog. " * 100_000)[:4_000_000]
    path = tmp_path / "big.jsonl"
    rec = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": answer}]}
    path.write_text(json.dumps(rec) + "\n" + json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    chat = sft.chat_template_for({}, bpe_tok)
    x_whole, y_whole = sft.encode_chat(rec["messages"], bpe_tok, chat)
    encoded, real = [], sft.encode_text
    monkeypatch.setattr(sft, "encode_text", lambda tok, text: encoded.append(len(text)) or real(tok, text))
    data = sft.prepare_sft(path, bpe_tok, chat, 64, 0.5, 0, log=lambda *a: None)
    (x, y), = [e for e in data["train"] + data["val"] if len(e[0]) == 64]
    assert (x == x_whole[:64]).all() and (y == y_whole[:64]).all()
    assert data["meta"]["truncated"] == 1
    assert sum(encoded) < 20_000, f"{sum(encoded):,} characters tokenized"


# ----------------------------------------------------------------------------------------------------
# JSON lines nested too deeply

def test_a_deeply_nested_jsonl_line_is_a_one_line_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(FileFormatError, match=r"deep.jsonl, line 2: .*nested too deeply"):
        list(read_jsonl(path))


# ----------------------------------------------------------------------------------------------------
# sample.py --chat with its input closed

def test_chat_with_stdin_closed_ends_quietly(tmp_path):
    run_quiet(tiny_args(tmp_path, make_text(tmp_path / "t.txt"), "--tokenizer", "bpe", "--vocab-size", 300))
    ck = load_checkpoint(tmp_path / "out")
    tok = ck.tokenizer()
    meta = build_meta(ck.model_config(), tok, chat={"template": sft.DEFAULT_TEMPLATE, "eos_token": "<|endoftext|>",
                                                   "stop_ids": [tok.special_tokens["<|endoftext|>"]]})
    save_checkpoint(tmp_path / "chat" / "ckpt.safetensors", ck.params, {}, {}, meta)
    r = subprocess.run(["sh", "-c", f'"{sys.executable}" sample.py --ckpt "{tmp_path / "chat"}" --chat <&-'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------------
# a killed export's folders

def dead_pid():
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_folders_of_a_killed_write_are_restored_or_removed(tmp_path, capsys):
    dest = tmp_path / "export"
    pid = dead_pid()
    # killed while writing: a half-written tmp folder (the review: 342 MB, forever)
    (tmp_path / f".export.tmp-{pid}").mkdir()
    (tmp_path / f".export.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    # killed between the two renames: dest is gone, the old copy only in .old-PID
    (tmp_path / f".export.old-{pid}").mkdir()
    (tmp_path / f".export.old-{pid}" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is not empty"):          # the old export is back, so --force is needed
        write_folder(dest, lambda d: (d / "new.txt").write_text("new"))
    assert (dest / "config.json").read_text() == "{}" and "restored it from" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # killed after the second rename, before the old copy was deleted: it goes
    (tmp_path / f".export.old-{pid}").mkdir()
    write_folder(dest, lambda d: (d / "new.txt").write_text("new"), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (dest / "new.txt").is_file()
    # a live process's folders are its work in progress: left alone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".export.tmp-{live.pid}").mkdir()
        write_folder(dest, lambda d: (d / "x.txt").write_text("x"), force=True)
        assert (tmp_path / f".export.tmp-{live.pid}").is_dir()
    finally:
        live.kill()
