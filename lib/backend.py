"""
lib/backend.py: the model module a program runs on: gpt_numpy (NumPy, the CPU) or gpt_cupy (the same file
on CuPy, an NVIDIA GPU), and the malloc setting that makes CPU training steps reuse their memory.
"""

import gpt_numpy
from errors import UserError


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS. Call it once
    at the start of a CPU training program; returns False (and does nothing) off glibc.

    Every step allocates and frees the same activations again. By default glibc unmaps big freed
    blocks and trims the top of its heap, so the next step page-faults the memory back in and the
    kernel zeroes each page (on a 2-core machine: 63 -> 47 ms per cpu-small step, 2 threads). Raising
    the mmap and trim thresholds keeps the blocks in the heap, where the next step reuses them; the
    process then holds on to its peak memory. Process-wide; host memory only (no effect on CuPy).
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                   # from glibc's malloc.h
    mmap_ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def load_backend(name):
    """The model module for a backend: gpt_numpy, or gpt_cupy (the same functions on the GPU)."""
    if name == "numpy":
        keep_freed_memory()                             # reuse the activations' memory step after step
        return gpt_numpy
    if name == "cupy":
        try:
            import gpt_cupy
        except RuntimeError as e:                       # no CuPy or no GPU: gpt_cupy says which
            raise UserError(str(e)) from None
        return gpt_cupy
    raise UserError(f"unknown backend {name!r}: choose numpy or cupy")
