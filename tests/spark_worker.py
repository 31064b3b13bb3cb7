"""Runs batch jobs or Delta reads in an interpreter (and JVM) of its own, for the tests that need a
Spark session other than the suite's shared one (delta-spark with the jars, a spark-submit driver).

    python tests/spark_worker.py '<json>'

The JSON names ``tree`` (settings overrides for the ``local`` profile), ``day``, and any of
``jobs`` (run in order), ``rerun`` (jobs run again, table versions recorded before and after) and
``read`` (tables read with the session's Delta engine: rows, fingerprint, and the Change Data Feed
per change type for tables that have one). The last stdout line is ``RESULT <json>``.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

JOBS = {"ingest": "spark_jobs.ingest", "clean": "spark_jobs.clean",
        "features": "spark_jobs.features"}


def main(arg: str) -> dict:
    from pyspark.sql import functions as F

    from freshrec.storage.delta import DeltaStore, fingerprint
    from freshrec.interval import DataInterval
    from freshrec.settings import load_settings
    from freshrec.storage.spark import get_spark

    spec = json.loads(arg)
    settings = load_settings(spec.get("profile", "local"), env={}, **spec["tree"])
    interval = DataInterval.for_day(spec["day"])
    store = DeltaStore(settings)
    out: dict = {"results": {}}
    for job in spec.get("jobs", []):
        out["results"][job] = importlib.import_module(JOBS[job]).run(settings, interval)
    if spec.get("rerun"):
        out["versions_before_rerun"] = store.versions()
        out["rerun"] = {job: importlib.import_module(JOBS[job]).run(settings, interval)
                        for job in spec["rerun"]}
        out["versions_after_rerun"] = store.versions()
    spark = get_spark(settings)
    out["engine"] = store.spark_backend(spark)
    out["master"] = spark.sparkContext.master
    out["read"] = {}
    for name in spec.get("read", []):
        df = store.read_spark(spark, name)
        entry: dict = {"fingerprint": list(fingerprint(df))}
        if store.spec(name).change_data_feed and out["engine"] == "spark":
            cdf = (spark.read.format("delta").option("readChangeFeed", "true")
                   .option("startingVersion", 0).load(store.path(name)))
            entry["cdf"] = {r["_change_type"]: r["count"]
                            for r in cdf.groupBy("_change_type").count().collect()}
            entry["cdf_deleted_users"] = sorted(
                r["user_id"] for r in cdf.where(F.col("_change_type") == "delete")
                .select("user_id").distinct().limit(20).collect()) \
                if "user_id" in df.columns else []
        out["read"][name] = entry
    return out


if __name__ == "__main__":
    result = main(sys.argv[1])
    print("RESULT " + json.dumps(result), flush=True)
