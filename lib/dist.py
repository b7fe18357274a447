"""
dist.py: data-parallel training on several processes, on one machine or many, through MPI (mpi4py), and on
several GPUs through NCCL (cupy.cuda.nccl). train.py imports it only when mpiexec started it; a run
without mpiexec never imports this file or MPI.

    mpiexec -n 2 python train.py --preset tiny --data notes.txt          # 2 processes train one model
    mpiexec -n 4 python train.py ... --zero 1                            # AdamW's moments sharded 4 ways
    mpiexec -f hosts -n 16 python train.py ... --backend cupy            # 16 GPUs: NCCL for the gradients

Data parallelism: every rank (process) holds the whole model, computes the gradients of its own slice of
each step's batch, and the ranks average those gradients before the same AdamW step, so their weights
stay equal. What this file adds to train.py's loop:

1. The same data at any world size (train.py's train_step): each step's global batch, batch x
   grad_accum x world sequences, is drawn from one seeded sampler on every rank, and rank r trains on
   micro-batches r*grad_accum .. r*grad_accum + grad_accum - 1 of it; dropout masks are keyed by the
   global micro-batch index. So 2 ranks x grad_accum 1 and 1 process x grad_accum 2 see the same
   sequences and masks, and (a sum of two terms being the same either way round) end with the same
   weights, bit for bit. With 3 terms a sum depends on its grouping: ((g0 + g1) + g2) in one process,
   whatever tree MPI picks across 3 ranks: equal to about 1e-7, not necessarily bit for bit.
2. Gradients averaged in one flat buffer (DataParallel), laid out in the order the backward pass
   finishes them (LM head and final norm, the last block ... the first, the embedding) and cut into
   buckets of whole layers. A bucket is sent (MPI Iallreduce, or NCCL on its own CUDA stream) as soon as
   its gradients are final, while the backward pass of the earlier layers still runs (as PyTorch DDP and
   llm.c do); loss_and_grads_hooked is the backward pass that says when.
3. ZeRO stage 1 (--zero 1; Rajbhandari et al. 2019): AdamW's moments sharded across ranks. The buckets are
   reduce-scattered instead of all-reduced, each rank updates its shard of the weights with its shard of
   the moments, and an all-gather returns the whole weights to every rank: 1/N of the optimizer memory
   per rank, the same weights as without it (the gradient norm is summed exactly as clip_grad_norm does).
   The flat buffer is padded so that it divides by N.
4. Checkpoints stay one file in checkpoint.py's format: rank 0 gathers the shards and writes it, after
   checking that every rank holds the same weights; any world size resumes it.
5. A rank that dies takes the job down: mpiexec kills the others when a process dies, and every wait in
   the training steps is bounded (--dist-timeout) and ends in MPI_Abort with one line saying what it
   waited for. A rank that fails (an error) aborts the job the same way (report_and_abort). While one
   rank works alone (data preparation, evaluation, writing a checkpoint) the others wait without
   spinning, so they leave it the cores; those two long waits (data, evaluation) are not bounded.
"""

import hashlib
import math
import os
import sys
import time

import numpy as np

DEFAULT_TIMEOUT = 300.0        # seconds a rank waits for the others inside the training loop


def report_and_abort(comm, message, code):
    """End the job after an error on this rank: rank 0 prints `message` and aborts at once; another rank
    first gives rank 0 a second to do so (an error that hits every rank alike, such as a checkpoint that
    cannot be resumed or a non-finite loss, is then reported once, and rank 0's abort ends this rank too),
    then prints its own and aborts."""
    if comm.rank != 0:
        time.sleep(1.0)
    print(message, file=sys.stderr, flush=True)
    time.sleep(0.2)                                     # mpiexec forwards the line; an abort at once may lose it
    comm.abort(code)


class OtherRankFailed(Exception):
    """Raised by together on a rank that got through while another failed: that one reports it."""

    def __init__(self, first):
        super().__init__(f"rank {first} failed")
        self.first = first


def together(comm, fn):
    """fn() on every rank, then a check that every rank got through it: the return value, or, if any rank
    failed (UserError or OSError), an exception on every rank: its own on a rank that failed, marked
    with e.reported_by, the first rank that failed (which alone reports it), OtherRankFailed on the
    others. So a failure that every rank meets alike (a --resume that none can use, an empty corpus)
    ends the job in order, one line from one rank, without MPI_Abort (whose launcher adds lines of its
    own). Not bounded in time: fn may prepare a large corpus. A bug or Ctrl-C inside fn still ends the
    job through MPI_Abort (train.report_failure), which the others' wait here does not hinder."""
    from errors import UserError
    error = out = None
    try:
        out = fn()
    except (UserError, OSError) as e:
        error = e
    failed = np.flatnonzero(comm.allgather_host(np.array([error is not None], np.uint8), "the others to get through",
                                                timeout=None))
    if len(failed) == 0:
        return out
    if error is None:
        raise OtherRankFailed(int(failed[0]))
    error.reported_by = int(failed[0])
    raise error


def fail(msg, code=1):
    """Stop this rank and, through MPI_Abort, the whole job: a one-line error first."""
    from mpi4py import MPI
    print(f"error: rank {MPI.COMM_WORLD.rank}: {msg}", file=sys.stderr, flush=True)
    MPI.COMM_WORLD.Abort(code)
    os._exit(code)


# ----------------------------------------------------------------------------------------------------
# Communicators: MPI for host (NumPy) arrays and for the small host-side agreements of every backend;
# NCCL for CuPy arrays. The collectives of DataParallel go through start_* (non-blocking: a handle),
# progress(handles) and wait(handles, what).

class MPIComm:
    """MPI.COMM_WORLD through mpi4py, with bounded, polite waits."""

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        from mpi4py import MPI                           # MPI_Init happens here
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.rank, self.comm.size
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)    # the ranks on this machine
        self.node_rank = self.node.rank
        self.timeout = timeout

    def abort(self, code=1):
        """End every rank of the job (MPI_Abort) and this process with `code`."""
        self.comm.Abort(code)
        os._exit(code)                                  # in case Abort returns before the launcher acts

    def wait(self, handles, what, timeout="default"):
        """Wait for non-blocking operations. Polls, yielding the CPU between polls (to any other process
        that wants it: on a shared or oversubscribed machine the ranks still working), and after 50 ms
        sleeps up to 1 ms between polls. (MPICH moves a collective along only while its ranks poll, so a
        long sleep would slow the others down.) After `timeout` seconds (None: no limit) the job is
        aborted, naming `what` it waited for."""
        timeout = self.timeout if timeout == "default" else timeout
        t0 = time.perf_counter()
        while not self.MPI.Request.Testall(handles):
            waited = time.perf_counter() - t0
            if timeout is not None and waited > timeout:
                fail(f"no word from the other ranks for {timeout:.0f} s while {what}: a rank has died or hangs; "
                     f"stopping the job (the last checkpoint is kept)")
            if waited < 0.05:
                os.sched_yield()
            else:
                time.sleep(min(0.001, waited / 100))

    def progress(self, handles):
        """Let MPI move pending transfers along (MPICH progresses non-blocking collectives only inside
        MPI calls, so the backward pass calls this between layers)."""
        if handles:
            self.MPI.Request.Testall(handles)

    def barrier(self, what, timeout="default"):
        self.wait([self.comm.Ibarrier()], what, timeout)

    # host arrays (every backend)
    def allreduce_host(self, values, what):
        """Elementwise sum over ranks of a small float64 vector (the loss, flags, squared norms)."""
        a = np.asarray(values, dtype=np.float64).copy()
        self.wait([self.comm.Iallreduce(self.MPI.IN_PLACE, a)], what)
        return a

    def allgather_host(self, a, what, timeout="default"):
        a = np.ascontiguousarray(a)
        out = np.empty((self.size, *a.shape), dtype=a.dtype)
        self.wait([self.comm.Iallgather(a, out)], what, timeout)
        return out

    def gather_host(self, a, what):
        """Rank 0 receives every rank's equal-sized array, stacked (None elsewhere)."""
        a = np.ascontiguousarray(a)
        out = np.empty((self.size, *a.shape), dtype=a.dtype) if self.rank == 0 else None
        self.wait([self.comm.Igather(a, out, root=0)], what)
        return out

    # the arrays of training: here NumPy arrays, so the same calls
    def start_allreduce(self, buf):
        """buf summed over ranks, in place."""
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf)

    def start_reduce_scatter(self, send, recv, counts):
        """send summed over ranks; rank r receives counts[r] elements of the sum, after those of ranks < r."""
        return self.comm.Ireduce_scatter(send, recv, counts)

    def start_allgather(self, buf, count):
        """buf[r * count:(r + 1) * count] of rank r to every rank, in place."""
        return self.comm.Iallgather(self.MPI.IN_PLACE, buf[:count * self.size])

    def start_exchange(self, sends, recvs):
        """Point to point: sends [(buf, peer, tag)], recvs [(buf, peer, tag)]; a list of handles."""
        return ([self.comm.Isend(buf, dest=peer, tag=tag) for buf, peer, tag in sends]
                + [self.comm.Irecv(buf, source=peer, tag=tag) for buf, peer, tag in recvs])


class NCCLComm(MPIComm):
    """The array collectives of MPIComm on CuPy arrays through NCCL (cupy.cuda.nccl), on a CUDA stream of
    their own so that they overlap the backward pass; MPI remains for the host-side agreements and to
    hand NCCL its unique id (as llm.c does). Each rank uses GPU (rank on its machine) mod (GPUs there).

    Not tested here (no GPU on the machine it was written on): written against CuPy's NCCL binding and
    NCCL's documented semantics (in-place all-reduce and all-gather, grouped reduce/send/recv)."""

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        super().__init__(timeout)
        import cupy
        from cupy.cuda import nccl
        self.cupy, self.nccl = cupy, nccl
        cupy.cuda.Device(self.node_rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nc = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def _launch(self, enqueue, *keep):
        """Run enqueue() on the communication stream after the work queued so far on the compute
        stream (which produced the data); returns a handle: an event, and the arrays kept alive."""
        ready = self.cupy.cuda.Event()
        ready.record(self.cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)
        enqueue()
        done = self.cupy.cuda.Event()
        done.record(self.stream)
        return (done, keep)

    def _dtype(self, a):
        if a.dtype != np.float32:
            raise ValueError(f"NCCL path: float32 buffers only, got {a.dtype}")
        return self.nccl.NCCL_FLOAT32

    def start_allreduce(self, buf):
        return self._launch(lambda: self.nc.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                                                      self.nccl.NCCL_SUM, self.stream.ptr), buf)

    def start_reduce_scatter(self, send, recv, counts):
        # unequal counts: one reduce per rank that receives something, to that rank, in one group
        def enqueue():
            self.nccl.groupStart()
            lo = 0
            for r, n in enumerate(counts):
                if n:
                    part = send[lo:lo + n]
                    out = recv if r == self.rank else part       # recvbuf matters on the root only
                    self.nc.reduce(part.data.ptr, out.data.ptr, n, self._dtype(send), self.nccl.NCCL_SUM, r,
                                   self.stream.ptr)
                lo += n
            self.nccl.groupEnd()
        return self._launch(enqueue, send, recv)

    def start_allgather(self, buf, count):
        mine = buf[self.rank * count:(self.rank + 1) * count]     # in place: sendbuf = recvbuf + rank * count
        return self._launch(lambda: self.nc.allGather(mine.data.ptr, buf.data.ptr, count, self._dtype(buf),
                                                      self.stream.ptr), buf)

    def start_exchange(self, sends, recvs):
        # one group: NCCL's send and recv block in stream order, so ungrouped pairs could deadlock
        def enqueue():
            self.nccl.groupStart()
            for buf, peer, _ in sends:
                self.nc.send(buf.data.ptr, buf.size, self._dtype(buf), peer, self.stream.ptr)
            for buf, peer, _ in recvs:
                self.nc.recv(buf.data.ptr, buf.size, self._dtype(buf), peer, self.stream.ptr)
            self.nccl.groupEnd()
        return [self._launch(enqueue, *(b for b, _, _ in sends + recvs))] if sends or recvs else []

    def progress(self, handles):
        pass                                             # NCCL runs on the GPU by itself

    def wait(self, handles, what, timeout="default"):
        """MPI requests as MPIComm does; NCCL handles: the compute stream waits for them (on the GPU), and
        the host polls them within the same bounded wait, so a dead peer does not hang the job."""
        mpi = [h for h in handles if isinstance(h, self.MPI.Request)]
        gpu = [h for h in handles if not isinstance(h, self.MPI.Request)]
        if mpi:
            super().wait(mpi, what, timeout)
        timeout = self.timeout if timeout == "default" else timeout
        t0 = time.perf_counter()
        for done, _ in gpu:
            while not done.done:
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    fail(f"NCCL: no progress for {timeout:.0f} s while {what}: a rank has died or hangs")
                time.sleep(1e-4)
            self.cupy.cuda.get_current_stream().wait_event(done)
        handles.clear()


def start(backend, timeout=DEFAULT_TIMEOUT):
    """The communicator of this process: MPIComm on NumPy, NCCLComm on CuPy (which also picks this
    rank's GPU: call it before any CuPy work). Raises UserError when mpi4py is missing."""
    from errors import UserError
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise UserError("mpiexec started this program, but mpi4py is not installed: pip install mpi4py mpich "
                        "(see docs/distributed.md)") from None
    if backend == "cupy":
        try:
            return NCCLComm(timeout)
        except Exception as e:                          # no CuPy, no NCCL in it, no GPU, a broken driver
            raise UserError(f"--backend cupy under mpiexec needs CuPy with NCCL and a GPU for each rank "
                            f"({type(e).__name__}: {e})") from None
    return MPIComm(timeout)


def in_turn(comm, fn):
    """fn() on rank 0 first, then on the first rank of every other machine, then on all the others;
    returns its result. Rank 0 prepares the data once; each other machine's first rank then finds it (a
    shared file system) or prepares it again (a local one); every other rank only reads what is there.
    The waits are not bounded: preparing a large corpus may take long (a rank that dies still ends the
    job through mpiexec)."""
    out = None
    for turn in range(3):
        mine = (comm.rank == 0 if turn == 0 else
                comm.rank != 0 and comm.node_rank == 0 if turn == 1 else comm.node_rank != 0)
        got = together(comm, fn if mine else lambda: None)     # a failure in a turn ends every rank (together)
        out = got if mine else out
    return out


# ----------------------------------------------------------------------------------------------------
# The backward pass that says when each gradient is final

def loss_and_grads_hooked(gm, params, ids, targets, cfg, seed, ready, lora=None):
    """gm.loss_and_grads whose backward pass calls ready(grads, names) as soon as the gradients `names`
    are final (gpt_numpy.model_backward's hook), so that they can be sent while the earlier layers'
    gradients are still being computed. (tests/test_dist.py checks it against gm.loss_and_grads, bit for
    bit, and that each gradient is reported once.)"""
    return gm.loss_and_grads(params, ids, targets, cfg, seed=seed, ready=ready, lora=lora)


# ----------------------------------------------------------------------------------------------------
# The flat gradient buffer: its layout, buckets and shards

def backward_units(names):
    """Parameter names grouped in the order the backward pass finishes them: the LM head and final norm,
    the blocks from the last to the first, the token embedding (last: a tied LM head adds into it at the
    end). ["tok_emb", "blocks.0.a", "blocks.1.a", "norm_f.weight"] ->
    [["norm_f.weight"], ["blocks.1.a"], ["blocks.0.a"], ["tok_emb"]]."""
    head, emb, blocks = [], [], {}
    for k in names:
        if k.startswith("blocks."):
            blocks.setdefault(int(k.split(".")[1]), []).append(k)
        elif k == "tok_emb":
            emb.append(k)
        else:
            head.append(k)
    return [u for u in (head, *(blocks[i] for i in sorted(blocks, reverse=True)), emb) if u]


class Layout:
    """Where each parameter's gradient (and with ZeRO its weight) lives in one flat buffer:

        [ final norm, LM head | block L-1 | ... | block 0 | tok_emb | padding ]      backward order
        buckets: runs of whole units (a block, ...) of at least bucket_elems elements
        shards (ZeRO): rank r owns [r * shard, (r + 1) * shard); world * shard >= n (the padding)

    offset[name] = (lo, hi); buckets = [(lo, hi)]; bucket_of[name] = the bucket holding it."""

    def __init__(self, shapes, world, bucket_elems):
        self.shapes = dict(shapes)                      # the params' order, kept for clip_grad_norm
        self.offset, o = {}, 0
        self.buckets, lo = [], 0
        for unit in backward_units(list(shapes)):
            for k in unit:
                n = math.prod(shapes[k])
                self.offset[k] = (o, o + n)
                o += n
            if o - lo >= bucket_elems:
                self.buckets.append((lo, o))
                lo = o
        if lo < o:
            self.buckets.append((lo, o))
        self.n, self.world = o, world
        self.shard = -(-o // world)                     # ceil: the last shard holds the padding
        self.padded = self.shard * world
        self.bucket_of = {k: next(b for b, (lo, hi) in enumerate(self.buckets) if lo <= a < hi)
                          for k, (a, _) in self.offset.items()}

    def owned(self, rank, lo, hi):
        """The part of [lo, hi) in rank's shard, as (a, b) (a == b: none)."""
        a, b = max(lo, rank * self.shard), min(hi, (rank + 1) * self.shard)
        return a, max(a, b)

    def counts(self, lo, hi):
        """How many elements of [lo, hi) each rank's shard holds."""
        return [b - a for a, b in (self.owned(q, lo, hi) for q in range(self.world))]


class DataParallel:
    """One model's gradients averaged over the ranks, with or without ZeRO-1. Per step:

        dp.loss_and_grads(...) per micro-batch   accumulate; the last one sends buckets as they finish
        dp.finish(loss, overflow)                wait for the buckets; agree on the loss and overflow
        dp.scale_grads(1 / n); dp.clip_grad_norm(max_norm); dp.adamw_step(params, opt, ...)

    Without ZeRO every rank holds the summed gradient (grads: views into the flat buffer, in the
    params' order) and takes the whole AdamW step. With ZeRO (zero=1) it holds the sum of its shard only,
    updates its shard of the weights and all-gathers them; the weights live in a flat buffer too (params
    become views of it) and the AdamW state holds this rank's pieces of the moments.

    params: the weights that train. In a LoRA run (lora: its gpt_numpy.LoraConfig) those are the adapters
    alone: only their gradients travel and only their moments are sharded; the frozen base never moves."""

    def __init__(self, comm, gm, params, zero=0, bucket_mb=4.0, lora=None):
        self.comm, self.gm, self.zero, self.lora = comm, gm, zero, lora
        self.rank, self.world = comm.rank, comm.size
        dtype = next(iter(params.values())).dtype
        self.layout = L = Layout({k: tuple(p.shape) for k, p in params.items()}, self.world,
                                 int(bucket_mb * 2 ** 20 / np.dtype(dtype).itemsize))
        xp = gm.xp
        self.flat_g = xp.zeros(L.padded, dtype=dtype)
        self.grads = self._views(self.flat_g)           # params' key order
        self.overlap = True                             # send buckets during the backward pass
        self.handles, self.sent = [], set()
        self.stats = {"steps": 0, "wait_s": 0.0, "bytes": 0}    # steps, seconds waiting in finish, bytes sent
        if zero:
            S, r = L.shard, self.rank
            self.flat_p = xp.zeros(L.padded, dtype=dtype)
            self.g_shard = xp.zeros(S, dtype=dtype)
            # this rank's piece of each parameter it has a share of; a matrix's piece as a (1, n) row,
            # so that adamw_step still sees ndim 2 and decays it
            self.pieces = [(k, a, b) for k in L.shapes for a, b in [L.owned(r, *L.offset[k])] if a < b]
            self.p_pieces = self._pieces(self.flat_p, 0)
            self.g_pieces = self._pieces(self.g_shard, r * S)
            # per bucket, for its reduce-scatter: where this rank's part of the sum lands, every rank's count
            self.recv = []
            for lo, hi in L.buckets:
                a, b = L.owned(r, lo, hi)
                self.recv.append((self.g_shard[a - r * S:b - r * S], L.counts(lo, hi)))

    def _views(self, flat):
        L = self.layout
        return {k: flat[L.offset[k][0]:L.offset[k][1]].reshape(shape) for k, shape in L.shapes.items()}

    def _pieces(self, flat, base):
        L = self.layout
        return {k: flat[a - base:b - base].reshape((1, -1) if len(L.shapes[k]) >= 2 else (-1,))
                for k, a, b in self.pieces}

    # ---- setup
    def adopt(self, params, opt):
        """This rank's (params, opt) from whole ones (fresh, or a checkpoint's): unchanged without ZeRO;
        with it, params become views of the flat weight buffer and opt keeps this rank's pieces only."""
        if not self.zero:
            return params, opt
        L, S, r, xp = self.layout, self.layout.shard, self.rank, self.gm.xp
        views = self._views(self.flat_p)
        for k, p in params.items():
            views[k][...] = p
        m, v = xp.zeros(S, dtype=self.flat_p.dtype), xp.zeros(S, dtype=self.flat_p.dtype)
        for k, a, b in self.pieces:
            lo = L.offset[k][0]
            m[a - r * S:b - r * S] = opt["m"][k].reshape(-1)[a - lo:b - lo]
            v[a - r * S:b - r * S] = opt["v"][k].reshape(-1)[a - lo:b - lo]
        self.m_shard, self.v_shard = m, v
        return views, {"t": opt["t"], "m": self._pieces(m, r * S), "v": self._pieces(v, r * S)}

    def optimizer_bytes(self, opt):
        """Bytes of AdamW state this rank holds (the moments)."""
        if self.zero:
            return int(self.m_shard.nbytes + self.v_shard.nbytes)
        return sum(int(a.nbytes) for d in (opt["m"], opt["v"]) for a in d.values())

    # ---- a step's gradients
    def loss_and_grads(self, params, ids, targets, cfg, seed, first, last):
        """One micro-batch: its loss; its gradients added into the flat buffer (copied, if first). On
        the rank's last micro-batch each bucket is sent as soon as its gradients are complete."""
        L = self.layout
        left = [0] * len(L.buckets)
        for k in L.offset:
            left[L.bucket_of[k]] += 1

        def ready(grads, names):
            for k in names:
                if first:
                    self.grads[k][...] = grads[k]
                else:
                    self.grads[k] += grads[k]
                grads[k] = None                         # its memory can go
                b = L.bucket_of[k]
                left[b] -= 1
                if last and self.overlap and left[b] == 0:
                    self._send(b)
            self.comm.progress(self.handles)

        loss, _ = loss_and_grads_hooked(self.gm, params, ids, targets, cfg, seed, ready, self.lora)
        return loss

    def accumulate(self, grads, first):
        """A micro-batch's gradients from elsewhere (mixed precision) into the flat buffer."""
        for k, g in grads.items():
            if first:
                self.grads[k][...] = g
            else:
                self.grads[k] += g

    def _send(self, b):
        lo, hi = self.layout.buckets[b]
        if self.zero:
            recv, counts = self.recv[b]
            h = self.comm.start_reduce_scatter(self.flat_g[lo:hi], recv, counts)
        else:
            h = self.comm.start_allreduce(self.flat_g[lo:hi])
        self.handles.append(h)
        self.sent.add(b)
        self.stats["bytes"] += int(self.flat_g[lo:hi].nbytes)

    def finish(self, loss, overflow):
        """After the rank's micro-batches: the buckets not sent yet are sent, all are waited for, and the
        ranks agree on the step's loss (their sum: each rank's loss is already over the global batch)
        and on whether any overflowed (then nobody sends and the step is skipped). Returns (loss,
        overflow) as every rank sees them."""
        loss, n_over = self.comm.allreduce_host([loss, float(overflow)], "summing the loss")
        overflow = n_over > 0
        if not overflow:
            for b in range(len(self.layout.buckets)):
                if b not in self.sent:
                    self._send(b)
        t0 = time.perf_counter()
        self.comm.wait(self.handles, "averaging the gradients")
        self.stats["wait_s"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        self.handles, self.sent = [], set()
        return float(loss), overflow

    def scale_grads(self, s):
        """The summed gradient times s (1 / the number of micro-batches): the mean."""
        if self.zero:
            self.g_shard *= s
        else:
            for g in self.grads.values():
                g *= s

    def clip_grad_norm(self, max_norm):
        """gm.clip_grad_norm of the whole averaged gradient, with the same result on every rank. With ZeRO
        each rank holds only its shard: every parameter's sum of squares is taken, as clip_grad_norm takes
        it, whole, by the rank holding its first element (a parameter cut by a shard boundary is sent there
        first), and the sums are added in the params' order: the norm of clip_grad_norm, bit for bit."""
        if not self.zero:
            return self.gm.clip_grad_norm(self.grads, max_norm)
        gm, L, S, r = self.gm, self.layout, self.layout.shard, self.rank
        names = list(L.shapes)
        sq = np.zeros(len(names))
        sends, recvs, whole = [], [], {}
        for i, k in enumerate(names):
            lo, hi = L.offset[k]
            first, last = lo // S, (hi - 1) // S
            if first == last:                           # inside one shard
                if first == r:
                    g = self.g_shard[lo - r * S:hi - r * S]
                    sq[i] = float(gm.xp.vdot(g, g))
            elif r == first:                            # cut: the other pieces come here
                buf = gm.xp.empty(hi - lo, dtype=self.g_shard.dtype)
                a, b = L.owned(r, lo, hi)
                buf[:b - a] = self.g_shard[a - r * S:b - r * S]
                for q in range(first + 1, last + 1):
                    qa, qb = L.owned(q, lo, hi)
                    recvs.append((buf[qa - lo:qb - lo], q, i))
                whole[i] = buf
            elif first < r <= last:
                a, b = L.owned(r, lo, hi)
                sends.append((self.g_shard[a - r * S:b - r * S], first, i))
        self.comm.wait(self.comm.start_exchange(sends, recvs), "summing the gradient norm")
        for i, buf in whole.items():
            sq[i] = float(gm.xp.vdot(buf, buf))
        sq = self.comm.allreduce_host(sq, "summing the gradient norm")      # x + 0 + ... + 0 = x exactly
        norm = math.sqrt(sum(float(s) for s in sq))     # as clip_grad_norm: Python floats, params' order
        # subtle: the clipping rule of gm.clip_grad_norm, on this rank's shard
        if max_norm and max_norm > 0 and norm > max_norm:
            self.g_shard *= max_norm / (norm + 1e-6)
        return norm

    def adamw_step(self, params, opt, lr, beta1, beta2, eps, weight_decay):
        """gm.adamw_step with the averaged gradients; with ZeRO on this rank's shard, then the all-gather
        of the weights (params are views of the flat weight buffer, so they change with it)."""
        if not self.zero:
            self.gm.adamw_step(params, self.grads, opt, lr, beta1, beta2, eps, weight_decay)
            return
        self.gm.adamw_step(self.p_pieces, self.g_pieces, opt, lr, beta1, beta2, eps, weight_decay)
        self.comm.wait([self.comm.start_allgather(self.flat_p, self.layout.shard)], "gathering the weights")

    # ---- checkpoints
    def check_same_weights(self, params):
        """Every rank must hold the same weights (the same gradients and steps keep them so); compared by
        a hash, before each checkpoint."""
        h = hashlib.sha256()
        for k in self.layout.shapes:
            h.update(np.ascontiguousarray(self.gm.to_host(params[k])).tobytes())
        mine = np.frombuffer(h.digest()[:8], dtype=np.uint64)
        every = self.comm.allgather_host(mine, "comparing the weights")
        if len(set(every.ravel().tolist())) != 1:
            bad = [q for q in range(self.world) if every[q, 0] != every[0, 0]]
            raise RuntimeError(f"the ranks' weights differ (ranks {bad} from rank 0): the gradients were not "
                               f"averaged to the same bits everywhere")

    def gather_state(self, params, opt):
        """(params, adam m, adam v) as whole host arrays on rank 0, None on the others."""
        self.check_same_weights(params)
        host = lambda d: {k: self.gm.to_host(a) for k, a in d.items()}            # noqa: E731
        if not self.zero:
            return (host(params), host(opt["m"]), host(opt["v"])) if self.rank == 0 else None
        L, out = self.layout, []
        for shard in (self.m_shard, self.v_shard):
            full = self.comm.gather_host(self.gm.to_host(shard), "gathering the optimizer state")
            if self.rank == 0:
                full = full.reshape(-1)
                out.append({k: full[L.offset[k][0]:L.offset[k][1]].reshape(s).copy() for k, s in L.shapes.items()})
        return (host(params), *out) if self.rank == 0 else None
