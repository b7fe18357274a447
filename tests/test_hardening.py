"""Tests for issue #12, the defects a hostile review found in checkpoints, run folders, corpora and exports:
one test (or a few) per item, each failing on the code before its fix. Items in the issue's order:
the metadata hash, the run-folder lock, other runs' temp files, output folders in a corpus, --force on
export, sizes that cannot fit, then the low-severity ones (schema, dtypes, tokenizer size, non-finite
weights, tiny temperatures, split patterns, surrogate pairs, --max-iters, file modes, full disks,
resuming on another corpus, non-UTF-8 text). New modules and names are imported inside the tests, so
that each test fails on its own on the old code."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import bpe
import export
import gpt_numpy
import sample
import train
from lib.checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, main_error, make_text, run_quiet, tiny_args
from errors import FileFormatError
from lib import generation, tokenizer_files

# ----------------------------------------------------------------------------------------------------
# helpers


def copy_run(tiny_run, dest):
    """A private copy of the session's tiny run (its out dir), to damage or extend."""
    shutil.copytree(tiny_run, dest)
    return dest


def resave(src, dest, **meta_changes):
    """Re-save the checkpoint src (a file or run folder) at dest with some metadata keys replaced (a
    value None deletes the key); a valid file, as a careless or hostile writer could make it."""
    ck = load_checkpoint(src)
    meta = {**ck.meta, **meta_changes}
    meta = {k: v for k, v in meta.items() if v is not None}
    save_checkpoint(dest, ck.params, ck.adam_m, ck.adam_v, meta)
    return dest


def flip_in_file(path, old, new):
    """Replace the bytes `old` by `new` (same length) once in a file: a one-byte edit of its metadata."""
    raw = path.read_bytes()
    assert len(old) == len(new) and raw.count(old) >= 1, old
    path.write_bytes(raw.replace(old, new, 1))


def run_limited(args, timeout=90, env_extra=None, fsize=None):
    """A program (python args...) in a subprocess with at most 4 GB of address space and `timeout`
    seconds, so that code that would grow memory or hang fails fast instead of taking the machine down."""
    import resource

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        if fsize is not None:                            # a "disk" that is full after fsize bytes per file
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limits)


def one_line_failure(r):
    assert r.returncode not in (0, None) and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# 1. the metadata is covered by the hash (format version 2); version 1 still loads


# the metadata is JSON inside the header's JSON: its quotes are escaped (\")
@pytest.mark.parametrize("old, new", [(b'step\\": 20', b'step\\": 28'), (b'has_uint32\\": 0', b'has_uint32\\": 1')])
def test_metadata_damage_is_refused(tiny_run, tmp_path, old, new, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    flip_in_file(run / "ckpt.safetensors", old, new)
    with pytest.raises(FileFormatError, match="corrupt"):
        load_checkpoint(run)
    code, err = main_error(train.main, ["--resume", str(run), "--max-iters", "30"], capsys)
    assert code == 1 and "corrupt" in err


def test_version_1_checkpoint_still_loads_with_a_note(tiny_run, tmp_path, capsys):
    from safetensors.numpy import save_file
    from lib.checkpoint import tensors_sha256
    ck = load_checkpoint(tiny_run)
    tensors = {**{"params." + k: a for k, a in ck.params.items()}, **{"adam.m." + k: a for k, a in ck.adam_m.items()},
               **{"adam.v." + k: a for k, a in ck.adam_v.items()}}
    v1 = tmp_path / "v1.safetensors"           # exactly as the version-1 code wrote it
    save_file(tensors, v1, metadata={"format": "gpt-numpy-checkpoint", "version": "1", "meta": json.dumps(ck.meta),
                                     "tensors_sha256": tensors_sha256(tensors)})
    capsys.readouterr()
    again = load_checkpoint(v1)
    assert again.meta == ck.meta and again.has_training_state
    assert "version-1" in capsys.readouterr().err                         # a note, not an error
    assert sample.main(["--ckpt", str(v1), "--max-new-tokens", "5", "--seed", "0"]) == 0
    # a version 1 file's tensors are still verified
    flip_in_file(v1, b'step\\": 20', b'step\\": 28')
    assert load_checkpoint(v1).step == 28                                  # unverified metadata: accepted
    raw = bytearray(v1.read_bytes())
    raw[-5] ^= 0x40
    v1.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="corrupt"):
        load_checkpoint(v1)


def test_checkpoints_are_written_as_version_2(tiny_run):
    from safetensors import safe_open
    with safe_open(tiny_run / "ckpt.safetensors", framework="numpy") as f:
        md = f.metadata()
    assert md["version"] == "2" and "sha256" in md and "tensors_sha256" not in md


# ----------------------------------------------------------------------------------------------------
# 2. two runs cannot share an out dir; a killed run releases it


def test_a_busy_out_dir_is_refused_and_a_killed_run_releases_it(tmp_path, capsys):
    text = make_text(tmp_path / "text.txt")
    out = tmp_path / "out"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *tiny_args(tmp_path, text), "--max-iters",
                              "1000000", "--eval-interval", "1000000", "--ckpt-interval", "0", "--sample-tokens", "0"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not (out / "log.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        code, err = main_error(train.main, tiny_args(tmp_path, text, "--max-iters", 2), capsys)
        assert code == 1 and "in use" in err and str(first.pid) in err
    finally:
        first.kill()                                                     # SIGKILL: no clean-up at all
        first.wait()
    assert train.main(tiny_args(tmp_path, text, "--max-iters", 2, "--force")) == 0  # the kernel released the lock
    assert load_checkpoint(out).step == 2


# ----------------------------------------------------------------------------------------------------
# 3. data preparation removes only its own temp files, or those of processes that are gone


def test_data_preparation_keeps_a_live_runs_temp_file(tmp_path):
    text = make_text(tmp_path / "text.txt")
    cache = tmp_path / "data" / "text" / "char"
    cache.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    try:
        (cache / f".train.bin.tmp-{live.pid}").write_bytes(b"another run's work in progress")
        (cache / f".train.bin.tmp-{dead}").write_bytes(b"left by a killed run")
        run_quiet(tiny_args(tmp_path, text, "--max-iters", 2))
        assert (cache / f".train.bin.tmp-{live.pid}").is_file()
        assert not (cache / f".train.bin.tmp-{dead}").exists()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------------------------------
# 4. a folder corpus leaves out the project's own output folders


def test_folder_corpus_leaves_out_data_and_out_folders(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_text(corpus / "text.txt")
    args = ["--preset", "tiny", "--data", str(corpus), "--data-dir", str(corpus / "data"),
            "--out-dir", str(corpus / "out")]
    run_quiet(args)
    res = run_quiet(args + ["--resume", "--max-iters", "30"])      # the corpus now holds data/ and out/
    assert res["step"] == 30
    assert [s["path"] for s in res["data_meta"]["sources"]] == ["text.txt"]
    # another run's out dir inside the corpus is left out too
    res = run_quiet(["--preset", "tiny", "--data", str(tmp_path), "--data-dir", str(tmp_path / "data2"),
                     "--out-dir", str(tmp_path / "out2"), "--max-iters", "2"])
    assert [s["path"] for s in res["data_meta"]["sources"]] == ["corpus/text.txt"]


# ----------------------------------------------------------------------------------------------------
# 5. export and import refuse a non-empty destination unless --force, which replaces it whole


def test_import_does_not_replace_a_training_run_without_force(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    assert export.main(["--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    before = (run / "ckpt.safetensors").read_bytes()
    capsys.readouterr()
    code, err = main_error(export.main, ["--import-hf", str(tmp_path / "hf"), "--out", str(run)], capsys)
    assert code == 1 and "--force" in err
    assert (run / "ckpt.safetensors").read_bytes() == before              # the run is untouched
    assert export.main(["--import-hf", str(tmp_path / "hf"), "--out", str(run), "--force"]) == 0
    assert "train_config" not in load_checkpoint(run).meta and not (run / "log.jsonl").exists()   # replaced whole


def test_export_into_another_models_folder_needs_force_and_replaces_it_whole(tiny_run, tmp_path, capsys):
    fresh, dest = tmp_path / "fresh", tmp_path / "dest"
    assert export.main(["--ckpt", str(tiny_run), "--out", str(fresh)]) == 0
    dest.mkdir()
    stale = {"config.json": '{"model_type": "gpt2"}', "special_tokens_map.json": '{"bos_token": "<s>"}',
             "added_tokens.json": '{"<extra>": 99}', "chat_template.jinja": "{{ messages }}"}
    for name, text in stale.items():
        (dest / name).write_text(text)
    capsys.readouterr()
    code, err = main_error(export.main, ["--ckpt", str(tiny_run), "--out", str(dest)], capsys)
    assert code == 1 and "--force" in err and (dest / "config.json").read_text() == stale["config.json"]
    assert export.main(["--ckpt", str(tiny_run), "--out", str(dest), "--force"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert (dest / "config.json").read_text() == (fresh / "config.json").read_text()
    # an empty folder is not "non-empty", and --force never replaces a folder holding folders
    (tmp_path / "empty").mkdir()
    assert export.main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "empty")]) == 0
    (dest / "sub").mkdir()
    capsys.readouterr()
    code, err = main_error(export.main, ["--ckpt", str(tiny_run), "--out", str(dest), "--force"], capsys)
    assert code == 1 and "folder" in err


# ----------------------------------------------------------------------------------------------------
# 6. sizes that cannot fit are refused up front, in one line naming the estimate and the memory


@pytest.mark.parametrize("flags", [["--n-layer", "100000", "--d-model", "4096"], ["--batch-size", "100000000"],
                                   ["--block-size", "100000"]])
def test_sizes_that_cannot_fit_are_refused(tmp_path, capsys, monkeypatch, flags):
    from lib import memory
    monkeypatch.setattr(memory, "machine_memory", lambda gm=None: (64 * 10 ** 9, "memory"))
    text = make_text(tmp_path / "text.txt")
    code, err = main_error(train.main, tiny_args(tmp_path, text, *flags), capsys)
    assert "needs about" in err and "64.0 GB" in err
    assert not (tmp_path / "data").exists()                             # refused before any work


def test_sampling_that_cannot_fit_is_refused(tiny_run, capsys, monkeypatch):
    from lib import memory
    monkeypatch.setattr(memory, "machine_memory", lambda gm=None: (10_000, "memory"))
    code, err = main_error(sample.main, ["--ckpt", str(tiny_run), "--max-new-tokens", "5"], capsys)
    assert code == 1 and "needs about" in err and "KV cache" in err and "10.0 KB" in err


def test_more_than_is_free_now_warns_and_goes_on(tiny_run, capsys, monkeypatch):
    from lib import memory
    monkeypatch.setattr(memory, "machine_memory", lambda gm=None: (64 * 10 ** 9, "memory"))
    monkeypatch.setattr(memory, "available_memory", lambda gm=None: 10_000)
    assert sample.main(["--ckpt", str(tiny_run), "--max-new-tokens", "5", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: sampling from" in err and "more than the 10.0 KB free now (of 64.0 GB)" in err
    assert memory.available_memory() is None or memory.available_memory() > 0      # this machine's own


def test_memory_estimates_follow_the_measured_peak():
    import tracemalloc
    from lib import memory
    for cfg, B, T in [(gpt_numpy.GPTConfig(vocab_size=65, n_layer=2, n_head=4, d_model=64, d_ff=172, max_seq_len=64), 8, 64),
                      (gpt_numpy.GPTConfig(vocab_size=500, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=128,
                                           dropout=0.1), 4, 128)]:
        params = gpt_numpy.init_params(cfg)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1))
        tracemalloc.start()
        opt = gpt_numpy.adamw_init(params)
        grads = gpt_numpy.loss_and_grads(params, ids[:, :-1], ids[:, 1:], cfg, seed=1)[1]
        peak = tracemalloc.get_traced_memory()[1] + 4 * gpt_numpy.num_params(params)   # + the weights
        tracemalloc.stop()
        del opt, grads
        est = sum(memory.training_bytes(cfg, B, T).values())
        assert 0.75 < est / peak < 1.6, (est, peak)
    assert memory.count_params(cfg) == (gpt_numpy.num_params(params), len(params))


@pytest.mark.parametrize("change", [{"n_layer": 10 ** 9}, {"max_seq_len": 10 ** 12}])
def test_absurd_checkpoint_metadata_is_refused_before_allocating(tiny_run, tmp_path, change):
    ck = load_checkpoint(tiny_run)
    bad = resave(tiny_run, tmp_path / "bad" / "ckpt.safetensors", model_config={**ck.meta["model_config"], **change})
    text = tiny_run.parent / "text.txt"
    for args in (["sample.py", "--ckpt", bad, "--max-new-tokens", "5"],
                 ["export.py", "--ckpt", bad, "--out", tmp_path / "hf"],
                 ["train.py", "--resume", bad, "--max-iters", "30"],
                 ["train.py", *tiny_args(tmp_path, text), "--init-from", bad]):
        line = one_line_failure(run_limited(args))
        assert "n_layer" in line or "max_seq_len" in line, line


# ----------------------------------------------------------------------------------------------------
# Low: metadata of the wrong type, dtypes, a small char tokenizer, non-finite weights


@pytest.mark.parametrize("change", [{"step": "abc"}, {"model_config": None}, {"rng": {"batch": {"state": 1}}},
                                    {"progress": None}, {"adam_t": -1}, {"loss_scaler": {"scale": "big"}}])
def test_metadata_of_the_wrong_type_is_one_line(tiny_run, tmp_path, capsys, change):
    bad = resave(tiny_run, tmp_path / "bad" / "ckpt.safetensors", **change)
    code, err = main_error(train.main, ["--resume", str(bad), "--max-iters", "30"], capsys)
    assert code == 1 and next(iter(change)) in err


@pytest.mark.parametrize("change", [{"step": "abc"}, {"model_config": None}, {"model_config": [1, 2]}])
def test_metadata_of_the_wrong_type_is_one_line_in_sample_and_export(tiny_run, tmp_path, capsys, change):
    bad = resave(tiny_run, tmp_path / "bad" / "ckpt.safetensors", **change)
    code, err = main_error(sample.main, ["--ckpt", str(bad), "--max-new-tokens", "3"], capsys)
    assert code == 1
    code, err = main_error(export.main, ["--ckpt", str(bad), "--out", str(tmp_path / "hf")], capsys)
    assert code == 1


def test_metadata_that_is_not_an_object_is_one_line_with_init_from(tiny_run, tmp_path, capsys):
    ck = load_checkpoint(tiny_run)
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, ck.params, {}, {}, [1, 2, 3])
    code, err = main_error(train.main, tiny_args(tmp_path, tiny_run.parent / "text.txt", "--init-from", bad), capsys)
    assert code == 1 and "metadata" in err
    # a fresh run (here a fine-tuning one) in a folder that holds such a checkpoint: refused in one line
    # naming the file (#23 item 3), and replaced with --force
    save_checkpoint(tmp_path / "out" / "ckpt.safetensors", ck.params, {}, {}, [1, 2, 3])
    code, err = main_error(train.main, tiny_args(tmp_path, tiny_run.parent / "text.txt", "--init-from", tiny_run,
                                                 "--max-iters", 2), capsys)
    assert code == 1 and "holds another run (ckpt.safetensors, written" in err
    assert train.main(tiny_args(tmp_path, tiny_run.parent / "text.txt", "--init-from", tiny_run,
                                "--max-iters", 2, "--force")) == 0
    assert load_checkpoint(tmp_path / "out").step == 2


def test_non_float32_tensors_are_refused(tiny_run, tmp_path, capsys):
    ck = load_checkpoint(tiny_run)
    params = {**ck.params, "norm_f.weight": ck.params["norm_f.weight"].astype(np.int32)}
    bad = tmp_path / "bad.safetensors"
    from safetensors.numpy import save_file
    from lib import checkpoint                                      # written as save_checkpoint would, without its cast
    tensors = {"params." + k: a for k, a in params.items()}
    text = json.dumps(ck.meta)
    if checkpoint.VERSION == "1":                          # (the code before the fix)
        md = {"version": "1", "tensors_sha256": checkpoint.tensors_sha256(tensors)}
    else:
        md = {"version": checkpoint.VERSION, "sha256": checkpoint.checkpoint_sha256(tensors, text)}
    save_file(tensors, bad, metadata={"format": "gpt-numpy-checkpoint", "meta": text, **md})
    code, err = main_error(sample.main, ["--ckpt", str(bad), "--max-new-tokens", "3"], capsys)
    assert code == 1 and "int32" in err
    code, err = main_error(export.main, ["--ckpt", str(bad), "--out", str(tmp_path / "hf")], capsys)
    assert code == 1 and "int32" in err


def test_a_char_tokenizer_smaller_than_the_model_is_refused(tiny_run, tmp_path, capsys):
    from lib.tokenizer import CharTokenizer
    ck = load_checkpoint(tiny_run)
    small = CharTokenizer(ck.tokenizer().chars[:5])
    tok = {"kind": "char", "text": small.to_text()}
    bad = resave(tiny_run, tmp_path / "bad" / "ckpt.safetensors", tokenizer=tok)
    code, err = main_error(sample.main, ["--ckpt", str(bad), "--max-new-tokens", "200", "--temperature", "2",
                                         "--seed", "0"], capsys)
    assert code == 1 and "tokenizer" in err


@pytest.mark.parametrize("how", ["--resume", "--init-from"])
def test_nonfinite_weights_are_refused(tiny_run, tmp_path, capsys, how):
    ck = load_checkpoint(tiny_run)
    ck.params["blocks.0.attn.qkv"][0, 0] = np.nan
    bad = tmp_path / "bad" / "ckpt.safetensors"
    save_checkpoint(bad, ck.params, ck.adam_m, ck.adam_v, ck.meta)
    argv = (["--resume", str(bad)] if how == "--resume"          # step 20 of 20: straight to the final sample
            else tiny_args(tmp_path, tiny_run.parent / "text.txt", "--init-from", bad))
    code, err = main_error(train.main, argv, capsys)
    assert code == 1 and "non-finite" in err


# ----------------------------------------------------------------------------------------------------
# Low: a tiny temperature


def test_a_tiny_temperature_is_greedy_without_warnings(tiny_run, capsys):
    logits = np.array([1.0, 3.0, 2.0, -5.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in (1e-310, 5e-324, 1e-300):
            assert generation.sample_next(logits, np.random.default_rng(0), temperature=t) == 1
            assert generation.sample_next(logits, np.random.default_rng(0), temperature=t, top_k=2, top_p=0.5) == 1
        assert sample.main(["--ckpt", str(tiny_run), "--temperature", "1e-310", "--max-new-tokens", "10"]) == 0
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    greedy = capsys.readouterr().out
    assert sample.main(["--ckpt", str(tiny_run), "--temperature", "0", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == greedy


# ----------------------------------------------------------------------------------------------------
# Low: split patterns must cover the text, and cannot hang


def test_a_split_pattern_that_drops_text_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cover"):
        bpe.Tokenizer.train(["hello, world 42!"], 260, pattern=r"\p{L}+", progress=False)
    text = bpe.Tokenizer("gpt4", []).to_text().replace(json.dumps(bpe.GPT4_PATTERN), json.dumps(r"\p{L}+"))
    (tmp_path / "t.bpe").write_text(text)
    with pytest.raises(FileFormatError, match="cover"):
        bpe.Tokenizer.load(tmp_path / "t.bpe")
    with pytest.raises(ValueError, match="cover"):
        bpe.Tokenizer(r"\p{L}+", [])


def test_a_pattern_with_catastrophic_backtracking_is_bounded():
    code = ("import bpe\n"
            "try:\n"
            "    bpe.Tokenizer.train(['a' * 80 + '!'], 260, pattern=r'(?:a|aa)+$|[\\s\\S]', progress=False)\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    r = run_limited(["-c", code], timeout=60)
    assert r.returncode == 0 and "backtracking" in r.stdout, r.stdout + r.stderr


def test_a_slow_custom_pattern_is_stopped_while_encoding():
    # harmless on the probes a new tokenizer's pattern is tried on, exponential on a long run of "q"
    code = ("import bpe\n"
            "tok = bpe.Tokenizer(r'(?:q|qq)+b|[\\s\\S]', [])\n"
            "bpe.PATTERN_MIN_SECONDS = 0.5\n"
            "try:\n"
            "    tok.encode_ordinary('q' * 80 + '!')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    r = run_limited(["-c", code], timeout=60)
    assert r.returncode == 0 and "backtracking" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------
# Low: a surrogate pair given as two code points encodes as tiktoken encodes it


def test_surrogate_pairs_encode_as_tiktoken_does():
    tiktoken = pytest.importorskip("tiktoken")
    tok = bpe.Tokenizer.train(["emoji 😀 and 💀 ok \U0001F600\U0001F600 smile"] * 20, 270, progress=False)
    enc = tiktoken.Encoding("t", pat_str=tok.pattern, mergeable_ranks=tokenizer_files.mergeable_ranks(tok), special_tokens={})
    for text in ["\ud83d\ude00", "a \ud83d\ude00\ud83d\udc80 b", "x\ud83d\ude00\ud800y", "\ude00\ud83d", "😀"]:
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text), repr(text)
        assert tok.encode(text) == enc.encode(text)
    assert tok.decode(tok.encode("\ud83d\ude00")) == "😀"


# ----------------------------------------------------------------------------------------------------
# Low: --max-iters 0 in an older run's folder; resuming past --max-iters


def test_max_iters_0_starts_its_own_run(tmp_path):
    text = make_text(tmp_path / "text.txt")
    run_quiet(tiny_args(tmp_path, text))                               # an older run, 20 steps
    res = run_quiet(tiny_args(tmp_path, text, "--max-iters", 0, "--seed", 7, "--force"))
    out = tmp_path / "out"
    assert res["step"] == 0 and load_checkpoint(res["ckpt"]).step == 0  # its own checkpoint, not the old one
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0]


def test_resuming_past_max_iters_warns(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    logs = []
    res = train.run(["--resume", str(run), "--max-iters", "10"], log=logs.append)
    assert res["step"] == 20
    assert any(line.startswith("warning:") and "--max-iters 10" in line for line in logs), logs


# ----------------------------------------------------------------------------------------------------
# Low: export's file modes; full disks name the file


def test_export_files_have_one_mode(tiny_run, tmp_path):
    assert export.main(["--ckpt", str(tiny_run), "--out", str(tmp_path / "hf")]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}


def test_a_full_disk_names_the_file(tmp_path):
    text = make_text(tmp_path / "text.txt", 800)                       # ~32 KB: train.bin ~64 KB
    r = run_limited(["train.py", *tiny_args(tmp_path, text)], fsize=20_000)
    line = one_line_failure(r)
    assert "File too large" in line and ".train.bin" in line, line
    run_quiet(tiny_args(tmp_path, text, "--max-iters", 0))             # the data cache, without a limit
    r = run_limited(["train.py", *tiny_args(tmp_path, text), "--n-layer", 4, "--d-model", 64, "--force"],
                    fsize=20_000)
    line = one_line_failure(r)
    # (the first checkpoint file written is the step-0 evaluation's best.safetensors, then ckpt.safetensors)
    assert "File too large" in line and ("best.safetensors" in line or "ckpt.safetensors" in line), line


# ----------------------------------------------------------------------------------------------------
# Low: --resume on another corpus is refused before it touches the data cache


def test_resume_on_another_corpus_leaves_the_data_cache_alone(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_text(tmp_path / "a" / "text.txt", seed=1)
    make_text(tmp_path / "b" / "text.txt", seed=2)                    # same name "text", other contents
    run_quiet(tiny_args(tmp_path, tmp_path / "a" / "text.txt"))
    cache = tmp_path / "data" / "text" / "char"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.iterdir()}
    code, err = main_error(train.main, ["--resume", str(tmp_path / "out"), "--data", str(tmp_path / "b" / "text.txt"),
                                        "--data-dir", str(tmp_path / "data"), "--max-iters", "30"], capsys)
    assert code == 1 and "corpus" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.iterdir()} == before


# ----------------------------------------------------------------------------------------------------
# Low: text that is not UTF-8 under the char tokenizer


def test_non_utf8_text_under_the_char_tokenizer_warns(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_text(corpus / "good.txt")
    (corpus / "bad.txt").write_bytes(make_text(tmp_path / "x.txt", 50).read_bytes() + b"caf\xe9 \xff\xfe\n")
    logs = []
    train.run(["--preset", "tiny", "--data", str(corpus), "--data-dir", str(tmp_path / "data"),
               "--out-dir", str(tmp_path / "out"), "--max-iters", "2"], log=logs.append)
    warned = [line for line in logs if line.startswith("warning:")]
    assert len(warned) == 1 and "bad.txt" in warned[0] and "3 bytes" in warned[0], logs


def test_run_main_turns_errors_into_statuses(capsys):
    """errors.run_main, every program's exit rules: 2 for the command line, 1 for a failure, 130 on Ctrl-C."""
    import errors

    def parse(argv):
        if argv == ["bad"]:
            raise errors.UserError("no such flag")
        return argv

    def work(args):
        if args == ["missing"]:
            raise FileNotFoundError(2, "No such file or directory", "x.txt")
        if args == ["corrupt"]:
            raise FileFormatError("x.bin: truncated")
        if args == ["interrupt"]:
            raise KeyboardInterrupt
        if args == ["bug"]:
            raise ZeroDivisionError
    assert errors.run_main(parse, work, ["bad"], prefix="p.py: error: ") == 2
    assert capsys.readouterr().err == "p.py: error: no such flag\n"
    assert errors.run_main(parse, work, ["missing"]) == 1
    assert capsys.readouterr().err == "error: [Errno 2] No such file or directory: 'x.txt'\n"
    assert errors.run_main(parse, work, ["corrupt"]) == 1
    assert capsys.readouterr().err == "error: x.bin: truncated\n"
    assert errors.run_main(parse, work, ["interrupt"]) == 130
    assert errors.run_main(parse, work, []) == 0
    with pytest.raises(ZeroDivisionError):                  # a bug keeps its traceback
        errors.run_main(parse, work, ["bug"])


def test_run_main_on_error_reports_instead(capsys):
    """on_error sees every failure first, with its status (a bug: 1), inside the except clause; True means
    it reported the failure (run_main prints and raises nothing), False leaves it to the rules above."""
    import traceback
    import errors

    def parse(argv):
        if argv == ["bad"]:
            raise errors.UserError("no such flag")
        return argv

    def work(args):
        raise {"missing": FileNotFoundError(2, "No such file or directory", "x.txt"), "pipe": BrokenPipeError(),
               "interrupt": KeyboardInterrupt(), "bug": ZeroDivisionError("boom")}[args[0]]
    seen = []

    def on_error(status, e):
        seen.append((status, type(e).__name__, "ZeroDivisionError: boom" in traceback.format_exc()))
        return True
    for argv, status in [(["bad"], 2), (["missing"], 1), (["pipe"], 0), (["interrupt"], 130), (["bug"], 1)]:
        assert errors.run_main(parse, work, argv, on_error=on_error) == status
    assert seen == [(2, "UserError", False), (1, "FileNotFoundError", False), (0, "BrokenPipeError", False),
                    (130, "KeyboardInterrupt", False), (1, "ZeroDivisionError", True)]
    assert capsys.readouterr().err == ""                    # all reported by on_error
    assert errors.run_main(parse, work, ["missing"], on_error=lambda status, e: False) == 1
    assert capsys.readouterr().err == "error: [Errno 2] No such file or directory: 'x.txt'\n"
    with pytest.raises(ZeroDivisionError):                  # False: a bug still keeps its traceback
        errors.run_main(parse, work, ["bug"], on_error=lambda status, e: False)
