"""The evaluate worker's cost per stage: wall time and the process tree's peak resident memory.

Runs what ``spark_jobs.evaluate.fit_candidates`` runs, stage by stage, in this process (its Spark
JVM, if a Spark model is fitted, is a child and counts in the tree): load the interval's silver
events (delta-rs), build the protocol's splits, then for each model its fit, its scoring on both
splits and its export, and finally the refit of one model on every event. MLflow logging is left
out (the export is what it uploads).

The silver ``events`` table is written directly with delta-rs from :func:`freshrec.data.synth.make_events`
(no ingest or clean; no malformed or duplicate rows; weights: a fixed weight per event type, not the
event rules'), once per ``--data`` folder and event count. ``--code DIR`` imports the project from
another checkout (e.g. ``git archive`` of the base commit): run both side by side on the same data
for a before/after. Usage::

    python benchmarks/evaluate_memory.py --events 1000000 --data /tmp/evm-1m \
        [--models most_popular,trending,item_knn,als,hybrid] [--refit item_knn] [--code DIR]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path


class TreePeak:
    """Peak resident memory of this process and its descendants, sampled every ``every`` s."""

    def __init__(self, every: float = 0.1) -> None:
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def reset(self) -> None:
        self.peak = self.now()


WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0, "rating": 4.0}


def write_events(settings, n_events: int) -> int:
    """The silver events table of ``n_events`` synthetic events (skipped when it exists)."""
    from datetime import datetime, timezone

    import numpy as np
    import pyarrow as pa

    from freshrec.storage.delta import DeltaStore
    from freshrec.data.synth import make_items, make_events

    store = DeltaStore(settings)
    if store.exists("events"):
        return store.version("events")
    cfg = settings.synth.model_copy(update={"n_events": n_events})
    rng = np.random.default_rng(cfg.seed)
    end = datetime(2026, 11, 1, tzinfo=timezone.utc)
    _, item_cluster = make_items(cfg, rng)
    ev, _ = make_events(cfg, item_cluster, end, rng)
    n = len(ev["user"])
    ids = np.char.add("e", np.arange(n).astype(str)).astype(object)
    w = np.vectorize(WEIGHTS.get, otypes=[np.float64])(ev["type"])
    table = pa.table({
        "event_id": pa.array(ids, pa.string()),
        "user_id": pa.array(np.char.add("u", ev["user"].astype(str)).astype(object), pa.string()),
        "item_id": pa.array(np.char.add("i", ev["item"].astype(str)).astype(object), pa.string()),
        "event_type": pa.array(ev["type"].astype(object), pa.string()),
        "value": pa.array(ev["value"], pa.float64(), from_pandas=True),
        "weight": pa.array(w, pa.float64()),
        "ts": pa.array(ev["ts"].astype("datetime64[us]"), pa.timestamp("us")).cast(
            pa.timestamp("us", tz="UTC")),
        "context": pa.nulls(n, pa.string()),
        "raw_id": pa.array(ids, pa.string()),
        "batch_date": pa.array(np.full(n, "2026-10-31", dtype=object), pa.string()),
    })
    store.write_arrow("events", table.cast(store.spec("events").schema), mode="overwrite")
    return store.version("events")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--data", required=True, help="data folder (tables written once per folder)")
    ap.add_argument("--models", default="most_popular,trending,item_knn,als,hybrid")
    ap.add_argument("--refit", default="item_knn", help="the model refitted on all events ('' none)")
    ap.add_argument("--code", default=None, help="import the project from this checkout")
    args = ap.parse_args()
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import tempfile

    from freshrec.interval import DataInterval
    from freshrec.settings import load_settings
    from recmodels import SPARK_MODELS, model_params
    from spark_jobs import evaluate

    settings = load_settings("local", env={}, paths={"data_dir": str(Path(args.data).resolve())})
    version = write_events(settings, args.events)
    import spark_jobs
    print(f"code: {Path(spark_jobs.__file__).parents[1]}  events version {version}", flush=True)
    cfg = settings.evaluation
    interval = DataInterval.for_day("2026-10-31")
    mem = TreePeak()
    rows: list[tuple[str, float, float, float]] = []

    def stage(name, fn):
        mem.reset()
        t0 = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t0, mem.peak / 1e9, mem.now() / 1e9))
        print(f"{name:<24}{rows[-1][1]:>9.1f} s  peak {rows[-1][2]:>6.2f} GB  after "
              f"{rows[-1][3]:>6.2f} GB", flush=True)
        return out

    from freshrec.storage.delta import DeltaStore

    store = DeltaStore(settings)
    events = stage("load", lambda: evaluate.worker_events(store, interval, version)
                   if hasattr(evaluate, "worker_events")
                   else evaluate.load_events(store, interval, version)[0].to_pandas())
    from recmodels.experiment import Protocol

    import inspect

    compact = {"keep_split_events": False} \
        if "keep_split_events" in inspect.signature(Protocol).parameters else {}
    protocol = stage("split", lambda: Protocol(events, None, cfg.ks, cfg.test_fraction,
                                                cfg.validation_fraction, cfg.max_users, cfg.seed,
                                                **compact))
    print("sizes", protocol.describe(), flush=True)
    keep = None
    for name in [m for m in args.models.split(",") if m]:
        if name in SPARK_MODELS:
            from freshrec.storage.spark import get_spark

            get_spark(settings)
        fitted = stage(f"fit {name}", lambda n=name: protocol.fit(n, model_params(n, settings)))
        scores = stage(f"score {name}", lambda f=fitted: protocol.score(f))
        print(f"  {name}: validation {scores.validation[protocol.metric]:.6f} test "
              f"{scores.test[protocol.metric]:.6f}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            stage(f"export {name}", lambda f=fitted, t=tmp: f.model.export(Path(t) / "model"))
        if name == args.refit:
            keep = fitted
        del fitted, scores
        later = args.models.split(",")[args.models.split(",").index(name) + 1:]
        if name in SPARK_MODELS and not set(later) & SPARK_MODELS \
                and hasattr(evaluate, "release_spark"):  # what the worker does
            stage("release spark", evaluate.release_spark)
    if keep is not None:
        stage(f"refit {args.refit}", lambda: keep.model.refit(
            evaluate.interactions_of(events, None)))
    print(f"\n{'stage':<24}{'wall_s':>9}{'peak_GB':>9}{'after_GB':>9}")
    for name, secs, peak, after in rows:
        print(f"{name:<24}{secs:>9.1f}{peak:>9.2f}{after:>9.2f}")
    print(f"{'total':<24}{sum(r[1] for r in rows):>9.1f}{max(r[2] for r in rows):>9.2f}")


if __name__ == "__main__":
    main()
