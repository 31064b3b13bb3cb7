"""Deleting a user's data on request: every Delta table row and every landed file row.

Deletes the pseudonymous user's rows from each table with a ``user_id`` column (Delta DELETE; the
old files go at the next VACUUM per retention) and rewrites landed event files that still hold
them, so a later ingest cannot bring them back. Returns the rows removed per table.
"""

from __future__ import annotations

import logging
import os

import pyarrow.compute as pc
import pyarrow.parquet as pq

from freshrec.delta import DeltaStore, sql_literal
from freshrec.settings import Settings
from freshrec.tables import TABLES

log = logging.getLogger(__name__)


def erase_user(settings: Settings, pseudonym: str) -> dict[str, int]:
    store = DeltaStore(settings)
    removed: dict[str, int] = {}
    for name, spec in TABLES.items():
        if "user_id" not in spec.schema.names or not store.exists(name):
            continue
        metrics = store.table(name).delete(f"user_id = {sql_literal(pseudonym)}")
        removed[name] = int(metrics.get("num_deleted_rows", 0) or 0)
    landing = 0
    for f in (settings.landing_dir / "events").glob("landed_date=*/*.parquet"):
        t = pq.read_table(f)
        keep = pc.not_equal(pc.fill_null(t.column("user_id"), ""), pseudonym)
        if pc.all(keep).as_py():
            continue
        landing += t.num_rows - pc.sum(keep.cast("int64")).as_py()
        tmp = f.with_name(f".{f.name}.tmp")
        pq.write_table(t.filter(keep), tmp)
        os.replace(tmp, f)
    removed["landing_files"] = landing
    log.info("erased user %s: %s", pseudonym, removed)
    return removed
