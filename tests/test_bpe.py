"""Tests for bpe.py, and the formats of other tools (lib/tokenizer_files.py). Run:
python -m pytest -q tests/test_bpe.py

tiktoken and tokenizers (Hugging Face) are optional: their equivalence tests skip without them. The GPT-2
tests need ../shared/data/gpt2 (encoder.json, vocab.bpe) next to the repository and skip without it.
"""

import doctest
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bpe  # noqa: E402
from lib import tokenizer_files  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_DIR = SHARED / "gpt2"
SPECIALS = ["<|endoftext|>", "<|pad|>"]

# -----------------------------------------------------------------------------
# helpers and fixtures


def naive_train(chunk_counts, n_merges):
    """Reference trainer: recount every pair before each merge; max over (count, (left bytes, right bytes))."""
    words = {tuple(c.encode("utf-8")): n for c, n in chunk_counts.items()}
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for _ in range(n_merges):
        stats = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                stats[pair] += n
        if not stats:
            break
        pair = max(stats, key=lambda p: (stats[p], (vocab[p[0]], vocab[p[1]])))
        new_id = 256 + len(merges)
        merges.append(pair)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        new_words = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i : i + 2] == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = n
        words = new_words
    return merges


def shared_text(name, n_chars):
    path = SHARED / name
    return path.read_text(encoding="utf-8")[:n_chars] if path.is_file() else None


CORPUS = Path(bpe.__file__).read_text(encoding="utf-8") + "\n" + "\n".join([
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 1234567 numbers.",
    "日本語のテキストと한국어 텍스트, emoji 🙂👍🏽 and accents: héllo wörld, ÇA VA?",
    "    indented\n\n\n\ttabs\t\tand   spaces   \r\n\r\nend",
] * 20)

TEXTS = [
    "",
    "a",
    " ",
    "é",
    "🙂",
    "👍🏽 family: 👨‍👩‍👧",
    "日本語のテキストです。中文也可以。",
    "한국어 텍스트",
    "  \n\n\n   \t\t \r\n\r\n  x  ",
    " " * 3000,
    "\n" * 1000,
    "\r\n" * 100 + "   ",
    "Hello world, it's 2024!\n  indented\ttab 1234567890",
    "don't STOP'S we'LL",
    "a" * 5000,
]


@pytest.fixture(scope="module")
def tok():
    """A small tokenizer trained on CORPUS (this repo's bpe.py plus a few lines), with two special tokens."""
    return bpe.Tokenizer.train([CORPUS], 256 + 400 + len(SPECIALS), special_tokens=SPECIALS, progress=False)


@pytest.fixture(scope="module")
def tok_gpt2_pattern():
    """Trained like tok, but with GPT-2's split pattern."""
    return bpe.Tokenizer.train([CORPUS], 256 + 300, pattern="gpt2", special_tokens=SPECIALS[:1], progress=False)


@pytest.fixture(scope="module")
def bytes_tok():
    """No merges: every byte is its own token."""
    return bpe.Tokenizer("gpt4", [])


@pytest.fixture(scope="module")
def gpt2():
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip(f"GPT-2 files not found in {GPT2_DIR}")
    return tokenizer_files.from_gpt2_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")


TOKENIZERS = ["tok", "tok_gpt2_pattern", "bytes_tok", "gpt2"]

# -----------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_roundtrip_text(request, name, text):
    t = request.getfixturevalue(name)
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert t.decode_bytes(np.array(ids, dtype=t.dtype)) == text.encode("utf-8")


def test_roundtrip_whole_file(tok):
    ids = tok.encode_ordinary(CORPUS)  # CORPUS holds special tokens' text: encode it as text
    assert tok.decode(ids) == CORPUS
    assert len(ids) < len(CORPUS.encode()) / 2  # it did learn something


RANDOM_BYTES = bytes(random.Random(0).randrange(256) for _ in range(5000))


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("data", [b"", b"\xff", b"\xff\xfe\x80", b"\xc3", b"a\xc3(", b"\xed\xa0\x80",
                                  bytes(range(256)), RANDOM_BYTES], ids=range(8))
def test_roundtrip_bytes(request, name, data):
    t = request.getfixturevalue(name)
    assert t.decode_bytes(t.encode_bytes(data)) == data
    # through a str with surrogateescape (how files are read) it is the same
    assert t.decode_bytes(t.encode(data.decode("utf-8", "surrogateescape"))) == data
    assert t.decode(t.encode_bytes(data)) == data.decode("utf-8", errors="replace")


def test_lone_surrogate_becomes_replacement_char(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_long_chunks_are_fast_and_exact(tok):
    # one chunk each (a whitespace run, a 60k-letter "word"); the heap-based merge keeps these O(n log n)
    for text in [" " * 100_000, "".join(random.Random(1).choice("etaoinshrdlu") for _ in range(60_000))]:
        assert tok.decode(tok.encode(text)) == text


# -----------------------------------------------------------------------------
# training


def test_wikipedia_example():
    # by hand, max over (count, (left bytes, right bytes)):
    # aaabdaaabac: aa x4 (overlaps count) -> 256=aa:  [aa] a b d [aa] a b a c
    # (aa, a) x2 ties (a, b) x2; b"aa" > b"a" so (256, 97) -> 257=aaa:  [aaa] b d [aaa] b a c
    # (aaa, b) x2 -> 258=aaab:  [aaab] d [aaab] a c
    tok = bpe.Tokenizer.train(["aaabdaaabac"], 256 + 3, progress=False)
    assert tok.merges == [(97, 97), (256, 97), (257, 98)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode_bytes([258]) == b"aaab"


def random_corpus(seed, n_words=300):
    """Words over a tiny alphabet with small counts: many ties."""
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "ab c", "xyz é"])
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(n_words)]
    return " ".join(words)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_trainer_equals_naive(seed):
    counts = bpe.count_chunks([random_corpus(seed)], progress=False)
    assert bpe.train_merges(counts, 60, progress=False) == naive_train(counts, 60)


def test_incremental_trainer_equals_naive_on_english():
    text = shared_text("tinyshakespeare.txt", 20_000) or CORPUS[:20_000]
    counts = bpe.count_chunks([text], "gpt2", progress=False)
    assert bpe.train_merges(counts, 150, progress=False) == naive_train(counts, 150)


def test_train_inputs_files_paths_texts_generators(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(CORPUS, encoding="utf-8")
    ref = bpe.Tokenizer.train([CORPUS], 300, progress=False).merges
    assert bpe.Tokenizer.train(f, 300, progress=False).merges == ref  # a single Path
    assert bpe.Tokenizer.train(str(f), 300, progress=False).merges == ref  # a str naming a file
    assert bpe.Tokenizer.train([f], 300, progress=False).merges == ref
    assert bpe.Tokenizer.train(iter([CORPUS]), 300, verbose=False).merges == ref  # a generator


def test_read_text_blocks_keeps_chunks(tmp_path):
    text = CORPUS + "".join(random.Random(2).choice(["a", "b", " ", "\n", "\n\n", " \n", "\r\n", ".", "é"])
                            for _ in range(20_000))
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode("utf-8"))
    pieces = list(bpe.read_text_blocks(f, block_size=500))
    blocks = [t for t, _ in pieces]
    assert len(blocks) > 20 and "".join(blocks) == text
    assert sum(n for _, n in pieces) == f.stat().st_size          # every byte counted once
    for pattern in bpe.PATTERNS.values():
        assert [c for b in blocks for c in regex.findall(pattern, b)] == regex.findall(pattern, text)


def test_text_blocks_keep_chunks_and_training_is_unchanged():
    # a long text in memory is counted block by block, with the same chunks as counted whole
    text = CORPUS + "".join(random.Random(4).choice(["a", "b", " ", "\n", "\n\n", " \n", "\r\n", ".", "é"])
                            for _ in range(20_000))
    blocks = list(bpe.text_blocks(text, block_size=500))
    assert len(blocks) > 20 and "".join(blocks) == text
    for pattern in bpe.PATTERNS.values():
        assert [c for b in blocks for c in regex.findall(pattern, b)] == regex.findall(pattern, text)
    assert list(bpe.text_blocks("", block_size=4)) == [""] and list(bpe.text_blocks("!!!!!!!!", block_size=4)) == ["!!!!!!!!"]
    whole = bpe.Counter(regex.findall(bpe.GPT4_PATTERN, text))
    assert bpe.count_chunks([text], progress=False) == whole


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_safe_cut_rule(pattern):
    # before any whitespace that follows a letter or digit, chunking is unchanged...
    pat = regex.compile(bpe.PATTERNS[pattern])
    rng = random.Random(3)
    pieces = ["a", "b", "é", "日", "1", "23", "!", "'s", "'ll", "l", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n",
              "\u3000", "\udcff", "("]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(25))
        for m in regex.finditer(r"(?<=[\p{L}\p{N}])(?=\s)", text):
            i = m.start()
            assert pat.findall(text[:i]) + pat.findall(text[i:]) == pat.findall(text), (text, i)
    # ...but not after a newline: GPT-2 chunks "x \na" as "x", " ", "\n", "a" and "x \n" as "x", " \n"
    gpt2 = regex.compile(bpe.GPT2_PATTERN)
    assert gpt2.findall("x \na") == ["x", " ", "\n", "a"] and gpt2.findall("x \n") == ["x", " \n"]


def test_gpt2_pattern_matches_gpt2_original():
    original = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    for text in TEXTS + [CORPUS, random_corpus(0)]:
        assert regex.findall(bpe.GPT2_PATTERN, text) == regex.findall(original, text)


def test_train_special_tokens():
    words = random_corpus(1).split()
    text = "".join(f"{words[i]}<|endoftext|>{words[i + 1]} <|pad|>" for i in range(0, 200, 2))
    tok = bpe.Tokenizer.train([text], 256 + 30 + 2, special_tokens=SPECIALS, progress=False)
    assert tok.vocab_size == 288 and len(tok.merges) == 30
    assert tok.special_tokens == {"<|endoftext|>": 286, "<|pad|>": 287}  # ids after the merges
    for i in range(256, 286):  # no merged token spans a special token or holds a piece of one
        assert not regex.search(rb"[<|>]|endof|pad", tok.decode_bytes([i]))
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(286) == 100 and ids.count(287) == 100 and tok.decode(ids) == text
    # without them as special tokens, "endoftext" would be merged first thing
    plain = bpe.Tokenizer.train([text], 256 + 30, progress=False)
    assert any(b"endof" in plain.decode_bytes([i]) for i in range(256, 286))


def test_train_stops_early_with_a_warning():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = bpe.Tokenizer.train(["ab ab"], 256 + 10, progress=False)
    assert tok.vocab_size < 266


def test_duplicate_token_bytes_rejected():
    with pytest.raises(ValueError, match="already"):
        bpe.Tokenizer("gpt4", [(97, 98), (97, 98)])


# -----------------------------------------------------------------------------
# special tokens


def test_special_tokens_allowed_and_refused(tok):
    eot, pad = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|pad|>"]
    text = "a<|endoftext|>b<|pad|>"
    assert tok.encode(text, allowed_special="all") == tok.encode("a") + [eot] + tok.encode("b") + [pad]
    assert tok.encode(text, allowed_special=SPECIALS) == tok.encode(text, allowed_special="all")
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):  # refused by default
        tok.encode(text)
    with pytest.raises(ValueError, match=r"<\|pad\|>"):  # allowing one leaves the other refused
        tok.encode("b<|pad|>", allowed_special={"<|endoftext|>"})
    # disallowed_special=() and encode_ordinary treat them as text
    as_text = tok.encode(text, disallowed_special=())
    assert as_text == tok.encode_ordinary(text) and eot not in as_text and pad not in as_text
    assert tok.decode(as_text) == text
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode(text, allowed_special={"<|nope|>"})


# -----------------------------------------------------------------------------
# files


def test_save_load_identity(tok, tmp_path):
    path = tmp_path / "tok.bpe"
    tok.save(path)
    assert path.read_text().startswith("bpe-tokenizer v1\npattern ")
    tok2 = bpe.Tokenizer.load(path)
    assert (tok2.pattern, tok2.merges, tok2.special_tokens, tok2.byte_ids) == \
           (tok.pattern, tok.merges, tok.special_tokens, tok.byte_ids)
    for text in TEXTS + ["<|endoftext|>x<|pad|>"]:
        assert tok2.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    tok2.save(tmp_path / "again.bpe")
    assert (tmp_path / "again.bpe").read_bytes() == path.read_bytes()


def test_save_load_gpt2(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2.bpe")
    g2 = bpe.Tokenizer.load(tmp_path / "gpt2.bpe")
    assert g2.byte_ids == gpt2.byte_ids and g2.encode("Hello world") == [15496, 995]


def _edit(lines, i, new):
    return lines[:i] + ([new] if new is not None else []) + lines[i + 1:]


MALFORMED = {  # name: (how to break the file's lines, what the error must say)
    "header": (lambda L: _edit(L, 0, "bpe-tokenizer v9"), "line 1"),
    "pattern json": (lambda L: _edit(L, 1, "pattern \\p{L}+"), "line 2"),
    "pattern regex": (lambda L: _edit(L, 1, 'pattern "(unclosed"'), "line 2"),
    "bytes count": (lambda L: _edit(L, 2, "bytes " + " ".join(map(str, range(255)))), "line 3"),
    "bytes repeated": (lambda L: _edit(L, 2, "bytes " + " ".join(["0"] * 256)), "line 3"),
    "specials count": (lambda L: _edit(L, 3, "specials two"), "line 4"),
    "special json": (lambda L: _edit(L, 4, "656 <|endoftext|>"), "line 5"),
    "special twice": (lambda L: _edit(L, 5, L[4]), "line 6"),
    "merges key": (lambda L: _edit(L, 6, "merge 400"), "line 7"),
    "merge id": (lambda L: _edit(L, 7, "256 97"), "line 8"),
    "merge fields": (lambda L: _edit(L, 8, "97 98 99"), "line 9"),
    "merge negative": (lambda L: _edit(L, 8, "-1 98"), "line 9"),
    "truncated": (lambda L: L[:-1], "ends at line"),
    "trailing junk": (lambda L: L + ["97 98"], "end of the file"),
    "special id": (lambda L: _edit(L, 4, '9999 "<|endoftext|>"'), "special token ids"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_load_malformed(tok, tmp_path, name):
    break_lines, message = MALFORMED[name]
    tok.save(tmp_path / "ok.bpe")
    lines = (tmp_path / "ok.bpe").read_text().splitlines()
    (tmp_path / "bad.bpe").write_text("\n".join(break_lines(lines)) + "\n")
    with pytest.raises(ValueError, match=regex.escape(message)):
        bpe.Tokenizer.load(tmp_path / "bad.bpe")


def test_load_not_a_tokenizer(tmp_path):
    (tmp_path / "bin.bpe").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        bpe.Tokenizer.load(tmp_path / "bin.bpe")
    (tmp_path / "empty.bpe").write_text("")
    with pytest.raises(ValueError, match="ends at line 0"):
        bpe.Tokenizer.load(tmp_path / "empty.bpe")
    with pytest.raises(ValueError, match="cannot read"):
        bpe.Tokenizer.load(tmp_path / "missing.bpe")


def test_encode_file_streams_like_encode(tok, tmp_path):
    text = CORPUS + "".join(random.Random(4).choice(["ab", " ", "\n", "\n\n", " \n", "\r\n", "7", "é"])
                            for _ in range(5000))
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8", newline="")
    blocks = list(tok.iter_encode_file(f, "all", progress=False, block_size=300))  # CORPUS has special tokens
    assert len(blocks) > 10 and all(b.dtype == np.uint16 for b in blocks)
    assert np.concatenate(blocks).tolist() == tok.encode(text, "all")
    assert tok.encode_file(f, disallowed_special=(), progress=False).tolist() == tok.encode_ordinary(text)
    with pytest.raises(ValueError, match="special token"):
        tok.encode_file(f, progress=False)


def test_not_utf8_file_trains_and_encodes(tmp_path):
    data = b"caf\xe9 cr\xe8me \xff\xfe latin-1 text\n" * 50 + "ok ünïcode\n".encode() * 50
    f = tmp_path / "latin1.txt"
    f.write_bytes(data)
    tok = bpe.Tokenizer.train([f], 256 + 20, progress=False)
    assert b"\xff\xfe" in tokenizer_files.mergeable_ranks(tok)  # invalid bytes are learned like any other
    assert tok.decode_bytes(tok.encode_file(f, progress=False)) == data


def test_dtype_uint32_for_big_vocab(tmp_path):
    big = bpe.Tokenizer("gpt4", [(a, b) for a in range(256) for b in range(256)])  # 65792 tokens
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert big.vocab_size == 65792 and big.encode_file(f, progress=False).dtype == np.uint32
    assert bpe.Tokenizer("gpt4", []).dtype == np.uint16


def test_encode_batch(tok):
    assert tok.encode_batch(TEXTS[:5]) == [tok.encode(t) for t in TEXTS[:5]]


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(texts_or_paths=["abc"], vocab_size=255), "at least 256"),
    (dict(texts_or_paths=["abc"], vocab_size=257, special_tokens=SPECIALS), "at least 256 (the bytes) + 2"),
    (dict(texts_or_paths=[""], vocab_size=300), "empty corpus"),
    (dict(texts_or_paths=[], vocab_size=300), "empty corpus"),
    (dict(texts_or_paths=[Path("no/such/file.txt")], vocab_size=300), "cannot read 'no/such/file.txt'"),
    (dict(texts_or_paths=["no/such/file.txt"], vocab_size=300), "no such file: 'no/such/file.txt'"),
    (dict(texts_or_paths=[b"bytes"], vocab_size=300), "expected a str"),
    (dict(texts_or_paths=["abc"], vocab_size=300, special_tokens=["x", "x"]), "distinct"),
    (dict(texts_or_paths=["abc"], vocab_size=300, pattern="(unclosed"), "invalid split pattern"),
])
def test_train_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=regex.escape(message)):
        bpe.Tokenizer.train(progress=False, **kwargs)


def test_decode_bad_id(tok):
    with pytest.raises(ValueError, match="token id 99999"):
        tok.decode([1, 99999])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode_bytes([1, -1])


def write_gpt2_files(folder, merges):
    """A tiny GPT-2-format encoder.json + vocab.bpe: bytes in GPT-2's order (printable ones first), then
    the merges, then <|endoftext|>."""
    b2u = tokenizer_files.bytes_to_unicode()
    order = sorted(range(256), key=lambda b: ord(b2u[b]))  # "!" (33) gets id 0, as in GPT-2
    encoder = {b2u[b]: i for i, b in enumerate(order)}
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "encoder.json").write_text(json.dumps(encoder))
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_gpt2_format_files(tmp_path):
    write_gpt2_files(tmp_path, [("Ġ", "t"), ("h", "e"), ("Ġt", "he")])
    t = tokenizer_files.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert t.byte_ids[ord("!")] == 0 and t.special_tokens == {"<|endoftext|>": 259}
    assert t.decode_bytes([258]) == b" the" and t.encode(" the the") == [258, 258]
    assert t.encode("<|endoftext|>", allowed_special="all") == [259]


def test_gpt2_files_malformed(tmp_path):
    write_gpt2_files(tmp_path, [("Ġ", "t"), ("h", "e")])
    with open(tmp_path / "vocab.bpe", "a") as f:
        f.write("e h\n")  # "eh" is not in encoder.json
    with pytest.raises(ValueError, match="vocab.bpe, line 4"):
        tokenizer_files.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ValueError, match="encoder.json"):
        tokenizer_files.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


# -----------------------------------------------------------------------------
# GPT-2 (ids below checked against tiktoken 0.14.0 with GPT-2's ranks)

GPT2_IDS = {
    "Hello world": [15496, 995],
    " Hello, world!\n\n  It's 2024.": [18435, 11, 995, 0, 628, 220, 632, 338, 48609, 13],
    "héllo wörld 🙂 日本語": [71, 2634, 18798, 266, 30570, 335, 32485, 10545, 245, 98, 17312, 105, 45739, 252],
    "   leading spaces\tand\ttabs\r\n": [220, 220, 3756, 9029, 197, 392, 197, 8658, 82, 201, 198],
    "<|endoftext|>": [50256],
}


@pytest.mark.parametrize("text", GPT2_IDS)
def test_gpt2_known_ids(gpt2, text):
    assert gpt2.encode(text, allowed_special="all") == GPT2_IDS[text]
    assert gpt2.decode(GPT2_IDS[text]) == text


def test_gpt2_vocab(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.byte_ids[ord("!")] == 0 and gpt2.byte_ids[ord(" ")] == 220  # not byte-ordered


# -----------------------------------------------------------------------------
# tiktoken and Hugging Face give the same ids


def random_unicode(seed, n=20_000):
    """Letters, digits, marks, emoji, CJK, punctuation and every kind of whitespace, mixed."""
    rng = random.Random(seed)
    pieces = ["a", "Z", "é", "ß", "日本", "한", "🙂", "👍🏽", "1", "42", "٣", "!", "...", "'s", "'LL",
              "\u0301",
              " ", "  ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\x0b", "\x85", "\u2028", "<|"]
    return "".join(rng.choice(pieces) for _ in range(n))


def equivalence_texts():
    texts = TEXTS + [CORPUS, "a<|endoftext|>b <|pad|>", random_corpus(5), random_unicode(0)]
    return texts + [t for t in [shared_text("tinyshakespeare.txt", 100_000),
                                shared_text("gutenberg_mix.txt", 300_000)] if t]


@pytest.mark.parametrize("name", ["tok", "tok_gpt2_pattern", "gpt2"])
def test_tiktoken_equivalence(request, name):
    tiktoken = pytest.importorskip("tiktoken")
    t = request.getfixturevalue(name)
    enc = tiktoken.Encoding(name, pat_str=t.pattern, mergeable_ranks=tokenizer_files.mergeable_ranks(t),
                            special_tokens=t.special_tokens)
    for text in equivalence_texts():
        assert t.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
        assert t.encode_ordinary(text) == enc.encode_ordinary(text)


def test_tiktoken_gpt2_ranks(gpt2):
    tiktoken_load = pytest.importorskip("tiktoken.load")
    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(str(GPT2_DIR / "vocab.bpe"), str(GPT2_DIR / "encoder.json"))
    assert tokenizer_files.mergeable_ranks(gpt2) == ranks


@pytest.mark.parametrize("name", ["tok", "tok_gpt2_pattern", "gpt2"])
def test_hf_equivalence(request, name, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    t = request.getfixturevalue(name)
    tokenizer_files.save_hf_tokenizer_json(t, tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size() == t.vocab_size
    for text in equivalence_texts():
        ids = t.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == text


# -----------------------------------------------------------------------------
# command line and docs


def test_cli_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "tok.bpe"
    assert bpe.main(["train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out),
                     "--special", "<|endoftext|>", "--quiet"]) == 0
    tok = bpe.Tokenizer.load(out)
    assert tok.vocab_size == 300 and tok.special_tokens == {"<|endoftext|>": 299}
    assert bpe.main(["encode", "--tokenizer", str(out), "--input", str(corpus), "--out", str(tmp_path / "c.bin"),
                     "--allow-special", "--quiet"]) == 0
    assert np.fromfile(tmp_path / "c.bin", dtype=np.uint16).tolist() == tok.encode(CORPUS, allowed_special="all")
    capsys.readouterr()
    assert bpe.main(["decode", "--tokenizer", str(out), "--input", str(tmp_path / "c.bin")]) == 0
    assert capsys.readouterr().out == CORPUS
    assert bpe.main(["encode", "--tokenizer", str(out), "--text", "hi<|endoftext|>", "--allow-special"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("hi<|endoftext|>", allowed_special="all")]


def test_cli_gpt2(gpt2, capsys):
    assert bpe.main(["encode", "--gpt2-dir", str(GPT2_DIR), "--text", "Hello world"]) == 0
    assert capsys.readouterr().out.strip() == "15496 995"


@pytest.mark.parametrize("argv, message", [
    (["train", "--input", "missing.txt", "--vocab-size", "300", "--out", "x.bpe"], "cannot read 'missing.txt'"),
    (["train", "--input", __file__, "--vocab-size", "100", "--out", "x.bpe"], "too small"),
    (["encode", "--tokenizer", "missing.bpe", "--text", "hi"], "cannot read 'missing.bpe'"),
    (["encode", "--tokenizer", __file__, "--text", "hi"], "line 1: expected the header"),
])
def test_cli_errors(argv, message, capsys):
    assert bpe.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_decode_refuses_a_partial_id_and_encode_names_the_flag(tmp_path, capsys):
    tok_path = tmp_path / "tok.bpe"
    bpe.Tokenizer.train(CORPUS, 300, special_tokens=["<|endoftext|>"], progress=False).save(tok_path)
    (tmp_path / "odd.bin").write_bytes(b"abc")                  # 1.5 uint16 ids
    assert bpe.main(["decode", "--tokenizer", str(tok_path), "--input", str(tmp_path / "odd.bin")]) == 1
    assert "not a whole number of uint16 ids" in capsys.readouterr().err
    assert bpe.main(["encode", "--tokenizer", str(tok_path), "--text", "a<|endoftext|>"]) == 1
    assert "--allow-special" in capsys.readouterr().err
    assert bpe.main(["train", "--input", str(tmp_path), "--vocab-size", "300", "--out", str(tok_path)]) == 1
    assert "a folder" in capsys.readouterr().err


def test_cli_process_exit_code_and_help():
    script = str(Path(bpe.__file__))
    r = subprocess.run([sys.executable, script, "encode", "--tokenizer", "missing.bpe", "--text", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing.bpe" in r.stderr
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout and "train" in r.stdout
    r = subprocess.run([sys.executable, script, "encode", "--tokenizer", "x.bpe"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: one of the arguments --input --text is required\n"


def test_docstring_examples():
    assert doctest.testmod(bpe).failed == 0
    assert doctest.testmod(tokenizer_files).failed == 0
