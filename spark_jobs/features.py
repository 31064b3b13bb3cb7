"""Features: silver ``events`` + ``items`` -> gold ``user_features``, ``item_features``,
``item_neighbors``, as of the interval's end.

* user features: activity (events, distinct items), first/last event, recency in days before the
  interval end, and the top category affinities (share of the user's event weight per category);
* item features: events, distinct users, weighted popularity and popularity with exponential time
  decay (half-life from settings);
* item neighbours: co-occurrence of items in the same user's most recent distinct items (bounded, so
  the self-join stays small), cosine-normalized, top-K per item.

Only events of batches up to the interval count, so a re-run of the interval recomputes the same
tables; they are replaced only when they differ (with delta-spark, compared by a checksum computed on
the executors; see :meth:`freshrec.storage.delta.StagedWrite.commit_if_changed`).
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from freshrec.storage.delta import DeltaStore
from freshrec.interval import DataInterval, run_job
from freshrec.progress import advance
from freshrec.settings import FeatureSettings, Settings
from freshrec.storage.spark import get_spark

log = logging.getLogger(__name__)
_DIGITS = 9  # rounding of derived doubles: the same input gives bit-identical tables


def events_as_of(events: DataFrame, interval: DataInterval) -> DataFrame:
    return events.where((F.col("batch_date") <= interval.batch_date)
                        & (F.col("ts") < F.lit(interval.end).cast("timestamp")))


def item_features(events: DataFrame, interval: DataInterval, cfg: FeatureSettings) -> DataFrame:
    end = F.lit(interval.end).cast("timestamp")
    age_days = (F.unix_timestamp(end) - F.unix_timestamp("ts")) / 86400.0
    decay = F.pow(F.lit(0.5), age_days / cfg.popularity_half_life_days)
    return events.groupBy("item_id").agg(
        F.count("*").alias("n_events"),
        F.countDistinct("user_id").alias("n_users"),
        F.round(F.sum("weight"), _DIGITS).alias("popularity"),
        F.round(F.sum(F.col("weight") * decay), _DIGITS).alias("popularity_decayed"),
        F.max("ts").alias("last_ts"),
    ).withColumn("as_of", end)


def user_features(events: DataFrame, items: DataFrame, interval: DataInterval,
                  cfg: FeatureSettings) -> DataFrame:
    end = F.lit(interval.end).cast("timestamp")
    activity = events.groupBy("user_id").agg(
        F.count("*").alias("n_events"),
        F.countDistinct("item_id").alias("n_items"),
        F.min("ts").alias("first_ts"),
        F.max("ts").alias("last_ts"),
        F.sum("weight").alias("_total"),
    ).withColumn("recency_days", F.round(
        (F.unix_timestamp(end) - F.unix_timestamp("last_ts")) / 86400.0, _DIGITS))
    cats = items.select("item_id", F.explode("categories").alias("category"))
    per_cat = events.join(cats, "item_id").groupBy("user_id", "category") \
        .agg(F.sum("weight").alias("w"))
    best = Window.partitionBy("user_id").orderBy(F.desc("w"), "category")
    top = per_cat.withColumn("_r", F.row_number().over(best)).where(F.col("_r") <= cfg.top_categories)
    affinities = top.join(activity.select("user_id", "_total"), "user_id").groupBy("user_id").agg(
        F.sort_array(F.collect_list(F.struct(
            F.col("_r").alias("_r"), F.col("category"),
            F.round(F.col("w") / F.col("_total"), _DIGITS).alias("score")))).alias("_a"))
    affinities = affinities.select(
        "user_id", F.transform("_a", lambda s: F.struct(s["category"].alias("category"),
                                                         s["score"].alias("score")))
        .alias("category_affinities"))
    return activity.join(affinities, "user_id", "left").drop("_total").withColumn("as_of", end)


def item_neighbors(events: DataFrame, cfg: FeatureSettings) -> DataFrame:
    recent = events.groupBy("user_id", "item_id").agg(F.max("ts").alias("last_ts"))
    newest = Window.partitionBy("user_id").orderBy(F.desc("last_ts"), "item_id")
    hist = recent.withColumn("_r", F.row_number().over(newest)) \
        .where(F.col("_r") <= cfg.neighbors_max_history).select("user_id", "item_id").cache()
    item_users = hist.groupBy("item_id").agg(F.count("*").alias("n"))
    a, b = hist.alias("a"), hist.alias("b")
    pairs = a.join(b, (F.col("a.user_id") == F.col("b.user_id"))
                   & (F.col("a.item_id") < F.col("b.item_id"))) \
        .groupBy(F.col("a.item_id").alias("i"), F.col("b.item_id").alias("j")) \
        .agg(F.count("*").alias("c")).where(F.col("c") >= cfg.neighbors_min_cooccurrence)
    both = pairs.select("i", "j", "c").unionByName(
        pairs.select(F.col("j").alias("i"), F.col("i").alias("j"), "c"))
    ni = item_users.select(F.col("item_id").alias("i"), F.col("n").alias("ni"))
    nj = item_users.select(F.col("item_id").alias("j"), F.col("n").alias("nj"))
    scored = both.join(ni, "i").join(nj, "j").withColumn(
        "score", F.round(F.col("c") / F.sqrt(F.col("ni") * F.col("nj")), _DIGITS))
    best = Window.partitionBy("i").orderBy(F.desc("score"), F.desc("c"), "j")
    return scored.withColumn("rank", F.row_number().over(best)) \
        .where(F.col("rank") <= cfg.neighbors_top_k).select(
            F.col("i").alias("item_id"), F.col("j").alias("neighbor_id"), "score",
            F.col("c").alias("cooccurrences"), F.col("rank").cast("int"))


def run(settings: Settings, interval: DataInterval) -> dict[str, int]:
    store = DeltaStore(settings)
    spark = get_spark(settings)
    cfg = settings.features
    events = events_as_of(store.read_spark(spark, "events"), interval).cache()
    items = store.read_spark(spark, "items")
    out = {
        "item_features": item_features(events, interval, cfg),
        "user_features": user_features(events, items, interval, cfg),
        "item_neighbors": item_neighbors(events, cfg),
    }
    counts = {}
    for n, (name, df) in enumerate(out.items()):
        advance(log, "features", n, len(out), "features %s: computing %s", interval.batch_date, name)
        _, counts[name] = store.write_spark_if_changed(name, df)
    events.unpersist()
    advance(log, "features", len(out), len(out), "features %s: %s", interval.batch_date, counts)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
