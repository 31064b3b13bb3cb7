"""Ingest: landed event files -> bronze ``events_raw``.

Reads the landing zone (``<data>/landing/events/landed_date=D/<file_id>.parquet``, written by the
importers) for files that landed before the interval's end and are not in bronze yet, tags their rows
with the interval's ``batch_date`` and appends them. A file is in bronze once or not at all (one atomic
commit per run), so re-running an interval finds nothing new and commits nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from freshrec.storage.crypto import DataCipher, cipher_for, is_sealed, read_parquet
from freshrec.storage.delta import DeltaStore
from freshrec.interval import DataInterval, run_job
from freshrec.progress import advance
from freshrec.settings import Settings
from freshrec.storage.spark import delta_spark_wanted, get_spark

log = logging.getLogger(__name__)
FILE_ID_LEN = 24


def landed_files(landing_dir: Path, interval: DataInterval) -> list[Path]:
    """Landed files whose landing day is before the interval end, oldest first."""
    end_day = interval.end.strftime("%Y-%m-%d")
    files = []
    for day_dir in sorted(landing_dir.glob("landed_date=*")):
        if day_dir.name.split("=", 1)[1] < end_day:
            files.extend(sorted(day_dir.glob("*.parquet")))
    return files


def read_landed(spark: SparkSession, files: list[Path], cipher: DataCipher | None) -> DataFrame:
    """The landed files as one DataFrame. Plaintext files are read by Spark; when any is sealed
    (``privacy.encrypt_at_rest``, :mod:`freshrec.storage.crypto`) all are opened on the driver with the
    data key and handed to Spark as Arrow, so the plaintext never touches disk."""
    if not any(is_sealed(f) for f in files):
        return spark.read.parquet(*[str(f) for f in files])
    tables = [read_parquet(f, cipher) for f in files]
    return spark.createDataFrame(pa.concat_tables(tables, promote_options="default"))


def to_bronze(landed: DataFrame, interval: DataInterval) -> DataFrame:
    return (landed.withColumn("batch_date", F.lit(interval.batch_date))
            .withColumn("ingested_at", F.lit(interval.end).cast("timestamp")))


def files_in_bronze(store: DeltaStore, spark: SparkSession | None) -> set[str]:
    """Ids of the landed files already in bronze: with delta-spark a distinct on the executors,
    else from the ``raw_id`` column read with delta-rs."""
    if spark is not None and store.spark_backend(spark) == "spark":
        ids = store.read_spark(spark, "events_raw") \
            .select(F.substring("raw_id", 1, FILE_ID_LEN).alias("f")).distinct().collect()
        return {r["f"] for r in ids}
    raw_ids = store.read_arrow("events_raw", columns=["raw_id"]).column("raw_id")
    return set(pc.unique(pc.utf8_slice_codeunits(raw_ids, 0, FILE_ID_LEN)).to_pylist())


def run(settings: Settings, interval: DataInterval) -> dict[str, int]:
    store = DeltaStore(settings)
    landed = landed_files(settings.landing_dir / "events", interval)
    # the delta-rs path needs no Spark session unless there is something new to ingest
    spark = get_spark(settings) if landed and delta_spark_wanted(settings) else None
    in_bronze = files_in_bronze(store, spark)
    files = [f for f in landed if f.stem not in in_bronze]
    if not files:
        log.info("ingest %s: no new landed files", interval.batch_date)
        return {"files": 0, "rows": 0}
    advance(log, "ingest", 0, 1, "ingest %s: reading %d landed file(s)", interval.batch_date, len(files))
    before = store.count("events_raw")
    spark = spark or get_spark(settings)
    bronze = to_bronze(read_landed(spark, files, cipher_for(settings)), interval)
    store.write_spark("events_raw", bronze, mode="append")
    rows = store.count("events_raw") - before
    advance(log, "ingest", 1, 1, "ingest %s: %d file(s), %d rows into events_raw", interval.batch_date,
            len(files), rows)
    return {"files": len(files), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, int]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
