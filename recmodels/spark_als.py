"""Spark MLlib ALS as a library function: (user_id, item_id, strength) rows -> factors keyed by id.

Used by the ``als`` / ``als_explicit`` models and the benchmarks; imports pyspark, so import this
module only where Spark runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.ml.feature import StringIndexer
from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from freshrec.settings import AlsSettings


def interactions(events: DataFrame) -> DataFrame:
    """One row per (user, item) of an events frame: the sum of the event weights (``strength``,
    the implicit 'rating')."""
    return events.groupBy("user_id", "item_id").agg(F.sum("weight").alias("strength"))


@dataclass
class AlsFactors:
    user_ids: np.ndarray  # object array of user ids, row i of user_factors
    user_factors: np.ndarray  # float32 (n_users, rank)
    item_ids: np.ndarray
    item_factors: np.ndarray
    fit_seconds: float
    n_interactions: int


def fit_als(pairs: DataFrame, cfg: AlsSettings, implicit: bool = True) -> AlsFactors:
    """Fit ALS on (user_id, item_id, strength) rows; returns factors keyed by id. ``implicit``:
    strength is a confidence (implicit feedback); otherwise strength is an explicit rating and ALS
    fits it by least squares."""
    users = StringIndexer(inputCol="user_id", outputCol="u", stringOrderType="alphabetAsc")
    items = StringIndexer(inputCol="item_id", outputCol="i", stringOrderType="alphabetAsc")
    u_model, i_model = users.fit(pairs), items.fit(pairs)
    indexed = i_model.transform(u_model.transform(pairs)).select(
        F.col("u").cast("int"), F.col("i").cast("int"), "strength").cache()
    n = indexed.count()
    u, user_factors, i, item_factors, fit_seconds = fit_als_indexed(indexed, cfg, implicit)
    indexed.unpersist()
    return AlsFactors(
        user_ids=np.asarray(u_model.labelsArray[0], dtype=object)[u], user_factors=user_factors,
        item_ids=np.asarray(i_model.labelsArray[0], dtype=object)[i], item_factors=item_factors,
        fit_seconds=fit_seconds, n_interactions=n)


def fit_als_indexed(pairs: DataFrame, cfg: AlsSettings,
                    implicit: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Fit ALS on (u, i, strength) rows whose ``u`` and ``i`` are already int indices;
    returns the user indices, user factors, item indices, item factors and the fit time."""
    als = ALS(rank=cfg.rank, maxIter=cfg.iterations, regParam=cfg.reg_param, alpha=cfg.alpha,
              implicitPrefs=implicit, userCol="u", itemCol="i", ratingCol="strength",
              numUserBlocks=cfg.num_blocks, numItemBlocks=cfg.num_blocks, seed=cfg.seed,
              nonnegative=False, coldStartStrategy="drop")
    t0 = time.perf_counter()
    model = als.fit(pairs)
    uf = model.userFactors.toArrow()
    itf = model.itemFactors.toArrow()
    fit_seconds = time.perf_counter() - t0
    return (uf.column("id").to_numpy(), _stack(uf.column("features")),
            itf.column("id").to_numpy(), _stack(itf.column("features")), fit_seconds)


def _stack(col: pa.ChunkedArray) -> np.ndarray:
    flat = pc.list_flatten(col.combine_chunks()).to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(len(col), -1)
