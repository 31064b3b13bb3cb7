"""Erasure costs, side by side with a baseline in the same run.

1. What the writers' erasure filter adds to a Delta append (``DeltaStore.write_arrow`` of an
   events batch): the same append with an empty erasure log (baseline), with ``--erased`` users in
   the log none of whom is in the batch, and with them plus 1% of the batch's users erased;
   median of ``--repeat`` appends each, interleaved, and the ratio to the baseline;
2. One erasure (``freshrec.privacy.erasure.erase_user``: DELETE in every user table, landing rewrite,
   VACUUM with retention 0 and log clean-up) on tables of ``--rows`` events written in
   ``--commits`` commits, next to a plain Delta DELETE of the same user on a copy (the erasure
   before this change did only that and the landing rewrite).

    .venv/bin/python benchmarks/erasure.py [--rows 200000] [--erased 10000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _events(n: int, n_users: int, offset: int = 0):
    import numpy as np
    import pyarrow as pa

    from freshrec.storage.tables import EVENTS

    rng = np.random.default_rng(offset)
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    users = rng.integers(0, n_users, n)
    return pa.table({
        "event_id": [f"e{offset}-{i}" for i in range(n)],
        "user_id": [f"p_{u:032x}" for u in users],
        "item_id": [f"i{i % 500}" for i in range(n)],
        "event_type": ["view"] * n, "value": pa.nulls(n, pa.float64()),
        "weight": pa.array(np.ones(n)), "ts": pa.array([t0 + timedelta(seconds=int(i)) for i in
                                                        range(n)], EVENTS.schema.field("ts").type),
        "context": pa.nulls(n, pa.string()), "raw_id": [f"r{offset}-{i}" for i in range(n)],
        "batch_date": ["2026-11-01"] * n}, schema=EVENTS.schema)


def _raw(ev):
    """The bronze form of events: text columns, as landed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from freshrec.storage.tables import EVENTS_RAW

    n = ev.num_rows
    cols = {f.name: (pc.cast(ev.column(f.name), pa.string()) if f.name in ev.column_names
                     else pa.nulls(n, f.type)) for f in EVENTS_RAW.schema}
    cols["batch_date"] = ev.column("batch_date")
    return pa.table(cols, schema=EVENTS_RAW.schema)


def _log(settings, users: list[str]) -> None:
    from freshrec.privacy.erasure import log_path

    path = log_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat()
    path.write_text("".join(json.dumps({"user_id": u, "erased_at": now}) + "\n" for u in users))


def main() -> None:
    from deltalake import DeltaTable

    from freshrec.storage.delta import DeltaStore
    from freshrec.privacy.erasure import erase_user
    from freshrec.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=20_000)
    ap.add_argument("--erased", type=int, default=10_000)
    ap.add_argument("--commits", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="freshrec-erasure-bench-"))
    try:
        n_users = 5000
        batch = _events(args.batch, n_users, offset=99)
        present = sorted(set(batch.column("user_id").to_pylist()))[: max(1, n_users // 100)]
        absent = [f"p_{u:032x}" for u in range(10**6, 10**6 + args.erased)]
        cases = {"empty log (baseline)": [], f"{args.erased} erased, none in batch": absent,
                 f"{args.erased} erased + {len(present)} in batch": absent + present}
        times: dict[str, list[float]] = {c: [] for c in cases}
        dirs = {}
        for n, c in enumerate(cases):
            s = load_settings("local", env={}, paths={"data_dir": str(work / f"w{n}")})
            if cases[c]:
                _log(s, cases[c])
            DeltaStore(s).write_arrow("events", batch.slice(0, 10))
            dirs[c] = s
        for _ in range(args.repeat):
            for c, s in dirs.items():
                t = time.perf_counter()
                DeltaStore(s).write_arrow("events", batch)
                times[c].append(time.perf_counter() - t)
        print(f"1. Delta append of {args.batch:,} events (median of {args.repeat}):")
        base = statistics.median(times["empty log (baseline)"])
        for c, ts in times.items():
            m = statistics.median(ts)
            print(f"   {c:<34} {m * 1000:8.1f} ms   x{m / base:.2f}")

        s = load_settings("local", env={}, paths={"data_dir": str(work / "erase")})
        store = DeltaStore(s)
        per = args.rows // args.commits
        for k in range(args.commits):
            ev = _events(per, n_users, offset=k)
            store.write_arrow("events", ev)
            store.write_arrow("events_raw", _raw(ev))
        copy = work / "plain"
        shutil.copytree(store.path("events"), copy / "events")
        shutil.copytree(store.path("events_raw"), copy / "events_raw")
        user = "p_" + f"{7:032x}"
        t = time.perf_counter()
        for name in ("events", "events_raw"):
            DeltaTable(str(copy / name)).delete(f"user_id = '{user}'")
        plain = time.perf_counter() - t
        t = time.perf_counter()
        report = erase_user(s, user)
        full = time.perf_counter() - t
        print(f"2. erasing one user from {args.rows:,} events in {args.commits} commits "
              f"(events and events_raw):")
        print(f"   Delta DELETE only (before)          {plain * 1000:8.1f} ms   x1.00")
        print(f"   erase_user (DELETE, rewrites, VACUUM) {full * 1000:6.1f} ms   x{full / plain:.2f}"
              f"   ({sum(report['tables'].values())} rows, {report['vacuumed_files']} old files "
              "removed)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
