"""Parsed headers of stored instances, kept between the analysis ahead and the job, so a file is parsed once.

The analysis ahead (``node/work/prefetch.py``) parses each instance as it arrives; the job parses the
same files again when the study is complete (0.6 s for a 300-slice CT, all of it after the last
instance). A :class:`HeaderCache` keeps each parsed header with its pixel data deferred (read from
the file when a volume is built, as a fresh parse would) and hands every reader its own shallow copy:
what a reader converts, loads or removes stays in its copy.

A file is known by its path, inode, size and modification time: a replaced instance (a duplicate
stored with ``node.duplicates: replace``, renamed over the old file) is a new entry, never the old header.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

#: Elements at least this large are read from the file when used (Pixel Data), not when parsed.
DEFER_BYTES = 64 * 1024
#: Headers kept at most (about 40 kB each for a CT slice): a few studies of several hundred slices.
MAX_ENTRIES = 2048


def read_header(path: Path | str) -> Dataset:
    """Parse the file at ``path``, its large elements (Pixel Data) deferred."""
    return dcmread(path, defer_size=DEFER_BYTES)


def private_copy(ds: Dataset) -> Dataset:
    """A copy of ``ds`` that shares its elements but not their mapping: converting, loading a deferred value,
    adding or removing an element in the copy leaves ``ds`` as it is."""
    out = copy.copy(ds)
    object.__setattr__(out, "_dict", dict(ds._dict))
    object.__setattr__(out, "_private_blocks", {})
    object.__setattr__(out, "_pixel_array", None)
    object.__setattr__(out, "_pixel_id", {})
    return out


class HeaderCache:
    """Headers by file, least recently used dropped first; thread-safe (the prefetch loop and the workers)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int, int, int], Dataset] = OrderedDict()
        self._lock = threading.Lock()
        #: Reads served from the cache and parsed (for the tests and the log).
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def read(self, path: Path | str) -> Dataset:
        """The header of the file at ``path`` (its pixel data deferred), as a copy of its own."""
        st = os.stat(path)
        key = (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            ds = self._entries.get(key)
            if ds is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if ds is None:
            ds = read_header(path)
            # Parsed after the stat: a file replaced in between has another inode or time, so the entry is
            # never found again rather than wrong (a replacement is renamed over the path, never written in place).
            with self._lock:
                self.misses += 1
                self._entries[key] = ds
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return private_copy(ds)

    def forget(self, keep: set[str]) -> int:
        """Drop the headers of files whose path is not in ``keep``; returns how many went."""
        with self._lock:
            gone = [key for key in self._entries if key[0] not in keep]
            for key in gone:
                del self._entries[key]
        return len(gone)
