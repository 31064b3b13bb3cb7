"""The landing zone: every server's write-ahead log segments sealed and landed as event files
(one Parquet file per segment, named by its content hash, fsynced) for the nearline round or the
nightly ingest to take into bronze; damaged lines go to ``events_dead_letter``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pyarrow as pa

from freshrec.data.importers import land_events, normalize_events
from freshrec.durable import fsync_path
from freshrec.settings import Settings
from freshrec.storage.segments import read_lines, take_sealed, wal_root
from freshrec.storage.tables import RAW_EVENT_COLUMNS

log = logging.getLogger(__name__)


def _lander(settings: Settings, counter: list[int]):
    from freshrec.storage.crypto import cipher_for

    schema = pa.schema([(c, pa.string()) for c in RAW_EVENT_COLUMNS])
    cipher = cipher_for(settings)

    def land(seg: Path) -> None:
        data, lines = read_lines(seg, cipher)
        file_id = "wal" + hashlib.sha256(data).hexdigest()[:21]
        rows, bad = [], []
        for n, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if isinstance(rec, dict):
                rows.append(rec)
            else:  # a line damaged on disk (we write whole lines): dead-lettered, never dropped
                bad.append((n, line))
        if bad:
            _dead_letter(settings, seg, file_id, bad)
        if not rows:
            return
        table = normalize_events(pa.Table.from_pylist(rows, schema=schema), seg.name)
        land_events(settings, table, f"grpc:{seg.parent.name}/{seg.name}", file_id,
                    pseudonymized=True)
        counter[0] += len(rows)

    return land


def _dead_letter(settings: Settings, seg: Path, file_id: str,
                 bad: list[tuple[int, bytes]]) -> None:
    """Lines of a segment that are not a JSON object -> ``events_dead_letter`` (reason
    ``wal_not_json``, the line's text in ``context``), once per line (raw_id = segment hash +
    line number)."""
    import pyarrow.compute as pc

    from freshrec.storage.delta import DeltaStore
    from freshrec.storage.tables import EVENTS_DEAD_LETTER

    store = DeltaStore(settings)
    ids = [f"{file_id}:bad{n}" for n, _ in bad]
    have = set(store.read_arrow("events_dead_letter", columns=["raw_id"],
                                filter=pc.field("raw_id").isin(ids)).column("raw_id").to_pylist())
    day = time.strftime("%Y-%m-%d", time.gmtime())
    rows = [{"context": line.decode("utf-8", "replace")[:10_000], "raw_id": rid,
             "reason": "wal_not_json: a write-ahead log line that is not a JSON object "
                       f"({seg.parent.name}/{seg.name} line {n + 1})", "batch_date": day}
            for (n, line), rid in zip(bad, ids) if rid not in have]
    if rows:
        store.write_arrow("events_dead_letter", pa.Table.from_pylist(
            [{**{c: None for c in RAW_EVENT_COLUMNS}, **r} for r in rows],
            schema=EVENTS_DEAD_LETTER.schema))
    log.error("%s: %d damaged line(s) went to events_dead_letter (wal_not_json)", seg, len(bad))


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
