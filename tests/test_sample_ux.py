"""sample.py for a newcomer (issue #23, item 8 and part of 5): sampling defaults chosen per mode and
stated in --help, --num-samples, --prompt-file, stop strings (never printed, even when they arrive over
several tokens), and a --chat error that names the runs that have a chat template."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

import sample
from conftest import ROOT, main_error


def test_defaults_per_mode_and_flags_override_them():
    a = sample.parse_args([])
    assert (a.temperature, a.top_k, a.top_p) == (0.8, 200, 1.0)             # plain text: nanoGPT's
    a = sample.parse_args(["--chat"])
    assert (a.temperature, a.top_k, a.top_p) == (0.2, 0, 0.9)               # chat: SmolLM2's model card
    a = sample.parse_args(["--chat", "--temperature", "0", "--top-p", "1"])
    assert (a.temperature, a.top_k, a.top_p) == (0.0, 0, 1.0)
    a = sample.parse_args(["--top-k", "5"])
    assert (a.temperature, a.top_k, a.top_p) == (0.8, 5, 1.0)
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    for phrase in ("(default: 0.8; with --chat 0.2)", "(default: 200; with --chat 0)", "(default: 1.0; with --chat 0.9)",
                   "--num-samples N", "--prompt-file FILE", "--stop TEXT"):
        assert phrase in text, phrase


def run_sample(capsys, *argv):
    assert sample.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_num_samples_are_the_seeded_samples_one_after_another(tiny_run, capsys):
    base = ["--ckpt", tiny_run, "--prompt", "the ", "--max-new-tokens", 20]
    out = run_sample(capsys, *base, "--seed", 5, "--num-samples", 3)
    one = [run_sample(capsys, *base, "--seed", s) for s in (5, 6, 7)]
    assert out == f"{sample.SEPARATOR}\n".join(one)
    assert len(set(one)) == 3


def test_prompt_file_is_the_prompt(tiny_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("the lazy\ndog ", encoding="utf-8")
    base = ["--ckpt", tiny_run, "--max-new-tokens", 10, "--seed", 1]
    assert run_sample(capsys, *base, "--prompt-file", tmp_path / "p.txt") == run_sample(capsys, *base, "--prompt",
                                                                                        "the lazy\ndog ")
    code, err = main_error(sample.main, ["--ckpt", str(tiny_run), "--prompt-file", str(tmp_path / "none.txt")], capsys)
    assert code == 1 and "--prompt-file" in err and "No such file" in err
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    code, err = main_error(sample.main, ["--ckpt", str(tiny_run), "--prompt-file", str(tmp_path / "bad.txt")], capsys)
    assert code == 1 and "is not UTF-8 text" in err
    code, err = main_error(sample.main, ["--prompt", "a", "--prompt-file", "p.txt"], capsys)
    assert code == 2 and "not allowed with argument" in err


def test_stop_strings_end_the_sample_and_are_not_printed(tiny_run, capsys):
    base = ["--ckpt", tiny_run, "--prompt", "the ", "--max-new-tokens", 60, "--temperature", 0]
    full = run_sample(capsys, *base)
    produced = full[len("the "):-1]
    stop = produced[7:10]                                   # three characters, three tokens, from the sample
    end = next(e for e in range(1, len(produced) + 1) if produced[:e].endswith(stop))
    out = run_sample(capsys, *base, "--stop", stop, "--stop", "never there")
    assert out == "the " + produced[:end - len(stop)] + "\n"


def test_stop_text_holds_back_only_what_may_still_be_a_stop():
    writes = []
    t = sample.StopText(SimpleNamespace(write=writes.append, flush=lambda: None), ["abd", "\n\n"])
    assert [t.add(p) for p in ["x", "a", "b", "c", "\n", "a", "b"]] == [False] * 7
    assert "".join(writes) == "xabc\n"                       # "ab" then "c": no stop; "\n", "ab" held back
    assert t.add("d") and "".join(writes) == "xabc\n"         # "\nabd" ends with "abd": not printed
    assert t.text == "xabc\n"
    writes.clear()
    t = sample.StopText(SimpleNamespace(write=writes.append, flush=lambda: None), ["\n\n", "xyz"])
    assert not t.add("a\n") and t.add("\nb") and "".join(writes) == "a"     # reached inside a token: cut there
    writes.clear()
    t = sample.StopText(SimpleNamespace(write=writes.append, flush=lambda: None), ["\n\n"])
    assert not t.add("one\n") and "".join(writes) == "one"
    t.finish("\n")
    assert "".join(writes) == "one\n\n"                      # held text comes out at the end


def test_chat_without_a_template_names_the_runs_that_have_one(tiny_run, capsys):
    code, err = main_error(sample.main, ["--ckpt", str(tiny_run), "--chat", "--prompt", "hi"], capsys)
    assert code == 1 and "has no chat template" in err and "train.py --sft" in err and "--import-gguf" in err


@pytest.mark.parametrize("argv, match", [
    (["--num-samples", "0"], "--num-samples >= 1"),
    (["--chat", "--num-samples", "2"], "--num-samples with --chat needs --prompt"),
    (["--stop", ""], "--stop needs a non-empty text"),
])
def test_bad_new_flags_are_usage_errors(argv, match, capsys):
    code, err = main_error(sample.main, argv, capsys)
    assert code == 2 and match in err
