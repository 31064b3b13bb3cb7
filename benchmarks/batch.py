"""Batch-lane benchmark on the embedded default: time every stage, and Spark ALS vs `implicit`.

Runs in its own data dir (``data/bench`` unless FRESHREC_DATA_DIR is set): synth + import, then
ingest, clean, features, als, evaluate, build_index for today's interval, each timed; then fits
Spark ALS and the `implicit` library's ALS (CPU, same rank, iterations, regularization and alpha)
on the same interactions in the same process and prints the ratio. Usage:

    .venv/bin/python benchmarks/batch.py [--events N] [--skip-stages]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=0, help="override synth.n_events")
    ap.add_argument("--skip-stages", action="store_true", help="only the ALS comparison")
    args = ap.parse_args()
    os.environ.setdefault("FRESHREC_DATA_DIR", str(ROOT / "data" / "bench"))
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    import numpy as np
    import scipy.sparse as sp

    from freshrec import importers
    from freshrec.delta import DeltaStore
    from freshrec.interval import DataInterval
    from freshrec.settings import load_settings
    from freshrec.synth import write_synth
    from serving import index_snapshot
    from recmodels.spark_als import fit_als, interactions
    from spark_jobs import clean, evaluate, features, gate, ingest

    settings = load_settings(**({"synth": {"n_events": args.events}} if args.events else {}))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; data: {settings.data_dir}")
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    interval = DataInterval.for_day(today)
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        print(f"  {name:<12}{timings[name]:>8.1f} s", flush=True)
        return out

    if not args.skip_stages:
        raw = settings.data_dir / "raw"
        synth = timed("synth", lambda: write_synth(settings.synth, raw, end=today))
        timed("import", lambda: (importers.import_events_file(settings, synth.events_path),
                                 importers.import_items_file(settings, synth.items_path)))
        timed("ingest", lambda: ingest.run(settings, interval))
        timed("clean", lambda: clean.run(settings, interval))
        timed("features", lambda: features.run(settings, interval))
        timed("evaluate", lambda: evaluate.run(settings, interval))
        timed("gate", lambda: gate.run(settings, interval))
        timed("build_index", lambda: index_snapshot.run(settings, interval))
        print(f"  {'total':<12}{sum(timings.values()):>8.1f} s  (target: whole make run <= 300 s)")

    # Spark ALS vs implicit on the same interactions.
    from freshrec.spark import get_spark

    spark = get_spark(settings)
    store = DeltaStore(settings)
    pairs = interactions(store.read_spark(spark, "events")).cache()
    n_pairs = pairs.count()
    cfg = settings.als
    spark_f = fit_als(pairs, cfg)
    table = pairs.toArrow()
    users, u = np.unique(table.column("user_id").to_numpy(zero_copy_only=False), return_inverse=True)
    items, i = np.unique(table.column("item_id").to_numpy(zero_copy_only=False), return_inverse=True)
    strength = table.column("strength").to_numpy().astype(np.float32)
    matrix = sp.csr_matrix((strength, (u, i)), shape=(len(users), len(items)))

    from implicit.cpu.als import AlternatingLeastSquares

    results = {}
    for solver, use_cg in (("implicit-cg", True), ("implicit-cholesky", False)):
        model = AlternatingLeastSquares(factors=cfg.rank, regularization=cfg.reg_param,
                                        alpha=cfg.alpha, iterations=cfg.iterations, use_cg=use_cg,
                                        random_state=cfg.seed, calculate_training_loss=False)
        t0 = time.perf_counter()
        model.fit(matrix, show_progress=False)
        results[solver] = time.perf_counter() - t0
    print(f"\nALS rank {cfg.rank}, {cfg.iterations} iterations, {n_pairs:,} user-item pairs, "
          f"{len(users):,} users x {len(items):,} items:")
    print(f"  {'spark-als':<20}{spark_f.fit_seconds:>8.1f} s   1.00x")
    for name, secs in results.items():
        print(f"  {name:<20}{secs:>8.1f} s   spark/implicit = {spark_f.fit_seconds / secs:.1f}x")
    best = min(results.values())
    ratio = spark_f.fit_seconds / best
    print(f"target: Spark ALS within 4x of implicit's (fastest solver): {ratio:.1f}x -> "
          f"{'met' if ratio <= 4 else 'missed'}")


if __name__ == "__main__":
    main()
