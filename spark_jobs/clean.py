"""Clean: bronze ``events_raw`` (one batch) -> silver ``events`` + ``events_dead_letter``.

Validates every raw row of the interval's batch: missing or over-long ids, unparseable or
out-of-range timestamps, unknown event types and bad or out-of-range values go to the dead-letter
table with their reason. Valid rows are typed (UTC timestamps, numeric value, confidence weight from
the event type), get an ``event_id`` (the given one, or a hash of the row), and are deduplicated by
``event_id`` within the batch and against other batches. raw = clean + dead-letter + duplicates is
checked before anything is written. Both outputs replace the batch's own rows, and only when they
differ, so a re-run of the interval commits nothing.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from freshrec.delta import DeltaStore, batch_filter
from freshrec.interval import DataInterval, run_job
from freshrec.settings import Settings
from freshrec.spark import get_spark
from freshrec.tables import EVENTS, EVENTS_DEAD_LETTER

log = logging.getLogger(__name__)

REASONS = ("missing_user_id", "missing_item_id", "id_too_long", "unparseable_ts", "ts_too_old",
           "ts_in_future", "unknown_event_type", "bad_value", "value_out_of_range")


class CountMismatch(RuntimeError):
    """raw != clean + dead-letter + duplicates: something would be lost; nothing was written."""


def _blank(c: Column) -> Column:
    return c.isNull() | (F.trim(c) == "")


def parse_ts(text: Column) -> Column:
    """ISO-8601 text (naive means UTC) or epoch seconds / milliseconds -> timestamp, else null."""
    t = F.trim(text)
    num = t.try_cast("double")
    epoch = F.timestamp_seconds(F.when(num > 1e11, num / 1000).otherwise(num))
    return F.when(t.rlike(r"^\d{9,13}(\.\d+)?$"), epoch).otherwise(F.try_to_timestamp(t))


def validate(raw: DataFrame, settings: Settings, interval: DataInterval) -> DataFrame:
    """Add typed columns (``ts_parsed``, ``value_num``, ``weight``, ``event_id_final``) and
    ``reason`` (null for a valid row, else the first problem found)."""
    ev = settings.events
    max_len = ev.max_id_length
    ts_parsed = parse_ts(F.col("ts"))
    value_blank = _blank(F.col("value"))
    value_num = F.when(value_blank, F.lit(None).cast("double")) \
        .otherwise(F.trim(F.col("value")).try_cast("double"))
    latest = interval.end + timedelta(days=1)
    reason = (
        F.when(_blank(F.col("user_id")), "missing_user_id")
        .when(_blank(F.col("item_id")), "missing_item_id")
        .when((F.length("user_id") > max_len) | (F.length("item_id") > max_len)
              | (F.length(F.coalesce("event_id", F.lit(""))) > max_len), "id_too_long")
        .when(ts_parsed.isNull(), "unparseable_ts")
        .when(ts_parsed < F.lit(ev.earliest_ts).cast("timestamp"), "ts_too_old")
        .when(ts_parsed >= F.lit(latest).cast("timestamp"), "ts_in_future")
        .when(~F.trim("event_type").isin(list(ev.types)), "unknown_event_type")
        .when(~value_blank & value_num.isNull(), "bad_value")
        .when(value_num.isNotNull() & ((value_num < ev.value_min) | (value_num > ev.value_max)
                                      | F.isnan(value_num)), "value_out_of_range")
    )
    type_weight = F.lit(None).cast("double")
    for name, w in ev.types.items():
        type_weight = F.when(F.trim("event_type") == name, F.lit(w)).otherwise(type_weight)
    weight = F.when((F.trim("event_type") == "rating") & value_num.isNotNull(),
                    type_weight * value_num).otherwise(type_weight)
    row_hash = F.sha2(F.concat_ws("|", "user_id", "item_id", "event_type", "ts",
                                  F.coalesce("value", F.lit(""))), 256)
    event_id = F.when(_blank(F.col("event_id")), F.concat(F.lit("h_"), row_hash.substr(1, 32))) \
        .otherwise(F.trim("event_id"))
    return raw.select("*", ts_parsed.alias("ts_parsed"), value_num.alias("value_num"),
                      weight.alias("weight"), event_id.alias("event_id_final"),
                      reason.alias("reason"))


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
        F.col("event_id_final").alias("event_id"), F.trim("user_id").alias("user_id"),
        F.trim("item_id").alias("item_id"), F.trim("event_type").alias("event_type"),
        F.col("value_num").alias("value"), "weight", F.col("ts_parsed").alias("ts"), "context",
        "raw_id", "batch_date")


def run(settings: Settings, interval: DataInterval) -> dict[str, int]:
    store = DeltaStore(settings)
    spark = get_spark(settings)
    batch = interval.batch_date
    raw = store.read_spark(spark, "events_raw").where(F.col("batch_date") == batch)
    validated = validate(raw, settings, interval).cache()
    others = store.read_spark(spark, "events").where(F.col("batch_date") != batch).select("event_id")
    dead = dead_letter(validated).toArrow()
    clean = clean_events(validated, others).toArrow()
    n_raw = validated.count()
    n_valid = n_raw - dead.num_rows
    n_dup = n_valid - clean.num_rows
    validated.unpersist()
    if n_raw != clean.num_rows + dead.num_rows + n_dup or n_dup < 0:
        raise CountMismatch(f"batch {batch}: raw {n_raw} != clean {clean.num_rows} + dead-letter "
                            f"{dead.num_rows} + duplicates {n_dup}; nothing written")
    predicate, where = batch_filter(batch)
    store.write_if_changed(EVENTS.name, clean, predicate, where)
    store.write_if_changed(EVENTS_DEAD_LETTER.name, dead, predicate, where)
    counts = {"raw": n_raw, "clean": clean.num_rows, "dead_letter": dead.num_rows,
              "duplicates": n_dup}
    log.info("clean %s: %s", batch, counts)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
