"""Impressions: every served Recommend slate, logged per server process, then the Delta table.

The request path only appends a tuple to an in-memory buffer (:meth:`ImpressionLog.record`, about
a microsecond). A background thread turns the buffer into record lines (one pickled tuple per
slate, :func:`freshrec.storage.segments.record_line`: about a fifth of the CPU of a JSON line, which
matters because that thread shares the GIL with the requests) and appends them to the
process's own segment directory ``<data>/impressions/log/<host>-<pid>-<start_ns>/`` (the same
per-process, seal-by-rename segments as the event write-ahead log, :mod:`freshrec.storage.segments`) with
one fsync per flush: every ``serving.impressions_flush_ms`` or as soon as
``serving.impressions_flush_records`` slates are waiting, and at shutdown. Impressions are
analytics, not acknowledged writes: a crash (kill -9, power loss) loses the slates of at most the
last flush period (plus what the buffer held when it was over ``impressions_max_buffer`` records:
those are dropped and counted, never blocking a request).

The nearline round (:func:`nearline.impressions.take_impressions`) seals every process's segment
and writes each record into ``impressions`` once per ``request_id``; malformed records and repeated
request ids go to ``impressions_dead_letter`` with their reason (:data:`REASONS`). Exactly once
per segment: the dead-letter rows and then the impressions rows are appended (each skipping
segments already there by ``source_file``, the segment's content hash), then the segment is
deleted; a round that dies in between is redone by the next one without doubles.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time

from freshrec.settings import Settings
from freshrec.storage.segments import (
    SegmentWriter,
    impressions_root,
    record_line,
)

log = logging.getLogger(__name__)

# the fields of a record line's tuple, in order (the writer's server name is its directory's)


log_root = impressions_root


class ImpressionLog:
    """The per-process impression logger of one server."""

    def __init__(self, settings: Settings) -> None:
        cfg = settings.serving
        from freshrec.storage.crypto import cipher_for

        self.writer = SegmentWriter(log_root(settings), cipher=cipher_for(settings))
        self.server = self.writer.name
        self.flush_seconds = cfg.impressions_flush_ms / 1000.0
        self.flush_records = cfg.impressions_flush_records
        self.max_buffer = cfg.impressions_max_buffer
        self._buf: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._prefix = hashlib.sha256(self.server.encode()).hexdigest()[:12] + "-"
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="impressions-flush", daemon=True)
        self._thread.start()

    def new_request_id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    def record(self, request_id: str, user_id: str, model_version: str, arm: str | None,
               items: list[str], scores: list[float], propensities: list[float],
               candidates: list[str] | None = None,
               candidate_scores: list[float] | None = None) -> None:
        """Queue one served slate (items in served order; a re-ranked slate also the candidates
        it was chosen from, with their retrieval scores); never blocks on I/O."""
        entry = (request_id, user_id, model_version, arm, items, scores, propensities,
                 time.time_ns() // 1000, candidates, candidate_scores)
        with self._lock:
            if len(self._buf) >= self.max_buffer:
                self.dropped += 1
                return
            self._buf.append(entry)
            n = len(self._buf)
        if n >= self.flush_records:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # keep serving; the records stay buffered for the next try
                log.exception("writing the impression log failed; will retry")

    def flush(self) -> int:
        with self._lock:
            buf, self._buf = self._buf, []
        if not buf:
            return 0
        try:
            self.writer.append(b"".join(map(record_line, buf)))
        except Exception:
            with self._lock:
                self._buf[:0] = buf
            raise
        self.written += len(buf)
        return len(buf)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
        self.writer.close()














