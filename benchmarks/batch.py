"""Batch-lane benchmark: time every stage, and Spark ALS vs `implicit`, locally or on a cluster.

Runs in its own data dir (``data/bench`` unless FRESHREC_DATA_DIR is set): synth + import (the
test data, made in a child process whose memory is printed apart from the driver's), then
ingest, clean, features, als, evaluate, build_index for today's interval, each timed; then fits
Spark ALS and the `implicit` library's ALS (CPU, same rank, iterations, regularization and alpha)
on the same interactions in the same process and prints the ratio. The driver's peak memory (this
process and its Spark JVM, resident set sampled every 0.2 s) is printed per stage and overall;
``--delta-backend spark`` runs the stages with delta-spark (the jars from ``make jars``), so the
tables are read and written on the executors instead of passing through the driver. evaluate fits
its models in a worker process (``evaluation.fit_in_worker``): its peak is printed apart, and
counted in the process tree's. ``--master spark://127.0.0.1:7077`` makes this process the
driver of a standalone cluster's application (the executors' peak is printed apart).
``--stages evaluate`` runs the named stages again on the tables already in the data dir (no synth
or import), e.g. to compare ``FRESHREC__EVALUATION__FIT_IN_WORKER
=false`` with the default on the same data. Usage:

    .venv/bin/python benchmarks/batch.py [--events N] [--skip-stages] [--delta-backend spark]
        [--stages evaluate,gate] [--master spark://127.0.0.1:7077]
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


class PeakMemory:
    """Samples the resident set of this process and its children (the Spark JVM) every 0.2 s."""

    def __init__(self, every: float = 0.2) -> None:
        import threading

        import psutil

        self.proc, self.peak, self.py_peak, self.every = psutil.Process(), 0, 0, every
        self.worker_peak = 0  # evaluate's worker process and its children (its own Spark JVM)
        self.executor_peak = 0  # executors outside this tree (a standalone cluster's workers')
        self.data_peak = 0  # the child that makes the test data (--generate-only): not the lane
        self.stage_peak = 0  # this stage's: this process and its JVM, evaluate's worker left out
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _tree(self) -> tuple[int, int, int]:
        """Resident bytes now of this process and its children (evaluate's worker included), of
        evaluate's worker alone, and of the child making the test data (not in the first)."""
        import psutil

        total = worker = data = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
                if "--generate-only" in p.cmdline():
                    data += rss
                    continue
                total += rss
                if any("evaluate_worker" in " ".join(q.cmdline())
                       for q in [p, *p.parents()] if q.pid != self.proc.pid):
                    worker += rss
            except psutil.Error:
                pass
        return total, worker, data

    def driver_now(self) -> int:
        """This process and its children now, evaluate's worker and the test data's left out."""
        total, worker, _ = self._tree()
        return total - worker

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = worker = data = 0
            try:
                self.py_peak = max(self.py_peak, self.proc.memory_info().rss)
                total, worker, data = self._tree()
            except psutil.Error:
                pass
            executors = 0
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if "CoarseGrainedExecutorBackend" in " ".join(p.info["cmdline"] or ()):
                        executors += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stage_peak = max(self.stage_peak, total - worker)
            self.worker_peak = max(self.worker_peak, worker)
            self.executor_peak = max(self.executor_peak, executors)
            self.data_peak = max(self.data_peak, data)
            self._stop.wait(self.every)

    def gb(self) -> float:
        return self.peak / 1e9

    def py_gb(self) -> float:
        return self.py_peak / 1e9

    def worker_gb(self) -> float:
        return self.worker_peak / 1e9

    def executors_gb(self) -> float:
        return self.executor_peak / 1e9

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=0, help="override synth.n_events")
    ap.add_argument("--skip-stages", action="store_true", help="only the ALS comparison")
    ap.add_argument("--skip-als", action="store_true", help="only the stages")
    ap.add_argument("--stages", default="",
                    help="comma-separated stages to run again on the data dir's existing tables "
                         "(e.g. evaluate), without synth and import")
    ap.add_argument("--delta-backend", choices=["auto", "spark", "rs"], default=None,
                    help="override delta.backend (spark: delta-spark on the executors)")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)  # the child
    ap.add_argument("--master", default="",
                    help="run the Spark stages with this process as the driver of this master, "
                         "e.g. spark://127.0.0.1:7077 (`make cluster-up`); the executors' peak "
                         "memory is then printed apart from the driver's. Default: spark.master")
    args = ap.parse_args()
    if args.delta_backend:
        os.environ["FRESHREC__DELTA__BACKEND"] = args.delta_backend
    peak = PeakMemory()
    os.environ.setdefault("FRESHREC_DATA_DIR", str(ROOT / "data" / "bench"))
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    import numpy as np
    import scipy.sparse as sp

    from freshrec.data import importers
    from freshrec.storage.delta import DeltaStore
    from freshrec.interval import DataInterval
    from freshrec.settings import load_settings
    from freshrec.data.synth import write_synth
    from nearline import snapshots as index_snapshot
    from recmodels.spark_als import fit_als, interactions
    from spark_jobs import clean, evaluate, features, gate, ingest

    overrides: dict = {"synth": {"n_events": args.events}} if args.events else {}
    if args.master:
        # this process is the driver (client mode); spark-submit would start another one
        overrides["spark"] = {"master": args.master, "submit": False,
                              "extra_conf": {"spark.ui.showConsoleProgress": "false"}}
    settings = load_settings(**overrides)
    if not args.generate_only:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}; data: {settings.data_dir}; Spark master "
              f"{settings.spark.master}")
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    interval = DataInterval.for_day(today)
    timings: dict[str, float] = {}

    def timed(name, fn):
        if name in ("gate", "build_index"):
            # They use no Spark, and on the cluster path run where no Spark JVM is (their own
            # Airflow tasks, or the caller of spark-submit): the earlier stages' JVM is ended.
            from spark_jobs.evaluate import release_spark

            release_spark()
            time.sleep(3 * peak.every)  # the sampler sees it gone before the stage's peak starts
        peak.stage_peak = peak.driver_now()
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        peak.stage_peak = max(peak.stage_peak, peak.driver_now())  # a stage shorter than a sample
        print(f"  {name:<12}{timings[name]:>8.1f} s   driver {peak.stage_peak / 1e9:.2f} GB in this "
              f"stage (this process + its JVM, evaluate's worker left out); peaks so far: tree "
              f"{peak.gb():.2f} GB, python {peak.py_gb():.2f} GB, evaluate worker "
              f"{peak.worker_gb():.2f} GB, executors {peak.executors_gb():.2f} GB", flush=True)
        return out

    stages = {"ingest": lambda: ingest.run(settings, interval),
              "clean": lambda: clean.run(settings, interval),
              "features": lambda: features.run(settings, interval),
              "evaluate": lambda: evaluate.run(settings, interval),
              "gate": lambda: gate.run(settings, interval),
              "build_index": lambda: index_snapshot.run(settings, interval)}
    if args.stages:
        unknown = set(args.stages.split(",")) - set(stages)
        if unknown:
            sys.exit(f"--stages: unknown {sorted(unknown)}; pick from {list(stages)}")
        for name in args.stages.split(","):
            timed(name, stages[name])
    elif args.generate_only:  # the child of a full run: the test data, then exit
        t0 = time.perf_counter()
        synth = write_synth(settings.synth, settings.data_dir / "raw", end=today)
        t1 = time.perf_counter()
        importers.import_events_file(settings, synth.events_path)
        importers.import_items_file(settings, synth.items_path)
        print(f"  (test data: synth {t1 - t0:.1f} s, import {time.perf_counter() - t1:.1f} s)",
              flush=True)
        return
    elif not args.skip_stages:
        # The test data is made in a child process, left out of the driver's figures: at 10M
        # events the generator alone holds ~6.6 GB, and it is not part of the lane.
        import subprocess

        child = [sys.executable, __file__, "--generate-only"]
        child += ["--events", str(args.events)] if args.events else []
        timed("synth+import", lambda: subprocess.run(child, check=True))
        print(f"  (test data made in a child process, peak {peak.data_peak / 1e9:.2f} GB, not "
              "counted in the driver's figures)", flush=True)
        for name, stage in stages.items():
            timed(name, stage)
        print(f"  {'total':<12}{sum(timings.values()):>8.1f} s  (target: whole make run <= 300 s)")
    if timings:
        from freshrec.storage.delta import DeltaStore as _Store
        from freshrec.storage.spark import get_spark as _get

        where = ("on local[*] the executors run inside the driver's JVM"
                 if settings.spark.master.startswith("local") else
                 f"the executors run on {settings.spark.master}'s workers")
        print(f"  Delta engine of the Spark jobs: "
              f"{_Store(settings).spark_backend(_get(settings))}; driver peak memory "
              f"(python + JVM RSS) {peak.gb():.2f} GB, python alone {peak.py_gb():.2f} GB "
              f"({where}); evaluate's worker "
              f"process tree {peak.worker_gb():.2f} GB (included in the first figure); "
              f"executors outside the driver (a cluster's) {peak.executors_gb():.2f} GB",
              flush=True)
    if args.skip_als:
        peak.stop()
        return

    # Spark ALS vs implicit on the same interactions.
    from freshrec.storage.spark import get_spark

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
