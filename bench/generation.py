"""
bench/generation.py: how fast gpt_numpy generates with a real pretrained model, next to transformers (eager
attention, float32) on the same weights, in the same run, on the same threads.

    python export.py --import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2
    python bench/generation.py --ckpt out/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
    python bench/generation.py --ckpt out/smollm2 --threads 2 --profile     # where our time goes
    python -m bench.generation --ckpt out/smollm2 --threads 2               # the same program, as a module

Run it from the repository root (it runs export.py, the program, from there).

It measures, on the same weights and threads:

    decode   tokens/s of single-token steps with the KV cache, after a short prompt (greedy, --decode steps)
    prefill  tokens/s of a --prefill-token prompt into an empty cache, logits of the last position only
             (as generation needs them; transformers' generate() asks for logits_to_keep=1 too)
    memory   peak RSS of a process that loads one engine and generates (loading included), and the peak
             while generating alone (Linux: VmHWM reset after loading); the import's peak
             (export.py --import-gguf in a subprocess)

Speed is timed in one process that holds both models and alternates them measurement by measurement
(ours, theirs, ours, theirs...), so that the load of a shared machine, which can change speeds 3x
within a minute, falls on both alike; the table gives the best of --rounds (the least disturbed run, as
bench/tokenizer.py does) and the median. Memory is measured in a fresh process per engine. The weights
are the checkpoint's float32 arrays; transformers reads the same arrays through export.py's Hugging Face
directory (written to a temporary folder). Both greedy decodes must give the same tokens.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):   # `python bench/generation.py`: import from the repository root, not from bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench import common
from bench.common import SHARED, peak_rss_mib, reset_peak_rss
from errors import ArgumentParser, UserError, run_main

SHAKESPEARE = SHARED / "tinyshakespeare.txt"


def checkpoint_tokenizer(ckpt):
    """The tokenizer of a checkpoint, from its metadata alone (without reading the weights)."""
    from lib.checkpoint import read_meta
    from lib.tokenizer import tokenizer_from_text
    path = Path(ckpt) / "ckpt.safetensors" if Path(ckpt).is_dir() else Path(ckpt)
    t = read_meta(path)["tokenizer"]
    return tokenizer_from_text(t["kind"], t["text"])


def prompt_ids(tok, n):
    """n token ids of real text (tiny Shakespeare if present, else a repeated sentence)."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000] if SHAKESPEARE.is_file() else \
        "The quick brown fox jumps over the lazy dog. " * 400
    ids = tok.encode_ordinary(text)
    return ids[:n]


# ----------------------------------------------------------------------------------------------------
# the two engines: each is (prefill() -> seconds, decode() -> (seconds, tokens)) on its own model

def ours(a):
    import numpy as np
    import gpt_numpy as gn
    from lib.checkpoint import load_model
    m = load_model(a.ckpt)
    params, cfg = m.params, m.cfg
    long = prompt_ids(m.tokenizer, a.prefill)
    short = long[:a.prompt]

    def prefill():
        kv = gn.kv_cache_init(cfg, np.float32, length=len(long))
        t = time.perf_counter()
        gn.forward_cached(params, np.array([long]), cfg, kv, 0, last_only=True)
        return time.perf_counter() - t

    def decode():
        kv = gn.kv_cache_init(cfg, np.float32, length=len(short) + a.decode)
        logits = gn.forward_cached(params, np.array([short]), cfg, kv, 0, last_only=True)
        out = []
        t = time.perf_counter()
        for pos in range(len(short), len(short) + a.decode):
            out.append(int(np.argmax(logits[0, -1])))
            logits = gn.forward_cached(params, np.array([out[-1:]]), cfg, kv, pos)
        return time.perf_counter() - t, out

    return prefill, decode


def theirs(a):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    tok = checkpoint_tokenizer(a.ckpt)
    long = prompt_ids(tok, a.prefill)
    short = long[:a.prompt]

    def prefill():
        with torch.no_grad():
            t = time.perf_counter()
            model(torch.tensor([long]), use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t

    def decode():
        with torch.no_grad():
            res = model(torch.tensor([short]), use_cache=True, logits_to_keep=1)
            kw = "cache" if hasattr(res, "cache") else "past_key_values"
            out = []
            t = time.perf_counter()
            for _ in range(a.decode):
                out.append(int(res.logits[0, -1].argmax()))
                res = model(torch.tensor([out[-1:]]), use_cache=True, **{kw: getattr(res, kw)})
            return time.perf_counter() - t, out

    return prefill, decode


def run_speed(a):
    """Both engines in this process, alternating, --rounds times: their prefill and decode seconds."""
    import torch
    engines = {"ours": ours(a), "theirs": theirs(a)}
    for prefill, decode in engines.values():                        # warm-up
        prefill(), decode()
    out = {name: {"prefill_s": [], "decode_s": [], "tokens": None} for name in engines}
    for _ in range(a.rounds):
        for what in ("prefill", "decode"):
            for name, (prefill, decode) in engines.items():
                if what == "prefill":
                    out[name]["prefill_s"].append(prefill())
                else:
                    sec, out[name]["tokens"] = decode()
                    out[name]["decode_s"].append(sec)
    out["threads"] = {"blas": os.environ.get("OPENBLAS_NUM_THREADS"), "torch": torch.get_num_threads()}
    return out


def run_memory(a, engine):
    """Peak RSS (MiB) of loading `engine` and generating with it once, and of the generating alone."""
    prefill, decode = (ours if engine == "ours" else theirs)(a)
    loaded = peak_rss_mib()
    reset_peak_rss()
    prefill(), decode()
    return {"load_peak_mib": loaded, "gen_peak_mib": peak_rss_mib(), "process_peak_mib": max(loaded, peak_rss_mib())}


def profile(prefill, decode, a):
    """cProfile of our prefill and decode: the functions where the time goes, by own time."""
    import cProfile
    import io
    import pstats
    prefill(), decode()
    out = {}
    for name, fn in (("prefill", prefill), ("decode", lambda: decode()[0])):
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        out[name] = s.getvalue()
    return out


# ----------------------------------------------------------------------------------------------------
# the parent: rounds, the import's memory, the table

def child(a, what):
    """Run this program's `what` part (speed, mem-ours, mem-theirs, profile) in a fresh process."""
    argv = [sys.executable, Path(__file__).resolve(), "--child", what, "--ckpt", a.ckpt, "--hf-dir", a.hf_dir,
            "--threads", a.threads, "--rounds", a.rounds, "--prompt", a.prompt, "--decode", a.decode,
            "--prefill", a.prefill]
    return common.run_child(argv, a.threads, f"the {what} run", cwd=common.ROOT)


def import_peak_mib(a):
    """Peak RSS (MiB) of export.py --import-gguf (a subprocess), or None without --gguf."""
    if not a.gguf:
        return None
    with tempfile.TemporaryDirectory() as d:
        p = subprocess.Popen([sys.executable, str(common.EXPORT), "--import-gguf", a.gguf, "--out", d],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=common.thread_env(a.threads))
        _, status, usage = os.wait4(p.pid, 0)
        if status:
            sys.stderr.write(p.stderr.read().decode()[-2000:])
            raise UserError(f"export.py --import-gguf {a.gguf} failed")
    return usage.ru_maxrss / 1024


def parse_args(argv):
    ap = ArgumentParser(prog="bench/generation.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint (export.py --import-gguf / --import-hf)")
    ap.add_argument("--gguf", help="also measure the peak memory of importing this GGUF file (default: none)")
    common.add_threads_argument(ap)
    ap.add_argument("--rounds", type=int, default=7, help="timed runs of each measurement (default: %(default)s)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding (default: %(default)s)")
    ap.add_argument("--decode", type=int, default=64, help="decode steps timed (default: %(default)s)")
    ap.add_argument("--prefill", type=int, default=512, help="prefill prompt tokens (default: %(default)s)")
    ap.add_argument("--profile", action="store_true", help="cProfile of our prefill and decode instead")
    ap.add_argument("--child", choices=["speed", "mem-ours", "mem-theirs", "profile"], help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default="", help=argparse.SUPPRESS)     # the children's Hugging Face copy
    a = ap.parse_args(argv)
    common.check_threads(a.threads)
    for k in ("rounds", "prompt", "decode", "prefill"):
        if getattr(a, k) < 1:
            raise UserError(f"--{k} must be at least 1, got {getattr(a, k)}")
    return a


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure."""
    return run_main(parse_args, bench, argv)


def bench(a):
    if a.child:
        common.print_result(run_speed(a) if a.child == "speed" else profile(*ours(a), a) if a.child == "profile"
                            else run_memory(a, a.child[4:]))
        return 0
    print(f"bench/generation.py  ckpt={a.ckpt}  threads={a.threads}  rounds={a.rounds}  load={common.loadavg()}")
    if a.profile:
        for name, text in child(a, "profile").items():
            print(f"\n--- ours, {name} ({a.prefill if name == 'prefill' else a.decode} tokens) ---\n{text}")
        return 0
    imp = import_peak_mib(a)
    import torch
    import transformers
    with tempfile.TemporaryDirectory() as tmp:                     # transformers' copy of the same weights
        hf_dir = os.path.join(tmp, "hf")
        if subprocess.run([sys.executable, str(common.EXPORT), "--ckpt", a.ckpt, "--out", hf_dir],
                          stdout=subprocess.DEVNULL).returncode:                  # its error line is on stderr
            raise UserError(f"export.py --ckpt {a.ckpt} failed")
        a.hf_dir = hf_dir
        mem = {engine: child(a, f"mem-{engine}") for engine in ("ours", "theirs")}
        speed = child(a, "speed")
    same = speed["ours"]["tokens"] == speed["theirs"]["tokens"]
    print(f"load after: {common.loadavg()}; transformers {transformers.__version__}, torch {torch.__version__}; "
          f"threads {speed['threads']}; greedy tokens identical: {same}")
    if imp is not None:
        print(f"peak memory of export.py --import-gguf: {imp:.0f} MiB")
    med = lambda xs: sorted(xs)[len(xs) // 2]                  # noqa: E731
    rows = {}
    for engine in ("ours", "theirs"):
        r = speed[engine]
        dec, pre = [a.decode / s for s in r["decode_s"]], [a.prefill / s for s in r["prefill_s"]]
        rows[engine] = (max(dec), med(dec), max(pre), med(pre), mem[engine]["process_peak_mib"], mem[engine]["gen_peak_mib"])
    print(f"\n| {'':<28} | decode tok/s: best (median) | prefill {a.prefill} tok/s: best (median) | peak MiB: process | while generating |")
    print(f"|{'-' * 30}|{'-' * 29}|{'-' * 35}|{'-' * 18}|{'-' * 18}|")
    names = {"ours": "gpt_numpy (NumPy, float32)", "theirs": "transformers eager float32"}
    for engine, (db, dm, pb, pm, lm, gm) in rows.items():
        print(f"| {names[engine]:<28} | {db:12.1f} ({dm:6.1f})       | {pb:16.1f} ({pm:7.1f})        | {lm:16.0f} | {gm:16.0f} |")
    o, t = rows["ours"], rows["theirs"]
    print(f"| {'ours / transformers':<28} | {o[0] / t[0]:11.2f}x ({o[1] / t[1]:5.2f}x)       |"
          f" {o[2] / t[2]:15.2f}x ({o[3] / t[3]:6.2f}x)        | {o[4] / t[4]:15.2f}x | {o[5] / t[5]:15.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
