"""Per-process append-only segment logs (lines) that another process can seal safely.

Each writing process owns one directory ``<root>/<host>-<pid>-<start_ns>/`` holding ``open.jsonl``
(the segment being appended to), ``sealed-<ns>.jsonl`` segments waiting to be taken, and three lock
files used with ``flock``:

* ``owner.lock``: held for the writer's whole life; a process that can take it knows the owner is
  gone (crashed or stopped) and may remove the directory once it is empty;
* ``seal.lock``: held around every append (write + fsync) and around sealing. Sealing is a rename of
  ``open.jsonl`` to ``sealed-<ns>.jsonl`` under this lock, followed by an fsync of the directory.
  Before each append the writer checks (under the lock) that its open file is still the one named
  ``open.jsonl`` and opens a fresh one when it was sealed, so a sealer in ANOTHER process (the
  nearline round, a restarted server) never races an append: every acknowledged line is either in
  the segment that was sealed or in the next one;
* ``take.lock``: held by whoever turns sealed segments into table rows / landed files, so two
  takers (the owner's timer and the nearline round) never take the same segment at once.

``flock`` locks hold between processes on one host (and on local file systems); a data directory
shared between hosts needs a file system whose ``flock`` works across them. With
``privacy.encrypt_at_rest`` each line is sealed on its own (AES-GCM, :mod:`freshrec.storage.crypto`), so
torn-line handling and sealing work the same on ciphertext.

A line is JSON (the event log) or a **record line** (the impression log, written on the serving
hot path): ``p1:`` + base64 of one pickled tuple of plain values (:func:`record_line`), several
times cheaper to write than JSON (no float-to-text). It is read back with :func:`read_record`,
whose unpickler refuses every class and function, so a line can only ever yield str, bytes,
numbers, None, bools, lists, tuples and dicts (the pattern of the ``pickle`` docs' "Restricting
Globals"); :func:`line_text` gives the bytes a search for a user id must look in.
"""

from __future__ import annotations

import binascii
import fcntl
import io
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from freshrec.durable import fsync_path

if TYPE_CHECKING:
    from freshrec.settings import Settings

OPEN = "open.jsonl"
RECORD_PREFIX = b"p1:"
log = logging.getLogger(__name__)


def record_line(record: tuple) -> bytes:
    """One record (a tuple of plain values) as one line, newline included."""
    return RECORD_PREFIX + binascii.b2a_base64(pickle.dumps(record, protocol=5))


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain values only: any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a record line may hold only plain values, not "
                                     f"{module}.{name}")


def read_record(line: bytes):
    """The value of a record line (without its newline); ValueError when it is not one that
    :func:`record_line` could have written."""
    if not line.startswith(RECORD_PREFIX):
        raise ValueError("not a record line")
    try:
        raw = binascii.a2b_base64(line[len(RECORD_PREFIX):], strict_mode=True)
        return _PlainUnpickler(io.BytesIO(raw)).load()
    except (binascii.Error, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            IndexError, KeyError, AttributeError, OverflowError, MemoryError) as e:
        raise ValueError(f"a corrupt record line ({type(e).__name__}: {e})") from None


def line_text(line: bytes) -> bytes:
    """The bytes of an opened line in which its strings appear as UTF-8: a JSON line itself, a
    record line's pickle (pickle stores strings as raw UTF-8)."""
    if line.startswith(RECORD_PREFIX):
        try:
            return binascii.a2b_base64(line[len(RECORD_PREFIX):])
        except binascii.Error:
            return line
    return line


def wal_root(settings: Settings) -> Path:
    """The servers' write-ahead logs of acknowledged events (one folder per process)."""
    return settings.data_dir / "wal"


def impressions_root(settings: Settings) -> Path:
    """The servers' impression logs (one folder per process)."""
    return settings.data_dir / "impressions" / "log"


@contextmanager
def flocked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """``flock`` ``path`` exclusively; yields False (without the lock) when ``blocking`` is False
    and another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def process_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"


class SegmentWriter:
    """The appending side: one per process and log root."""

    def __init__(self, root: Path, name: str | None = None, cipher=None) -> None:
        self.root = root
        self.cipher = cipher  # freshrec.storage.crypto.DataCipher: each line sealed (encrypt_at_rest)
        self.name = name or process_id()
        self.dir = root / self.name
        # The directory appears under its name with its owner lock already held, so a sealer
        # never mistakes a starting writer's directory for an abandoned one.
        staging = root / f".{self.name}.new"
        staging.mkdir(parents=True)
        self._owner_fd = os.open(staging / "owner.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours for life
        os.rename(staging, self.dir)
        fsync_path(root)
        self._lock = threading.Lock()
        self._file = None
        self._ino = -1

    def _reopen_if_sealed(self) -> None:
        path = self.dir / OPEN
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            ino = -2
        if self._file is None or ino != self._ino:
            if self._file is not None:
                self._file.close()
            self._file = open(path, "ab")
            self._ino = os.fstat(self._file.fileno()).st_ino
            if ino != self._ino:  # a new directory entry: make it durable too
                fsync_path(self.dir)

    def append(self, payload: bytes) -> None:
        """Write ``payload`` (whole lines) and fsync before returning."""
        if not payload:
            return
        if self.cipher is not None:
            payload = b"".join(self.cipher.seal_line(line) + b"\n"
                               for line in payload.split(b"\n")[:-1])
        with self._lock, flocked(self.dir / "seal.lock"):
            self._reopen_if_sealed()
            self._file.write(payload)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._owner_fd >= 0:
                fcntl.flock(self._owner_fd, fcntl.LOCK_UN)
                os.close(self._owner_fd)
                self._owner_fd = -1


def seal(proc_dir: Path) -> Path | None:
    """Seal ``proc_dir``'s open segment (any process may call this); returns the sealed path, or
    None when it is empty or missing."""
    with flocked(proc_dir / "seal.lock"):
        path = proc_dir / OPEN
        try:
            if path.stat().st_size == 0:
                return None
        except FileNotFoundError:
            return None
        while True:
            target = proc_dir / f"sealed-{time.time_ns():020d}.jsonl"
            if not target.exists():
                break
        os.replace(path, target)
        fsync_path(proc_dir)
        return target


def process_dirs(root: Path) -> list[Path]:
    """The writers' directories (a name starting with a dot is one still being set up)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def take_sealed(root: Path, take: Callable[[Path], None], seal_open: bool = True,
                only: str | None = None) -> int:
    """Seal every process directory's open segment (``seal_open``), then call ``take(segment)`` on
    each sealed segment, oldest first, and delete it after ``take`` returned. ``only``: one
    process directory's name. Directories of processes that are gone are removed once empty.
    Returns the segments taken."""
    if not root.exists():
        return 0
    taken = 0
    for proc_dir in process_dirs(root):
        if only is not None and proc_dir.name != only:
            continue
        if seal_open:
            seal(proc_dir)
        with flocked(proc_dir / "take.lock"):
            segments = sorted(proc_dir.glob("sealed-*.jsonl"))
            for seg in segments:
                take(seg)
                seg.unlink()
            if segments:
                fsync_path(proc_dir)
            taken += len(segments)
        remove_if_abandoned(proc_dir)
    return taken


def read_lines(seg: Path, cipher=None) -> tuple[bytes, list[bytes]]:
    """A segment's bytes and its complete lines (sealed lines opened with ``cipher``). A last
    line without its newline is a write that a crash cut before its fsync returned, so it was
    never acknowledged: it is left out, with a warning."""
    from freshrec.storage.crypto import open_line

    data = seg.read_bytes()
    lines = data.split(b"\n")
    if lines[-1].strip():
        log.warning("%s: skipping a torn last line of %d bytes (a write cut by a crash before "
                    "it was acknowledged)", seg, len(lines[-1]))
    return data, [open_line(line, cipher, f"{seg}: a line") for line in lines[:-1]
                  if line.strip()]


def remove_if_abandoned(proc_dir: Path) -> None:
    with flocked(proc_dir / "owner.lock", blocking=False) as free:
        if not free:
            return  # its owner is alive
        leftovers = [p for p in proc_dir.iterdir() if not p.name.endswith(".lock")]
        if any(p.name != OPEN or p.stat().st_size for p in leftovers):
            return
        for p in proc_dir.iterdir():
            p.unlink()
    try:
        proc_dir.rmdir()
    except OSError:  # a new writer picked the same name (cannot happen: names carry the time)
        pass
