"""
lib/tokenizer_files.py: the tokenizer files of other tools, as functions that return (or take) our
tokenizers. bpe.py keeps the algorithm and its own file; every outside format is here, as minbpe keeps its
conversions out of its algorithm's file.

    tok = from_gpt2_files("encoder.json", "vocab.bpe")     # GPT-2's original files -> bpe.Tokenizer
    tok.encode("Hello world")                               # -> [15496, 995]
    tiktoken.Encoding("ours", pat_str=tok.pattern, mergeable_ranks=mergeable_ranks(tok),
                      special_tokens=tok.special_tokens)    # tiktoken
    obj = to_hf_json(tok); tok = from_hf_json(obj)          # Hugging Face's tokenizer.json (a dict), both ways
    save_hf_tokenizer_json(tok, "tokenizer.json")           # ... as a file, for tokenizers.Tokenizer.from_file
    tok = from_gguf_fields(fields)                          # llama.cpp's vocabulary in a GGUF file
    fields = to_gguf_fields(tok, n_vocab)                   # ... and back, for export.py --gguf

Each gives the same ids as the tokenizer it came from: tests/test_bpe.py, test_export.py and
test_pretrained.py compare them with tiktoken, Hugging Face tokenizers and transformers.

Byte-level vocabularies (GPT-2's files, tokenizer.json, GGUF) spell each token's bytes in GPT-2's printable
alphabet (bytes_to_unicode): " the" is "Ġthe". A character tokenizer (lib/tokenizer.CharTokenizer) has a
tokenizer.json form too: a WordLevel model over single characters.
"""

import json
from pathlib import Path

import regex

import bpe
from errors import FileFormatError, UserError
from lib.tokenizer import CharTokenizer

# A GGUF file names its pre-tokenizer (tokenizer.ggml.pre) instead of storing its regex: llama.cpp's names
# -> (split pattern, ignore_merges), as llama.cpp's llama-vocab.cpp sets them (ignore_merges only for
# Llama 3). tests/test_pretrained.py checks each against the pre-tokenizer of Hugging Face tokenizers.
PRE_PATTERNS = {
    "gpt-2": (bpe.GPT2_PATTERN, False),
    **{name: (bpe.SMOLLM_PATTERN, False) for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: (bpe.LLAMA3_PATTERN, True) for name in ("llama-bpe", "llama3", "llama-v3")},
    "qwen2": (bpe.QWEN2_PATTERN, False),
}
# Export (to_gguf_fields): our split pattern -> the name llama.cpp knows it by. GPT-4's pattern (bpe.py's
# default) is Llama 3's (tiktoken's cl100k) but for one alternative, \s++$: whitespace at the very end of a
# text that holds a newline then spaces ("a\n  ") is one chunk here and two ("\n", "  ") in llama.cpp. A
# model trained here hardly ever ends a prompt that way; every other text splits the same.
GGUF_PRE_NAMES = {bpe.GPT2_PATTERN: "gpt-2", bpe.SMOLLM_PATTERN: "smollm", bpe.LLAMA3_PATTERN: "llama-bpe",
                  bpe.GPT4_PATTERN: "llama-bpe", bpe.QWEN2_PATTERN: "qwen2"}
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 1, 3, 4, 5    # tokenizer.ggml.token_type values
ANY_CHAR = r"[\s\S]"             # the split regex of a character tokenizer.json: every code point alone


# ----------------------------------------------------------------------------------------------------
# GPT-2's byte alphabet, and its original files (encoder.json + vocab.bpe)

def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, the alphabet of encoder.json, vocab.bpe and
    Hugging Face's byte-level vocabularies: printable Latin-1 bytes map to themselves, the other 68
    (controls, space, ...) to chr(256), chr(257), ... in byte order.

    >>> b2u = bytes_to_unicode()
    >>> b2u[ord("A")], b2u[ord(" ")], b2u[ord("\\n")], len(set(b2u.values()))
    ('A', 'Ġ', 'Ċ', 256)
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def from_gpt2_files(encoder_json, vocab_bpe):
    """GPT-2's original tokenizer from encoder.json (token string -> id) and vocab.bpe (merges in rank
    order), both spelled in bytes_to_unicode's alphabet. Its byte ids are not byte-ordered ("!" is 0,
    " " is 220), so they come from encoder.json; merge i must make id 256 + i, as in GPT-2's files;
    ids after the merges (<|endoftext|> = 50256) are special tokens. Pattern: GPT-2's."""
    try:
        encoder = json.loads(bpe.read_text(encoder_json))
        b2u = bytes_to_unicode()
        byte_ids = [encoder[b2u[b]] for b in range(256)]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{encoder_json}: not a GPT-2 encoder.json ({e})") from None
    if sorted(byte_ids) != list(range(256)):
        raise ValueError(f"{encoder_json}: the 256 single bytes must have the ids 0..255")
    merges = []
    for n, line in enumerate(bpe.read_text(vocab_bpe).splitlines(), 1):
        if line.startswith("#version") or not line:
            continue
        a, _, b = line.partition(" ")
        if encoder.get(a + b) != 256 + len(merges) or a not in encoder or b not in encoder:
            raise ValueError(
                f"{vocab_bpe}, line {n}: expected a merge of two tokens of {encoder_json} whose result"
                f" has id {256 + len(merges)}, got {line[:100]!r}"
            )
        merges.append((encoder[a], encoder[b]))
    specials = {s: i for s, i in encoder.items() if i >= 256 + len(merges)}
    return bpe.Tokenizer(bpe.GPT2_PATTERN, merges, specials, byte_ids)


# ----------------------------------------------------------------------------------------------------
# tiktoken

def mergeable_ranks(tok):
    """tiktoken's mergeable_ranks of a bpe.Tokenizer: every non-special token's bytes -> its id (= its
    rank). So tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=mergeable_ranks(tok),
    special_tokens=tok.special_tokens) encodes exactly as tok does."""
    special_ids = set(tok.special_tokens.values())
    return {t: i for i, t in enumerate(tok.token_bytes()) if i not in special_ids}


# ----------------------------------------------------------------------------------------------------
# Hugging Face's tokenizer.json: a byte-level BPE (bpe.Tokenizer) or a WordLevel over characters
# (CharTokenizer), both ways

def to_hf_json(tok):
    """tokenizer.json (a dict) that Hugging Face tokenizers encodes exactly as tok: a bpe.Tokenizer or a
    CharTokenizer (lib/tokenizer.py), by its kind."""
    return _char_to_hf_json(tok) if tok.kind == "char" else _bpe_to_hf_json(tok)


def from_hf_json(obj, name="tokenizer.json"):
    """tokenizer.json (the parsed JSON) -> a bpe.Tokenizer (byte-level BPE) or a CharTokenizer (WordLevel);
    the inverse of to_hf_json. Anything else, a field of the wrong JSON type included, raises
    FileFormatError naming the field; name: the file, for the messages."""
    check_hf_json_types(obj, name)
    if obj["model"].get("type") == "WordLevel":
        return _char_from_hf_json(obj, name)
    return _bpe_from_hf_json(obj, name)


def preview(value, n=60):
    """A JSON value, shortened for a message: [1, 2, 3] -> '[1, 2, 3]'."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def is_id(v):
    """A token id as JSON holds one: a non-negative integer (not a boolean)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_hf_json_types(obj, name="tokenizer.json"):
    """FileFormatError naming the field unless each part of tokenizer.json that the readers below use has
    its JSON type: an object at the top, model an object, model.vocab {token: id}, model.merges strings or
    pairs of strings, added_tokens [{id, content}], the pre-tokenizer and decoder objects, flags booleans.
    (Without it, a list where an object belongs would be a traceback, and "false" a true flag.)"""
    def expect(field, value, ok, what):
        if not ok:
            raise FileFormatError(f"{name}: {field} must be {what}, got {preview(value)}")

    expect("the whole file", obj, isinstance(obj, dict), "a JSON object")
    model = obj.get("model")
    expect("model", model, isinstance(model, dict), "an object")
    vocab = model.get("vocab", {})
    expect("model.vocab", vocab, isinstance(vocab, dict) and all(map(is_id, vocab.values())),
           "an object of token ids {token: id}")
    merges = model.get("merges", [])
    expect("model.merges", merges, isinstance(merges, list) and all(
        isinstance(m, str) or (isinstance(m, list) and all(isinstance(x, str) for x in m)) for m in merges),
        'a list of "left right" strings or [left, right] pairs')
    added = obj.get("added_tokens", [])
    expect("added_tokens", added, isinstance(added, list) and all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and is_id(t.get("id")) for t in added),
        "a list of {id, content} objects")
    for t in added:
        expect(f"added_tokens (id {t['id']}) special", t.get("special"), isinstance(t.get("special", False), bool),
               "true or false")
        expect(f"added_tokens (id {t['id']}) content", t["content"], t["content"] != "", "a non-empty string")
    for f in ("pre_tokenizer", "decoder"):
        expect(f, obj.get(f), obj.get(f) is None or isinstance(obj.get(f), dict), "an object or null")
    pre = obj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [])
    expect("pre_tokenizer.pretokenizers", steps, isinstance(steps, list) and all(isinstance(x, dict) for x in steps),
           "a list of objects")
    for where, part in [("model", model), ("pre_tokenizer", pre)] + [(f"pre_tokenizer.pretokenizers[{i}]", x)
                                                                    for i, x in enumerate(steps)]:
        for flag in ("ignore_merges", "byte_fallback", "fuse_unk", "add_prefix_space", "use_regex", "trim_offsets",
                     "invert", "individual_digits"):
            if flag in part:
                expect(f"{where}.{flag}", part[flag], isinstance(part[flag], bool), "true or false")
    for where, part in [("pre_tokenizer", pre)] + [(f"pre_tokenizer.pretokenizers[{i}]", x) for i, x in enumerate(steps)]:
        if "pattern" in part:
            pat = part["pattern"]
            expect(f"{where}.pattern", pat, isinstance(pat, dict) and all(isinstance(v, str) for v in pat.values()),
                   'an object {"Regex": "..."}')


def save_hf_tokenizer_json(tok, path):
    """Write to_hf_json(tok) to path, for tokenizers.Tokenizer.from_file(path)."""
    Path(path).write_text(json.dumps(to_hf_json(tok), ensure_ascii=False), encoding="utf-8")


def _bpe_to_hf_json(tok):
    """A byte-level BPE tokenizer.json: a BPE model over byte-level strings (bytes_to_unicode), split by the
    same regex ("Isolated": each match is a piece), then ByteLevel without its own regex; special tokens
    are added tokens. ignore_merges=True makes a chunk that is a whole token map to it directly, as tiktoken
    and bpe.Tokenizer do (for a tokenizer trained here the merges reach it anyway)."""
    b2u = bytes_to_unicode()
    spell = lambda t: "".join(b2u[b] for b in t)  # noqa: E731
    special_ids = set(tok.special_tokens.values())
    token_bytes = tok.token_bytes()
    pattern = hf_split_regex(tok.pattern)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": tok.ignore_merges,
            # the special tokens too, under their own text: Hugging Face keeps an added token's id only
            # if its model's vocabulary has it (else it appends the token after the vocabulary)
            "vocab": {t.decode() if i in special_ids else spell(t): i for i, t in enumerate(token_bytes)},
            # "left right": byte-level spellings never hold a real space (" " is spelled "Ġ")
            "merges": [f"{spell(token_bytes[a])} {spell(token_bytes[b])}" for a, b in tok.merges],
        },
    }


def _bpe_from_hf_json(obj, name="tokenizer.json"):
    """A byte-level BPE tokenizer.json -> bpe.Tokenizer; GPT-2's as Hugging Face tokenizers writes it, and
    those of real models (SmolLM2, Llama 3) read too, with the same ids as Hugging Face gives on any text.
    Every vocabulary entry must be a byte or made by a merge; special tokens may have any ids.
    Example: vocab {'Ġthe': 262}, merges ['Ġt he'] -> token 262 = b' the'."""
    model = obj["model"]

    def need(field, ok, why):
        if not ok:
            raise FileFormatError(f"{name}: {field} is not supported: {why}")

    need(f"model.type = {model.get('type')!r}", model.get("type") == "BPE", "only byte-level BPE tokenizers import")
    need("normalizer", obj.get("normalizer") is None, "byte-level BPE works on the raw text (no normalizer)")
    need("decoder", (obj.get("decoder") or {}).get("type") == "ByteLevel", "byte-level BPE decodes with ByteLevel")
    for f in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        need(f"model.{f}", not model.get(f), "not a plain byte-level BPE")
    need("model.byte_fallback", not model.get("byte_fallback"), "a SentencePiece-style BPE, not byte-level")
    pattern = _pattern_from_hf(obj.get("pre_tokenizer"), name)
    specials = {t["content"]: t["id"] for t in obj.get("added_tokens", []) if t.get("special")}
    ordinary = {t["content"] for t in obj.get("added_tokens", []) if not t.get("special")}
    # special tokens may be listed in the vocab as well, as GPT-2's <|endoftext|> is; they are not byte strings
    vocab = {s: i for s, i in model.get("vocab", {}).items() if i not in specials.values()}
    need("added_tokens", ordinary <= vocab.keys(), f"non-special added tokens {sorted(ordinary - vocab.keys())[:3]}")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]  # "a b" or ["a", "b"]
    tok = _from_byte_level(vocab, merges, specials, pattern, model.get("ignore_merges", False), need,
                           ("model.vocab", "model.merges"))
    # an unknown token only stands in for a byte the vocabulary lacks: refuse one that would be used
    need("model.unk_token", not model.get("unk_token") or None not in tok.byte_ids,
         "an unknown token with bytes missing from the vocabulary (Hugging Face would emit it where we drop the byte)")
    return tok


def hf_split_regex(pattern):
    """A split pattern as Hugging Face's tokenizer.json must spell it for the same chunks.
    subtle: Oniguruma, HF's regex engine, reads GPT-4's "\\p{N}{1,3}+" as "(\\p{N}{1,3})+", any run of
    digits, not as possessive; at the end of an alternative, as there, "{1,3}" matches the same.

    >>> hf_split_regex(r"\\p{N}{1,3}+|a++")
    '\\\\p{N}{1,3}|a++'
    """
    return regex.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _pattern_from_hf(pre, name="tokenizer.json"):
    """The split regex of a byte-level pre_tokenizer: ByteLevel(use_regex=true) alone is GPT-2's;
    Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)] is the Split's (to_hf_json's, Llama 3's);
    Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)] is SmolLM2's (bpe.SMOLLM_PATTERN)."""
    def bad(why):
        raise FileFormatError(f"{name}: pre_tokenizer is not supported: {why}")

    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    last = steps[-1] if steps else None
    if not last or last.get("type") != "ByteLevel":
        bad("not byte-level BPE (the last pre-tokenizer must be ByteLevel)")
    if last.get("add_prefix_space", False):
        bad("add_prefix_space is true (our tokenizer does not insert a leading space)")
    if len(steps) == 1:
        if not last.get("use_regex", True):
            bad("ByteLevel with use_regex false and no Split before it")
        return bpe.GPT2_PATTERN  # the possessive form of ByteLevel's regex: the same chunks
    split = steps[0]
    if (len(steps) == 2 and split.get("type") == "Digits" and split.get("individual_digits")
            and last.get("use_regex", True)):
        return bpe.SMOLLM_PATTERN
    if (len(steps) != 2 or split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {})
            or split.get("behavior") != "Isolated" or split.get("invert", False) or last.get("use_regex", True)):
        bad("only Split(Regex, Isolated) then ByteLevel(use_regex=false) is understood")
    # to_hf_json rewrites GPT-4's possessive "\\p{N}{1,3}+" for Oniguruma: map the rewritten spellings
    # back, so that an export round trip gives the same tok.pattern
    hf = split["pattern"]["Regex"]
    known = [*bpe.PATTERNS.values(), bpe.SMOLLM_PATTERN]
    return next((p for p in known if hf_split_regex(p) == hf), hf)


def _char_to_hf_json(tok):
    """A character tokenizer.json: a WordLevel model over single characters in code point order. An
    unknown character fails to encode in both libraries (unk_token names no token in the vocab), and
    Fuse joins the pieces back without spaces."""
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": ANY_CHAR}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tok.chars)},
                      "unk_token": "<unk>"}}


def _char_from_hf_json(obj, name="tokenizer.json"):
    """The inverse of _char_to_hf_json; any other WordLevel tokenizer.json is refused."""
    vocab = obj["model"].get("vocab", {})
    chars = "".join(sorted(vocab, key=vocab.get))
    pre = obj.get("pre_tokenizer") or {}
    if (pre.get("type") != "Split" or (pre.get("pattern") or {}).get("Regex") != ANY_CHAR or obj.get("added_tokens")
            or not all(len(c) == 1 for c in vocab) or sorted(vocab.values()) != list(range(len(vocab)))
            or chars != "".join(sorted(chars))):
        raise FileFormatError(f"{name}: model.type = 'WordLevel' is only understood as the character "
                              "tokenizer export.py writes (one id per character, in code point order)")
    return CharTokenizer(chars)


# ----------------------------------------------------------------------------------------------------
# llama.cpp's GGUF vocabularies (lib/gguf_model.py reads and writes the files), both ways

def from_gguf_fields(fields):
    """llama.cpp's tokenizer metadata -> bpe.Tokenizer: `fields` maps GGUF keys (tokenizer.ggml.model, .pre,
    .tokens, .token_type, .merges) to plain values. Byte-level BPE only (model "gpt2"); the pre-tokenizer's
    name picks the split pattern (PRE_PATTERNS). Control and user-defined tokens (types 3, 4) become
    special tokens, found whole in the text as llama.cpp and Hugging Face find them; unused tokens (type 5)
    after the last real one are padding (the model's vocabulary may be larger than its tokenizer's).
    Anything else, a value of the wrong type included, raises FileFormatError naming the key."""
    def need(key, ok, why):
        if not ok:
            raise FileFormatError(f"GGUF {key} = {fields.get(key)!r:.60} is not supported: {why}")

    def typed(key, ok, what, default=None):
        v = fields.get(key, default)
        if not ok(v):
            raise FileFormatError(f"GGUF {key} must be {what}, got {preview(v)}")
        return v

    strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)      # noqa: E731
    typed("tokenizer.ggml.model", lambda v: isinstance(v, str), "a string")
    need("tokenizer.ggml.model", fields.get("tokenizer.ggml.model") == "gpt2",
         "only byte-level BPE (llama.cpp's 'gpt2' tokenizer) imports, not SentencePiece ('llama') and others")
    pre = typed("tokenizer.ggml.pre", lambda v: isinstance(v, str), "a string", "default")
    need("tokenizer.ggml.pre", pre in PRE_PATTERNS,
         f"its split pattern is not known here (known: {', '.join(sorted(PRE_PATTERNS))})")
    pattern, ignore_merges = PRE_PATTERNS[pre]
    tokens = typed("tokenizer.ggml.tokens", strings, "an array of strings", [])
    types = typed("tokenizer.ggml.token_type", lambda v: isinstance(v, list) and all(map(is_id, v)),
                  "an array of integers", [GGUF_NORMAL] * len(tokens))
    need("tokenizer.ggml.token_type", len(types) == len(tokens), f"{len(types)} types for {len(tokens)} tokens")
    need("tokenizer.ggml.merges", "tokenizer.ggml.merges" in fields, "a byte-level BPE needs its merges")
    merges = typed("tokenizer.ggml.merges", strings, 'an array of "left right" strings')
    n = len(tokens)
    while n and types[n - 1] == GGUF_UNUSED:        # padding at the end: not part of the tokenizer
        n -= 1
    tokens, types = tokens[:n], types[:n]
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)}
    empty = next((i for t, i in specials.items() if not t), None)
    need("tokenizer.ggml.tokens", empty is None, f"token {empty} is an empty control or user-defined token")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (GGUF_CONTROL, GGUF_USER_DEFINED)}
    need("tokenizer.ggml.tokens", len(specials) + len(vocab) == len(tokens), "the same token twice")
    return _from_byte_level(vocab, [m.split(" ") for m in merges], specials, pattern, ignore_merges, need,
                            ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))


def to_gguf_fields(tok, n_vocab=None):
    """The inverse of from_gguf_fields, as llama.cpp's converter (convert_hf_to_gguf.py, _set_vocab_gpt2)
    writes a byte-level BPE: every token by id in its byte-level spelling (special tokens as themselves,
    type CONTROL), the merges "left right" in rank order, and the name llama.cpp knows the split pattern
    by (GGUF_PRE_NAMES). n_vocab: the model's vocabulary, when larger than the tokenizer's: the ids past it
    are "[PAD<id>]" tokens of type UNUSED, as the converter pads. A character tokenizer, or a split pattern
    llama.cpp has no name for, raises UserError.
    Example: GPT-2's pattern, bytes then one merge (b'a', b'b') -> tokens [..., 'a', 'b', ..., 'ab'],
    merges ['a b'], pre 'gpt-2'."""
    if tok.kind != "bpe":
        raise UserError(f"a {tok.kind} tokenizer cannot be written as llama.cpp's vocabulary, which is byte-level "
                        f"BPE ('gpt2'): train the model with a BPE tokenizer (train.py --tokenizer bpe)")
    pre = GGUF_PRE_NAMES.get(tok.pattern)
    if pre is None:
        raise UserError(f"the tokenizer's split pattern {tok.pattern[:60]!r} has no name in llama.cpp (it knows "
                        f"bpe.py's gpt2 and gpt4 patterns, SmolLM2's, Llama 3's and Qwen2's)")
    b2u = bytes_to_unicode()
    spell = lambda t: "".join(b2u[b] for b in t)        # noqa: E731
    special_ids = set(tok.special_tokens.values())
    token_bytes = tok.token_bytes()
    tokens = [t.decode("utf-8") if i in special_ids else spell(t) for i, t in enumerate(token_bytes)]
    types = [GGUF_CONTROL if i in special_ids else GGUF_NORMAL for i in range(len(tokens))]
    pad = max(0, (n_vocab or 0) - len(tokens))
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens + [f"[PAD{i}]" for i in range(len(tokens), len(tokens) + pad)],
            "tokenizer.ggml.token_type": types + [GGUF_UNUSED] * pad,
            "tokenizer.ggml.merges": [f"{spell(token_bytes[a])} {spell(token_bytes[b])}" for a, b in tok.merges]}


# ----------------------------------------------------------------------------------------------------
# What tokenizer.json and GGUF share: a byte-level vocabulary and its merges, laid out as they lay them out

def _from_byte_level(vocab, merges, specials, pattern, ignore_merges, need, fields):
    """A bpe.Tokenizer from a byte-level vocabulary {spelling: id} and merges [[left, right]] spelled in
    GPT-2's printable alphabet (bytes_to_unicode), as tokenizer.json and GGUF store them. need(field,
    ok, why) raises the caller's FileFormatError; fields: the caller's names of the vocabulary and the
    merges, for the messages."""
    vocab_field, merges_field = fields
    b2u = bytes_to_unicode()
    alphabet = set(b2u.values())
    bad = next((s for s in vocab if not s or any(c not in alphabet for c in s)), None)
    need(vocab_field, bad is None,
         f"token {bad!r} is not in the byte-level alphabet")
    byte_ids = [vocab.get(b2u[b]) for b in range(256)]          # None: a byte with no token
    made = {i for i in byte_ids if i is not None}
    pairs, merge_ids = [], []
    for n, m in enumerate(merges):
        a, b = m if len(m) == 2 else (None, None)
        i = vocab.get(a + b) if a is not None else None
        need(merges_field, a in vocab and b in vocab and i is not None and vocab[a] in made and vocab[b] in made
             and i not in made, f"merge {n} {m!r} must join two tokens made before it into a new vocabulary token")
        pairs.append((vocab[a], vocab[b]))
        merge_ids.append(i)
        made.add(i)
    need(vocab_field, len(made) == len(vocab), f"{len(vocab) - len(made)} tokens that no byte or merge makes")
    try:
        return bpe.Tokenizer(pattern, pairs, specials, byte_ids, merge_ids, ignore_merges)
    except (ValueError, regex.error) as e:
        raise FileFormatError(f"tokenizer: {e}") from None
