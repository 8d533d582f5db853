"""The file store: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.

Files are written as temp file + fsync + atomic rename + directory fsync, so a C-STORE
success (ARCHITECTURE.md, invariant 1) never points at a half-written or vanished file.
The database indexes the spool; the spool is the source of pixel data.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset, dcmread


def _dicom_file(header: bytes, encoded_dataset: bytes | memoryview) -> Callable[[BinaryIO], None]:
    """What writes a DICOM file of ``header`` (preamble, "DICM", File Meta Information) and a data set as sent."""

    def body(fh: BinaryIO) -> None:
        fh.write(header)
        fh.write(encoded_dataset)

    return body


def _flush_and_close(fh: BinaryIO, fsync: bool = True) -> None:
    try:
        if fsync:
            os.fsync(fh.fileno())
    finally:
        fh.close()


# DICOM UIDs are digits and dots only (PS3.5 9.1); anything else would let a sender
# write outside its study folder, so it is refused before it becomes a path.
_UID = re.compile(r"^[0-9][0-9.]{0,63}$")

RESULTS_DIR = "_results"
#: Label rows of slices analysed while their study arrived (``node/work/slicestore.py``), by study.
INFERENCE_DIR = "_inference"
TMP_SUFFIX = ".part"
#: A temp file older than this is left over whoever wrote it (no write takes that long: DIMSE timeouts).
STALE_TEMP_S = 3600.0
_HOST = socket.gethostname().replace(".", "-") or "host"


def temp_path(final: Path) -> Path:
    """Where to write ``final`` before renaming it into place: named after this host and process, so that a
    process starting on a shared spool removes only what a dead process left (:meth:`Spool.remove_temp_files`)."""
    return final.with_name(f"{final.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


#: When this process started (about: when this module was imported), for :func:`_left_over`.
_STARTED = time.time()


def _left_over(path: Path, now: float) -> bool:
    """Whether the temp file at ``path`` was left by a process that stopped (or is too old to be in progress)."""
    parts = path.name[: -len(TMP_SUFFIX)].rsplit(".", 3)
    if len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit():
        if int(parts[2]) == os.getpid():
            # Named after this process, but older than it: an earlier process of the same PID left it (a container
            # restarted, its process PID 1 again). Written since this one started: this process's own, in use.
            try:
                return path.stat().st_mtime < _STARTED - 1.0
            except FileNotFoundError:
                return False
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            return True  # its process is gone
        except PermissionError:
            pass  # alive, another user's
        else:
            return False  # being written now, by a live process of this host
    try:
        return now - path.stat().st_mtime > STALE_TEMP_S  # another host's (shared spool), or an older name
    except FileNotFoundError:
        return False


class SpoolError(OSError):
    """The spool could not keep a file (disk full, permissions, ...)."""


class StagedFile:
    """A file written under its temp name and being flushed to the disk (:meth:`Spool.stage_encoded`).

    :meth:`put_in_place` waits for the flush, renames it into place and flushes its folder: only then is it kept.
    :meth:`discard` removes it. One of the two must be called.
    """

    def __init__(self, spool: Spool, relpath: str, tmp: Path, size: int, synced: Future[None] | None) -> None:
        self.spool = spool
        self.relpath = relpath
        self.tmp = tmp
        #: The file's size in bytes.
        self.size = size
        self._synced = synced

    def put_in_place(self) -> int:
        """Rename the file into place once it is on the disk, durably (its folder fsynced); returns its size."""
        final = self.spool.root / self.relpath
        try:
            if self._synced is not None:
                self._synced.result()
            os.replace(self.tmp, final)
            if self.spool.fsync:
                self.spool._fsync_dir(final.parent)
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise SpoolError(exc.errno, f"cannot write {self.relpath}: {exc.strerror or exc}") from exc
        return self.size

    def discard(self) -> None:
        """Remove the file (its flush ended first: the descriptor is closed by it)."""
        if self._synced is not None:
            self._synced.exception()  # waits; a failed flush does not matter for a file that goes
        self.tmp.unlink(missing_ok=True)


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and bool(_UID.match(value))


class Spool:
    """Durable file store rooted at ``root``.

    Parameters
    ----------
    root
        Folder of the spool; shared by every node process in a scaled-out deployment. Each
        process remembers the folders it made (one ``mkdir`` per series, not per instance); when
        another process's retention has removed one, the next write makes it again.
    fsync
        Flush file and folder to the disk before a write returns. Only tests of the
        network stack's raw speed may turn this off.
    """

    def __init__(self, root: Path, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        #: Below this much free space the spool takes no more instances (results are still written).
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        #: Flushes of staged files (:meth:`stage_encoded`), made while the caller writes the instance's row.
        self._flushes: ThreadPoolExecutor | None = None
        self._flushes_lock = threading.Lock()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def below_watermark(self) -> str | None:
        """Why the spool takes no more instances now (free space under ``min_free_bytes``), or None.

        Refusing before the disk is full keeps room for the results of what was already received,
        and for the database next to it; the sender keeps the instances and retries.
        """
        if self.min_free_bytes <= 0:
            return None
        free = self.free_bytes()
        if free >= self.min_free_bytes:
            return None
        return f"spool free space {free // 2**20} MB below min_free_disk_mb {self.min_free_bytes // 2**20}"

    # -- paths -----------------------------------------------------------------------------
    @staticmethod
    def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        for uid in (study_uid, series_uid, sop_instance_uid):
            if not valid_uid(uid):
                raise ValueError(f"not a valid DICOM UID: {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    @staticmethod
    def result_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        return f"{RESULTS_DIR}/{Spool.instance_relpath(study_uid, series_uid, sop_instance_uid)}"

    def abspath(self, relpath: str) -> Path:
        return self.root / relpath

    # -- writing ---------------------------------------------------------------------------
    def exists(self, relpath: str) -> bool:
        return os.path.isfile(f"{self.root}/{relpath}")  # on every C-STORE: a tenth of the pathlib call's time

    def remove(self, relpath: str) -> None:
        """Remove one file (one this process wrote and no row points to); its folder stays."""
        (self.root / relpath).unlink(missing_ok=True)

    def write_encoded(self, relpath: str, header: bytes, encoded_dataset: bytes | memoryview) -> int:
        """Write a DICOM file from its header (preamble, "DICM", File Meta Information: ``node/receive/filemeta.py``)
        and the dataset as received.

        The dataset bytes are kept exactly as the sender encoded them (no re-encoding, no
        pixel decoding): the transfer syntax in the header says how to read them.
        Returns the file size in bytes.
        """

        return self._stage(relpath, _dicom_file(header, encoded_dataset), background=False).put_in_place()

    def stage_encoded(self, relpath: str, header: bytes, encoded_dataset: bytes | memoryview) -> StagedFile:
        """Like :meth:`write_encoded`, in two steps: the file is written under its temp name now and flushed to the
        disk in the background while the caller goes on (a C-STORE writes its row meanwhile); it is kept only
        by :meth:`StagedFile.put_in_place`, which waits for the flush, renames it and flushes its folder.

        The flush (0.6 ms for a CT slice here) and the row (0.5-0.8 ms of mostly Python) then overlap
        instead of following each other on every C-STORE.
        """
        return self._stage(relpath, _dicom_file(header, encoded_dataset), background=True)

    def write_dataset(self, relpath: str, ds: Dataset) -> int:
        """Write a complete dataset (with ``file_meta``) such as a result object."""
        return self._write_atomically(relpath, lambda fh: ds.save_as(fh, enforce_file_format=True))

    def write_ahead(self, relpath: str, ds: Dataset) -> str:
        """Write ``ds`` now, fsynced, under a temp name beside ``relpath``, for :meth:`publish` to put in place later.

        Returns the temp file's relative path. Named like any temp file of this process, it is removed as
        one when this process stops before it was published (:meth:`remove_temp_files`).
        """
        staged = temp_path(self.root / relpath).relative_to(self.root).as_posix()
        self.write_dataset(staged, ds)
        return staged

    def publish(self, staged: str, relpath: str) -> bool:
        """Rename a file written ahead into place, durably (its folder fsynced); False when it is gone."""
        final = self.root / relpath
        try:
            os.replace(self.root / staged, final)
        except FileNotFoundError:
            return False
        if self.fsync:
            self._fsync_dir(final.parent)
        return True

    def discard(self, relpaths: Iterable[str]) -> None:
        """Remove files written ahead that were not published (missing ones are fine)."""
        for relpath in relpaths:
            (self.root / relpath).unlink(missing_ok=True)

    def _write_atomically(self, relpath: str, body: Callable[[BinaryIO], None]) -> int:
        return self._stage(relpath, body, background=False).put_in_place()

    def _stage(self, relpath: str, body: Callable[[BinaryIO], None], background: bool) -> StagedFile:
        """Write ``body`` to a temp file beside ``relpath`` and flush it (``background``: in a thread of this spool)."""
        final = self.root / relpath
        directory = final.parent
        tmp = temp_path(final)
        synced: Future[None] | None = None
        try:
            if directory not in self._known_dirs:
                self._make_dir(directory)
            try:
                fh = open(tmp, "wb")
            except FileNotFoundError:
                # Another process sharing this spool removed the folder since this one made it (its
                # retention deleted the study): make it again, once; a second failure is real.
                self._known_dirs.discard(directory)
                self._make_dir(directory)
                fh = open(tmp, "wb")
            try:
                body(fh)
                fh.flush()
                size = fh.tell()
            except BaseException:
                fh.close()
                raise
            if self.fsync and background:
                synced = self._flush_pool().submit(_flush_and_close, fh)
            else:
                _flush_and_close(fh, self.fsync)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(exc.errno, f"cannot write {relpath}: {exc.strerror or exc}") from exc
        return StagedFile(self, relpath, tmp, size, synced)

    def _flush_pool(self) -> ThreadPoolExecutor:
        with self._flushes_lock:
            if self._flushes is None:
                # One flush per C-STORE in progress: a few associations at once.
                self._flushes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-flush")
            return self._flushes

    def _make_dir(self, directory: Path) -> None:
        """Create ``directory`` (and missing parents) and remember it: later writes skip the check."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            self._fsync_dir(directory.parent)
        self._known_dirs.add(directory)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading and housekeeping ----------------------------------------------------------
    def read(self, relpath: str, *, headers_only: bool = False) -> Dataset:
        return dcmread(self.root / relpath, stop_before_pixels=headers_only)

    def remove_study(self, study_uid: str) -> None:
        if valid_uid(study_uid):
            shutil.rmtree(self.root / study_uid, ignore_errors=True)
            shutil.rmtree(self.root / INFERENCE_DIR / study_uid, ignore_errors=True)
            self._known_dirs = {d for d in self._known_dirs if d.parent.parent.name != study_uid}

    def iter_instance_files(self) -> Iterator[str]:
        """Relative paths of every received instance file (not results, not temp files)."""
        for path in self.root.glob("*/*/*.dcm"):
            if path.parts[-3] != RESULTS_DIR:
                yield path.relative_to(self.root).as_posix()

    def remove_temp_files(self) -> int:
        """Delete temp files left by a process killed mid-write (they were never acknowledged).

        Only those: other processes may be writing to the same spool now (a node's worker processes, the
        receivers and workers of a scaled-out node), and their temp files are theirs.
        """
        removed = 0
        now = time.time()
        for path in self.root.rglob(f"*{TMP_SUFFIX}"):
            if _left_over(path, now):
                path.unlink(missing_ok=True)
                removed += 1
        return removed
