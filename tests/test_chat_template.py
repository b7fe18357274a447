"""Tests for lib/chat_template.py's bounds: a chat template is a program that comes in a file, and no
template may hang a program, exhaust its memory or end it with a traceback. Each case of issue #22's
review (a loop of 10^10 steps, 'a' * 10**9, 7 ** 10**8, a template that bombs only on some messages,
runtime errors, a template that is not text) ends in one UserError line, quickly, through the library
and through the programs."""

import resource
import time

import pytest

import sample
import train
from conftest import main_error, make_text, run_quiet, tiny_args
from errors import FileFormatError, UserError
from lib import chat_template as chat, sft
from lib.checkpoint import build_meta, load_checkpoint, save_checkpoint

pytest.importorskip("jinja2")

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture()
def fast(monkeypatch):
    """A render time limit of half a second, so that the endless templates end quickly."""
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)


def failed(template, messages=MSGS, match="the chat template failed"):
    """Render `template`; expect UserError matching `match`, within 5 s; return its message."""
    t0 = time.time()
    with pytest.raises(UserError, match=match) as e:
        chat.render_template(template, messages)
    assert time.time() - t0 < 5, f"took {time.time() - t0:.1f} s"
    return str(e.value)


@pytest.mark.parametrize("template", [
    LOOP,                                                       # 10^10 steps of nothing: the time limit
    LOOP.replace("{% endfor %}{% endfor %}", "x{% endfor %}{% endfor %}"),   # ... and of output
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
])
def test_a_template_that_never_ends_is_stopped(fast, template):
    failed(template)


@pytest.mark.parametrize("template", [
    "{% set s = 'a' * 10**9 %}",
    "{{ 'a' * 10**10 }}",
    "{% set l = [0] * 10**9 %}",
    "{{ 'x'.ljust(10**10) }}", "{{ 'x'.center(10**10) }}", "{{ 'x' | indent(10**10) }}",
    "{{ messages | tojson(indent=10**9) }}",
    "{% set s = 'a' * 20000 %}{{ s.replace('a', s).replace('a', s) | length }}",   # replace amplification
])
def test_a_template_that_builds_huge_values_is_refused(template):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    failed(template, match="the chat template failed: (it needed more than|its output passed|MemoryError)")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 2 * (chat.RENDER_MEMORY >> 20), f"peak memory grew {grown_mib:.0f} MiB"
    # the address space limit is back as it was: a large allocation works again
    assert len(bytearray(chat.RENDER_MEMORY + (1 << 20))) > chat.RENDER_MEMORY


def test_huge_powers_are_refused():
    failed("{{ 7 ** (10 ** 8) }}", match="too large a number")
    assert chat.render_template("{{ 2 ** 64 }}", MSGS) == str(2 ** 64)


def test_output_is_bounded_by_the_conversation():
    """The output may be 4x the messages' text plus RENDER_CHARS: a long conversation renders whole."""
    long = [{"role": "user", "content": "y" * (2 * chat.RENDER_CHARS)}]
    assert len(chat.render_template("{{ messages[0].content }}", long)) == 2 * chat.RENDER_CHARS
    failed("{% for i in range(100) %}{{ 'z' * 100000 }}{% endfor %}", match="its output passed")


def test_a_template_that_bombs_on_other_messages_is_stopped_at_render(fast):
    """Harmless on the probe that chat_info renders ("hi"), endless on anything else."""
    bpe = pytest.importorskip("bpe")
    tok = bpe.Tokenizer("gpt4", [], {"<|im_end|>": 256})
    template = "{% if messages[0].content != 'hi' %}" + LOOP + "{% endif %}{{ messages[0].content }}<|im_end|>"
    info = chat.chat_info(template, tok)
    failed(template, [{"role": "user", "content": "what now?"}])
    with pytest.raises(UserError, match="ran for more than"):
        chat.prompt_ids(info, tok, [{"role": "user", "content": "what now?"}])


@pytest.mark.parametrize("template, match", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% include 'other.jinja' %}", "the chat template failed"),
    ("{% import 'other.jinja' as o %}", "the chat template failed"),
    ("{% extends 'base.jinja' %}", "the chat template failed"),
    ("{{ range(10**9) | list }}", "the chat template failed"),
    ("{{ lipsum(min=5, max=5) }}", "the chat template failed"),
    ("{{ strftime_now(123) }}", "TypeError"),
])
def test_runtime_errors_are_one_line(template, match):
    failed(template, match=match)


def test_templates_that_are_not_templates():
    with pytest.raises(FileFormatError, match="does not parse"):
        chat.compile_template("{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}")
    for bad in (5, ["{{ x }}"], None):
        with pytest.raises(FileFormatError, match="expected text"):
            chat.compile_template(bad)


def test_sft_renders_through_the_same_bounds(fast):
    with pytest.raises(UserError, match="ran for more than"):
        sft.render_chat(LOOP, MSGS)


# ----------------------------------------------------------------------------------------------------
# through the programs: one line, exit 1

@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe_run")
    run_quiet(tiny_args(d, make_text(d / "text.txt"), "--tokenizer", "bpe", "--vocab-size", 300))
    return d


def test_train_sft_with_a_bombing_template(bpe_run, tmp_path, capsys, fast):
    records = tmp_path / "chat.jsonl"
    records.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n' * 3)
    (tmp_path / "bomb.jinja").write_text(LOOP)
    argv = ["--init-from", bpe_run / "out", "--sft", records, "--chat-template", tmp_path / "bomb.jinja",
            "--out-dir", tmp_path / "sft", "--data-dir", tmp_path / "data", "--max-iters", 2, "--block-size", 16]
    code, err = main_error(train.main, [str(a) for a in argv], capsys)
    assert code == 1 and "the chat template failed: it ran for more than" in err


def test_sample_chat_with_a_bombing_template(bpe_run, tmp_path, capsys, fast):
    ck = load_checkpoint(bpe_run / "out")
    tok = ck.tokenizer()
    eot = tok.special_tokens["<|endoftext|>"]
    template = "{% if messages[0].content != 'hi' %}" + LOOP + "{% endif %}"
    meta = build_meta(ck.model_config(), tok, chat={"template": template, "eos_token": "<|endoftext|>",
                                                   "bos_token": None, "bos_id": None, "add_bos": False,
                                                   "stop_ids": [eot]})
    save_checkpoint(tmp_path / "chat" / "ckpt.safetensors", ck.params, {}, {}, meta)
    code, err = main_error(sample.main, ["--ckpt", str(tmp_path / "chat"), "--chat", "--prompt", "hello"], capsys)
    assert code == 1 and "the chat template failed: it ran for more than" in err
