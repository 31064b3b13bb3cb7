"""Write-ahead log of events accepted by ``RecordEvents``: durable before the reply, then landed.

Each server process appends to its own segment directory ``<data>/wal/<host>-<pid>-<start_ns>/``
(:mod:`freshrec.storage.segments`), so several ``freshrec serve`` processes may share one data directory.
``append`` writes the events as JSON lines and fsyncs before returning, so an acknowledged event
survives a crash. Landing seals a directory's open segment (a rename under a lock any process can
take, then an fsync of the directory) and moves every sealed segment into the landing zone (one
Parquet file per segment, named by its content hash, fsynced), from where the nearline round
(:mod:`nearline.ingest`) or the nightly ingest job takes it into bronze ``events_raw``. A segment is
deleted only after it landed, and landing the same segment twice lands it once.

Who lands: each server its own directory every ``serving.wal_flush_seconds`` and at shutdown; at
start-up and in every nearline round (:func:`freshrec.storage.landing.land_all`) every directory,
including the open segments of live servers and whatever a crashed server left behind.
"""

from __future__ import annotations

import json
import logging

from freshrec.settings import Settings
from freshrec.storage.landing import land_all
from freshrec.storage.segments import SegmentWriter, wal_root

log = logging.getLogger(__name__)










class EventLog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        from freshrec.storage.crypto import cipher_for

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
