"""Ingest: landed event files -> bronze ``events_raw``.

Reads the landing zone (``<data>/landing/events/landed_date=D/<file_id>.parquet``, written by the
importers) for files that landed before the interval's end and are not in bronze yet, tags their rows
with the interval's ``batch_date`` and appends them. A file is in bronze once or not at all (one atomic
commit per run), so re-running an interval finds nothing new and commits nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from freshrec.delta import DeltaStore
from freshrec.interval import DataInterval, run_job
from freshrec.settings import Settings
from freshrec.spark import get_spark

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


def to_bronze(landed: DataFrame, interval: DataInterval) -> DataFrame:
    return (landed.withColumn("batch_date", F.lit(interval.batch_date))
            .withColumn("ingested_at", F.lit(interval.end).cast("timestamp")))


def run(settings: Settings, interval: DataInterval) -> dict[str, int]:
    store = DeltaStore(settings)
    raw_ids = store.read_arrow("events_raw", columns=["raw_id"]).column("raw_id")
    in_bronze = set(pc.unique(pc.utf8_slice_codeunits(raw_ids, 0, FILE_ID_LEN)).to_pylist())
    files = [f for f in landed_files(settings.landing_dir / "events", interval)
             if f.stem not in in_bronze]
    if not files:
        log.info("ingest %s: no new landed files", interval.batch_date)
        return {"files": 0, "rows": 0}
    spark = get_spark(settings)
    landed = spark.read.parquet(*[str(f) for f in files])
    bronze = to_bronze(landed, interval)
    store.write_spark("events_raw", bronze, mode="append")
    rows = store.count("events_raw") - len(raw_ids)
    log.info("ingest %s: %d file(s), %d rows into events_raw", interval.batch_date, len(files), rows)
    return {"files": len(files), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, int]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
