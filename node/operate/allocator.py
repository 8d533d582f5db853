"""The C allocator of a serving node: two heaps ("arenas") per process, not one for each of its threads.

glibc's ``malloc`` gives each thread that allocates while another holds a heap a heap of its own, up to 8
per core. A node has dozens of threads (one pair per association, job threads, ONNX Runtime's and
NumPy's pools, spool flushes), and a job's buffers (slices, slabs, labelmaps, SEG frames of 0.1-32 MiB)
are made and freed in several of them. Each heap keeps what was freed in it for its own later use, so
the node's memory grew by the free space of every heap a job touched. Python code holds the interpreter
lock anyway; two heaps let a native thread (ONNX Runtime, NumPy) allocate beside it.

Measured with four scanners sending 300-slice CTs at once on 2 cores (``tests/bench/concurrent_senders.py``,
2026-11-30, two runs each, in turns): in one process the peak went from 1.31-1.37 GB to 0.93-0.96 GB, with
2 worker processes from 1.60-1.61 GB to 1.30-1.31 GB (proportional set sizes summed), at the same speed
(the last result 9.8-10.7 s against 10.9-11.3 s, and 5.8 s against 6.2-6.5 s).

Only the processes of ``ainode serve`` do this, first thing (as ``MALLOC_ARENA_MAX=2`` in their
environment would); an administrator's own ``MALLOC_ARENA_MAX`` is kept. Elsewhere (musl, macOS) it does
nothing.
"""

from __future__ import annotations

import ctypes
import os

#: glibc's ``mallopt`` parameter number of ``M_ARENA_MAX`` (malloc.h).
M_ARENA_MAX = -8
#: Heaps per process: one for the thread holding the interpreter lock, one for a native thread beside it.
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Let this process's threads share at most ``arenas`` heaps; False where that was not set here.

    Call it before threads are started: a thread that already has a heap keeps it.
    """
    if "MALLOC_ARENA_MAX" in os.environ:  # the administrator's own choice, which glibc read at start
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas) == 1)
