"""The slice cache in the spool: label rows of slices analysed while their study arrived.

``<spool>/_inference/<StudyUID>/<key>.rows``: one file per slice, its rows saved with NumPy and
compressed with zlib, written as a temp file (the spool's ``.part`` suffix, removed at start like the
spool's own) renamed into place. In the spool because every process of a scaled-out node shares it:
a worker on another machine finds what this one computed.

It is a cache, not a record: no fsync. A file lost or torn by a crash fails zlib's checksum or NumPy's
header and is a miss; the job computes that slice again. The entries of a study go when it is processed
(:meth:`SliceStore.remove_finished`), when retention removes the study, or after a day at the latest
(:meth:`SliceStore.remove_older_than`: a study that never completes).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import numpy as np

from node.receive.spool import INFERENCE_DIR, Spool, temp_path, valid_uid

log = logging.getLogger("ainode.prefetch")

SUFFIX = ".rows"
#: Which process analyses a study's slices ahead (:meth:`StudySlices.claim`); its time is the lease's renewal.
OWNER_FILE = ".analysed-by"
_KEY = re.compile(r"^[0-9a-f]{16,128}$")


class StudySlices:
    """The slice cache of one study (a :class:`pipelines.slicecache.SliceCache`); ``folder`` None keeps nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):  # keys are hex digests: nothing else becomes a path
            raise ValueError(f"not a slice key: {key!r}")
        if self.folder is None:
            raise FileNotFoundError(key)
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str) -> np.ndarray | None:
        try:
            data = zlib.decompress(self._path(key).read_bytes())
            rows = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError, zlib.error):
            return None
        if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.dtype not in (np.uint8, np.uint16):
            return None
        return rows

    def put(self, key: str, rows: np.ndarray) -> None:
        if self.folder is None:
            return
        path = self._path(key)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(rows), allow_pickle=False)
        tmp = temp_path(path)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(zlib.compress(buffer.getbuffer(), 1))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk or a folder removed meanwhile: the job computes the slice
            tmp.unlink(missing_ok=True)
            log.debug("slice rows not kept: %s", exc)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.folder is not None and self._path(key).is_file()

    def held_by_other(self, owner: str, lease_s: float) -> bool:
        """Whether another process than ``owner`` holds this study's lease (it analyses the study ahead)."""
        if self.folder is None:
            return False
        path = self.folder / OWNER_FILE
        try:
            return path.read_text() not in ("", owner) and time.time() - path.stat().st_mtime < lease_s
        except OSError:
            return False

    def claim(self, owner: str, lease_s: float, now: float | None = None) -> bool:
        """Whether ``owner`` (a process) analyses this study's slices ahead: it holds the study's lease, or takes
        it because it is free or has not been renewed for ``lease_s`` (its holder stopped or died).

        Every worker process of a scaled-out node sees the same arriving instances: without a lease, each would
        run the model on every slice. Holding renews the lease. ``now``: the time to judge the lease's age at.
        """
        if self.folder is None:
            return False
        path = self.folder / OWNER_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder, age = path.read_text(), (time.time() if now is None else now) - path.stat().st_mtime
                if holder == owner:
                    os.utime(path)
                    return True
                if age < lease_s:
                    return False
                tmp = temp_path(path)
                tmp.write_text(owner)
                os.replace(tmp, path)  # two taking over at once both analyse for one pass: the same rows
                log.debug("analysis ahead of study %s taken over from %s", self.folder.name, holder or "?")
                return True
            except OSError:  # removed meanwhile (the study processed), or a full disk: not this pass
                return False
        except OSError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(owner)
        return True


class SliceStore:
    """The slice caches of all studies, under ``<spool>/_inference``."""

    def __init__(self, spool: Spool) -> None:
        self.root = spool.root / INFERENCE_DIR

    def study(self, study_instance_uid: str) -> StudySlices:
        """The cache of one study; one that keeps nothing for a UID that cannot be a folder name."""
        return StudySlices(self.root / study_instance_uid if valid_uid(study_instance_uid) else None)

    def studies(self) -> list[str]:
        """Study Instance UIDs that have a slice cache."""
        try:
            return [p.name for p in self.root.iterdir() if p.is_dir() and valid_uid(p.name)]
        except FileNotFoundError:
            return []

    def remove_study(self, study_instance_uid: str) -> None:
        if valid_uid(study_instance_uid):
            shutil.rmtree(self.root / study_instance_uid, ignore_errors=True)

    def remove_finished(self, open_studies: Iterable[str]) -> list[str]:
        """Remove the caches of every study not in ``open_studies`` (receiving, or queued for analysis)."""
        keep = set(open_studies)
        removed = [uid for uid in self.studies() if uid not in keep]
        for uid in removed:
            self.remove_study(uid)
        return removed

    def remove_older_than(self, cutoff: datetime) -> int:
        """Remove entries (and temp files) last written before ``cutoff``, then emptied study folders."""
        limit = cutoff.timestamp()
        removed = 0
        for uid in self.studies():
            folder = self.root / uid
            try:
                entries = list(folder.iterdir())
            except FileNotFoundError:
                continue
            for path in entries:
                try:
                    if path.stat().st_mtime < limit:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
            try:
                folder.rmdir()  # only when empty
            except OSError:
                pass
        return removed
