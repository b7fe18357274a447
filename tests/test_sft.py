"""Tests for sft.py: chat templates rendered as transformers renders them (in the sandbox), the records
(chat and Alpaca, and one-line errors naming the line), the loss mask (exactly the assistant's tokens),
truncation, the split and the padded batches."""

import json

import numpy as np
import pytest

import bpe
from lib import sft
from lib.tokenizer import EOT, CharTokenizer
from errors import UserError

# SmolLM2-Instruct's template (ChatML with a default system message), as its GGUF file carries it
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIALS = [EOT, "<|im_start|>", "<|im_end|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8."}]


@pytest.fixture(scope="module")
def tok():
    text = "the quick brown fox jumps over the lazy dog. What is 2 + 3? It is 5. Be brief.\n" * 20
    return bpe.Tokenizer.train([text], 300, special_tokens=SPECIALS, progress=False)


def chatml(tok):
    return sft.chat_template_for({"chat": {"template": CHATML, "eos_token": "<|im_end|>"}}, tok)


def default(tok):
    return sft.chat_template_for({}, tok)


# ----------------------------------------------------------------------------------------------------
# rendering

def test_default_template_renders_as_documented(tok):
    chat = default(tok)
    assert chat.source == "default" and chat.stop_token == EOT
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert chat.render(msgs) == "### User:\nHi\n\n### Assistant:\nHello!<|endoftext|>"
    assert chat.render(msgs[:1], add_generation_prompt=True) == "### User:\nHi\n\n### Assistant:\n"
    # a tokenizer without <|endoftext|> (characters): no end-of-turn token
    char = sft.chat_template_for({}, CharTokenizer("abc"))
    assert char.stop_token is None and char.render(msgs) == "### User:\nHi\n\n### Assistant:\nHello!"


@pytest.mark.parametrize("template", [CHATML, sft.DEFAULT_TEMPLATE], ids=["chatml", "default"])
@pytest.mark.parametrize("gen", [False, True])
def test_render_equals_transformers(template, gen):
    ct = pytest.importorskip("transformers.utils.chat_template_utils")
    specials = {"eos_token": "<|im_end|>", "bos_token": "<s>"}
    for msgs in (CHAT, CHAT[1:3], CHAT[:2]):
        want = ct.render_jinja_template([msgs], chat_template=template, add_generation_prompt=gen, **specials)
        want = want[0][0] if isinstance(want, tuple) else want
        assert sft.render_chat(template, msgs, gen, **specials) == want


def test_template_runs_in_the_sandbox(tok):
    with pytest.raises(UserError, match="the chat template failed: .*unsafe"):
        sft.render_chat("{{ messages.__class__.__mro__ }}", CHAT)
    with pytest.raises(UserError, match="the chat template failed: no system messages"):
        sft.render_chat("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}"
                        "{% endif %}", CHAT)
    with pytest.raises(UserError, match="the chat template does not parse"):
        sft.chat_template_for({"chat": {"template": "{% for m in messages %}"}}, tok)
    with pytest.raises(UserError, match="eos_token '<nope>' is not a special token"):
        sft.chat_template_for({"chat": {"template": CHATML, "eos_token": "<nope>"}}, tok)


# ----------------------------------------------------------------------------------------------------
# the loss mask: exactly the assistant's tokens

@pytest.mark.parametrize("which", ["default", "chatml"])
def test_assistant_tokens_are_exactly_the_targets(tok, which):
    chat = default(tok) if which == "default" else chatml(tok)
    x, y = sft.encode_chat(CHAT, tok, chat)
    ids = np.concatenate([x, y[-1:]]) if y[-1] >= 0 else None
    full = sft.encode_text(tok, chat.render(CHAT))
    assert ids is not None and ids.tolist() == full                     # the text, tokenized piece by piece
    # each assistant turn is its content and the turn's end (the default: <|endoftext|>; ChatML:
    # <|im_end|> and the newline the template writes after it), k tokens that are exactly the targets
    end = EOT if which == "default" else "<|im_end|>\n"
    turns = [sft.encode_text(tok, m["content"] + end) for m in CHAT if m["role"] == "assistant"]
    assert y[y >= 0].tolist() == turns[0] + turns[1]
    assert int((y >= 0).sum()) == sum(map(len, turns))
    # ... in place: the prompt's tokens contribute none
    k0 = len(sft.encode_text(tok, chat.render(CHAT[:2], add_generation_prompt=True)))
    assert (y[:k0 - 1] == -1).all() and (y[k0 - 1:k0 - 1 + len(turns[0])] >= 0).all()
    # with the prompt: every next token is a target
    x2, y2 = sft.encode_chat(CHAT, tok, chat, train_on_prompt=True)
    assert np.array_equal(x2, x) and y2.tolist() == full[1:]


def test_alpaca_records_become_chats():
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert sft.to_messages(rec, "f:1") == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                           {"role": "assistant", "content": "5"}]
    assert sft.to_messages({"instruction": "Hi", "output": "Yo"}, "f:1")[0] == {"role": "user", "content": "Hi"}


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"chat.jsonl, line 3: not valid JSON"),
    ({"messages": []}, r"chat.jsonl, line 3: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"chat.jsonl, line 3: message 0 has unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, r"chat.jsonl, line 3: message 0 must be an object with a string 'content'"),
    ({"instruction": "x"}, r"chat.jsonl, line 3: an Alpaca record needs a string 'output'"),
    ({"prompt": "x", "completion": "y"}, r"chat.jsonl, line 3: expected a chat record"),
    ([1, 2], r"chat.jsonl, line 3: expected a JSON object"),
    ({"messages": [{"role": "user", "content": "no answer"}]}, r"chat.jsonl, line 3: the record renders to zero assistant"),
])
def test_bad_records_name_their_line(tmp_path, tok, line, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, "", line, GOOD])       # line 2 is blank
    with pytest.raises(UserError, match=message) as e:
        sft.prepare_sft(path, tok, default(tok), 64, 0.5, 0, log=lambda *a: None)
    assert "\n" not in str(e.value)


def test_empty_assistant_turn_without_end_token_is_zero_tokens(tmp_path):
    # a character tokenizer has no <|endoftext|>: an empty answer renders to nothing at all
    tok = CharTokenizer("#ASUacdehinorstuw:?\n 0123456789+")
    rec = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": ""}]}
    good = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, rec])
    with pytest.raises(UserError, match=r"c.jsonl, line 2: the record renders to zero assistant tokens"):
        sft.prepare_sft(path, tok, sft.chat_template_for({}, tok), 64, 0.5, 0, log=lambda *a: None)


def test_templates_that_rewrite_earlier_turns_are_refused(tok):
    # a template that shows only the last assistant turn (as some "reasoning" templates do)
    drop = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] }}: "
            "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    chat = sft.chat_template_for({"chat": {"template": drop}}, tok)
    with pytest.raises(UserError, match="does not render this conversation turn by turn"):
        sft.encode_chat(CHAT, tok, chat, where="x.jsonl:1")


# ----------------------------------------------------------------------------------------------------
# the data set: truncation, split, batches

def test_prepare_truncates_counts_and_splits(tmp_path, tok):
    long = {"messages": [{"role": "user", "content": "the quick brown fox " * 2}, {"role": "assistant",
                                                                                  "content": "the lazy dog " * 20}]}
    lost = {"messages": [{"role": "user", "content": "the quick brown fox " * 30}, {"role": "assistant",
                                                                                   "content": "5"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8 + [long, lost])
    logs = []
    d = sft.prepare_sft(path, tok, default(tok), 48, 0.2, seed=3, log=logs.append)
    assert any("2 of 10 examples are longer than --block-size 48 tokens and were truncated; 1 of them kept "
               "no assistant token and were dropped" in line for line in logs)
    assert len(d["train"]) + len(d["val"]) == 9 and len(d["val"]) == 2
    assert all(len(x) == len(y) <= 48 and (y >= 0).any() for x, y in d["train"] + d["val"])
    m = d["meta"]
    assert (m["truncated"], m["dropped"], m["records"]) == (2, 1, 10)
    assert m["val_tokens"] == sum(int((y >= 0).sum()) for _, y in d["val"])
    # the split is a function of the seed; the identity changes with the template and the mask
    again = sft.prepare_sft(path, tok, default(tok), 48, 0.2, seed=3, log=lambda *a: None)
    assert again["meta"]["key"] == m["key"] and [x.tolist() for x, _ in again["val"]] == [x.tolist() for x, _ in d["val"]]
    for chat, on_prompt in ((chatml(tok), False), (default(tok), True)):
        other = sft.prepare_sft(path, tok, chat, 200, 0.2, seed=3, train_on_prompt=on_prompt, log=lambda *a: None)
        assert other["meta"]["key"] != m["key"]
    with pytest.raises(UserError, match="need at least 2"):
        sft.prepare_sft(write_jsonl(tmp_path / "one.jsonl", [GOOD]), tok, default(tok), 48, 0.1, 0, log=print)


def test_batches_are_padded_with_ignored_targets():
    ex = [(np.arange(3), np.array([-1, 5, 6])), (np.arange(5), np.array([-1, -1, 1, 2, 3]))]
    x, y = sft.pad_batch(ex, pad_id=9)
    assert x.tolist() == [[0, 1, 2, 9, 9], [0, 1, 2, 3, 4]]
    assert y.tolist() == [[-1, 5, 6, -1, -1], [-1, -1, 1, 2, 3]]
    x, y = sft.get_batch(ex, 6, np.random.default_rng(0))
    assert x.shape == y.shape and x.shape[0] == 6 and x.dtype == np.int64
    assert [b[0].shape for b in sft.eval_batches(ex * 3, 4)] == [(4, 5), (2, 5)]
    assert len(sft.eval_batches(ex * 3, 2, limit=2)) == 2


def test_chat_prompt_and_stop_ids(tok):
    chat = chatml(tok)
    ids = sft.chat_prompt_ids(tok, chat, "Hi")
    assert tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert sft.stop_ids(tok, chat) == [tok.special_tokens["<|im_end|>"]]


def test_the_documented_default_template_is_the_one_in_use():
    # docs/finetuning.md prints DEFAULT_TEMPLATE over four lines; it must render the same text
    from conftest import ROOT
    doc = (ROOT / "docs" / "finetuning.md").read_text()
    shown = doc.split("such as every model train.py trains:\n\n```\n")[1].split("\n```")[0]
    for gen in (False, True):
        for msgs in (CHAT, CHAT[:3], CHAT[1:2], []):
            assert sft.render_chat(shown, msgs, gen, eos_token=EOT) == sft.render_chat(sft.DEFAULT_TEMPLATE, msgs, gen,
                                                                                        eos_token=EOT)
