"""node/operate/allocator.py: a node's threads share two heaps, not one each (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Eight threads that allocate at the same time, as a node's association, job and native threads do; prints
# how many heaps (arenas) glibc then has, from malloc_info(3), and what limit_arenas returned.
_THREADS = """
import ctypes, sys, tempfile, threading
from node.operate.allocator import limit_arenas

limited = limit_arenas() if sys.argv[1] == "limited" else None
together = threading.Barrier(8)

def work():
    held = [bytearray(64 * 1024) for _ in range(4)]
    together.wait()  # every thread holds its buffers at once
    del held

threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(suffix=".xml") as info:
    stream = libc.fopen(info.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(info.name).read().count("<heap nr="), limited)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc (its heaps per thread)")


def _heaps(mode: str, **env: str) -> tuple[int, str]:
    repo = Path(__file__).resolve().parents[2]
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    done = subprocess.run(
        [sys.executable, "-c", _THREADS, mode], cwd=repo, env=environ, capture_output=True, text=True, check=True
    )
    heaps, limited = done.stdout.split()
    return int(heaps), limited


@glibc
def test_the_threads_of_a_node_share_two_heaps():
    assert _heaps("limited") == (2, "True")
    # Without the limit, the same threads have heaps of their own (what made the node's memory grow).
    heaps, _ = _heaps("default")
    assert heaps > 2


@glibc
def test_an_administrators_own_arena_setting_is_kept():
    assert _heaps("limited", MALLOC_ARENA_MAX="4") == (4, "False")
