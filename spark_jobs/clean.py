"""Clean: bronze ``events_raw`` (one batch) -> silver ``events`` + ``events_dead_letter``.

Checks every raw row of the interval's batch with the event rules (``freshrec/contracts/events.py``,
the same rules ``RecordEvents`` applies before acknowledging an event): missing or over-long ids,
unparseable or out-of-range timestamps (the reference instant is the interval's end), unknown
event types and bad or out-of-range values (per event type) go to the dead-letter table with their
reason. Valid rows are typed (UTC timestamps, numeric value, the rules' confidence weight), get an
``event_id`` (the given one, or a hash of the row), and are deduplicated by ``event_id`` within the
batch and against other batches. raw = clean + dead-letter + duplicates is checked before anything
is written, each term counted on its own (raw from bronze, clean and dead-letter from the rows to
write, duplicates from the validated event ids), so a stage that loses a row fails the run. Both
outputs replace the batch's own rows, and only when they differ, so a re-run of the interval
commits nothing. The rules run on the executors, on Arrow batches (``mapInArrow``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from freshrec.contracts.events import REASONS, EventRules, rules_for
from freshrec.storage.delta import DeltaStore, batch_filter
from freshrec.interval import DataInterval, run_job
from freshrec.progress import advance
from freshrec.settings import Settings
from freshrec.storage.spark import get_spark
from freshrec.storage.tables import EVENTS, EVENTS_DEAD_LETTER

log = logging.getLogger(__name__)

__all__ = ["REASONS", "CountMismatch", "validate", "dead_letter", "clean_events", "count_duplicates",
           "run", "main"]

# what the rules add to each raw row: (column, the rules' output column, Spark type)
_CHECKED = (("ts_parsed", "ts", T.TimestampType()), ("value_num", "value", T.DoubleType()),
            ("weight", "weight", T.DoubleType()), ("event_id_clean", "event_id", T.StringType()),
            ("user_id_clean", "user_id", T.StringType()),
            ("item_id_clean", "item_id", T.StringType()),
            ("event_type_clean", "event_type", T.StringType()), ("reason", "reason", T.StringType()))


class CountMismatch(RuntimeError):
    """raw != clean + dead-letter + duplicates: something would be lost; nothing was written."""


def _checker(rules: EventRules, reference):
    names = [name for name, _, _ in _CHECKED]

    def check(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out = rules.check_table(batch, reference)
            cols = [out.column(src).combine_chunks() for _, src, _ in _CHECKED]
            yield pa.RecordBatch.from_arrays(list(batch.columns) + cols,
                                             names=list(batch.schema.names) + names)

    return check


def validate(raw: DataFrame, settings: Settings, interval: DataInterval) -> DataFrame:
    """Add typed columns (``ts_parsed``, ``value_num``, ``weight``, ``event_id_final``, the
    trimmed ``*_clean`` ids) and ``reason`` (null for a valid row, else the first problem found, as
    :meth:`freshrec.contracts.events.EventRules.check_table` decides with the interval's end as
    the reference instant)."""
    schema = T.StructType(list(raw.schema.fields)
                          + [T.StructField(name, typ, True) for name, _, typ in _CHECKED])
    checked = raw.mapInArrow(_checker(rules_for(settings), interval.end), schema)
    row_hash = F.sha2(F.concat_ws("|", "user_id", "item_id", "event_type", "ts",
                                  F.coalesce("value", F.lit(""))), 256)
    event_id = F.when(F.col("event_id_clean").isNull(),
                      F.concat(F.lit("h_"), row_hash.substr(1, 32))) \
        .otherwise(F.col("event_id_clean"))
    return checked.withColumn("event_id_final", event_id)


def dead_letter(validated: DataFrame) -> DataFrame:
    return validated.where(F.col("reason").isNotNull()).select(*EVENTS_DEAD_LETTER.schema.names)


def clean_events(validated: DataFrame, other_event_ids: DataFrame) -> DataFrame:
    """Valid rows, typed, first row per event_id (by raw_id), minus ids other batches hold."""
    valid = validated.where(F.col("reason").isNull())
    first = Window.partitionBy("event_id_final").orderBy("raw_id")
    deduped = valid.withColumn("_n", F.row_number().over(first)).where(F.col("_n") == 1)
    fresh = deduped.join(other_event_ids.withColumnRenamed("event_id", "event_id_final"),
                         on="event_id_final", how="left_anti")
    return fresh.select(
        F.col("event_id_final").alias("event_id"), F.col("user_id_clean").alias("user_id"),
        F.col("item_id_clean").alias("item_id"), F.col("event_type_clean").alias("event_type"),
        F.col("value_num").alias("value"), "weight", F.col("ts_parsed").alias("ts"), "context",
        "raw_id", "batch_date")


def count_duplicates(validated: DataFrame, other_event_ids: DataFrame) -> int:
    """Valid rows that clean must drop, counted on their own from the validated frame: repeats of
    an event id within the batch (valid rows minus distinct ids) plus the distinct ids that other
    batches already hold."""
    valid = validated.where(F.col("reason").isNull())
    row = valid.agg(F.count(F.lit(1)).alias("n"),
                    F.countDistinct("event_id_final").alias("distinct")).collect()[0]
    ids = valid.select(F.col("event_id_final").alias("event_id")).distinct()
    held = ids.join(other_event_ids.distinct(), on="event_id", how="left_semi").count()
    return int(row["n"]) - int(row["distinct"]) + int(held)


def run(settings: Settings, interval: DataInterval) -> dict[str, int]:
    store = DeltaStore(settings)
    spark = get_spark(settings)
    batch = interval.batch_date
    raw = store.read_spark(spark, "events_raw").where(F.col("batch_date") == batch)
    # Each stream is counted on its own, so a stage that drops or doubles rows is caught:
    # raw from bronze, clean and dead-letter from what would be written, duplicates from the
    # validated rows' event ids.
    n_raw = raw.count()
    advance(log, "clean", 0, 2, "clean %s: validating %d raw rows", batch, n_raw)
    validated = validate(raw, settings, interval).cache()
    others = store.read_spark(spark, "events").where(F.col("batch_date") != batch).select("event_id")
    by_reason = {r["reason"]: r["count"] for r in validated.where(F.col("reason").isNotNull())
                 .groupBy("reason").count().collect()}
    # staged: collected to Arrow (delta-rs) or persisted on the executors (delta-spark)
    dead = store.stage_spark(EVENTS_DEAD_LETTER.name, dead_letter(validated))
    clean = store.stage_spark(EVENTS.name, clean_events(validated, others))
    n_dup = count_duplicates(validated, others)
    validated.unpersist()
    if n_raw != clean.rows + dead.rows + n_dup:
        raise CountMismatch(f"batch {batch}: raw {n_raw} != clean {clean.rows} + dead-letter "
                            f"{dead.rows} + duplicates {n_dup}; nothing written")
    predicate, where = batch_filter(batch)
    advance(log, "clean", 1, 2, "clean %s: writing %d clean and %d dead-letter rows", batch, clean.rows,
            dead.rows)
    clean.commit_if_changed(predicate, where)
    dead.commit_if_changed(predicate, where)
    counts = {"raw": n_raw, "clean": clean.rows, "dead_letter": dead.rows, "duplicates": n_dup}
    advance(log, "clean", 2, 2, "clean %s: %s; dead-letter by reason: %s", batch, counts,
            {r: by_reason[r] for r in REASONS if r in by_reason})
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
