"""
bench/generation.py: how fast gpt_numpy generates with a real pretrained model, next to transformers (eager
attention, float32) or next to llama.cpp's own llama-bench, on the same weights, in the same run, on the
same threads.

    python export.py --import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2
    python bench/generation.py --ckpt out/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
    python bench/generation.py --ckpt out/smollm2 --threads 2 --profile     # where our time goes
    python bench/generation.py --ckpt out/smollm2 --threads 1 --llama-gguf SmolLM2-135M-Instruct.F32.gguf \
        --llama-bench llama.cpp/build/bin/llama-bench                      # against llama.cpp
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
directory (written to a temporary folder). Both greedy decodes must give the same tokens. Ours runs as
sample.py runs it: the weights laid out for inference (lib/inference.pack_for_inference).

With --llama-gguf FILE the other side is llama.cpp instead: its `llama-bench` (on PATH, or --llama-bench
PATH; docs/pretrained.md has the recipe that builds it and makes an F32 GGUF of the same weights) on FILE,
which must hold the checkpoint's very weights (checked first, tensor by tensor). Measured as llama-bench
measures, its two tests:
    pp N   tokens/s of an N-token prompt (--prefill) into an empty cache
    tg N   tokens/s of N single-token steps (--decode) from position 0
run alternately with ours, round by round (llama-bench -r 1 each time, its KV cache in f16, its default,
and in f32 as ours), one process on each side, the same thread count. The table gives the best of
--rounds and the median, and the ratios of the best and the median of each round's own ratio.
"""

import argparse
import json
import os
import shutil
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
# the two engines: each is (prefill() -> seconds, decode() -> (seconds, tokens)) on its own model; ours adds
# tg() -> seconds, llama-bench's generation test

def ours(a):
    import numpy as np
    import gpt_numpy as gn
    from lib import inference
    from lib.checkpoint import load_model
    m = load_model(a.ckpt)
    params, cfg = inference.pack_for_inference(gn, m.params, m.cfg), m.cfg    # as sample.py and eval.py run it
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

    def tg():
        """llama-bench's tg test: --decode single-token steps from position 0 (greedy), seconds."""
        kv = gn.kv_cache_init(cfg, np.float32, length=a.decode)
        nxt = long[0]
        t = time.perf_counter()
        for pos in range(a.decode):
            logits = gn.forward_cached(params, np.array([[nxt]]), cfg, kv, pos)
            nxt = int(np.argmax(logits[0, -1]))
        return time.perf_counter() - t

    return prefill, decode, tg


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
    engines = {"ours": ours(a)[:2], "theirs": theirs(a)}
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
    prefill, decode = (ours if engine == "ours" else theirs)(a)[:2]
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
# llama.cpp: its llama-bench, alternating with ours

def llama_bench(a):
    """One llama-bench run (-r 1: one timed repetition, after its own warm-up), its KV cache in f16 (its
    default): {"pp": tokens/s, "tg": tokens/s, "info": its build}."""
    cmd = [a.llama_bench, "-m", a.llama_gguf, "-p", a.prefill, "-n", a.decode, "-t", a.threads, "-r", 1, "-o", "jsonl"]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or len(rows) != 2:
        sys.stderr.write(p.stderr[-2000:])
        raise UserError(f"{a.llama_bench} failed (exit {p.returncode})")
    out = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    r = rows[0]
    out["info"] = (f"build {r['build_commit']}, {r['backends']}, {r['model_type']}, KV {r['type_k']}, "
                   f"flash_attn {r['flash_attn']}")
    return out


def llama_cpp_f32(a):
    """llama-bench's two tests with an f32 KV cache, which llama-bench does not offer (its -ctk takes f16,
    bf16 and quantized types): the same libllama (the one beside llama-bench, through llama-cpp-python's
    bindings: LLAMA_CPP_LIB_PATH), the steps of llama-bench's test_prompt and test_gen (random token ids,
    the prompt in one batch with the last position's logits; single tokens from position 0), after a
    warm-up run of each, one timed run. {"pp": tokens/s, "tg": tokens/s}."""
    import ctypes
    import random
    import llama_cpp as L
    quiet = L.llama_log_callback(lambda level, text, data: None)                # kept: C calls it
    L.llama_log_set(quiet, ctypes.c_void_p())
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(a.llama_gguf).encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = max(a.prefill, a.decode), 2048, 512       # llama-bench's batch sizes
    cp.n_threads = cp.n_threads_batch = a.threads
    cp.type_k = cp.type_v = 0                                                   # GGML_TYPE_F32
    ctx = L.llama_init_from_model(model, cp)
    if not model or not ctx:
        raise UserError(f"libllama could not load {a.llama_gguf}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab, bos = L.llama_vocab_n_tokens(vocab), (L.llama_vocab_bos(vocab) if L.llama_vocab_get_add_bos(vocab) else None)
    memory, rng = L.llama_get_memory(ctx), random.Random(0)
    batch = L.llama_batch_init(1, 0, 1)

    def pp():
        L.llama_memory_clear(memory, False)
        ids = [rng.randrange(n_vocab) for _ in range(a.prefill)]
        ids[0] = ids[0] if bos is None else bos
        tokens = (L.llama_token * len(ids))(*ids)                               # kept: the batch points into it
        t = time.perf_counter()
        if L.llama_decode(ctx, L.llama_batch_get_one(tokens, len(ids))):
            raise UserError("llama_decode failed")
        L.llama_synchronize(ctx)
        return a.prefill / (time.perf_counter() - t)

    def tg():
        L.llama_memory_clear(memory, False)
        token = rng.randrange(n_vocab) if bos is None else bos
        t = time.perf_counter()
        for pos in range(a.decode):
            batch.n_tokens, batch.token[0], batch.pos[0] = 1, token, pos
            batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 0, 1
            if L.llama_decode(ctx, batch):
                raise UserError("llama_decode failed")
            L.llama_synchronize(ctx)
            token = rng.randrange(n_vocab)
        return a.decode / (time.perf_counter() - t)

    pp(), tg()                                                                   # warm-up, as llama-bench's
    return {"pp": pp(), "tg": tg()}


def run_llama(a):
    """Ours, llama-bench (KV f16) and libllama with an f32 KV cache, alternately, --rounds times (the order
    rotating each round): tokens/s of each."""
    prefill, _, tg = ours(a)
    prefill(), tg()                                                 # warm-up (the llama runs warm up themselves)
    out = {name: {"pp": [], "tg": []} for name in SIDES}
    for k in range(a.rounds):
        for name in SIDES[k % 3:] + SIDES[:k % 3]:
            if name == "ours":
                r = {"pp": a.prefill / prefill(), "tg": a.decode / tg()}
            elif name == "f16":
                r = llama_bench(a)
                out["info"] = r["info"]
            else:
                r = child(a, "llama-f32")
            out[name]["pp"].append(r["pp"])
            out[name]["tg"].append(r["tg"])
    return out


SIDES = ("ours", "f16", "f32")


def same_weights(a):
    """Does --llama-gguf hold the checkpoint's weights, tensor for tensor? (and the same config)"""
    import numpy as np
    from lib.checkpoint import load_model
    from lib.gguf_model import read_gguf
    m = load_model(a.ckpt)
    g = read_gguf(a.llama_gguf)
    same = g.cfg == m.cfg and all(np.array_equal(g.params[k], m.params[k]) for k in m.params)
    return {"same": bool(same)}


def machine():
    """The CPU model and core count, NumPy's BLAS (its build configuration, which names the kernels a
    DYNAMIC_ARCH OpenBLAS picked)."""
    import numpy as np
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    what = blas.get("openblas configuration") or f"{blas.get('name', '?')} {blas.get('version', '')}"
    return f"{cpu}, {os.cpu_count()} cores; numpy {np.__version__}, BLAS: {' '.join(what.split())}"


def llama_table(a):
    """--llama-gguf: the weights checked, then ours and llama-bench alternately; the table."""
    if not child(a, "weights")["same"]:
        raise UserError(f"--llama-gguf {a.llama_gguf} does not hold the weights of --ckpt {a.ckpt}: the comparison "
                        f"needs the very same numbers (docs/pretrained.md: make the F32 GGUF from the file imported)")
    print(f"weights: {a.llama_gguf} holds the checkpoint's float32 weights, tensor for tensor")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(Path(a.llama_bench).resolve().parent)   # the f32 runs' libllama
    r = child(a, "llama")
    print(f"machine: {r['machine']}")
    print(f"llama.cpp: {a.llama_bench}: {r['info']}; load after: {common.loadavg()}")
    med = lambda xs: sorted(xs)[len(xs) // 2]                     # noqa: E731
    names = {"ours": "gpt_numpy, KV float32", "f16": "llama-bench, KV f16 (its default)", "f32": "libllama, KV f32"}
    pp, tg = f"pp{a.prefill}", f"tg{a.decode}"
    print(f"\nthreads: {a.threads} (OPENBLAS_NUM_THREADS for ours, llama-bench -t); {a.rounds} rounds, alternating; "
          f"tokens/s, best (median)\n")
    print(f"| {'':<36} | {pp + ' tok/s':>20} | {tg + ' tok/s':>20} |")
    print(f"|{'-' * 38}|{'-' * 22}|{'-' * 22}|")
    for name in SIDES:
        print(f"| {names[name]:<36} | {max(r[name]['pp']):10.1f} ({med(r[name]['pp']):7.1f}) "
              f"| {max(r[name]['tg']):10.1f} ({med(r[name]['tg']):7.1f}) |")
    for kv_type in SIDES[1:]:
        row = []
        for test in ("pp", "tg"):
            o, t = r["ours"][test], r[kv_type][test]
            row.append(f"{max(o) / max(t):8.2f}x ({med([x / y for x, y in zip(o, t)]):5.2f}x)")
        print(f"| {'ours / ' + names[kv_type].split(' (')[0]:<36} | {row[0]:>20} | {row[1]:>20} |")
    print("\n(ratios: of the best, and in brackets the median of each round's own ratio. libllama, KV f32: the library\n"
          "beside llama-bench, driven through llama-cpp-python with llama-bench's steps: its -ctk takes no f32)")
    return 0


# ----------------------------------------------------------------------------------------------------
# the parent: rounds, the import's memory, the table

def child(a, what):
    """Run this program's `what` part (speed, mem-ours, mem-theirs, profile, weights, llama) in a fresh process."""
    argv = [sys.executable, Path(__file__).resolve(), "--child", what, "--ckpt", a.ckpt, "--hf-dir", a.hf_dir,
            "--threads", a.threads, "--rounds", a.rounds, "--prompt", a.prompt, "--decode", a.decode,
            "--prefill", a.prefill]
    if a.llama_gguf:
        argv += ["--llama-gguf", a.llama_gguf, "--llama-bench", a.llama_bench]
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
    ap.add_argument("--llama-gguf", metavar="FILE",
                    help="compare with llama.cpp's llama-bench on this GGUF file instead of transformers: the "
                         "checkpoint's very weights, in F32 (docs/pretrained.md has the recipe)")
    ap.add_argument("--llama-bench", metavar="PATH",
                    help="llama.cpp's llama-bench program (default: llama-bench on PATH)")
    ap.add_argument("--child", choices=["speed", "mem-ours", "mem-theirs", "profile", "weights", "llama",
                                        "llama-f32"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default="", help=argparse.SUPPRESS)     # the children's Hugging Face copy
    a = ap.parse_args(argv)
    common.check_threads(a.threads)
    for k in ("rounds", "prompt", "decode", "prefill"):
        if getattr(a, k) < 1:
            raise UserError(f"--{k} must be at least 1, got {getattr(a, k)}")
    if a.llama_bench and not a.llama_gguf:
        raise UserError("--llama-bench needs --llama-gguf FILE (the F32 GGUF of the checkpoint's weights)")
    if a.llama_gguf:
        if not Path(a.llama_gguf).is_file():
            raise UserError(f"--llama-gguf {a.llama_gguf}: no such file")
        a.llama_bench = a.llama_bench or shutil.which("llama-bench")
        if not a.llama_bench:
            raise UserError("llama-bench is not on PATH: pass --llama-bench PATH (docs/pretrained.md has the recipe "
                            "that builds it)")
        if not (Path(a.llama_bench).is_file() and os.access(a.llama_bench, os.X_OK)):
            raise UserError(f"--llama-bench {a.llama_bench}: not an executable file")
    return a


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure."""
    return run_main(parse_args, bench, argv)


def bench(a):
    if a.child:
        run = {"speed": run_speed, "weights": same_weights, "profile": lambda a: profile(*ours(a)[:2], a),
               "llama": lambda a: {**run_llama(a), "machine": machine()}, "llama-f32": llama_cpp_f32}.get(a.child)
        common.print_result(run(a) if run else run_memory(a, a.child[4:]))
        return 0
    print(f"bench/generation.py  ckpt={a.ckpt}  threads={a.threads}  rounds={a.rounds}  load={common.loadavg()}")
    if a.profile:
        for name, text in child(a, "profile").items():
            print(f"\n--- ours, {name} ({a.prefill if name == 'prefill' else a.decode} tokens) ---\n{text}")
        return 0
    if a.llama_gguf:
        return llama_table(a)
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
