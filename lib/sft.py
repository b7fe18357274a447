"""
sft.py: instruction data for supervised fine-tuning (train.py --sft): JSONL records -> chats rendered
with a chat template -> token ids whose loss is on the assistant's tokens only -> padded batches.

    records = read_records("chat.jsonl")                   # [("chat.jsonl, line N", messages)], one-line errors
    chat = chat_template_for(meta, tok, path=None)          # the checkpoint's template, or DEFAULT_TEMPLATE
    x, y = encode_chat(messages, tok, chat)                 # inputs and targets, -1 off the assistant's tokens
    data = prepare_sft(path, tok, chat, block_size=256, val_fraction=0.1, seed=1337)
    x, y = get_batch(data["train"], batch_size, rng)        # (B, T) padded to the longest example drawn

The records, one JSON object per line (blank lines are skipped):

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}          # chat records (roles as below)
    {"instruction": "...", "input": "...", "output": "..."}              # Alpaca records ("input" optional)

An Alpaca record becomes the chat [user: instruction + "\\n\\n" + input, assistant: output], so both kinds
go through the same template, the one the model is later prompted with.

Templates are Jinja, rendered in jinja2's ImmutableSandboxedEnvironment with the options and helpers of
transformers' apply_chat_template (trim_blocks, lstrip_blocks, loop controls, tojson, raise_exception,
strftime_now; {% generation %} blocks render their body): a template from the Hugging Face Hub is
untrusted code, and the sandbox keeps it from reaching Python internals. The assistant's tokens are found
turn by turn: the text of messages[:k] with the generation prompt is a prefix of the text of
messages[:k+1] when message k is the assistant's, and the characters in between are its tokens. A
template that does not render a conversation turn by turn (one that rewrites earlier turns) is refused.

Batches are padded, not packed: each row holds one example at positions 0..n-1, padded after its end to
the longest example in the batch, the padding's targets -1. Why: packing several examples into a row
without letting them attend to each other needs a block-diagonal attention mask and RoPE positions that
restart per example, which the model's causal attention does not have; padding needs neither, and each
example then sees exactly what it sees at inference. Padding to the batch's longest example, not to the
block size, keeps the wasted work small; the causal mask already keeps real tokens from seeing the pads.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import UserError
from lib.chat_template import compile_template, render_template   # jinja2's sandbox, as transformers sets it up
from lib.files import file_sha256, read_jsonl, text_sha256
from lib.tokenizer import EOT

ROLES = ("system", "user", "assistant")

# The default chat template, for models that come without one (every model train.py trains). For
# [user: "Hi", assistant: "Hello!"] it renders
#     "### User:\nHi\n\n### Assistant:\nHello!<|endoftext|>"
# and the generation prompt after a user turn is "\n\n### Assistant:\n". eos_token (the tokenizer's
# <|endoftext|>, none for a character tokenizer) closes each assistant turn, so a model learns to stop.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ ('\\n\\n' if messages else '') + '### Assistant:\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------
# Rendering a chat with a template

def render_chat(template, messages, add_generation_prompt=False, **specials):
    """The text of `messages` (a list of {"role", "content"} dicts) under a Jinja chat template, with
    `specials` (bos_token, eos_token ...) as template variables, as transformers' apply_chat_template
    (tokenize=False) renders it, in chat_template.py's bounded sandbox. A template error, or a render that
    runs too long or grows too large, raises UserError ("the chat template failed: ...").

    Example: render_chat(DEFAULT_TEMPLATE, [{"role": "user", "content": "Hi"}], True, eos_token="</s>")
    -> "### User:\nHi\n\n### Assistant:\n".
    """
    return render_template(template, messages, add_generation_prompt, **specials)


@dataclass(frozen=True)
class Chat:
    """A chat template with the special-token strings it is rendered with."""
    template: str
    specials: tuple = ()        # ((name, value), ...): bos_token, eos_token
    source: str = "default"     # where the template came from: "default", "checkpoint" or a file path

    def render(self, messages, add_generation_prompt=False):
        return render_chat(self.template, messages, add_generation_prompt, **dict(self.specials))

    @property
    def stop_token(self):
        """The string that ends an assistant turn (generation stops at its id), or None."""
        return dict(self.specials).get("eos_token") or None

    def to_meta(self):
        """What a checkpoint keeps, so that the model is later prompted as it was trained."""
        return {"template": self.template, **dict(self.specials), "source": self.source}


def chat_template_for(meta, tok, path=None):
    """The Chat a fine-tuning run renders with: the template in the file `path` if given, else the one
    in the checkpoint's metadata ("chat": {"template", "bos_token", "eos_token"}), else DEFAULT_TEMPLATE.
    eos_token and bos_token come from the metadata when it names them; otherwise eos_token is
    <|endoftext|> when the tokenizer has it (the default template's turn end), and bos_token is unset."""
    chat = (meta or {}).get("chat") if isinstance((meta or {}).get("chat"), dict) else {}
    if path:
        try:
            template, source = Path(path).expanduser().read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--chat-template {path}: cannot read it ({e})") from None
    elif isinstance(chat.get("template"), str) and chat["template"]:
        template, source = chat["template"], chat.get("source", "checkpoint")
    else:
        template, source = DEFAULT_TEMPLATE, "default"
    special = getattr(tok, "special_tokens", None) or {}
    specials = {"eos_token": chat.get("eos_token", EOT if EOT in special else ""), "bos_token": chat.get("bos_token", "")}
    for name, value in specials.items():
        if value and value not in special:
            raise UserError(f"the chat template's {name} {value!r} is not a special token of the tokenizer")
    compile_template(template)                          # a template that does not compile fails now
    return Chat(template, tuple(sorted(specials.items())), source)


# ----------------------------------------------------------------------------------------------------
# Records: JSONL lines -> chats

def to_messages(obj, where):
    """One parsed record -> its list of messages, or UserError naming `where` (e.g. "chat.jsonl, line 3").

    Example: {"instruction": "Add 2 and 3", "input": "", "output": "5"} ->
    [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}].
    """
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: message {j} must be an object with a string 'content'")
            if m.get("role") not in ROLES:
                raise UserError(f"{where}: message {j} has unknown role {m.get('role')!r} (expected one of "
                                f"{', '.join(ROLES)})")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    if "instruction" in obj or "output" in obj:
        for k in ("instruction", "output"):
            if not isinstance(obj.get(k), str):
                raise UserError(f"{where}: an Alpaca record needs a string {k!r}")
        if not isinstance(obj.get("input", ""), str):
            raise UserError(f"{where}: an Alpaca record's 'input' must be a string")
        user = obj["instruction"] + ("\n\n" + obj["input"] if obj.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    raise UserError(f"{where}: expected a chat record {{\"messages\": [...]}} or an Alpaca record "
                    f"{{\"instruction\", \"input\", \"output\"}}; got the keys {sorted(obj)[:5]}")


def read_records(path):
    """A JSONL file -> [("file, line N", messages)], blank lines skipped. A line that is not JSON, or not
    a record of either kind, raises UserError naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--sft {path}: no such file")
    records = [(where, to_messages(obj, where)) for _, where, obj in read_jsonl(path)]
    if not records:
        raise UserError(f"--sft {path}: no records (the file is empty)")
    return records


# ----------------------------------------------------------------------------------------------------
# Chats -> token ids with the loss on the assistant's tokens

def encode_text(tok, text):
    """Template text -> ids, its special-token strings (<|im_start|>, <|endoftext|> ...) as their ids."""
    if getattr(tok, "special_tokens", None):
        return tok.encode(text, allowed_special="all")
    return [int(i) for i in tok.encode_ordinary(text)]


def segments(messages, chat, where="the record"):
    """The rendered chat cut into [(text, is_assistant)], turn by turn (see the module docstring).

    Example (default template): [user "Hi", assistant "Yo"] -> [("### User:\\nHi\\n\\n### Assistant:\\n",
    False), ("Yo<|endoftext|>", True)].
    """
    full = chat.render(messages)
    out, done = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat.render(messages[:k], add_generation_prompt=True)
        upto = chat.render(messages[:k + 1])
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= done):
            raise UserError(f"{where}: the chat template does not render this conversation turn by turn "
                            f"(message {k}'s text is not an extension of the turns before it), so its "
                            f"assistant tokens cannot be found; use another --chat-template")
        out += [(full[done:len(before)], False), (full[len(before):len(upto)], True)]
        done = len(upto)
    out.append((full[done:], False))
    return [(t, a) for t, a in out if t]


def encode_chat(messages, tok, chat, train_on_prompt=False, where="the record", max_ids=None):
    """One chat -> (x, y), int64 arrays of equal length: the inputs, and each position's target, the
    next token, or -1 where the next token is not the assistant's (unless train_on_prompt). A record
    whose assistant part is k tokens has exactly k targets (the first token of the text is never one).
    max_ids: encode only about the first max_ids tokens of the rendered chat (at least that many, when it
    has them; exactly the whole text's first ids, encode_prefix): a 20 MB record cut to a block of 64
    tokens is never tokenized whole."""
    return encode_segments(segments(messages, chat, where), tok, train_on_prompt, where, max_ids)


def encode_segments(segs, tok, train_on_prompt=False, where="the record", max_ids=None):
    """encode_chat from the chat's segments (text, is_assistant)."""
    ids, mask = [], []
    for text, is_assistant in segs:
        if max_ids is not None and len(ids) >= max_ids:
            break
        try:
            t = encode_prefix(tok, text, None if max_ids is None else max_ids - len(ids))
        except ValueError as e:                         # a character the tokenizer lacks
            raise UserError(f"{where}: cannot tokenize its text: {e}") from None
        ids += t
        mask += [is_assistant] * len(t)
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
    y = np.where(mask[1:] | train_on_prompt, ids[1:], -1)
    return ids[:-1], y


def encode_prefix(tok, text, need=None):
    """encode_text(tok, text), or with `need`, at least its first `need` ids (all of them if it has fewer),
    reading no more of the text than that takes: the text is cut where the tokenizer allows (tok.cut: the
    two parts encode to the ids of the whole), so the ids are exactly a prefix of the whole text's."""
    k = 64 * need + 4096 if need else len(text)         # a first guess of the characters needed
    while k < len(text):
        cut = tok.cut(text[:k])
        if cut:
            ids = encode_text(tok, text[:cut])
            if len(ids) >= need:
                return ids
        k *= 2
    return encode_text(tok, text)


def prepare_sft(path, tok, chat, block_size, val_fraction, seed, train_on_prompt=False, log=print):
    """Read, render, tokenize and split the records of `path`: {"train": [(x, y)], "val": [(x, y)],
    "meta": {...}}. Examples longer than block_size are cut to their first block_size positions (counted
    and printed); one left with no target is dropped (counted). The validation split is a seeded random
    choice of round(val_fraction * n) records (at least one)."""
    records = read_records(path)
    examples, truncated, dropped = [], 0, 0
    for where, messages in records:
        segs = segments(messages, chat, where)
        if not (train_on_prompt or any(is_assistant and text for text, is_assistant in segs)):
            raise UserError(f"{where}: the record renders to zero assistant tokens (nothing to train on)")
        # block_size + 2 ids: x = ids[:-1] then has more than block_size positions when the record is longer
        x, y = encode_segments(segs, tok, train_on_prompt, where, max_ids=block_size + 2)
        if len(x) > block_size:
            truncated += 1
            x, y = x[:block_size], y[:block_size]
            if not (y >= 0).any():
                dropped += 1
                continue
        examples.append((x, y))
    if truncated:
        log(f"sft: {truncated} of {len(records)} examples are longer than --block-size {block_size} tokens and "
            f"were truncated" + (f"; {dropped} of them kept no assistant token and were dropped" if dropped else ""))
    if len(examples) < 2:
        raise UserError(f"--sft {path}: {len(examples)} usable record(s); a training and a validation split "
                        f"need at least 2")
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    order = np.random.default_rng([seed, 7]).permutation(len(examples))
    val = sorted(order[:n_val].tolist())
    is_val = np.zeros(len(examples), dtype=bool)
    is_val[val] = True
    train_ex = [e for e, v in zip(examples, is_val) if not v]
    val_ex = [e for e, v in zip(examples, is_val) if v]
    h = hashlib.sha256()                                # the examples' identity, for --resume
    for x, y in examples:
        h.update(x.tobytes() + b"|" + y.tobytes() + b"\n")
    count = lambda exs: int(sum((y >= 0).sum() for _, y in exs))       # noqa: E731
    val_bytes = sum(len(tok.decode_bytes([int(t)])) for _, y in val_ex for t in y[y >= 0])
    meta = {"name": Path(path).stem, "kind": "sft", "path": str(path),
            "key": {"format": "sft-1", "sources_sha256": file_sha256(Path(path).expanduser()),
                    "examples_sha256": h.hexdigest(), "template_sha256": text_sha256(chat.template),
                    "train_on_prompt": bool(train_on_prompt), "block_size": block_size,
                    "val_fraction": val_fraction},
            "records": len(records), "train_examples": len(train_ex), "val_examples": len(val_ex),
            "truncated": truncated, "dropped": dropped, "train_tokens": count(train_ex),
            "val_tokens": count(val_ex), "val_bytes_per_token": val_bytes / max(1, count(val_ex)),
            "longest": max(len(x) for x, _ in examples)}
    log(f"sft: {len(records)} records from {path} ({chat.source} chat template) -> {len(train_ex)} train + "
        f"{len(val_ex)} val examples, {meta['train_tokens']:,} + {meta['val_tokens']:,} target tokens "
        f"({'every token' if train_on_prompt else 'assistant tokens only'}), longest {meta['longest']} tokens")
    return {"train": train_ex, "val": val_ex, "meta": meta}


# ----------------------------------------------------------------------------------------------------
# Batches

def pad_batch(examples, pad_id=0):
    """A list of (x, y) -> (B, T) inputs and targets, T the longest example; pads: pad_id and -1."""
    T = max(len(x) for x, _ in examples)
    X = np.full((len(examples), T), pad_id, dtype=np.int64)
    Y = np.full((len(examples), T), -1, dtype=np.int64)
    for b, (x, y) in enumerate(examples):
        X[b, :len(x)], Y[b, :len(y)] = x, y
    return X, Y


def get_batch(examples, batch_size, rng):
    """batch_size examples drawn uniformly with replacement (as the corpus sampler draws windows), padded."""
    return pad_batch([examples[i] for i in rng.integers(0, len(examples), size=batch_size)])


def eval_batches(examples, batch_size, limit=None):
    """The examples in order, in padded batches of batch_size (at most `limit` batches)."""
    n = len(examples) if limit is None else min(len(examples), limit * batch_size)
    return [pad_batch(examples[i:i + batch_size]) for i in range(0, n, batch_size)]


def chat_prompt_ids(tok, chat, user_text):
    """The ids of a one-turn chat ready for the answer: the user's message and the generation prompt."""
    return encode_text(tok, chat.render([{"role": "user", "content": user_text}], add_generation_prompt=True))


def stop_ids(tok, chat):
    """The ids that end an assistant turn: the template's eos_token, if the tokenizer has it."""
    s = chat.stop_token
    return [tok.special_tokens[s]] if s and s in (getattr(tok, "special_tokens", None) or {}) else []
