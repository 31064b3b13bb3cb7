"""The Spark session every Spark job uses, built once per process from settings.

Timestamps are UTC (``spark.sql.session.timeZone``); Python workers run this interpreter
(``PYSPARK_PYTHON``), so they find pyarrow; extra conf comes from ``spark.extra_conf``.

The Delta jars (``.jars/``, see :mod:`freshrec.ops.jars`) are loaded only when the Spark jobs are to use
delta-spark (:func:`delta_spark_wanted`), so the embedded default's session pays nothing for them.
Under ``spark-submit`` the submitter decides the master, the jars and their conf: this module then
sets neither (see :mod:`freshrec.ops.submit`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from freshrec.settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def under_spark_submit() -> bool:
    """True in a driver that ``spark-submit`` started (its JVM is already up with its conf)."""
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT"))


def delta_spark_wanted(settings: Settings) -> bool:
    """Whether the Spark jobs should read and write Delta with delta-spark.

    ``delta.backend``: ``spark`` always; ``rs`` never; ``auto`` under spark-submit (the session then
    says whether the submitter loaded the jars) or, for a session built here, when the jars are in
    ``.jars/`` and the master is not ``local``: locally delta-rs is faster (see README), on a
    cluster only delta-spark keeps the tables off the driver.
    """
    from freshrec.ops.jars import delta_jars

    backend = settings.delta.backend
    if backend != "auto":
        return backend == "spark"
    if under_spark_submit():
        return True
    return bool(delta_jars()) and not settings.spark.master.startswith("local")


def get_spark(settings: Settings) -> SparkSession:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    cfg = settings.spark
    submitted = under_spark_submit()
    builder = SparkSession.builder
    if not submitted:  # spark-submit's --master, --name and --driver-memory stand
        builder = builder.master(cfg.master).appName(cfg.app_name) \
            .config("spark.driver.memory", cfg.driver_memory)
    builder = (builder
               .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
               .config("spark.default.parallelism", str(max(2, cfg.shuffle_partitions)))
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.ui.enabled", os.environ.get("FRESHREC_SPARK_UI", "false"))
               .config("spark.ui.showConsoleProgress", "true")
               .config("spark.local.dir", str(settings.data_dir / "spark-tmp"))
               # files Spark and delta-spark write: the owner's only, like the rest (umask 077)
               .config("spark.hadoop.fs.permissions.umask-mode", "077")
               .config("spark.driver.extraJavaOptions", "-Dderby.system.home="
                       + str(settings.data_dir / "spark-tmp")))
    if not submitted and delta_spark_wanted(settings):
        from freshrec.ops.jars import DELTA_CONF, require_delta_jars

        jars = ",".join(str(f) for f in require_delta_jars())
        builder = builder.config("spark.jars", jars)
        for k, v in {**DELTA_CONF, **delta_tuning(settings)}.items():
            builder = builder.config(k, v)
    if not submitted and settings.data_is_uri:  # s3:// tables: hadoop-aws (freshrec/storage/objects.py)
        from freshrec.ops.jars import require_delta_jars, require_s3_jars
        from freshrec.storage.objects import spark_conf

        jars = [*(require_delta_jars() if delta_spark_wanted(settings) else []), *require_s3_jars()]
        builder = builder.config("spark.jars", ",".join(str(f) for f in jars))
        for k, v in spark_conf(settings).items():
            builder = builder.config(k, v)
    for k, v in cfg.extra_conf.items():
        builder = builder.config(k, v)
    # Spark runs one task per core; a multi-threaded native BLAS inside each task (ALS) would
    # oversubscribe the cores. The JVM inherits the variable at launch; this process keeps its own.
    previous = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        spark = builder.getOrCreate()
    finally:
        if previous is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = previous
    spark.sparkContext.setLogLevel("WARN")
    log.info("Spark %s session on %s", spark.version, spark.sparkContext.master)
    return spark


def delta_tuning(settings: Settings) -> dict[str, str]:
    """delta-spark conf sized like the rest of the session: Delta's log replay uses 50 partitions
    by default, which costs seconds per table on a few cores."""
    n = str(settings.spark.shuffle_partitions)
    return {"spark.databricks.delta.snapshotPartitions": n}
