"""Nearline ingest: landed event files -> bronze ``events_raw`` -> silver ``events`` +
``events_dead_letter``, in seconds and without a Spark session (delta-rs + pyarrow).

The first step of every nearline round (:func:`nearline.refresher.refresh_once`). It takes every
landed file (``<data>/landing/events/landed_date=D/<file_id>.parquet``) whose file id is not in
bronze yet, exactly as the nightly jobs would take it:

* ``batch_date`` = the file's landing day ``D``: the nightly ingest of interval ``[D, D+1)`` is the
  one that would have taken it (it takes files landed before its end), and it now finds the file in
  bronze and skips it;
* the rows are checked by the same event rules (:meth:`EventRules.check_table`) with the same
  reference instant (the batch's end, ``D+1``), refused rows go to ``events_dead_letter`` with their
  reason, valid rows get the same ``event_id`` (given, or ``h_`` + the first 32 hex digits of the
  SHA-256 of ``user_id|item_id|event_type|ts|value`` as the raw text) and weight;
* deduplication gives what the nightly clean of each batch gives: per ``event_id`` the row with the
  smallest ``raw_id`` within a batch (a new row with a smaller ``raw_id`` replaces the stored one of
  its batch), none when another batch holds the id. So the nightly clean's replace-by-batch_date
  rewrite of ``D`` finds the same rows and commits nothing.

Exactly once per landed file: the dead-letter rows, then the silver rows are written (each write
skips what is already there: ``raw_id`` in the dead-letter table, ``event_id`` in ``events``), and
the bronze append comes last: a file id in bronze means taken. A crash between the steps leaves the
file untaken; the next round recomputes the same rows, finds the ones already written, writes the
rest and then bronze. A round with nothing new commits nothing. Rounds are serialized by a file
lock (``<data>/refresher/ingest.lock``).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from freshrec.contracts.events import rules_for
from freshrec.storage.crypto import cipher_for, read_parquet
from freshrec.storage.delta import DeltaStore, conform
from freshrec.settings import Settings
from freshrec.storage.tables import EVENTS, EVENTS_DEAD_LETTER, EVENTS_RAW
from freshrec.storage.segments import flocked

log = logging.getLogger(__name__)
FILE_ID_LEN = 24  # spark_jobs.ingest.FILE_ID_LEN: raw_id = <file id>:<row>


class CountMismatch(RuntimeError):
    """raw != clean + dead-letter + duplicates: something would be lost; nothing was written."""


def taken_file_ids(store: DeltaStore) -> set[str]:
    raw_ids = store.read_arrow("events_raw", columns=["raw_id"]).column("raw_id")
    return set(pc.unique(pc.utf8_slice_codeunits(raw_ids, 0, FILE_ID_LEN)).to_pylist())


def pending_files(settings: Settings, taken: set[str]) -> list[tuple[str, Path]]:
    """(landing day, file) of every landed file not in bronze, oldest day first."""
    out = []
    for day_dir in sorted((settings.landing_dir / "events").glob("landed_date=*")):
        day = day_dir.name.split("=", 1)[1]
        out.extend((day, f) for f in sorted(day_dir.glob("*.parquet")) if f.stem not in taken)
    return out


def _row_hash_ids(valid: pa.Table) -> pa.Array:
    """``h_`` + sha256(user_id|item_id|event_type|ts|value) of the raw text, as clean makes it."""
    cols = [valid.column(c).to_pylist() for c in ("user_id", "item_id", "event_type", "ts",
                                                   "value")]
    return pa.array(["h_" + hashlib.sha256(f"{u}|{i}|{t}|{ts}|{v or ''}".encode()).hexdigest()[:32]
                     for u, i, t, ts, v in zip(*cols)], pa.string())


def check_batch(settings: Settings, raw: pa.Table, batch_date: str) -> tuple[pa.Table, pa.Table]:
    """(clean rows with event ids, not yet deduplicated; dead-letter rows) of one batch's raw rows,
    by the event rules with the batch's end as the reference instant."""
    end = datetime.strptime(batch_date, "%Y-%m-%d").replace(tzinfo=timezone.utc) + timedelta(days=1)
    out = rules_for(settings).check_table(raw, end)
    bad = out.column("reason").is_valid()
    dead = raw.append_column("reason", out.column("reason")).filter(bad)
    good = pc.invert(bad)
    ok = out.filter(good)
    raw_ok = raw.filter(good)
    given = ok.column("event_id")
    event_id = pc.if_else(given.is_valid(), given, _row_hash_ids(raw_ok)) if raw_ok.num_rows \
        else given
    clean = pa.table({
        "event_id": event_id, "user_id": ok.column("user_id"), "item_id": ok.column("item_id"),
        "event_type": ok.column("event_type"), "value": ok.column("value"),
        "weight": ok.column("weight"), "ts": ok.column("ts"), "context": raw_ok.column("context"),
        "raw_id": raw_ok.column("raw_id"), "batch_date": raw_ok.column("batch_date")})
    return clean, dead.select(EVENTS_DEAD_LETTER.schema.names)


def _first_per_event_id(clean: pa.Table) -> pa.Table:
    """Per event_id the row of the earliest batch, and within it the smallest raw_id."""
    if clean.num_rows == 0:
        return clean
    order = clean.sort_by([("event_id", "ascending"), ("batch_date", "ascending"),
                           ("raw_id", "ascending")])
    ids = order.column("event_id").to_numpy(zero_copy_only=False)
    first = np.r_[True, ids[1:] != ids[:-1]]
    return order.filter(pa.array(first))


def _against_silver(store: DeltaStore, fresh: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(rows to insert, rows that replace a stored row of their batch with a larger raw_id)."""
    if fresh.num_rows == 0:
        return fresh, fresh
    stored = store.read_arrow("events", columns=["event_id", "raw_id", "batch_date"],
                              filter=pc.field("event_id").isin(fresh.column("event_id")))
    if stored.num_rows == 0:
        return fresh, fresh.slice(0, 0)
    joined = fresh.join(stored.rename_columns(["event_id", "s_raw_id", "s_batch_date"]),
                        "event_id", join_type="left outer")
    new = joined.column("s_raw_id").is_null()
    replace = pc.and_(pc.and_(pc.invert(new), pc.equal(joined.column("s_batch_date"),
                                                       joined.column("batch_date"))),
                      pc.less(joined.column("raw_id"), joined.column("s_raw_id")))
    names = EVENTS.schema.names
    return joined.filter(new).select(names), joined.filter(pc.fill_null(replace, False)).select(names)


def ingest_landed(settings: Settings, now: datetime | None = None, crash=None) -> dict:
    """Take every landed file not in bronze into bronze and silver (see the module docstring);
    returns counts. ``crash(name)``: the refresher's test hook, called between the steps."""
    crash = crash or (lambda name: None)
    store = DeltaStore(settings)
    lock = settings.data_dir / "refresher" / "ingest.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with flocked(lock):
        files = pending_files(settings, taken_file_ids(store))
        report = {"files": len(files), "raw": 0, "clean": 0, "dead_letter": 0, "duplicates": 0,
                  "replaced": 0, "batches": sorted({d for d, _ in files})}
        if not files:
            return report
        stamp = now or datetime.now(timezone.utc)
        cipher = cipher_for(settings)
        raws = []
        for day, f in files:
            t = read_parquet(f, cipher)
            t = t.append_column("batch_date", pa.array([day] * t.num_rows, pa.string()))
            t = t.append_column("ingested_at", pa.array([stamp] * t.num_rows, EVENTS_RAW.schema
                                                        .field("ingested_at").type))
            raws.append(t.select(EVENTS_RAW.schema.names).cast(EVENTS_RAW.schema))
        raw = pa.concat_tables(raws)
        cleans, deads = [], []
        for day in report["batches"]:
            c, d = check_batch(settings, raw.filter(pc.field("batch_date") == day), day)
            cleans.append(c)
            deads.append(d)
        clean = pa.concat_tables(cleans)
        dead = pa.concat_tables(deads)
        fresh = _first_per_event_id(clean)
        insert, replace = _against_silver(store, fresh)
        n_dup = clean.num_rows - insert.num_rows - replace.num_rows
        if raw.num_rows != insert.num_rows + replace.num_rows + dead.num_rows + n_dup:
            raise CountMismatch(f"raw {raw.num_rows} != clean {insert.num_rows + replace.num_rows}"
                                f" + dead-letter {dead.num_rows} + duplicates {n_dup}")
        # 1. dead-letter rows not written yet (a crashed round may have written them)
        if dead.num_rows:
            have = store.read_arrow("events_dead_letter", columns=["raw_id"],
                                    filter=pc.field("raw_id").isin(dead.column("raw_id")))
            todo = dead.filter(pc.invert(pc.is_in(dead.column("raw_id"), have.column("raw_id"))))
            if todo.num_rows:
                store.write_arrow("events_dead_letter", todo)
        crash("ingest_after_dead_letter")
        # 2. silver: one commit (append, or MERGE when a stored row gets replaced)
        if replace.num_rows:

            from freshrec.privacy.erasure import drop_erased, guarded

            rows = conform(pa.concat_tables([insert, replace]), EVENTS)
            store.ensure("events")
            with guarded(settings) as erased:  # an erased user's rows do not come back
                rows = drop_erased("events", rows, erased)
                (store.table("events")
                 .merge(rows, predicate="t.event_id = s.event_id", source_alias="s",
                        target_alias="t")
                 .when_matched_update_all(predicate="t.batch_date = s.batch_date AND "
                                                    "s.raw_id < t.raw_id")
                 .when_not_matched_insert_all().execute())
        elif insert.num_rows:
            store.write_arrow("events", insert)
        crash("ingest_after_silver")
        # 3. bronze last: the file ids there are the checkpoint
        store.write_arrow("events_raw", raw)
        crash("ingest_after_bronze")
        report.update(raw=raw.num_rows, clean=insert.num_rows + replace.num_rows,
                      dead_letter=dead.num_rows, duplicates=n_dup, replaced=replace.num_rows)
        log.info("nearline ingest: %s", report)
        return report
