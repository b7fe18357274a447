"""Issue #22, hardening round 3: the defects a hostile review found in the newer surfaces, each with the
test that failed before its fix (the chat templates' own are in test_chat_template.py)."""

import json

import numpy as np
import pytest

from conftest import make_text
from errors import FileFormatError
from lib import sft
from lib.files import read_jsonl
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
