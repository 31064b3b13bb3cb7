"""Spark ALS vs the `implicit` library's conjugate-gradient ALS on the same data, in one run.

Issue 14 item 6: Spark ALS within 4x of implicit's CG. The same (user, item, strength) pairs (the
synthetic generator's events summed per pair, or ``--pairs`` random Zipf pairs) and the same rank,
iterations, regularization, alpha are fitted by

- ``implicit-cg`` / ``implicit-cholesky``: `implicit.cpu.als` with as many threads as Spark has
  cores (the baseline),
- ``spark-shipped``: ``recmodels.spark_als.fit_als`` as the batch lane runs it (``als.solver``,
  ``cg`` by default: conjugate gradient on the executors, one barrier stage per fit);
  ``spark-cg blocks=N``: the same solver on the cached, repartitioned ratings with one block per
  core; ``spark-cg broadcast``: the same with one job per half-iteration and the factors broadcast
  (the path for sessions with dynamic allocation); ``spark-mllib``: ``fit_als`` with MLlib's
  solver,
- MLlib ALS variants, each changing one thing against MLlib as shipped (block count, storage
  level, cached and repartitioned ratings, checkpointing) and ``spark-tuned`` (all the helpful
  ones together),

timed from the start of ``ALS.fit`` until the factors are on the driver (what the lane needs;
``spark-shipped`` reports ``fit_als``'s own fit time, which leaves out its string indexing, as
implicit's time leaves out building the sparse matrix).
Prints each time and its ratio to implicit-cg, and which BLAS the Spark JVM loaded. Usage:

    python benchmarks/als_speed.py [--events 1000000] [--master local[2]] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synth_pairs(n_events: int, seed: int = 7):
    """(user_id, item_id, strength) of the synthetic generator's events, as Arrow."""
    import tempfile
    from datetime import datetime, timezone

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from freshrec.settings import load_settings
    from freshrec.data.synth import write_synth

    settings = load_settings(env={}, synth={"n_events": n_events, "seed": seed},
                             paths={"data_dir": tempfile.mkdtemp(prefix="als-speed-")})
    with tempfile.TemporaryDirectory() as tmp:
        out = write_synth(settings.synth, Path(tmp), end=datetime.now(timezone.utc))
        table = pq.read_table(out.events_path, columns=["user_id", "item_id", "event_type"])
    weights = settings.events.types
    w = pc.fill_null(pc.cast(_map(table.column("event_type"), weights), "float32"), 1.0)
    table = table.append_column("w", w).drop_null()
    return table.group_by(["user_id", "item_id"]).aggregate([("w", "sum")]).rename_columns(
        ["user_id", "item_id", "strength"])


def _map(col, weights: dict):
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pa.array(list(weights))
    idx = pc.index_in(col.cast(pa.string()), value_set=keys)
    return pc.take(pa.array(list(weights.values()), pa.float32()), idx)


def executor_cores(master: str, webui_port: int) -> int:
    """How many cores the fits get: N of local[N], every core for local / local[*], and for a
    standalone master the cores of its alive workers (Spark's defaultParallelism is no count of
    cores there: it was 8 on a cluster of two one-core workers)."""
    if master in ("local", "local[*]"):
        return os.cpu_count() or 2
    if master.startswith("local["):
        return int(master[6:-1].split(",")[0])
    from freshrec.ops.cluster import Cluster, master_state

    state = master_state(Cluster(webui_port=webui_port))
    cores = sum(int(w.get("cores", 0)) for w in state.get("workers", []) if w.get("state") == "ALIVE")
    if not cores:
        raise SystemExit(f"the master behind web UI port {webui_port} has no alive worker; start "
                         "them (`make cluster-up`) or pass --cores")
    return cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="synthetic events (summed to pairs)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--rank", type=int, default=0, help="default: als.rank of the settings")
    ap.add_argument("--iterations", type=int, default=0, help="default: als.iterations")
    ap.add_argument("--repeat", type=int, default=1, help="fits per variant (the best counts)")
    ap.add_argument("--variants", default="", help="comma list; default all")
    ap.add_argument("--cores", type=int, default=0,
                    help="cores the fits may use (implicit's threads, the tuned block count); "
                         "default: N of local[N], the machine's for local[*], and for a spark:// "
                         "master the cores of its alive workers (from the master's web UI)")
    ap.add_argument("--webui-port", type=int, default=8080,
                    help="the spark:// master's web UI port, to count its workers' cores")
    args = ap.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # implicit's advice; Spark's JVM gets 1 as well

    import numpy as np
    import scipy.sparse as sp
    from pyspark.ml.recommendation import ALS

    from freshrec.settings import load_settings
    from freshrec.storage.spark import get_spark
    from recmodels.spark_als import fit_als, fit_als_cg, fit_als_indexed

    base = load_settings(env={})
    cfg = base.als.model_copy(update={k: v for k, v in (("rank", args.rank),
                                                        ("iterations", args.iterations)) if v})
    t0 = time.perf_counter()
    table = synth_pairs(args.events)
    print(f"data: {args.events:,} synthetic events -> {table.num_rows:,} pairs "
          f"({time.perf_counter() - t0:.1f} s)")
    users, u = np.unique(table.column("user_id").to_numpy(zero_copy_only=False), return_inverse=True)
    items, i = np.unique(table.column("item_id").to_numpy(zero_copy_only=False), return_inverse=True)
    strength = table.column("strength").to_numpy().astype(np.float32)

    settings = load_settings(env={}, spark={"master": args.master, "driver_memory": "6g",
                                            "extra_conf": {"spark.ui.showConsoleProgress": "false"}},
                             paths={"data_dir": str(ROOT / "data" / "bench-als")})
    spark = get_spark(settings)
    master = spark.sparkContext.master
    cores = args.cores or executor_cores(master, args.webui_port)
    jvm = spark._jvm  # type: ignore[attr-defined]
    try:
        blas = jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName()
    except Exception as e:  # noqa: BLE001
        blas = f"unknown ({e})"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"Spark {spark.version} on {spark.sparkContext.master} ({cores} cores), BLAS {blas}")
    print(f"ALS rank {cfg.rank}, {cfg.iterations} iterations, reg {cfg.reg_param}, alpha "
          f"{cfg.alpha}: {table.num_rows:,} pairs, {len(users):,} users x {len(items):,} items\n")

    import pandas as pd

    pdf = pd.DataFrame({"u": u.astype(np.int32), "i": i.astype(np.int32), "strength": strength})
    indexed = spark.createDataFrame(pdf).cache()
    indexed.count()
    pairs = spark.createDataFrame(table.to_pandas()).cache()
    pairs.count()

    def als(**kw):
        p = dict(rank=cfg.rank, maxIter=cfg.iterations, regParam=cfg.reg_param, alpha=cfg.alpha,
                 implicitPrefs=True, userCol="u", itemCol="i", ratingCol="strength",
                 numUserBlocks=cfg.num_blocks, numItemBlocks=cfg.num_blocks, seed=cfg.seed,
                 nonnegative=False)
        p.update(kw)
        return ALS(**p)

    def spark_fit(estimator, data):
        def run():
            model = estimator.fit(data)
            model.userFactors.toArrow(), model.itemFactors.toArrow()
        return run

    ckpt = ROOT / "data" / "bench-als" / "checkpoints"
    spark.sparkContext.setCheckpointDir(str(ckpt))
    repart = indexed.repartition(cores).cache()
    repart.count()
    mllib = cfg.model_copy(update={"solver": "mllib"})
    variants = {
        f"spark-shipped (solver {cfg.solver})": lambda: fit_als(pairs, cfg).fit_seconds,
        f"spark-cg blocks={cores}": lambda: fit_als_indexed(
            repart, cfg.model_copy(update={"solver": "cg", "num_blocks": cores}))[-1],
        f"spark-cg broadcast blocks={cores}": lambda: fit_als_cg(
            repart, cfg.model_copy(update={"num_blocks": cores}), exchange="broadcast")[-1],
        "spark-mllib (fit_als solver=mllib)": lambda: fit_als(pairs, mllib).fit_seconds,
        f"blocks={cores}": spark_fit(als(numUserBlocks=cores, numItemBlocks=cores), indexed),
        "blocks=1": spark_fit(als(numUserBlocks=1, numItemBlocks=1), indexed),
        "blocks=10 (Spark default)": spark_fit(als(numUserBlocks=10, numItemBlocks=10), indexed),
        "storage MEMORY_ONLY": spark_fit(als(intermediateStorageLevel="MEMORY_ONLY",
                                             finalStorageLevel="MEMORY_ONLY"), indexed),
        "checkpoint every 2": spark_fit(als(checkpointInterval=2), indexed),
        f"ratings repartitioned({cores})+cached": spark_fit(als(), repart),
        "spark-tuned": spark_fit(als(numUserBlocks=cores, numItemBlocks=cores,
                                     intermediateStorageLevel="MEMORY_ONLY",
                                     finalStorageLevel="MEMORY_ONLY", checkpointInterval=-1),
                                 repart),
    }
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    keep = set(spark.sparkContext._jsc.getPersistentRDDs().keys())  # the cached inputs

    def release():
        """Drop what a fit left cached (ALS persists its factors) so the next variant starts from
        the same memory; the inputs stay cached."""
        for rid, rdd in dict(spark.sparkContext._jsc.getPersistentRDDs()).items():
            if rid not in keep:
                rdd.unpersist(True)
        jvm.System.gc()
    matrix = sp.csr_matrix((strength, (u, i)), shape=(len(users), len(items)))
    from implicit.cpu.als import AlternatingLeastSquares

    # One short fit of each kind first, untimed, so the first timed variant (spark-shipped) does not
    # also pay for the JVM's JIT warm-up and class loading that every later variant is spared.
    ALS(rank=cfg.rank, maxIter=1, regParam=cfg.reg_param, alpha=cfg.alpha, implicitPrefs=True,
        userCol="u", itemCol="i", ratingCol="strength", numUserBlocks=cores,
        numItemBlocks=cores).fit(indexed).userFactors.count()
    fit_als(pairs, cfg.model_copy(update={"iterations": 1}))
    fit_als(pairs, mllib.model_copy(update={"iterations": 1}))
    release()
    times: dict[str, float] = {}

    def timed(name, fn):
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            inner = fn()  # a variant may return its own fit time (fit_als: without the indexing)
            best = min(best, inner if isinstance(inner, float) else time.perf_counter() - t)
            release()
        times[name] = best
        print(f"  {name:<36}{best:>8.2f} s", flush=True)

    def fit_implicit_cg():
        fit_implicit(True)

    for solver, use_cg in (("implicit-cg", True), ("implicit-cholesky", False)):
        def fit_implicit(use_cg=use_cg):
            AlternatingLeastSquares(factors=cfg.rank, regularization=cfg.reg_param,
                                    alpha=cfg.alpha, iterations=cfg.iterations, use_cg=use_cg,
                                    random_state=cfg.seed, calculate_training_loss=False,
                                    num_threads=cores).fit(matrix, show_progress=False)
        timed(solver, fit_implicit)
    for name, fn in variants.items():
        if not wanted or name in wanted:
            timed(name, fn)
    first = times["implicit-cg"]
    timed("implicit-cg (again, last)", fit_implicit_cg)  # brackets the machine's drift
    cg = min(first, times["implicit-cg (again, last)"])
    print(f"\nratio to implicit-cg (the faster of its two runs, {cg:.2f} s, {cores} threads), "
          "target <= 4x:")
    for name, secs in times.items():
        print(f"  {name:<36}{secs / cg:>7.1f}x")
    spark_best = min((s, n) for n, s in times.items() if not n.startswith("implicit"))
    print(f"best Spark: {spark_best[1]} {spark_best[0]:.2f} s = {spark_best[0] / cg:.1f}x implicit-cg "
          f"-> {'met' if spark_best[0] / cg <= 4 else 'missed'}")


if __name__ == "__main__":
    main()
