"""
lib/tokenizer.py: the tokenizers every program reads and writes, by kind: characters (CharTokenizer,
nanoGPT's shakespeare_char) or byte-level BPE (bpe.Tokenizer); how a tokenizer is rebuilt from the text
form that the data cache hashes and every checkpoint embeds, or loaded from a saved file; and the small
rules of encoding text and prompts. The formats of other tools (GPT-2's files, tiktoken, Hugging Face's
tokenizer.json, GGUF) are in lib/tokenizer_files.py.
"""

import json
from pathlib import Path

import numpy as np

import bpe
from errors import FileFormatError, UserError

EOT = "<|endoftext|>"                   # the BPE special token written between documents (files)


# ----------------------------------------------------------------------------------------------------
# Tokenizers: characters (nanoGPT's shakespeare_char, here) or byte-level BPE (bpe.Tokenizer). Both have
# vocab_size, dtype, encode_ordinary(text) -> ids, decode(ids) -> str, decode_bytes(ids) -> bytes,
# special_tokens, a `kind`, a text form (to_text / from_text) that the data cache hashes and every
# checkpoint embeds, and cut / file_errors, which say how read_text_blocks may feed them a file. Their
# Hugging Face tokenizer.json forms are in lib/tokenizer_files.py.


class CharTokenizer:
    """One id per character of the corpus, in code point order: "hello" -> vocab "ehlo", ids [1, 0, 2, 2, 3]."""

    kind = "char"
    special_tokens = {}
    file_errors = "replace"                     # invalid UTF-8 in a file becomes U+FFFD

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)   # sorted

    @property
    def dtype(self):
        return bpe.id_dtype(self.vocab_size)

    @staticmethod
    def cut(text, start=0):
        """Characters encode one by one: a text may be cut anywhere."""
        return len(text)

    def encode_ordinary(self, text):
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self.codepoints, cp)                   # binary search per character
        bad = (ids >= self.vocab_size) | (self.codepoints[np.minimum(ids, self.vocab_size - 1)] != cp)
        if bad.any():
            missing = sorted(set(chr(c) for c in cp[bad]))[:10]
            raise UserError(f"characters not in the char vocabulary: {''.join(missing)!r}")
        return ids

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def to_text(self):
        return json.dumps({"type": "char", "version": 1, "chars": self.chars}, ensure_ascii=False) + "\n"

    @classmethod
    def from_text(cls, text):
        try:
            return cls(json.loads(text)["chars"])
        except (ValueError, KeyError, TypeError) as e:
            raise FileFormatError(f"unreadable char tokenizer ({e})") from None


def tokenizer_from_text(kind, text):
    """Rebuild a tokenizer from its kind and text form (as the data cache and the checkpoints keep it)."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        return bpe.Tokenizer.from_text(text, "the bpe tokenizer")
    raise FileFormatError(f"unknown tokenizer kind {kind!r}")


def load_tokenizer_file(name):
    """A saved tokenizer: bpe.py's file, or a character vocabulary (CharTokenizer.to_text's JSON, as a
    fine-tuning run writes it to its out dir)."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"--tokenizer {name!r}: expected 'char', 'bpe' or a saved tokenizer file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not load the tokenizer {path}: {e}") from None
    try:
        kind = "char" if text.startswith("{") else "bpe"      # JSON; bpe.py's files start with their format line
        return tokenizer_from_text(kind, text)
    except UserError as e:
        raise FileFormatError(f"could not load the tokenizer {path}: {e}") from None


def eot_id(tok):
    return tok.special_tokens.get(EOT) if tok.special_tokens else None


def encode_text(tok, text):
    """Plain text -> ids (special-token strings in the text are treated as ordinary text)."""
    return np.asarray(tok.encode_ordinary(text), dtype=np.int64)


def encode_prompt(tok, prompt):
    """Prompt text -> ids; an empty prompt starts from <|endoftext|> (BPE) or a newline (or id 0 when a
    char vocabulary has no newline). The default prompt "\\n" falls back the same way; any other prompt
    that the tokenizer cannot encode is an error (UserError)."""
    if prompt:
        try:
            ids = encode_text(tok, prompt)
        except UserError:
            if prompt != "\n":
                raise
            ids = []
        if len(ids):
            return [int(i) for i in ids]
    eot = eot_id(tok)
    if eot is not None:
        return [eot]
    try:
        return [int(i) for i in encode_text(tok, "\n")]
    except UserError:
        return [0]


def token_byte_lengths(tok):
    """UTF-8 byte length of every token id, special tokens 0."""
    lengths = np.array([len(tok.decode_bytes([i])) for i in range(tok.vocab_size)], dtype=np.int64)
    for i in (tok.special_tokens or {}).values():
        lengths[i] = 0
    return lengths

