"""The Spark session every Spark job uses, built once per process from settings.

Timestamps are UTC (``spark.sql.session.timeZone``); Python workers run this interpreter
(``PYSPARK_PYTHON``), so they find pyarrow; extra conf (e.g. the Delta jars on a cluster) comes from
``spark.extra_conf``.
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


def get_spark(settings: Settings) -> SparkSession:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    cfg = settings.spark
    builder = (SparkSession.builder.master(cfg.master).appName(cfg.app_name)
               .config("spark.driver.memory", cfg.driver_memory)
               .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
               .config("spark.default.parallelism", str(max(2, cfg.shuffle_partitions)))
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.ui.enabled", os.environ.get("FRESHREC_SPARK_UI", "false"))
               .config("spark.ui.showConsoleProgress", "true")
               .config("spark.local.dir", str(settings.data_dir / "spark-tmp"))
               .config("spark.driver.extraJavaOptions", "-Dderby.system.home="
                       + str(settings.data_dir / "spark-tmp")))
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
    log.info("Spark %s session on %s", spark.version, cfg.master)
    return spark
