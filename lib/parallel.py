"""
lib/parallel.py: a training step on every core, in one process: train.py --threads N.

The step's batch is cut into N shards of equal rows; N threads run the model's forward and backward on
one shard each, every thread with a single BLAS thread; the gradients are then summed in shard order, and
the element-wise work after the backward pass (that sum, the mean, AdamW) is split among the same threads
by rows of the parameters. What a step with N threads computes is therefore defined without threads:

    --threads N --batch-size B --grad-accum G  ==  --threads 1 --batch-size B/N --grad-accum G*N

bit for bit (train.py's train_step: shard j of micro-batch m is micro-batch m*N + j, its dropout masks
keyed so, its gradients added in that order), as 2 MPI ranks equal --grad-accum 2 in one process
(lib/dist.py). tests/test_threads.py holds the two runs equal.

Why threads work here, in spite of Python's global interpreter lock (GIL): NumPy lets go of the GIL inside
every matmul and every element-wise pass over a large array, so N threads run N shards' array work at
once; only the Python between the array calls takes turns (1-3% of a step of the bench configs: the part
of a step that stays serial, with the gradient-norm reduction; bench/training.py --threads N measures the
whole).

Why one BLAS thread per worker rather than one BLAS with N threads: a BLAS parallelizes each matmul
alone, and its threads meet at a barrier after every call, hundreds of times per step; the element-wise
passes between the calls (norms, RoPE, softmax, SwiGLU's gating, AdamW) run on one core meanwhile. Shards
keep every core busy with everything, meet once per step, and do not wait for a core that another program
took. set_blas_threads finds the OpenBLAS that NumPy loaded (NumPy's wheels bring one) and sets its
thread count while a pool runs; with another BLAS, set its own variable (MKL_NUM_THREADS=1 ...).

    pool = Pool(2)                                  # 2 threads: one worker and the caller
    out = pool.map(f, items)                        # [f(item) for item in items], items run at once
    add_into(pool, grads, g)                        # grads[k] += g[k] for every k, split by rows
    adamw_step(pool, gm, params, grads, state, lr, ...)   # gm.adamw_step, the same bits
    add_into(None, grads, g)                        # pool None: the same, here in one thread
    pool.close()
"""

import ctypes
import queue
import threading

import numpy as np


# ----------------------------------------------------------------------------------------------------
# The BLAS's own thread count

# OpenBLAS's names for its thread-count functions: its own build, the 64-bit-integer build, and the build
# of NumPy's wheels (scipy-openblas, whose symbols carry a prefix and a suffix)
OPENBLAS_NAMES = [("openblas_get_num_threads", "openblas_set_num_threads"),
                  ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                  ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                  ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads")]


def _find_openblas():
    """(get, set) of the thread count of the OpenBLAS loaded in this process, or None. Linux: the
    libraries mapped into the process (/proc/self/maps) whose file name says openblas."""
    try:                                                # (NumPy's core loads its BLAS with it)
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return None
    for path in sorted(p for p in paths if "openblas" in p.rsplit("/", 1)[-1].lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in OPENBLAS_NAMES:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                get, set_ = getattr(lib, get_name), getattr(lib, set_name)
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                return get, set_
    return None


_OPENBLAS = []          # [(get, set) or None], found once


def blas_threads():
    """The (get, set) pair of NumPy's OpenBLAS thread count, or None where it cannot be found."""
    if not _OPENBLAS:
        _OPENBLAS.append(_find_openblas())
    return _OPENBLAS[0]


def set_blas_threads(n):
    """Set the BLAS's thread count to n; returns the count it had (None: no OpenBLAS found, nothing set)."""
    found = blas_threads()
    if found is None:
        return None
    get, set_ = found
    old = get()
    if old != n:
        set_(n)
    return old


# ----------------------------------------------------------------------------------------------------
# The pool

class Pool:
    """`threads` threads for the shards of a step: threads - 1 workers and the caller, which runs item 0
    itself. map() runs items at once, one per thread, with one BLAS thread each. The workers are daemon
    threads: a second Ctrl-C ends the program at once, without waiting for a shard to finish."""

    def __init__(self, threads):
        if threads < 1:
            raise ValueError(f"a pool needs at least 1 thread, got {threads}")
        self.threads = threads
        self._inbox = [queue.SimpleQueue() for _ in range(threads - 1)]
        self._done = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, args=(q,), name=f"shard-{i + 1}", daemon=True)
                         for i, q in enumerate(self._inbox)]
        for w in self._workers:
            w.start()

    def _work(self, inbox):
        while True:
            job = inbox.get()
            if job is None:                             # close()
                return
            i, fn, item = job
            try:
                self._done.put((i, True, fn(item)))
            except BaseException as e:                  # handed to the caller, raised there
                self._done.put((i, False, e))

    def map(self, fn, items):
        """[fn(item) for item in items], at most `threads` items at once (item i on thread i % threads),
        in items' order. If any raises, the first (in items' order) is raised, once every item is done."""
        items = list(items)
        results, errors = [None] * len(items), {}
        old = set_blas_threads(1) if self.threads > 1 else None
        try:
            for w0 in range(0, len(items), self.threads):           # a wave: one item per thread
                wave = range(w0, min(w0 + self.threads, len(items)))
                for i in wave[1:]:
                    self._inbox[i - w0 - 1].put((i, fn, items[i]))
                try:
                    results[w0] = fn(items[w0])                     # the caller's own item
                except Exception as e:
                    errors[w0] = e
                for _ in wave[1:]:
                    i, ok, r = self._done.get()
                    if ok:
                        results[i] = r
                    else:
                        errors[i] = r
                if errors:
                    raise errors[min(errors)]
        finally:
            if old is not None:
                set_blas_threads(old)
        return results

    def close(self):
        for q in self._inbox:
            q.put(None)
        for w in self._workers:
            w.join()
        self._workers = []


# ----------------------------------------------------------------------------------------------------
# Element-wise work on whole parameter sets, split by rows: each thread takes every parameter's rows
# lo .. hi of its share, so the split is even, and an element gets the very operations it got in one
# thread (the same bits).

def row_parts(dicts, n):
    """The rows of the arrays of `dicts` (dicts of arrays of the same keys and shapes: weights, gradients,
    moments) in n even parts: n tuples of dicts of views, {k: a[lo:hi]}, the same rows of every dict in
    one part. A 1-D array (a norm's weight) stays whole in the first part: it is small. A part of a matrix
    is a matrix still, so AdamW's rule "decay matrices only" sees what it would see whole."""
    parts = [tuple({} for _ in dicts) for _ in range(n)]
    for k, a in dicts[0].items():
        if a.ndim < 2 or n == 1:
            for d, part in zip(dicts, parts[0]):
                part[k] = d[k]
            continue
        cuts = np.linspace(0, a.shape[0], n + 1).round().astype(int)
        for j in range(n):
            if cuts[j] < cuts[j + 1]:
                for d, part in zip(dicts, parts[j]):
                    part[k] = d[k][cuts[j]:cuts[j + 1]]
    return parts


def by_rows(pool, fn, dicts):
    """fn(part) for the parts of row_parts(dicts, pool.threads), one per thread at once; with pool None,
    fn(dicts) here, the arrays whole (a step on one thread: train.py calls the helpers below either way)."""
    if pool is None:
        fn(tuple(dicts))
    else:
        pool.map(fn, row_parts(dicts, pool.threads))


def add_into(pool, grads, g):
    """grads[k] += g[k] for every k (g: another shard's gradients), the rows split among the threads."""
    def add(part):
        mine, other = part
        for k, a in mine.items():
            a += other[k]
    by_rows(pool, add, [grads, g])


def scale(pool, grads, s):
    """g *= s for every gradient, the rows split among the threads."""
    def mul(part):
        for a in part[0].values():
            a *= s
    by_rows(pool, mul, [grads])


def adamw_step(pool, gm, params, grads, state, *args, **kwargs):
    """gm.adamw_step(params, grads, state, *args, **kwargs), the rows split among the threads (pool None:
    that one call): AdamW updates each number by itself, so each thread calls gm.adamw_step on its rows of
    the weights, the gradients and the moments (with the step count t of the whole), and the update is the
    very one of a single call, bit for bit. state's t then counts the step, once."""
    if pool is None:
        return gm.adamw_step(params, grads, state, *args, **kwargs)
    t = state["t"]

    def update(part):
        p, g, m, v = part
        gm.adamw_step(p, g, {"t": t, "m": m, "v": v}, *args, **kwargs)
    pool.map(update, row_parts([params, grads, state["m"], state["v"]], pool.threads))
    state["t"] = t + 1


_POOLS = {}             # the process's pools, by thread count: made once, kept for every step


def pool(threads):
    """The process's Pool of `threads` threads (made on first use; its workers wait between steps)."""
    if threads not in _POOLS:
        _POOLS[threads] = Pool(threads)
    return _POOLS[threads]
