"""The clean job's count reconciliation can fail: each stream is counted on its own, so a stage
that loses a row stops the run before anything is written."""

from __future__ import annotations

import pyarrow as pa
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.interval import DataInterval
from freshrec.storage.tables import EVENTS_RAW
from spark_jobs import clean

pytestmark = pytest.mark.integration
DAY = "2026-11-27"


def _raw(batch: str, rows: list[tuple]) -> pa.Table:
    cols = {c: [] for c in EVENTS_RAW.schema.names}
    for n, (eid, user, etype, value) in enumerate(rows):
        for c, v in (("event_id", eid), ("user_id", user), ("item_id", "i1"),
                     ("event_type", etype), ("value", value), ("ts", "2026-11-20T00:00:00Z"),
                     ("context", None), ("raw_id", f"{batch}:{n}"), ("source_file", "f"),
                     ("batch_date", batch), ("ingested_at", None)):
            cols[c].append(v)
    return pa.Table.from_pydict(cols, schema=EVENTS_RAW.schema)


@pytest.fixture
def bronze(spark, settings):
    store = DeltaStore(settings)
    store.write_arrow("events_raw", _raw("2026-11-26", [("old1", "p_a", "view", None)]))
    clean.run(settings, DataInterval.for_day("2026-11-26"))
    store.write_arrow("events_raw", _raw(DAY, [
        ("e1", "p_a", "view", None), ("e2", "p_b", "click", None),
        ("e2", "p_b", "click", None), ("e2", "p_b", "click", None),  # 2 repeats in the batch
        ("old1", "p_a", "view", None),  # held by the other batch
        ("e3", "", "view", None), ("e4", "p_c", "hover", None),  # dead letters
        ("e5", "p_d", "rating", "4")]))
    return store


def test_counts_balance_on_a_healthy_run(bronze, settings):
    c = clean.run(settings, DataInterval.for_day(DAY))
    assert c == {"raw": 8, "clean": 3, "dead_letter": 2, "duplicates": 3}
    assert bronze.count("events") == 4  # 3 of this batch + 1 of the other


@pytest.mark.parametrize("stage", ["clean_events", "dead_letter"])
def test_a_stage_that_drops_a_row_raises_count_mismatch_and_writes_nothing(bronze, settings,
                                                                          monkeypatch, stage):
    real = getattr(clean, stage)

    def lossy(*args, **kwargs):
        df = real(*args, **kwargs)
        return df.limit(max(0, df.count() - 1))  # a bug that loses one row

    monkeypatch.setattr(clean, stage, lossy)
    before = bronze.versions()
    with pytest.raises(clean.CountMismatch, match=r"raw 8 != "):
        clean.run(settings, DataInterval.for_day(DAY))
    assert bronze.versions() == before
