"""Write-ahead log of events accepted by ``RecordEvents``: durable before the reply, then landed.

Each server process appends to its own segment directory ``<data>/wal/<host>-<pid>-<start_ns>/``
(:mod:`serving.segments`), so several ``freshrec serve`` processes may share one data directory.
``append`` writes the events as JSON lines and fsyncs before returning, so an acknowledged event
survives a crash. Landing seals a directory's open segment (a rename under a lock any process can
take, then an fsync of the directory) and moves every sealed segment into the landing zone (one
Parquet file per segment, named by its content hash, fsynced), from where the nearline round
(:mod:`serving.ingest`) or the nightly ingest job takes it into bronze ``events_raw``. A segment is
deleted only after it landed, and landing the same segment twice lands it once.

Who lands: each server its own directory every ``serving.wal_flush_seconds`` and at shutdown; at
start-up and in every nearline round (:func:`land_all`) every directory, including the open
segments of live servers and whatever a crashed server left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pyarrow as pa

from freshrec.durable import fsync_path
from freshrec.importers import land_events, normalize_events
from freshrec.settings import Settings
from freshrec.tables import RAW_EVENT_COLUMNS
from serving.segments import SegmentWriter, read_lines, take_sealed

log = logging.getLogger(__name__)


def wal_root(settings: Settings) -> Path:
    return settings.data_dir / "wal"


def _lander(settings: Settings, counter: list[int]):
    from freshrec.crypto import cipher_for

    schema = pa.schema([(c, pa.string()) for c in RAW_EVENT_COLUMNS])
    cipher = cipher_for(settings)

    def land(seg: Path) -> None:
        data, lines = read_lines(seg, cipher)
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # cannot happen for lines we wrote whole; never drop
                raise ValueError(f"{seg}: a line is not JSON ({line[:80]!r}); the segment stays "
                                 "in the log, fix or move it by hand") from None
        if not rows:
            return
        table = normalize_events(pa.Table.from_pylist(rows, schema=schema), seg.name)
        file_id = "wal" + hashlib.sha256(data).hexdigest()[:21]
        land_events(settings, table, f"grpc:{seg.parent.name}/{seg.name}", file_id,
                    pseudonymized=True)
        counter[0] += len(rows)

    return land


def land_all(settings: Settings, only: str | None = None) -> int:
    """Seal and land every server's segments (or only the directory ``only``); returns the events
    landed."""
    counter = [0]
    _adopt_legacy(wal_root(settings))
    take_sealed(wal_root(settings), _lander(settings, counter), only=only)
    if counter[0]:
        log.info("write-ahead log: landed %d events", counter[0])
    return counter[0]


def _adopt_legacy(root: Path) -> None:
    """Segments of the single-file layout of earlier versions (``wal/open.jsonl``,
    ``wal/sealed-*.jsonl``, written by one process) move into a process directory of their own, so
    they are landed like any other (run the new version only after the old servers stopped)."""
    old = [root / "open.jsonl", *sorted(root.glob("sealed-*.jsonl"))] if root.exists() else []
    old = [p for p in old if p.exists()]
    if not old:
        return
    legacy = root / "legacy"
    legacy.mkdir(exist_ok=True)
    for n, path in enumerate(old):
        os.replace(path, legacy / f"sealed-{time.time_ns():020d}-{n:04d}.jsonl")
    fsync_path(legacy)
    fsync_path(root)


class EventLog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        from freshrec.crypto import cipher_for

        self.writer = SegmentWriter(wal_root(settings), cipher=cipher_for(settings))
        self.dir = self.writer.dir

    def append(self, events: list[dict]) -> None:
        if not events:
            return
        self.writer.append(b"".join(json.dumps(e, sort_keys=True).encode() + b"\n"
                                    for e in events))

    def land(self, everyone: bool = False) -> int:
        """Seal this process's open segment and land its sealed ones (``everyone``: every
        process's); returns the events landed."""
        return land_all(self.settings, only=None if everyone else self.writer.name)

    def close(self) -> None:
        self.writer.close()
