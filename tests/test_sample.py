"""Tests for sample.py: streaming from a checkpoint (reproducible with --seed, UTF-8 split across tokens
printed whole) and its command line: exit 2 for bad flags, 1 for a bad checkpoint or prompt, one line each."""

import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

import sample
from conftest import ROOT, main_error


def test_sample_streams_from_a_tiny_checkpoint(tiny_run, capsys):
    ck = str(tiny_run / "ckpt.safetensors")
    argv = ["--ckpt", ck, "--prompt", "the ", "--max-new-tokens", "30", "--seed", "3", "--top-p", "0.9"]
    assert sample.main(argv) == 0
    out1 = capsys.readouterr().out
    assert out1.startswith("the ") and len(out1) == len("the ") + 30 + 1      # chars: one per token, + "\n"
    assert sample.main(argv) == 0
    assert capsys.readouterr().out == out1                                    # seeded: reproducible
    assert sample.main(argv[:1] + [str(tiny_run)] + argv[2:]) == 0           # the out dir works as well
    assert capsys.readouterr().out == out1
    code, err = main_error(sample.main, ["--ckpt", ck, "--prompt", "€"], capsys)   # not in the char vocabulary
    assert code == 1 and "not in the char vocabulary" in err


def test_sample_decodes_utf8_split_across_tokens(monkeypatch):
    """A byte-level tokenizer splits "é" and an emoji into several tokens: the stream must print each
    character whole, once its last byte arrives, never U+FFFD."""
    bpe = pytest.importorskip("bpe")
    tok = bpe.Tokenizer("gpt4", [])                                           # bytes only
    new = list("é😀".encode())                                               # 2 + 4 byte tokens
    monkeypatch.setattr(sample.generation, "generate_stream", lambda *a, **k: iter(new))
    writes = []
    out = SimpleNamespace(write=writes.append, flush=lambda: None)
    sample.stream(None, None, tok, None, "a", 6, 1.0, None, None, 0, out=out)
    assert "".join(writes) == "aé😀\n"
    assert "é" in writes and "😀" in writes                                  # each printed whole


def test_plain_prompt_starts_with_bos_when_the_model_says_so(monkeypatch):
    """add_bos in the chat metadata (Llama 3; llama.cpp's rule for GGUF files): the model reads BOS first,
    the output shows the prompt without it; without add_bos the ids are encode_prompt's."""
    bpe = pytest.importorskip("bpe")
    tok = bpe.Tokenizer("gpt4", [], {"<|begin_of_text|>": 256})
    seen = []

    def generate_stream(gm, params, ids, *a, **k):
        seen.append(list(ids))
        return iter([])
    monkeypatch.setattr(sample.generation, "generate_stream", generate_stream)
    fake = None
    writes = []
    out = SimpleNamespace(write=writes.append, flush=lambda: None)
    info = {"bos_id": 256, "add_bos": True}
    sample.stream(None, None, tok, fake, "hi", 4, 1.0, None, None, 0, out=out, info=info)
    sample.stream(None, None, tok, fake, "hi", 4, 1.0, None, None, 0, out=out, info={**info, "add_bos": False})
    assert seen == [[256, 104, 105], [104, 105]] and "".join(writes) == "hi\nhi\n"


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--temperature", "inf"], ["--top-p", "0"],
                                   ["--top-k", "-2"], ["--max-new-tokens", "-1"], ["--seed", "-3"],
                                   ["--backend", "tpu"], ["--no-such-flag"]])
def test_bad_flags_are_usage_errors(tiny_run, flags, capsys):
    code, err = main_error(sample.main, ["--ckpt", str(tiny_run), *flags], capsys)
    assert code == 2 and err.startswith("error: ")


def test_bad_checkpoints_are_one_line_failures(tiny_run, tmp_path, capsys):
    code, err = main_error(sample.main, ["--ckpt", str(tmp_path / "none")], capsys)
    assert code == 1 and err.startswith("error: no checkpoint at")
    shutil.copy(tiny_run / "ckpt.safetensors", tmp_path / "ckpt.safetensors")
    (tmp_path / "ckpt.safetensors").write_bytes((tmp_path / "ckpt.safetensors").read_bytes()[:500])
    code, err = main_error(sample.main, ["--ckpt", str(tmp_path)], capsys)
    assert code == 1 and "truncated or corrupt" in err


def test_process_exit_status_and_help(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "sample.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path)
    r = run("--help")
    assert r.returncode == 0 and "--ckpt" in r.stdout and "--top-p" in r.stdout
    r = run("--ckpt", "nothing")
    assert r.returncode == 1 and r.stderr == "error: no checkpoint at nothing\n"
    r = run("--top-k", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: argument --top-k") and "Traceback" not in r.stderr


def test_plain_sample_ends_at_the_models_end_of_text_token(tiny_run, tmp_path, capsys):
    # a model whose metadata names its end-of-text token (imported and chat models do) ends a plain sample
    # there, the token not printed, as transformers' generate() and llama.cpp do; --ignore-eos goes on past
    # it; a model trained here names none and runs to --max-new-tokens (the first test)
    from lib.checkpoint import build_meta, load_checkpoint, save_checkpoint
    argv = ["--prompt", "the ", "--max-new-tokens", "30", "--temperature", "0"]
    assert sample.main(["--ckpt", str(tiny_run)] + argv) == 0
    full = capsys.readouterr().out[len("the "):-1]                           # 30 greedy characters
    end = full[len(full) // 2]                                                # a character it reaches
    ck = load_checkpoint(tiny_run)
    tok = ck.tokenizer()
    meta = build_meta(ck.model_config(), tok, chat={"template": "{{ messages }}", "eos_token": None, "bos_token": None,
                                                   "bos_id": None, "add_bos": False,
                                                   "stop_ids": [int(tok.encode_ordinary(end)[0])]})
    save_checkpoint(tmp_path / "eos" / "ckpt.safetensors", ck.params, {}, {}, meta)
    assert sample.main(["--ckpt", str(tmp_path / "eos")] + argv) == 0
    assert capsys.readouterr().out == "the " + full[:full.index(end)] + "\n"
    assert sample.main(["--ckpt", str(tmp_path / "eos"), "--ignore-eos"] + argv) == 0
    assert capsys.readouterr().out == "the " + full + "\n"
    code, err = main_error(sample.main, ["--ckpt", str(tmp_path / "eos"), "--chat", "--ignore-eos"], capsys)
    assert code == 2 and "--ignore-eos is for plain text" in err
