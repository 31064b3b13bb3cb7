"""The snapshot's user histories (nearline/snapshots.py ``_histories``) are read from silver
``events`` a record batch at a time as integer codes; they must hold what a plain pandas reading
of the same rows gives: users in sorted order (only those with a catalog item), each user's
(item, summed weight) pairs sorted by catalog position, and their newest RECENT_ITEMS catalog
items in time order (ties in the table's scan order), across several appends (files)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa

from freshrec.storage.delta import DeltaStore
from nearline.snapshots import RECENT_ITEMS, _histories


def _events(users, items, weights, ts, start: int) -> pa.Table:
    n = len(users)
    return pa.table({
        "event_id": [f"e{start + k}" for k in range(n)], "user_id": users, "item_id": items,
        "event_type": ["view"] * n, "value": pa.nulls(n, pa.float64()),
        "weight": pa.array(weights, pa.float64()),
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")), "context": pa.nulls(n, pa.string()),
        "raw_id": [f"r{start + k}" for k in range(n)], "batch_date": ["2026-11-28"] * n})


def _reference(df: pd.DataFrame, catalog: list[str]):
    position = {i: n for n, i in enumerate(catalog)}
    df = df[df["item_id"].isin(position)].copy()
    df["pos"] = df["item_id"].map(position)
    users = sorted(df["user_id"].unique())
    rows = {u: r for r, u in enumerate(users)}
    df["row"] = df["user_id"].map(rows)
    pairs = df.groupby(["row", "pos"])["weight"].sum().reset_index()
    recent = df.sort_values(["row", "ts"], kind="stable").groupby("row").tail(RECENT_ITEMS)
    return users, pairs, recent


def test_histories_match_a_plain_reading_of_the_events(settings):
    rng = np.random.default_rng(3)
    store = DeltaStore(settings)
    catalog = [f"i{k:03d}" for k in range(40)]  # i040..i059 occur in events but are not served
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    start = 0
    for _ in range(3):  # three appends: several files, scanned in several batches
        n = 700
        users = [f"u{k}" for k in rng.zipf(1.6, n) % 37] + ["ü-unicode", "zz-outside"]
        items = [f"i{k:03d}" for k in rng.integers(0, 60, n)] + ["i001", "i050"]
        weights = rng.choice([1.0, 0.5, 3.25], n + 2)
        ts = [t0 + timedelta(minutes=int(m)) for m in rng.integers(0, 90, n + 2)]  # many ties
        table = _events(users, items, weights, ts, start)
        store.write_arrow("events", table)
        start += n + 2
    # the whole table read at once, in the order a scan gives it (ties in ts keep that order)
    df = store.read_arrow("events", columns=["user_id", "item_id", "ts", "weight"]).to_pandas()
    assert len(df) == 3 * 702
    users, indptr, items, weights, rptr, recent, newest = _histories(
        store, store.version("events"), catalog)
    ref_users, pairs, ref_recent = _reference(df, catalog)

    assert users == ref_users and "zz-outside" not in users  # only users with a catalog item
    assert "ü-unicode" in users
    assert np.array_equal(np.diff(indptr), np.bincount(pairs["row"], minlength=len(users)))
    assert np.array_equal(items, pairs["pos"].to_numpy())
    assert np.allclose(weights, pairs["weight"].to_numpy(), rtol=0, atol=1e-6)
    heavy = int(np.argmax(np.diff(rptr)))
    assert np.diff(rptr)[heavy] == RECENT_ITEMS  # the busiest users are cut to the newest
    assert np.array_equal(np.diff(rptr), np.bincount(ref_recent["row"], minlength=len(users)))
    assert np.array_equal(recent, ref_recent["pos"].to_numpy())
    assert newest == df["ts"].max().timestamp()


def test_histories_of_an_empty_table_and_of_events_outside_the_catalog(settings):
    store = DeltaStore(settings)
    store.ensure("events")
    users, indptr, items, _, rptr, recent, newest = _histories(store, store.version("events"), ["i1"])
    assert (users, list(indptr), len(items), list(rptr), len(recent), newest) == ([], [0], 0, [0], 0,
                                                                                 None)
    t = datetime(2026, 11, 2, tzinfo=timezone.utc)
    store.write_arrow("events", _events(["u1"], ["gone"], [1.0], [t], 0))
    users, indptr, items, _, rptr, recent, newest = _histories(store, store.version("events"), ["i1"])
    assert (users, list(indptr), len(items), list(rptr), len(recent)) == ([], [0], 0, [0], 0)
    assert newest == t.timestamp()  # the newest event counts even when its item is not served
