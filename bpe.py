"""
bpe.py: a byte-level BPE tokenizer in the style of GPT-2 and GPT-4, in pure Python (regex, numpy, tqdm).

- The base vocabulary is the 256 byte values. Text is first cut into chunks by a regex (GPT-2's or GPT-4's
  split pattern), and merges never cross a chunk boundary.
- Training counts the distinct chunks once, reading files block by block, so memory follows the number of
  distinct chunks, not the size of the corpus. Then it merges with incremental pair counts and a heap: a
  merge touches only the chunks that contain its pair, and pairs are never recounted: about 4 s for a
  32768-token vocabulary on 8 MB of English (bench/tokenizer.py), where recounting all pairs costs ~0.3 s a merge.
- Encoding merges, inside each chunk, the adjacent pair whose concatenation has the lowest rank (rank =
  token id), exactly as tiktoken does, with a cache for repeated chunks.
- One file format, this file's own (save/load, to_text/from_text; below). The formats of other tools
  (GPT-2's encoder.json + vocab.bpe, tiktoken's mergeable ranks, Hugging Face's tokenizer.json, GGUF
  vocabularies) are functions in lib/tokenizer_files.py that return or take a Tokenizer, with the same ids.

    tok = Tokenizer.train(["input.txt"], vocab_size=4096, special_tokens=["<|endoftext|>"])
    ids = tok.encode("hello world<|endoftext|>", allowed_special="all")
    tok.decode(ids)                  # -> "hello world<|endoftext|>"
    tok.save("tok.bpe"); tok = Tokenizer.load("tok.bpe")
    from lib.tokenizer_files import from_gpt2_files
    gpt2 = from_gpt2_files("encoder.json", "vocab.bpe")
    gpt2.encode("Hello world")       # -> [15496, 995]

Command line: `python bpe.py --help` (train, encode, decode).

Text and bytes. Files are read as UTF-8 with errors="surrogateescape": an invalid byte becomes a lone
surrogate (U+DC80..U+DCFF) that turns back into the same byte when its chunk is encoded, so a file that is
not UTF-8 never crashes training or encoding, and decode_bytes(encode_file(f)) gives the file back byte for
byte; encode_bytes(b) does the same for bytes in memory. decode(ids) returns str (invalid UTF-8 replaced by
U+FFFD), decode_bytes(ids) the exact bytes. Any other lone surrogate in a str is not text; it is encoded as
U+FFFD, as tiktoken does; a surrogate pair spelled as two code points ("\ud83d\ude00") is the character it
stands for (U+1F600), as tiktoken reads it too.

Split patterns. Every character of a text must fall in some chunk, or it would vanish from the ids (r"\\p{L}+"
would encode "hello, world 42!" as "helloworld"), and matching must end: a pattern that backtracks
catastrophically can take hours on one line. The GPT-2 and GPT-4 patterns do both by construction. Any other
is tried on probe texts when a tokenizer is made (trained, loaded or imported) and refused if it drops a
character or takes over a second; it is then also checked on every text it splits, under the regex module's
timeout (PATTERN_MIN_SECONDS plus PATTERN_SECONDS_PER_CHAR per character), which costs it ~2.5x in speed.

Errors. Bad input (a vocab size too small, an empty corpus, a missing or unreadable file, a malformed
tokenizer file, a special token where none is allowed) raises ValueError with a message naming the culprit
(errors.py's UserError for an unreadable file, FileFormatError for a malformed one: both ValueErrors).

Tokenizer file (plain text, ASCII; strings JSON-quoted):
    bpe-tokenizer v1
    pattern "<split regex>"
    bytes <256 ids>               the id of byte 0, 1, ..., 255 (0 1 ... 255 when trained here; GPT-2 permutes)
    specials <S>
    <id> "<special token>"        S lines
    merges <M>
    <left id> <right id>          M lines; merge i mints token 256 + i

Version 2, written only for a vocabulary laid out otherwise (imported from a tokenizer.json or a GGUF file):
    bpe-tokenizer v2
    pattern "<split regex>"
    bytes <256 fields>            the id of each byte, or - for a byte with no token
    ignore_merges <true|false>    does a chunk that is a whole token skip the merges?
    specials <S>
    <id> "<special token>"        S lines
    merges <M>
    <left id> <right id> <id>     M lines, in rank order; merge i mints the id on its line
"""

import argparse
import codecs
import heapq
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from itertools import chain
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

from errors import ArgumentParser, FileFormatError, UserError, run_main

# GPT-2's split pattern as tiktoken writes it (r50k_base). GPT-2's own encoder.py has
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# which gives the same chunks; the possessive form (++) runs ~25% faster in the regex package.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's (cl100k_base) split pattern, as tiktoken writes it: contractions in any case, a letter run may
# take one leading non-letter, numbers in groups of at most 3 digits, punctuation keeps its newlines.
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
# Real models' split patterns, as one regex each (lib/tokenizer_files.py maps the pre-tokenizers of
# tokenizer.json and GGUF files to them). SmolLM2's (StarCoder's) tokenizer.json splits off every
# digit first (Digits(individual_digits=true)), then runs ByteLevel's GPT-2 regex on the pieces between.
# As one regex: a digit alone first, GPT-2's alternatives without digits, and GPT-2's "whitespace not
# followed by a non-space" \s+(?!\S) also taking a digit as the end of its piece: \s+(?![^\s\p{N}]).
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s+(?![^\s\p{N}])|\s+"""
# Llama 3's (tiktoken's cl100k with a non-possessive spelling) and Qwen2's (digits one by one), as their
# tokenizer.json files write them
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# the patterns that cover every text, in linear time by construction: used without the checks below
SAFE_PATTERNS = frozenset([*PATTERNS.values(), SMOLLM_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN])
PATTERN_MIN_SECONDS = 10.0  # the time limit of any other pattern on one text: this much ...
PATTERN_SECONDS_PER_CHAR = 5e-6  # ... plus this per character (~20x what GPT-4's pattern needs)
PATTERN_PROBE_SECONDS = 1.0  # a new tokenizer's pattern must split each probe text in less than this
PATTERN_PROBES = [  # every kind of character, and long runs of one kind (where backtracking explodes)
    "Hello, world 42! It's don't WE'LL 1234567 3.14 x=y+1; a_b (c) [d] {e} <f> \"g\" #h @i $j %k ^l &m *n ~o |p",
    "日本語 中文 한국어 Ελληνικά русский עברית العربية हिन्दी emoji 🙂👍🏽 e\u0301 ß ﬁ Ⅻ ½ ٣ ₂ ©®™ ∑√∞ ←→",
    " \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000 \x00\x01\x7f\x9f \ufffd \ue000 "
    "\udc80\udcff \ud800 end\r\n",
    *(c * 300 + e for c, e in [("a", "!"), (" ", "x"), ("1", "a"), ("!", " "), ("\n", "a"), ("é", "1"), ("'", "s"),
                               ("\r\n", " "), ("日", "!")]),
    "aA1! " * 60,
]
FORMAT = "bpe-tokenizer v1"  # first line of a tokenizer file
FORMAT_V2 = "bpe-tokenizer v2"  # ... of one whose ids are laid out otherwise (see the module docstring)
MAX_CACHE = 1 << 20  # chunks remembered by the encoder before its cache is cleared

# -----------------------------------------------------------------------------
# helpers


class LineProgress:
    """tqdm's interface (update, close, with) for a log file: off a terminal a bar's \\r updates would fill
    the file with thousands of overwritten lines, so this writes a plain line now and then instead: at
    every tenth of the total (or every 30 s when the total is unknown) and once at the end."""

    def __init__(self, total=None, desc="", unit="it", unit_scale=False, file=None, **_):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.file, self.n, self.shown, self.t0 = file or sys.stderr, 0, 0, time.time()
        self.last = self.t0

    def _amount(self, n):
        return tqdm.format_sizeof(n) + self.unit if self.unit_scale else f"{n:,} {self.unit}s"

    def _line(self):
        done = (f"{self.n:,} of {self._amount(self.total)}" if self.total and not self.unit_scale
                else self._amount(self.n) + (f" of {self._amount(self.total)}" if self.total else ""))
        print(f"{self.desc}: {done} ({time.time() - self.t0:.1f} s)", file=self.file, flush=True)
        self.shown, self.last = self.n, time.time()

    def update(self, n=1):
        self.n += n
        if (self.total and self.n - self.shown >= self.total / 10) or (not self.total and time.time() - self.last >= 30):
            self._line()

    def close(self):
        if self.n != self.shown or self.n == 0:
            self._line()
        self.shown = self.n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(progress=True, **kwargs):
    """A tqdm bar on a terminal, plain lines (LineProgress) when stderr is a file or a pipe, as train.py's
    log does; nothing when progress is false."""
    if progress and not sys.stderr.isatty():
        return LineProgress(**kwargs)
    return tqdm(**kwargs, disable=not progress)


def to_bytes(text):
    """The UTF-8 bytes of a str; lone surrogates made by errors="surrogateescape" turn back into the raw
    bytes they stand for.

    >>> to_bytes("é"), to_bytes(b"\\xff\\xfe".decode("utf-8", "surrogateescape"))
    (b'\\xc3\\xa9', b'\\xff\\xfe')
    >>> to_bytes("\\ud800")  # any other lone surrogate is not text: U+FFFD, as tiktoken does
    b'\\xef\\xbf\\xbd'
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return regex.sub("[\ud800-\udc7f\udd00-\udfff]", "\ufffd", text).encode("utf-8", "surrogateescape")


_LAST_CUT = regex.compile(r"(?r)[\p{L}\p{N}]\s")  # (?r): the regex package searches backwards: the last one


def safe_cut(text, start=0):
    r"""Where a long text can be cut so that chunking the two parts gives the same chunks as the whole: just
    before the last whitespace character that follows a letter or digit (found at or after start); 0 if none.

    Why this is safe for the GPT-2 and GPT-4 patterns: the chunk that holds that letter or digit (a word, a
    number, a contraction) ends right there, and finds its end the same way whether whitespace or the end
    of the text comes next, so the left part chunks as in the whole; the patterns never look behind, so the
    right part, which starts with the whitespace, chunks as in the whole too. subtle: a cut after a newline
    is not safe: GPT-2 chunks "x \na" as "x", " ", "\n", "a" but "x \n" alone as "x", " \n" (\s+(?!\S)
    looks ahead). A custom pattern needs the same check (tests/test_bpe.py tries random texts).

    >>> safe_cut("one two\nthree!\n"), safe_cut("!? \n")
    (7, 0)
    """
    m = _LAST_CUT.search(text, max(start, 0))
    return m.start() + 1 if m else 0


def can_cut(special_tokens):
    """Blocks may be cut unless a special token holds whitespace: a cut could fall inside one."""
    return not any(regex.search(r"\s", s) for s in special_tokens)


def read_text_blocks(path, block_size=1 << 22, cut=safe_cut, errors="surrogateescape", hasher=None):
    """Yield (text, nbytes) for a file's text in blocks of about block_size bytes, so a big file is never
    held whole: at most one block and the tail carried into the next. The one file reader of the project
    (training here, encoding here, and lib/data.py's corpus preparation and hashing all use it).

    - cut(text, start) -> index: where a block may end (default safe_cut: where BPE's chunking is
      unchanged, searched from start); None: nowhere, the file comes as one block.
      subtle: a block with no cut (no letter or digit followed by whitespace) is carried on, so such a
      file ends up read whole, as with cut=None.
    - UTF-8 through an incremental decoder, so a character split between two reads stays whole; errors:
      how invalid bytes decode ("surrogateescape" keeps them exact for bpe.py; "replace" gives U+FFFD).
      No newline translation ("\\r\\n" stays as it is).
    - nbytes: the bytes read since the previous block (for progress bars); they sum to the file's size.
    - hasher (a hashlib object) sees the raw bytes as they pass, so reading and hashing is one pass.

    >>> import tempfile; f = tempfile.NamedTemporaryFile(delete=False); _ = f.write(b"ab\\ncd\\n\\xff"); f.close()
    >>> list(read_text_blocks(f.name, block_size=4))
    [('ab', 4), ('\\ncd', 3), ('\\n\\udcff', 0)]
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    tail, nbytes = "", 0
    try:
        with open(path, "rb") as f:
            while data := f.read(block_size):
                if hasher is not None:
                    hasher.update(data)
                nbytes += len(data)
                text = tail + decoder.decode(data)
                i = cut(text, len(tail) - 1) if cut else 0  # earlier text held no cut
                if i:
                    yield text[:i], nbytes
                    nbytes = 0
                tail = text[i:]
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    tail += decoder.decode(b"", final=True)
    if tail or nbytes:
        yield tail, nbytes


def text_blocks(text, block_size=1 << 22, cut=True):
    """A long in-memory text in blocks of about block_size characters, each ending at a safe_cut, as
    read_text_blocks does for files: counting chunks block by block holds one block's chunks at a time
    (a 20 MB text counted whole makes a list of ~4 million chunk strings, ~250 MB).

    >>> list(text_blocks("ab cd ef", block_size=4))
    ['ab', ' cd', ' ef']
    """
    start = 0
    while cut and len(text) - start > block_size:
        i = safe_cut(text[start:start + block_size])
        if not i:                                  # no safe cut in this block: the rest goes whole
            break
        yield text[start:start + i]
        start += i
    yield text[start:]


def read_text(path):
    """A whole (small) file as str, strict UTF-8; UserError / FileFormatError naming the path if it
    cannot be read."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{str(path)!r} is not UTF-8 text: {e}") from None


def id_dtype(vocab_size):
    """The smallest NumPy dtype that holds every id of a vocabulary: uint16 up to 65536 tokens, else
    uint32 (the .bin files of bpe.py and lib/data.py, like nanoGPT's).

    >>> id_dtype(65536).__name__, id_dtype(65537).__name__
    ('uint16', 'uint32')
    """
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _looks_like_path(s):
    """A str with no whitespace ending in a file extension: 'data/input.txt' yes, 'hello world' no."""
    return regex.fullmatch(r"\S+\.[A-Za-z][A-Za-z0-9]{0,4}", s) is not None


def iter_texts(texts_or_paths, cut=True, bar=None):
    """Yield the training texts: each item (or a single item) is a file or a text. An os.PathLike (such as
    pathlib.Path) is a file; a str is a file if it names an existing file and a text otherwise, except that
    a str with no whitespace ending in a file extension ("data/input.txt") that names no file raises
    ValueError: it is surely a mistyped path. Files come in blocks (read_text_blocks).

    >>> list(iter_texts("hello world")), list(iter_texts(["a b", "c d"]))
    (['hello world'], ['a b', 'c d'])
    """
    if isinstance(texts_or_paths, (str, os.PathLike)):
        texts_or_paths = [texts_or_paths]
    for item in texts_or_paths:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and os.path.isfile(item)):
            for text, nbytes in read_text_blocks(item, cut=safe_cut if cut else None):
                yield text
                if bar is not None:
                    bar.update(nbytes)
        elif isinstance(item, str) and _looks_like_path(item):
            raise ValueError(f"no such file: {item!r} (to train on it as a text, add a space to it)")
        elif isinstance(item, str):
            for block in text_blocks(item, cut=cut):
                yield block
                if bar is not None:
                    bar.update(len(block))
        else:
            raise ValueError(f"expected a str text or a file path, got {type(item).__name__}")


def _special_regex(names):
    """A regex matching any of the special tokens (longest first), or None for none."""
    if not names:
        return None
    return regex.compile("|".join(regex.escape(s) for s in sorted(names, key=len, reverse=True)))


_HIGH_SURROGATE = regex.compile("[\ud800-\udbff]")
_SURROGATE_PAIR = regex.compile("[\ud800-\udbff][\udc00-\udfff]")


def join_surrogate_pairs(text):
    """Each surrogate pair spelled as two code points -> the one character it stands for, as tiktoken
    reads a str; lone surrogates stay (to_bytes makes them U+FFFD, or the raw bytes they escape).

    >>> join_surrogate_pairs("a\\ud83d\\ude00b") == "a\\U0001F600b"
    True
    """
    if text.isascii() or not _HIGH_SURROGATE.search(text):
        return text
    return _SURROGATE_PAIR.sub(lambda m: m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"), text)


def check_pattern(pattern):
    """Compile a split pattern, and for one other than GPT-2's and GPT-4's try it on PATTERN_PROBES: it must
    cover each probe and split it within PATTERN_PROBE_SECONDS. Returns the compiled regex; ValueError (one
    line) for an invalid, partial or catastrophically slow pattern."""
    try:
        chunk_re = regex.compile(pattern)
    except (regex.error, TypeError) as e:
        raise ValueError(f"invalid split pattern {pattern!r}: {e}") from None
    if pattern not in SAFE_PATTERNS:
        for probe in PATTERN_PROBES:
            split_chunks(chunk_re, probe, pattern, seconds=PATTERN_PROBE_SECONDS)
    return chunk_re


def split_chunks(chunk_re, text, pattern, seconds=None):
    """chunk_re.findall(text), for a pattern other than the built-in ones bounded in time (seconds, default
    PATTERN_MIN_SECONDS + PATTERN_SECONDS_PER_CHAR per character) and checked to cover the whole text.
    ValueError (one line) otherwise.

    >>> split_chunks(regex.compile(r"\\p{L}+|\\s"), "hi you", r"\\p{L}+|\\s")
    ['hi', ' ', 'you']
    """
    if pattern in SAFE_PATTERNS:
        return chunk_re.findall(text)
    seconds = PATTERN_MIN_SECONDS + PATTERN_SECONDS_PER_CHAR * len(text) if seconds is None else seconds
    try:
        chunks = chunk_re.findall(text, timeout=seconds)
    except TimeoutError:
        raise ValueError(f"the split pattern {pattern!r} took over {seconds:.1f} s on a text of {len(text):,} "
                         f"characters ({text[:20]!r}...): catastrophic backtracking? Use a pattern with possessive "
                         f"quantifiers, such as 'gpt4'") from None
    if sum(map(len, chunks)) != len(text):
        dropped = "".join(sorted(set(chunk_re.sub("", text))))
        raise ValueError(f"the split pattern {pattern!r} does not cover the text: it drops {dropped[:20]!r}, which "
                         f"would vanish from the ids; every character must fall in some chunk (end it with "
                         f"|[\\s\\S] to catch the rest)")
    return chunks


def count_chunks(texts_or_paths, pattern="gpt4", special_tokens=(), progress=True):
    """Count the distinct chunks of a corpus (texts and/or files, as in iter_texts): pass 1 of training.
    Special tokens cut the text first and are not counted, so no chunk spans one.

    >>> count_chunks(["hello world<|x|>hello"], special_tokens=["<|x|>"], progress=False)
    Counter({'hello': 2, ' world': 1})
    """
    pattern = PATTERNS.get(pattern, pattern)
    chunk_re = check_pattern(pattern)
    special_re = _special_regex(special_tokens)
    counts = Counter()
    with progress_bar(progress, desc="count chunks", unit="B", unit_scale=True) as bar:
        for text in iter_texts(texts_or_paths, can_cut(special_tokens), bar):
            for part in special_re.split(text) if special_re else [text]:
                counts.update(split_chunks(chunk_re, join_surrogate_pairs(part), pattern))
    return counts


def merge(ids, pair, new_id):
    """Replace every occurrence of pair in ids by new_id, left to right, without overlaps.

    >>> merge([97, 97, 97, 98], (97, 97), 256)
    [256, 97, 98]
    """
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _inverted(b):
    """A key that sorts byte strings in reverse, so a min-heap pops the greatest first: each byte c becomes
    (1, 255 - c), and the end of the string (2,) sorts after any byte, so a prefix sorts after its
    extensions. subtle: just 255 - c fails on prefixes, since b"a" < b"ab" must become key(b"a") > key(b"ab").

    >>> sorted([b"a", b"ab", b"b", b""], key=_inverted)
    [b'b', b'ab', b'a', b'']
    """
    return bytes(x for c in b for x in (1, 255 - c)) + b"\x02"


def _inverted_concat(key_a, key_b):
    """_inverted(a + b) from _inverted(a) and _inverted(b): drop a's end marker.

    >>> _inverted_concat(_inverted(b"ab"), _inverted(b"c")) == _inverted(b"abc")
    True
    """
    return key_a[:-1] + key_b


def train_merges(chunk_counts, n_merges, progress=True):
    """Pass 2 of training: learn up to n_merges merges from {chunk (str or bytes): count}, merge i making
    token 256 + i. The pair with the highest count wins; a tie goes to the pair whose (left bytes, right
    bytes) compares greater, a rule that does not depend on ids, so merges compare across implementations.
    Stops early if no pair is left. Returns [(left id, right id), ...].

    Instead of recounting all pairs at each merge, keep: the count of every pair, the set of chunks each
    pair occurs in, and a heap of pairs by count. A merge then rewrites only the chunks that hold its pair
    and fixes the counts of the pairs in those chunks. The heap is lazy: an entry's count is only an upper
    bound, checked when popped. That works because counts only fall, except for pairs that contain the new
    token, which are born in that merge and pushed once it is done.

    Wikipedia's example, by hand: in "aaabdaaabac", (a, a) is the most frequent pair (4 times, overlaps
    included) -> 256 = "aa", giving [256, a, b, d, 256, a, b, a, c]; then (256, a) and (a, b) both occur
    twice, and b"aa" > b"a" so (256, a) wins -> 257 = "aaa"; then (257, b) -> 258 = "aaab".

    >>> train_merges({"aaabdaaabac": 1}, 3, progress=False)
    [(97, 97), (256, 97), (257, 98)]
    """
    words, counts = [], []  # each distinct chunk as a list of token ids, and how often it occurs
    for chunk, n in chunk_counts.items():
        ids = list(chunk if isinstance(chunk, bytes) else to_bytes(chunk))
        if len(ids) > 1:  # a one-byte chunk has no pair to merge
            words.append(ids)
            counts.append(n)
    keys = [_inverted(bytes([b])) for b in range(256)]  # heap tie-break key of each token's bytes
    # count pairs, once, and remember which chunks each pair occurs in
    stats, where = defaultdict(int), defaultdict(set)
    for i, (ids, n) in enumerate(zip(words, counts)):
        for pair in zip(ids, ids[1:]):
            stats[pair] += n
            where[pair].add(i)
    heap = [(-n, keys[a], keys[b], (a, b)) for (a, b), n in stats.items()]
    heapq.heapify(heap)
    merges = []
    bar = progress_bar(progress, total=n_merges, desc="merges", unit="merge")
    while len(merges) < n_merges and heap:
        # find the most frequent pair: pop until an entry's count is up to date
        neg_n, key_a, key_b, pair = heapq.heappop(heap)
        n = stats.get(pair, 0)
        if n != -neg_n:
            if n > 0:  # stale entry: put it back with its true count
                heapq.heappush(heap, (-n, key_a, key_b, pair))
            continue
        # mint a new token: its tie-break key is that of its bytes, b"aa" from b"a" + b"a"
        a, b = pair
        new_id = 256 + len(merges)
        merges.append(pair)
        keys.append(_inverted_concat(keys[a], keys[b]))
        # merge it in every chunk that holds it; where[pair] may name chunks that lost the pair since
        born = set()
        for i in where.pop(pair):
            ids, n = words[i], counts[i]
            new_ids = merge(ids, pair, new_id)
            if len(new_ids) == len(ids):
                continue
            # update pair counts: take out the chunk's old pairs, put in its new ones
            for p in zip(ids, ids[1:]):
                stats[p] -= n
            for p in zip(new_ids, new_ids[1:]):
                stats[p] += n
                if new_id in p:  # a pair born in this merge
                    where[p].add(i)
                    born.add(p)
            words[i] = new_ids
        del stats[pair]
        # push the pairs born in this merge, now that their counts are complete
        for p in born:
            heapq.heappush(heap, (-stats[p], keys[p[0]], keys[p[1]], p))
        bar.update()
    bar.close()
    return merges


def bpe(piece, ranks, splits=None):
    """Encode one chunk's bytes: repeatedly merge the adjacent pair whose concatenation has the lowest rank
    (the leftmost on a tie) until no pair's concatenation is in ranks; returns the parts (bytes). For a
    tokenizer trained here rank = token id, and that is exactly replaying the merges in order. A heap of
    candidate pairs over a linked list of parts makes it O(n log n): a long chunk (a run of spaces, base64)
    stays fast, where rescanning all pairs per merge is quadratic.

    splits: {token bytes: length of the left part of the merge that makes it}. With it, two parts merge only
    if they are that merge's pair, (t[:n], t[n:]), not just any two parts that spell a token t: Hugging
    Face's rule (a merge is a pair of tokens). tiktoken's rule (any two parts) gives the same ids on a
    vocabulary trained by BPE; a vocabulary from elsewhere (tokenizer.json, GGUF) need not be one.

    >>> ranks = {b"ab": 256, b"abc": 257}
    >>> bpe(b"abcab", ranks)
    [b'abc', b'ab']
    >>> bpe(b"abc", {b"bc": 0, b"abc": 1}, splits={b"bc": 1, b"abc": 2})    # abc = (ab, c), not (a, bc)
    [b'a', b'bc']
    """
    get, n = ranks.get, len(piece)
    parts = [piece[i : i + 1] for i in range(n)]
    nxt = list(range(1, n + 1))  # linked list over the parts still alive: next and previous index
    prv = list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := get(piece[i : i + 2])) is not None]  # 1 + 1 byte: any split fits
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        j = nxt[i]
        # subtle: entries go stale as parts merge; one is valid iff the pair at i still has rank r
        if j >= n or parts[i] is None or get(parts[i] + parts[j]) != r:
            continue
        # merge part j into part i, unlink j
        parts[i] = merged = parts[i] + parts[j]
        parts[j] = None
        k = nxt[i] = nxt[j]
        # the merged part makes new pairs with its neighbours (with splits: only the pairs a merge joins)
        if k < n:
            prv[k] = i
            t = merged + parts[k]
            if (r := get(t)) is not None and (splits is None or splits[t] == len(merged)):
                heapq.heappush(heap, (r, i))
        if (h := prv[i]) >= 0:
            t = parts[h] + merged
            if (r := get(t)) is not None and (splits is None or splits[t] == len(parts[h])):
                heapq.heappush(heap, (r, h))
    return [p for p in parts if p is not None]


def _ints(text, count, fail):
    """Parse exactly count space-separated non-negative ints, or fail().

    >>> _ints("3 4", 2, print)
    [3, 4]
    """
    fields = text.split(" ")
    if len(fields) != count or not all(f.isdigit() and f.isascii() for f in fields):
        fail(f"{count} non-negative integer(s)")
    return [int(f) for f in fields]


# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A byte-level BPE tokenizer: a split pattern, byte tokens, merges, and special tokens.

    Token ids: byte_ids[b] for byte b (b itself when trained here), 256 + i for merge i, then the special
    tokens. Build one with train or load (or lib/tokenizer_files.py's readers of other tools' files); the
    constructor only checks that no two tokens have the same bytes and that the special tokens take the
    ids after the merges.

    Vocabularies made elsewhere (tokenizer.json, GGUF: lib/tokenizer_files.py) may lay their ids
    out otherwise: merge_ids[i] is the id merge i makes, special tokens may come first (SmolLM2's ids
    0..16), and a byte may have no token at all (byte_ids[b] None; SmolLM2 lacks 21 bytes that never occur
    in UTF-8 text): such a byte is dropped when encoding, as Hugging Face tokenizers and llama.cpp drop it.
    Every id from 0 to vocab_size - 1 is a byte, a merge or a special token, exactly once.
    ignore_merges: a chunk that is a whole token maps to it directly (tiktoken, and Hugging Face's
    ignore_merges = true); False runs the merges on every chunk (Hugging Face's default).
    """

    def __init__(self, pattern, merges, special_tokens=None, byte_ids=None, merge_ids=None, ignore_merges=True):
        self.pattern = PATTERNS.get(pattern, pattern)  # the split regex itself, not its name
        self.merges = [tuple(m) for m in merges]  # merge i, in rank order: (left id, right id)
        self.byte_ids = list(range(256)) if byte_ids is None else list(byte_ids)  # byte b -> its id, or None
        n_bytes = sum(i is not None for i in self.byte_ids)
        standard = merge_ids is None  # merge i makes n_bytes + i (256 + i when trained here)
        self.merge_ids = list(range(n_bytes, n_bytes + len(self.merges))) if standard else list(merge_ids)
        self.special_tokens = dict(special_tokens or {})  # str -> id
        self.ignore_merges = bool(ignore_merges)
        n = n_bytes + len(self.merges)  # ordinary tokens
        size = n + len(self.special_tokens)
        if len(self.merge_ids) != len(self.merges):
            raise ValueError(f"{len(self.merge_ids)} merge ids for {len(self.merges)} merges")
        if standard and sorted(self.special_tokens.values()) != list(range(n, size)):
            raise ValueError(f"special token ids must be {n}, {n + 1}, ... (after the merges)")
        owners = [i for i in self.byte_ids if i is not None] + self.merge_ids + list(self.special_tokens.values())
        if sorted(owners) != list(range(size)):
            raise ValueError(f"the bytes, merges and special tokens must have the ids 0 .. {size - 1}, each once")
        # every token's bytes, by id
        vocab = [None] * size
        for b, i in enumerate(self.byte_ids):
            if i is not None:
                vocab[i] = bytes([b])
        for k, ((a, b), i) in enumerate(zip(self.merges, self.merge_ids)):
            if not (0 <= a < size and 0 <= b < size and vocab[a] is not None and vocab[b] is not None):
                raise ValueError(f"merge {k} joins ids {a} and {b}, which no byte or earlier merge makes")
            vocab[i] = vocab[a] + vocab[b]
        # ranks, the inverse: bytes -> id. subtle: it must be one-to-one (tiktoken requires it); training
        # here cannot make the same bytes twice (see train), but a hand-made file could
        self._ranks = {}
        for i, t in enumerate(vocab):
            if t is not None and self._ranks.setdefault(t, i) != i:
                raise ValueError(f"token {i} is {t!r}, which token {self._ranks[t]} already is")
        # for the merge loop (bpe): the rank of the merge making each token's bytes, and its left part's length
        self._merge_ranks = {vocab[i]: k for k, i in enumerate(self.merge_ids)}
        self._splits = {vocab[i]: len(vocab[a]) for (a, _), i in zip(self.merges, self.merge_ids)}
        self._all_bytes = n_bytes == 256
        self._missing = bytes(b for b, i in enumerate(self.byte_ids) if i is None)   # bytes with no token
        self._decoder = vocab  # id -> bytes, specials included
        for s, i in self.special_tokens.items():
            self._decoder[i] = s.encode("utf-8")
        self._chunk_re = check_pattern(self.pattern)  # a pattern that drops text or hangs: ValueError
        self._special_res = {}  # frozenset of special tokens -> regex finding them
        self._cache = {}  # chunk -> its ids

    @property
    def standard_layout(self):
        """Ids laid out as training here lays them out (bytes, then merges in order, then the special
        tokens), with the whole-token shortcut: the tokenizer file's version 1 holds exactly these."""
        n = sum(i is not None for i in self.byte_ids)
        return (n == 256 and self.ignore_merges and self.merge_ids == list(range(256, 256 + len(self.merges)))
                and sorted(self.special_tokens.values()) == list(range(256 + len(self.merges), self.vocab_size)))

    def __repr__(self):
        name = next((k for k, v in PATTERNS.items() if v == self.pattern), "custom")
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={name!r}, special_tokens={list(self.special_tokens)})"

    @property
    def vocab_size(self):
        """Number of token ids: bytes (256 when trained here) + merges + special tokens."""
        return len(self._decoder)

    @property
    def dtype(self):
        """The smallest NumPy dtype that holds every id: uint16 up to 65536 tokens, else uint32."""
        return id_dtype(self.vocab_size)

    # how lib/data.py reads files for this tokenizer (read_text_blocks): exact bytes (invalid UTF-8 kept as
    # surrogates, encoded back to the same bytes), and blocks cut only where the chunks are unchanged
    file_errors = "surrogateescape"

    def cut(self, text, start=0):
        """Where a long text may be cut so that encoding both parts gives the ids of the whole (safe_cut),
        0 if nowhere; never inside a special token that holds whitespace."""
        return safe_cut(text, start) if can_cut(self.special_tokens) else 0

    # -- training ------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts_or_paths, vocab_size, pattern="gpt4", special_tokens=None, progress=True, verbose=None):
        """Train on texts and/or files (see iter_texts: Path objects and str naming an existing file are
        files, other str are texts; a single one may be passed alone). vocab_size counts the 256 bytes,
        the merges and the special tokens, which get the last ids. pattern: "gpt4", "gpt2" or a regex.
        Special tokens cut the text before chunking: no chunk, hence no merge, spans one. A corpus that
        runs out of pairs stops early with a warning. verbose: another name for progress (tqdm bars).

        Why two merges never make the same bytes (tiktoken needs bytes -> id one-to-one): while a span of a
        chunk is covered by whole tokens, no merge has crossed its edges, so the merges inside it are
        exactly those its bytes alone would go through. If merge r made bytes t, then t alone is one token
        after merge r; so a span spelling t is one token after merge r too, and no later pair can spell t.
        The constructor checks it anyway.
        """
        progress = progress if verbose is None else verbose
        special_tokens = list(special_tokens or [])
        if len(set(special_tokens)) < len(special_tokens) or not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError(f"special tokens must be distinct non-empty strings, got {special_tokens!r}")
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 256 + len(special_tokens):
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small: it needs at least 256 (the bytes)"
                f" + {len(special_tokens)} (special tokens) = {256 + len(special_tokens)}"
            )
        pattern = PATTERNS.get(pattern, pattern)
        check_pattern(pattern)  # invalid, partial or catastrophically slow: refused before any counting
        counts = count_chunks(texts_or_paths, pattern, special_tokens, progress)
        if not counts:
            raise ValueError("empty corpus: there is no text to train on")
        n_merges = int(vocab_size) - 256 - len(special_tokens)
        merges = train_merges(counts, n_merges, progress)
        if len(merges) < n_merges:
            warnings.warn(f"the corpus ran out of pairs after {len(merges)} of {n_merges} merges")
        specials = {s: 256 + len(merges) + k for k, s in enumerate(special_tokens)}
        return cls(pattern, merges, specials)

    # -- encoding ------------------------------------------------------------------------------------

    def _encode_chunk(self, chunk):
        """One chunk's ids; a chunk that is a whole token (most English words) skips the merge loop, unless
        ignore_merges is off. A byte with no token (only in a vocabulary made elsewhere) is dropped before
        the merges, as Hugging Face drops it: its neighbours then merge as if adjacent."""
        piece = to_bytes(chunk)
        if self.ignore_merges and (i := self._ranks.get(piece)) is not None:
            return [i]
        if not self._all_bytes:
            piece = piece.translate(None, self._missing)
        return list(map(self._ranks.__getitem__, bpe(piece, self._merge_ranks, self._splits)))

    def encode_ordinary(self, text):
        """Encode text with no special tokens: a special token's text is encoded as ordinary text.

        >>> Tokenizer("gpt4", [(104, 105)]).encode_ordinary("hi hi")
        [256, 32, 256]
        """
        chunks = split_chunks(self._chunk_re, join_surrogate_pairs(text), self.pattern)
        cache = self._cache
        if len(cache) > MAX_CACHE:
            cache.clear()
        # encode each new distinct chunk once, then look every chunk up (the loop runs in C)
        for chunk in set(chunks).difference(cache):
            cache[chunk] = self._encode_chunk(chunk)
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    def encode_bytes(self, data):
        """Encode arbitrary bytes as ordinary text, exactly: decode_bytes(encode_bytes(b)) == b.

        >>> tok = Tokenizer("gpt4", []); tok.encode_bytes(b"a\\xff")
        [97, 255]
        """
        return self.encode_ordinary(data.decode("utf-8", "surrogateescape"))

    def _find_specials(self, names):
        """Cached regex finding the special tokens in names."""
        if names not in self._special_res:
            self._special_res[names] = _special_regex(names)
        return self._special_res[names]

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Encode text with tiktoken's rules for special tokens: allowed_special ("all" or a set) become
        their ids; any of disallowed_special ("all" = every special token not allowed; () = none) in the
        text raises ValueError; the rest are encoded as ordinary text.

        >>> tok = Tokenizer("gpt4", [], {"<|eot|>": 256})
        >>> tok.encode("a<|eot|>", allowed_special="all")
        [97, 256]
        >>> tok.encode("a<|eot|>", disallowed_special=())
        [97, 60, 124, 101, 111, 116, 124, 62]
        """
        names = set(self.special_tokens)
        allowed = names if allowed_special == "all" else set(allowed_special)
        if unknown := allowed - names:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {sorted(names)}")
        disallowed = names - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (m := self._find_specials(frozenset(disallowed)).search(text)):
            raise ValueError(
                f"the text contains the special token {m.group()!r}: pass allowed_special={{{m.group()!r}}}"
                " (or 'all') to encode it as that token, or disallowed_special=() to encode it as text"
            )
        if not allowed:
            return self.encode_ordinary(text)
        # cut at the allowed special tokens, encode the text between them
        ids, start = [], 0
        for m in self._find_specials(frozenset(allowed)).finditer(text):
            ids += self.encode_ordinary(text[start : m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_batch(self, texts, allowed_special=frozenset(), disallowed_special="all", progress=False):
        """Encode a list of texts to a list of id lists (as tiktoken's encode_batch does). For one array:
        np.array([i for ids in out for i in ids], dtype=tok.dtype)."""
        return [self.encode(t, allowed_special, disallowed_special) for t in tqdm(texts, disable=not progress)]

    def iter_encode_file(self, path, allowed_special=frozenset(), disallowed_special="all", progress=True,
                         block_size=1 << 22):
        """Stream a file's ids as NumPy arrays (dtype self.dtype), one per block of about block_size bytes
        cut where chunking is unchanged (see safe_cut), so a big file is never held whole, nor twice:
        concatenated, the blocks' ids equal encode(whole text)."""
        with progress_bar(progress, total=os.path.getsize(path) if os.path.isfile(path) else None, desc="encode",
                          unit="B", unit_scale=True) as bar:
            for text, nbytes in read_text_blocks(path, block_size, self.cut):
                yield np.array(self.encode(text, allowed_special, disallowed_special), dtype=self.dtype)
                bar.update(nbytes)

    def encode_file(self, path, allowed_special=frozenset(), disallowed_special="all", progress=True):
        """A whole file's ids as one NumPy array of dtype self.dtype (uint16 up to 65536 tokens)."""
        blocks = list(self.iter_encode_file(path, allowed_special, disallowed_special, progress))
        return np.concatenate(blocks) if blocks else np.zeros(0, self.dtype)

    # -- decoding ------------------------------------------------------------------------------------

    def decode_bytes(self, ids):
        """The exact bytes of a sequence of ids (a list or a NumPy array).

        >>> Tokenizer("gpt4", [(104, 105)]).decode_bytes([256, 33, 255])
        b'hi!\\xff'
        """
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)  # Python ints index a list fastest
        try:
            if not ids or min(ids) >= 0:  # subtle: a negative index would silently count from the end
                return b"".join(map(self._decoder.__getitem__, ids))
        except (IndexError, TypeError):
            pass
        bad = next(i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < self.vocab_size))
        raise ValueError(f"token id {bad!r} is not in this tokenizer's vocabulary (size {self.vocab_size})")

    def decode(self, ids):
        """Decode ids to str; bytes that are not valid UTF-8 (a multi-byte character cut between tokens)
        become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self):
        """Every token's bytes, by id (a special token's: its text in UTF-8), as a new list: what the
        formats of other tools spell out (lib/tokenizer_files.py).

        >>> Tokenizer("gpt4", [(104, 105)], {"<|eot|>": 257}).token_bytes()[255:]
        [b'\\xff', b'hi', b'<|eot|>']
        """
        return list(self._decoder)

    # -- files ---------------------------------------------------------------------------------------

    kind = "bpe"  # the "kind" of a checkpoint's tokenizer entry (lib/tokenizer.CharTokenizer's is "char")

    def to_text(self):
        """The tokenizer file's content (format in the module docstring), as a str: what save writes and
        what every checkpoint embeds."""
        if not self.standard_layout:
            return self._to_text_v2()
        lines = [FORMAT, f"pattern {json.dumps(self.pattern)}", "bytes " + " ".join(map(str, self.byte_ids))]
        lines.append(f"specials {len(self.special_tokens)}")
        lines += [f"{i} {json.dumps(s)}" for s, i in self.special_tokens.items()]
        lines.append(f"merges {len(self.merges)}")
        lines += [f"{a} {b}" for a, b in self.merges]
        return "\n".join(lines) + "\n"

    def _to_text_v2(self):
        """Version 2 of the file, for ids laid out as another library lays them out."""
        lines = [FORMAT_V2, f"pattern {json.dumps(self.pattern)}",
                 "bytes " + " ".join("-" if i is None else str(i) for i in self.byte_ids),
                 f"ignore_merges {str(self.ignore_merges).lower()}", f"specials {len(self.special_tokens)}"]
        lines += [f"{i} {json.dumps(s)}" for s, i in self.special_tokens.items()]
        lines.append(f"merges {len(self.merges)}")
        lines += [f"{a} {b} {i}" for (a, b), i in zip(self.merges, self.merge_ids)]
        return "\n".join(lines) + "\n"

    def save(self, path):
        """Write the tokenizer file (to_text)."""
        Path(path).write_text(self.to_text(), encoding="ascii", newline="\n")

    @classmethod
    def load(cls, path):
        """Read a tokenizer file written by save; a malformed one raises FileFormatError (a ValueError)
        naming the line."""
        return cls.from_text(read_text(path), path)

    @classmethod
    def from_text(cls, text, path="<text>"):
        """The inverse of to_text; path names the text's source in error messages."""
        lines = text.splitlines()
        n = 0  # number of the line being read

        def fail(expected):
            raise FileFormatError(f"{path}, line {n}: expected {expected}, got {lines[n - 1][:100]!r}")

        def take(key=None):
            """The next line; with a key, the rest of a line that must start with that key and a space."""
            nonlocal n
            n += 1
            if n > len(lines):
                raise FileFormatError(f"{path}: the file ends at line {n - 1}, expected more")
            if key is not None and not lines[n - 1].startswith(key + " "):
                fail(f"a line starting with {key!r}")
            return lines[n - 1][len(key) + 1 :] if key is not None else lines[n - 1]

        if lines[:1] == [FORMAT_V2]:
            return cls._from_text_v2(lines, path)
        if take() != FORMAT:
            fail(f"the header {FORMAT!r} (is this a tokenizer file, and of this version?)")
        try:
            pattern = json.loads(take("pattern"))
            regex.compile(pattern)
        except (ValueError, TypeError, regex.error):
            fail("pattern followed by a JSON-quoted valid regex")
        byte_ids = _ints(take("bytes"), 256, fail)
        if sorted(byte_ids) != list(range(256)):
            fail("the ids 0..255 of the 256 bytes, each once")
        specials = {}
        for _ in range(_ints(take("specials"), 1, fail)[0]):
            i, _sep, name = take().partition(" ")
            try:
                name = json.loads(name)
            except ValueError:
                fail('<id> "<special token>"')
            if not isinstance(name, str) or not name or name in specials:
                fail("a non-empty special token string, each once")
            specials[name] = _ints(i, 1, fail)[0]
        merges = []
        for k in range(_ints(take("merges"), 1, fail)[0]):
            a, b = _ints(take(), 2, fail)
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                fail(f"two ids of earlier tokens (< {256 + k}) for merge {k}")
            merges.append((a, b))
        if n < len(lines):
            n += 1
            fail("the end of the file")
        try:
            return cls(pattern, merges, specials, byte_ids)
        except ValueError as e:
            raise FileFormatError(f"{path}: {e}") from None

    @classmethod
    def _from_text_v2(cls, lines, path):
        """Version 2 of the file (from_text reads version 1); the constructor checks the ids add up."""
        it = iter(enumerate(lines, 1))

        def take(key, fields=None):
            """The next line, which must be `key` and then `fields` space-separated fields (any number if
            None); returns the fields as a list."""
            n, line = next(it, (len(lines) + 1, None))
            if line is None:
                raise FileFormatError(f"{path}: the file ends at line {n - 1}, expected more")
            head, _, rest = line.partition(" ")
            got = rest.split(" ") if rest else []
            if (key is not None and head != key) or (fields is not None and len(got) != fields):
                raise FileFormatError(f"{path}, line {n}: expected {key or 'a'} line of {fields or 'some'} "
                                      f"fields, got {line[:100]!r}")
            return [head] + got if key is None else got

        def num(f):
            if not (f.isdigit() and f.isascii()):
                raise FileFormatError(f"{path}: expected a non-negative integer, got {f[:30]!r}")
            return int(f)

        next(it)                                                  # the header
        try:
            pattern = json.loads(" ".join(take("pattern")))
            regex.compile(pattern)
        except (ValueError, TypeError, regex.error):
            raise FileFormatError(f"{path}, line 2: expected pattern followed by a JSON-quoted valid regex") from None
        byte_ids = [None if f == "-" else num(f) for f in take("bytes", 256)]
        flag = take("ignore_merges", 1)[0]
        if flag not in ("true", "false"):
            raise FileFormatError(f"{path}: ignore_merges must be true or false, got {flag!r}")
        specials = {}
        for _ in range(num(take("specials", 1)[0])):
            i, *name = take(None)
            try:
                name = json.loads(" ".join(name))
            except ValueError:
                name = None
            if not isinstance(name, str) or not name or name in specials:
                raise FileFormatError(f'{path}: expected <id> "<special token>", a non-empty string, each once')
            specials[name] = num(i)
        rows = [take(None) for _ in range(num(take("merges", 1)[0]))]
        if any(len(r) != 3 for r in rows):
            raise FileFormatError(f"{path}: expected merge lines <left id> <right id> <id>")
        if next(it, None) is not None:
            raise FileFormatError(f"{path}: expected the end of the file after the merges")
        try:
            return cls(pattern, [(num(a), num(b)) for a, b, _ in rows], specials, byte_ids,
                       [num(i) for _, _, i in rows], flag == "true")
        except ValueError as e:
            raise FileFormatError(f"{path}: {e}") from None


# -----------------------------------------------------------------------------
# command line

EPILOG = """examples:
  python bpe.py train --input ../shared/data/gutenberg_mix.txt --vocab-size 32768 --out tok.bpe
  python bpe.py train --input a.txt b.txt --vocab-size 4096 --pattern gpt2 --special "<|endoftext|>" --out tok.bpe
  python bpe.py encode --tokenizer tok.bpe --input book.txt --out book.bin
  python bpe.py encode --gpt2-dir ../shared/data/gpt2 --text "Hello world"      # prints 15496 995
  python bpe.py decode --tokenizer tok.bpe --input book.bin > book_again.txt

A .bin file is the raw ids in native byte order, uint16 when the vocabulary has at most 65536 tokens,
else uint32 (np.fromfile(path, dtype=np.uint16)); nothing else, like nanoGPT's train.bin.
"""


def _load_for_cli(args):
    """The tokenizer named by --tokenizer or --gpt2-dir."""
    if args.gpt2_dir:
        # imported here, not at the top: the library (lib/) builds on this file, never the other way round,
        # and only this command line reads another tool's files
        from lib.tokenizer_files import from_gpt2_files
        return from_gpt2_files(Path(args.gpt2_dir) / "encoder.json", Path(args.gpt2_dir) / "vocab.bpe")
    return Tokenizer.load(args.tokenizer)


def parse_args(argv):
    """The command line -> args; a bad one raises UserError (run_main: `error: ...`, exit status 2)."""
    parser = ArgumentParser(
        prog="bpe.py",
        description="Byte-level BPE tokenizer (GPT-2/GPT-4 style): train one on text files, "
        "encode files to token ids, decode ids back to text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,encode,decode}")
    p = sub.add_parser("train", help="train a tokenizer on text files", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a byte-level BPE tokenizer on UTF-8 text files and save it.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="training text files")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="tokens in all: 256 bytes + merges + special tokens")
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the tokenizer file")
    p.add_argument("--pattern", default="gpt4", choices=sorted(PATTERNS), help="split regex (default: gpt4)")
    p.add_argument("--special", nargs="*", default=[], metavar="TOKEN", help="special tokens, e.g. '<|endoftext|>'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, help_, desc in [
        ("encode", "encode a file or a text to token ids",
         "Encode a text file to a .bin of token ids (--out), or print the ids of --text or --input."),
        ("decode", "decode a .bin of token ids to text",
         "Decode a .bin of token ids and write the text's bytes to stdout."),
    ]:
        p = sub.add_parser(name, help=help_, description=desc, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--tokenizer", metavar="PATH", help="a tokenizer file written by train")
        which.add_argument("--gpt2-dir", metavar="DIR", help="a folder with GPT-2's encoder.json and vocab.bpe")
        if name == "encode":
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--input", metavar="FILE", help="text file to encode")
            src.add_argument("--text", help="text to encode (ids go to stdout)")
            p.add_argument("--out", metavar="FILE.bin", help="write the ids here instead of printing them")
            p.add_argument("--allow-special", action="store_true",
                           help="encode special tokens in the text as their ids (without it, a special "
                                "token in the text is an error)")
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        else:
            p.add_argument("--input", required=True, metavar="FILE.bin", help="ids written by encode --out")
    return parser.parse_args(argv)


def run(args):
    """Train, encode or decode; a failure raises UserError (run_main: `error: ...`, exit status 1)."""
    try:
        if args.command == "train":
            inputs = [Path(f) for f in args.input]
            for f in inputs:  # before any progress bar starts
                if not f.is_file():
                    raise ValueError(f"cannot read {str(f)!r}: " + ("a folder (name its files)" if f.is_dir() else "no such file"))
            tok = Tokenizer.train(inputs, args.vocab_size, args.pattern, args.special, progress=not args.quiet)
            tok.save(args.out)
            print(f"wrote {args.out}: {tok!r}", file=sys.stderr)
        elif args.command == "encode":
            tok = _load_for_cli(args)
            allowed = "all" if args.allow_special else frozenset()
            if args.text is not None:
                ids = np.array(tok.encode(args.text, allowed), dtype=tok.dtype)
                blocks = [ids]
            else:
                blocks = tok.iter_encode_file(args.input, allowed, progress=not args.quiet)
            if args.out:
                count = 0
                with open(args.out, "wb") as f:
                    for ids in blocks:
                        ids.tofile(f)
                        count += len(ids)
                print(f"wrote {count} ids ({np.dtype(tok.dtype).name}) to {args.out}", file=sys.stderr)
            else:
                for ids in blocks:
                    print(" ".join(map(str, ids.tolist())))
        else:
            tok = _load_for_cli(args)
            try:
                size = os.path.getsize(args.input)
                if size % np.dtype(tok.dtype).itemsize:
                    raise ValueError(f"{args.input!r} holds {size} bytes, not a whole number of "
                                     f"{np.dtype(tok.dtype).name} ids: not a .bin of this tokenizer?")
                ids = np.fromfile(args.input, dtype=tok.dtype)
            except OSError as e:
                raise ValueError(f"cannot read {args.input!r}: {e.strerror or e}") from None
            sys.stdout.buffer.write(tok.decode_bytes(ids))  # the exact bytes, whatever stdout's encoding
    except BrokenPipeError:
        raise                                   # output piped into `head`: run_main ends quietly
    except (ValueError, OSError) as e:          # this file's errors (UserError is a ValueError), a full disk
        msg = str(e)
        if args.command == "encode" and "allowed_special=" in msg:
            msg += "; on the command line: --allow-special"
        raise UserError(msg) from None


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, the same line and 1 for a failure
    (a missing or malformed file, a special token not allowed); 130 on Ctrl-C: errors.run_main's rules,
    as in every program here."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
