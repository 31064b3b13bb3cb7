"""Write-ahead log of events accepted by ``RecordEvents``: durable before the reply, then landed.

``append`` writes the events as JSON lines to the open segment and fsyncs before returning, so an
acknowledged event survives a crash. ``land`` seals the open segment and moves every sealed segment
into the landing zone (one Parquet file per segment, named by its content hash), from where the
batch ingest job takes it into bronze ``events_raw``; a segment is deleted only after it landed,
and landing the same segment twice lands it once. Start-up lands whatever a crash left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time

import pyarrow as pa

from freshrec.importers import land_events, normalize_events
from freshrec.settings import Settings
from freshrec.tables import RAW_EVENT_COLUMNS

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.data_dir / "wal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.dir / "open.jsonl", "ab")

    def append(self, events: list[dict]) -> None:
        if not events:
            return
        payload = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in events)
        with self._lock:
            self._file.write(payload)
            self._file.flush()
            os.fsync(self._file.fileno())

    def _seal(self) -> None:
        with self._lock:
            if self._file.tell() == 0:
                return
            self._file.close()
            os.replace(self.dir / "open.jsonl", self.dir / f"sealed-{time.time_ns()}.jsonl")
            self._file = open(self.dir / "open.jsonl", "ab")

    def land(self) -> int:
        """Seal the open segment and land every sealed one; returns the events landed."""
        self._seal()
        landed = 0
        for seg in sorted(self.dir.glob("sealed-*.jsonl")):
            data = seg.read_bytes()
            rows = [json.loads(line) for line in data.splitlines() if line.strip()]
            if rows:
                schema = pa.schema([(c, pa.string()) for c in RAW_EVENT_COLUMNS])
                table = normalize_events(pa.Table.from_pylist(rows, schema=schema), seg.name)
                file_id = "wal" + hashlib.sha256(data).hexdigest()[:21]
                land_events(self.settings, table, f"grpc:{seg.name}", file_id, pseudonymized=True)
                landed += len(rows)
            seg.unlink()
        if landed:
            log.info("write-ahead log: landed %d events", landed)
        return landed

    def close(self) -> None:
        with self._lock:
            self._file.close()
