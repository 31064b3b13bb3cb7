"""Feedback join benchmark: shown items (impression slate rows) labelled per minute, on 2 cores.

Synthetic impressions (``--slates`` slates of ``--k`` items over ``--users`` users and ``--items``
items, over one hour) and silver events (a click on ~``--ctr`` of the shown items inside the
attribution window, some after it, plus as many organic events) are written to fresh Delta tables
in a temporary directory. Measured, each the best of ``--repeat`` runs:

1. the join alone (:func:`nearline.feedback.explode` + :func:`nearline.feedback.label`, in memory);
2. the whole incremental job (:func:`nearline.feedback.run_feedback`: read both tables from Delta,
   join, append the ``feedback`` rows in one commit), on a fresh ``feedback`` table each time;
3. the baseline side by side: the same labels computed row by row in Python (a dict of each
   user's events per item, scanned per shown item) on the first ``--baseline-slates`` slates,
   with its result checked equal to the vectorized one on those slates.

Target: >= 1,000,000 shown items per minute on 2 cores.

    .venv/bin/python benchmarks/feedback.py [--slates 100000] [--k 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slates", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--ctr", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--baseline-slates", type=int, default=5_000)
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa

    pa.set_cpu_count(2)
    pa.set_io_thread_count(2)
    from freshrec.storage.delta import DeltaStore
    from freshrec.settings import load_settings
    from freshrec.storage.tables import TS
    from nearline import feedback

    rng = np.random.default_rng(5)
    t0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    n, k = args.slates, args.k
    start_us = int(t0.timestamp() * 1e6)
    imp_us = np.sort(start_us + rng.integers(0, 3600 * 10**6, n))
    users = rng.integers(0, args.users, n)
    items = rng.integers(0, args.items, (n, k))
    user_ids = np.char.add("u", users.astype(str)).astype(object)
    item_ids = np.char.add("i", items.astype(str)).astype(object)
    offsets = np.arange(0, n * k + 1, k, dtype=np.int32)
    flat_items = pa.array(item_ids.ravel(), pa.string())
    list_of = lambda values: pa.ListArray.from_arrays(pa.array(offsets), values)  # noqa: E731
    impressions = pa.table({
        "request_id": pa.array([f"r{i}" for i in range(n)], pa.string()),
        "user_id": pa.array(user_ids, pa.string()),
        "model_version": pa.array(["freshrec-retrieval/1 als"] * n),
        "arm": pa.nulls(n, pa.string()),
        "items": list_of(flat_items),
        "positions": list_of(pa.array(np.tile(np.arange(k, dtype=np.int32), n))),
        "scores": list_of(pa.array(rng.random(n * k))),
        "propensities": list_of(pa.array(np.ones(n * k))),
        "ts": pa.array(imp_us, pa.int64()).cast(TS),
        "server": pa.array(["bench"] * n), "source_file": pa.array(["bench"] * n),
        "served_date": pa.array([t0.strftime("%Y-%m-%d")] * n)})
    # events: clicks inside the window, late clicks, organic
    m = int(n * k * args.ctr)
    row = rng.integers(0, n * k, m)
    slate = row // k
    delay = rng.integers(1, 45 * 60 * 10**6, m)  # up to 45 min: a third after a 30 min window
    org = m
    ev_user = np.r_[users[slate], rng.integers(0, args.users, org)]
    ev_item = np.r_[items.ravel()[row], rng.integers(0, args.items, org)]
    ev_us = np.r_[imp_us[slate] + delay, start_us + rng.integers(0, 3600 * 10**6, org)]
    ne = len(ev_us)
    events = pa.table({
        "event_id": pa.array([f"e{i}" for i in range(ne)]),
        "user_id": pa.array(np.char.add("u", ev_user.astype(str)).astype(object), pa.string()),
        "item_id": pa.array(np.char.add("i", ev_item.astype(str)).astype(object), pa.string()),
        "event_type": pa.array(["click"] * ne), "value": pa.nulls(ne, pa.float64()),
        "weight": pa.array(np.full(ne, 2.0)), "ts": pa.array(ev_us, pa.int64()).cast(TS),
        "context": pa.nulls(ne, pa.string()), "raw_id": pa.array([f"x:{i}" for i in range(ne)]),
        "batch_date": pa.array([t0.strftime("%Y-%m-%d")] * ne)})
    window = timedelta(minutes=30)
    now = t0 + timedelta(hours=3)
    shown_rows = n * k
    print(f"{n:,} slates x {k} = {shown_rows:,} shown items, {ne:,} events, "
          f"{pa.cpu_count()} Arrow threads, {os.cpu_count()} cores")

    def best(fn):
        times = []
        out = None
        for _ in range(args.repeat):
            s = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - s)
        return min(times), out

    def join():
        return feedback.label(feedback.explode(impressions), events, window, t0, now, now)

    t_join, rows = best(join)
    clicked = int(np.sum(rows.column("clicked").to_numpy(zero_copy_only=False)))

    tmp = Path(tempfile.mkdtemp(prefix="freshrec-fb-"))
    try:
        settings = load_settings("local", env={}, paths={"data_dir": str(tmp / "data")},
                                 feedback={"window_minutes": 30, "settle_minutes": 0})
        store = DeltaStore(settings)
        store.write_arrow("impressions", impressions)
        store.write_arrow("events", events)

        def job():
            shutil.rmtree(store.path("feedback"), ignore_errors=True)
            return feedback.run_feedback(settings, now=now)

        t_job, report = best(job)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # baseline: row by row in Python on the first slates
    b = args.baseline_slates
    s = time.perf_counter()
    by_user: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for u, i, t, e in zip(events.column("user_id").to_pylist(), events.column("item_id")
                          .to_pylist(), ev_us.tolist(), events.column("event_id").to_pylist()):
        by_user.setdefault((u, i), []).append((t, e))
    w_us = int(window / timedelta(microseconds=1))
    base = {}
    for j in range(b):
        for p in range(k):
            hits = [(t, e) for t, e in by_user.get((user_ids[j], item_ids[j, p]), ())
                    if imp_us[j] < t <= imp_us[j] + w_us]
            base[(f"r{j}", item_ids[j, p])] = min(hits)[1] if hits else None
    t_base = time.perf_counter() - s
    ours = {(r, i): e for r, i, e, o in zip(rows.column("request_id").to_pylist(),
                                             rows.column("item_id").to_pylist(),
                                             rows.column("event_id").to_pylist(),
                                             rows.column("organic").to_pylist())
            if not o and int(r[1:]) < b}
    assert ours == base, "vectorized labels differ from the row-by-row baseline"

    per_min = lambda rows_, secs: rows_ / secs * 60  # noqa: E731
    print(f"join in memory:      {t_join:7.2f} s  {per_min(shown_rows, t_join):>14,.0f} shown items/min"
          f"  ({clicked:,} clicked, {report['organic']:,} organic)")
    print(f"job incl. Delta I/O: {t_job:7.2f} s  {per_min(shown_rows, t_job):>14,.0f} shown items/min"
          f"  ({report['rows']:,} feedback rows written)")
    print(f"baseline row-by-row: {t_base:7.2f} s  {per_min(b * k, t_base):>14,.0f} shown items/min"
          f"  (first {b:,} slates, same labels)")
    print(f"ratio job / baseline: {per_min(shown_rows, t_job) / per_min(b * k, t_base):.1f}x;  "
          f"target >= 1,000,000/min: {'met' if per_min(shown_rows, t_job) >= 1e6 else 'MISSED'}")


if __name__ == "__main__":
    main()
