"""ALS: silver ``events`` -> ``user_factors`` / ``item_factors`` + an MLflow run.

Spark ALS for implicit feedback: each (user, item) pair's confidence is 1 + alpha * (sum of its
event weights), weights from the event types in settings; rank, iterations, regularization and alpha
from settings. The model version names the interval, the silver table version and the parameters,
so a re-run of the interval finds its factors in place and commits nothing. The MLflow run records
the parameters, sizes, fit time, the Delta versions read and the factors (``factors/*.npz``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from freshrec.delta import DeltaStore
from freshrec.interval import DataInterval, parse_job_args
from freshrec.settings import AlsSettings, Settings
from freshrec.spark import get_spark
from freshrec.tracking import mlflow_for
from recmodels.spark_als import AlsFactors, fit_als  # noqa: F401 (re-exported)
from spark_jobs.features import events_as_of

log = logging.getLogger(__name__)


def interactions(events: DataFrame) -> DataFrame:
    """One row per (user, item): the sum of the event weights (the implicit 'rating')."""
    return events.groupBy("user_id", "item_id").agg(F.sum("weight").alias("strength"))


def model_version(interval: DataInterval, events_version: int | None, cfg: AlsSettings) -> str:
    params = hashlib.sha1(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:8]
    return f"als-{interval.batch_date}-ev{events_version}-{params}"


def factors_table(ids: np.ndarray, factors: np.ndarray, id_col: str, version: str) -> pa.Table:
    offsets = pa.array(np.arange(0, factors.size + 1, factors.shape[1], dtype=np.int32))
    vectors = pa.ListArray.from_arrays(offsets, pa.array(factors.ravel(), pa.float32()))
    return pa.table({id_col: pa.array(ids, pa.string()), "factors": vectors,
                     "model_version": pa.array([version] * len(ids), pa.string())})


def current_version(store: DeltaStore, table: str) -> str | None:
    t = store.read_arrow(table, columns=["model_version"])
    return t.column("model_version")[0].as_py() if t.num_rows else None


def run(settings: Settings, interval: DataInterval, force: bool = False) -> dict[str, object]:
    store = DeltaStore(settings)
    ev_version = store.version("events")
    version = model_version(interval, ev_version, settings.als)
    if not force and current_version(store, "item_factors") == version \
            and current_version(store, "user_factors") == version:
        log.info("als %s: factors of %s already in place; nothing to do", interval.batch_date,
                 version)
        return {"model_version": version, "skipped": True}
    spark = get_spark(settings)
    events = events_as_of(store.read_spark(spark, "events", version=ev_version), interval)
    pairs = interactions(events)
    if pairs.isEmpty():
        raise ValueError(f"als {interval.batch_date}: no events in silver 'events' up to this "
                         "interval; import events and run ingest and clean first")
    log.info("als %s: fitting rank %d, %d iterations", interval.batch_date, settings.als.rank,
             settings.als.iterations)
    f = fit_als(pairs, settings.als)
    mlflow = mlflow_for(settings)
    with mlflow.start_run(run_name=f"als-{interval.batch_date}") as mlrun:
        mlflow.set_tags({"model_version": version, "stage": "als", "interval": interval.batch_date})
        mlflow.log_params({**settings.als.model_dump(), "events_delta_version": ev_version,
                           "items_delta_version": store.version("items")})
        mlflow.log_metrics({"fit_seconds": f.fit_seconds, "n_users": len(f.user_ids),
                            "n_items": len(f.item_ids), "n_interactions": f.n_interactions})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "als_factors.npz"
            np.savez_compressed(path, user_ids=f.user_ids.astype(str), user_factors=f.user_factors,
                                item_ids=f.item_ids.astype(str), item_factors=f.item_factors)
            mlflow.log_artifact(str(path), artifact_path="factors")
    store.write_arrow("item_factors", factors_table(f.item_ids, f.item_factors, "item_id", version),
                      mode="overwrite")
    store.write_arrow("user_factors", factors_table(f.user_ids, f.user_factors, "user_id", version),
                      mode="overwrite")
    log.info("als %s: %s (%d users, %d items, fit %.1fs, MLflow run %s)", interval.batch_date,
             version, len(f.user_ids), len(f.item_ids), f.fit_seconds, mlrun.info.run_id)
    return {"model_version": version, "skipped": False, "fit_seconds": round(f.fit_seconds, 2),
            "mlflow_run_id": mlrun.info.run_id}


def main(argv: list[str] | None = None) -> dict[str, object]:
    args, settings, interval = parse_job_args(
        __doc__.splitlines()[0], argv,
        lambda p: p.add_argument("--force", action="store_true", help="refit even if in place"))
    return run(settings, interval, force=args.force)


if __name__ == "__main__":
    main()
