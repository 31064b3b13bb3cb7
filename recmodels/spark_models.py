"""Methods trained in Spark, for data too large for one process, under the same contract.

* ``als`` / ``als_explicit``: ALS on Spark for implicit feedback (confidence from the summed
  event weights; the ``cg`` solver on the executors by default, or MLlib's, see
  :mod:`recmodels.spark_als`) and MLlib ALS for explicit ratings (least squares on the mean
  ``value`` per pair, e.g. MovieLens stars; needs events with a value).
* ``spark_item_knn``: item-based CF whose cosine neighbours (with shrinkage) are computed by a Spark
  self-join over users' bounded histories; scoring is the item-kNN product on the driver.
* ``spark_user_knn``: user-based CF whose top-N neighbours per user are computed in Spark the same
  way over items' bounded audiences.

Each uses the shared Spark session of ``freshrec.storage.spark.get_spark`` (``local[*]`` on the embedded
default, the cluster master elsewhere).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recmodels.base import (FactorRecommender, Interactions, Recommender, popularity_prior,
                                  standardize_rows)
from recmodels.servable import csr_arrays


def _spark():
    from freshrec.settings import load_settings
    from freshrec.storage.spark import get_spark

    return get_spark(load_settings())


class SparkALSModel(FactorRecommender):
    name = "als"

    def __init__(self, rank: int = 64, iterations: int = 10, reg_param: float = 0.1,
                 alpha: float = 1.0, num_blocks: int = 2, seed: int = 42, implicit: bool = True,
                 solver: str = "cg", cg_steps: int = 3) -> None:
        super().__init__()
        from freshrec.settings import AlsSettings

        self.cfg = AlsSettings(rank=rank, iterations=iterations, reg_param=reg_param, alpha=alpha,
                               num_blocks=num_blocks, seed=seed, solver=solver, cg_steps=cg_steps)
        self.implicit = implicit

    def fit(self, data: Interactions) -> "SparkALSModel":
        import pyarrow as pa

        from recmodels.spark_als import fit_als_indexed

        ev = data.events
        if ev is None:
            raise ValueError(f"{self.name} needs the events (Interactions.events)")
        spark = _spark()
        rows, cols = ev["user_row"].to_numpy(), ev["item_row"].to_numpy()
        if self.implicit:
            strength = ev["weight"].to_numpy(np.float64)
        else:
            if "value" not in ev or ev["value"].isna().all():
                raise ValueError("als_explicit needs explicit ratings (events with a value, e.g. "
                                 "MovieLens stars); use als for implicit feedback")
            strength = ev["value"].to_numpy(np.float64)
            ok = ~np.isnan(strength)
            rows, cols, strength = rows[ok], cols[ok], strength[ok]
        # one row per (user, item): the summed weight (implicit) or the mean rating (explicit),
        # aggregated here on integer rows: no string ids cross into the JVM
        pair, inverse = np.unique(rows.astype(np.int64) * data.n_items + cols, return_inverse=True)
        total = np.bincount(inverse, weights=strength, minlength=len(pair))
        if not self.implicit:
            total = total / np.bincount(inverse, minlength=len(pair))
        del inverse
        user_rows, u = _string_order(data.user_ids, pair // data.n_items)
        item_rows, i = _string_order(data.item_ids, pair % data.n_items)
        del pair
        frame = spark.createDataFrame(pa.table({"u": pa.array(u, pa.int32()),
                                                "i": pa.array(i, pa.int32()),
                                                "strength": pa.array(total, pa.float64())}))
        del u, i, total
        uidx, user_factors, iidx, item_factors, self.fit_seconds = fit_als_indexed(
            frame, self.cfg, implicit=self.implicit)
        rank = user_factors.shape[1]
        self.users = np.zeros((data.n_users, rank), np.float32)
        self.users[user_rows[uidx]] = user_factors
        self.items = np.zeros((data.n_items, rank), np.float32)
        self.items[item_rows[iidx]] = item_factors
        self.data = data
        return self

    def params(self) -> dict:
        return {**self.cfg.model_dump(), "implicit": self.implicit}

    def reg_per_rating(self) -> bool:
        return not (self.implicit and self.cfg.solver == "cg")  # MLlib scales it; cg does not


def _string_order(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows present in ``rows`` in the order of their ids as strings (what Spark's
    ``StringIndexer(stringOrderType="alphabetAsc")`` gives, so ALS sees the indices it always saw),
    and each of ``rows`` as an index into them."""
    present, inverse = np.unique(rows, return_inverse=True)
    order = np.argsort(ids[present].astype(str), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return present[order], rank[inverse]


class SparkALSExplicitModel(SparkALSModel):
    """Explicit-feedback ALS. A predicted rating says how much a user would like an item if they
    met it, not whether they will: ranked alone it favours obscure items (Cremonesi et al. 2010).
    For top-N the ranking score is the per-user standardized predicted rating plus
    ``popularity_weight`` times the standardized log popularity (0: the raw prediction)."""

    name = "als_explicit"

    def __init__(self, rank: int = 32, iterations: int = 10, reg_param: float = 0.1,
                 popularity_weight: float = 2.0, **kw) -> None:
        super().__init__(rank=rank, iterations=iterations, reg_param=reg_param, implicit=False, **kw)
        self.popularity_weight = popularity_weight

    def fit(self, data: Interactions) -> "SparkALSExplicitModel":
        super().fit(data)
        self.prior = popularity_prior(data.matrix)
        return self

    def predict_ratings(self, user_rows: np.ndarray) -> np.ndarray:
        return super().score(user_rows)

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return standardize_rows(self.predict_ratings(user_rows)) + self.popularity_weight * self.prior

    def servable(self):
        kind, scorer, arrays = super().servable()
        return "history", {**scorer, "prior_weight": self.popularity_weight}, \
            {**arrays, "popularity_prior": self.prior}

    def params(self) -> dict:
        return {**super().params(), "popularity_weight": self.popularity_weight}


def _pairs_frame(data: Interactions, cap: int, by: str):
    """Distinct (user, item) rows, keeping each ``by`` group's ``cap`` newest, as a Spark frame."""
    ev = data.events[["user_row", "item_row", "ts"]].sort_values("ts")
    ev = ev.drop_duplicates(["user_row", "item_row"], keep="last")
    ev = ev.groupby(by, group_keys=False).tail(cap)
    return _spark().createDataFrame(ev[["user_row", "item_row"]].astype(np.int64)
                                    .rename(columns={"user_row": "u", "item_row": "i"}))


def _cosine_neighbours(pairs, key: str, via: str, n_neighbors: int, shrinkage: float):
    """Top ``n_neighbors`` cosine neighbours of each ``key`` over shared ``via`` values, shrunk by
    co / (co + shrinkage); computed in Spark, collected as (a, b, sim)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    sizes = pairs.groupBy(key).agg(F.count("*").alias("n"))
    a = pairs.select(F.col(via), F.col(key).alias("a"))
    b = pairs.select(F.col(via), F.col(key).alias("b"))
    co = a.join(b, via).where(F.col("a") != F.col("b")).groupBy("a", "b").agg(F.count("*").alias("co"))
    sim = co.join(sizes.withColumnRenamed(key, "a").withColumnRenamed("n", "na"), "a") \
        .join(sizes.withColumnRenamed(key, "b").withColumnRenamed("n", "nb"), "b") \
        .withColumn("sim", F.col("co") / F.sqrt(F.col("na") * F.col("nb"))
                    * F.col("co") / (F.col("co") + F.lit(shrinkage)))
    w = Window.partitionBy("a").orderBy(F.col("sim").desc(), F.col("b"))
    top = sim.withColumn("r", F.row_number().over(w)).where(F.col("r") <= n_neighbors)
    return top.select("a", "b", "sim").toPandas()


class SparkItemKNNModel(Recommender):
    name = "spark_item_knn"

    def __init__(self, n_neighbors: int = 100, shrinkage: float = 10.0, max_history: int = 200) -> None:
        super().__init__()
        self.n_neighbors, self.shrinkage, self.max_history = n_neighbors, shrinkage, max_history

    def fit(self, data: Interactions) -> "SparkItemKNNModel":
        if data.events is None:
            raise ValueError(f"{self.name} needs the events (Interactions.events)")
        pairs = _pairs_frame(data, self.max_history, "user_row")
        nb = _cosine_neighbours(pairs, "i", "u", self.n_neighbors, self.shrinkage)
        self.similarity = sp.csr_matrix((nb["sim"].to_numpy(np.float32),
                                         (nb["a"].to_numpy(), nb["b"].to_numpy())),
                                        shape=(data.n_items, data.n_items))
        self.binary = (data.matrix > 0).astype(np.float32).tocsr()
        self.data = data
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return (self.binary[np.asarray(user_rows)] @ self.similarity.T).toarray()

    def similar_items(self, item_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.similarity[item_row]
        order = np.argsort(-row.data)[:k]
        return row.indices[order], row.data[order]

    def servable(self):
        return "history", {"type": "item_item", "binary": True}, \
            csr_arrays(self.similarity.T.tocsr(), "matrix")

    def params(self) -> dict:
        return {"n_neighbors": self.n_neighbors, "shrinkage": self.shrinkage,
                "max_history": self.max_history}


class SparkUserKNNModel(Recommender):
    name = "spark_user_knn"

    def __init__(self, n_neighbors: int = 50, shrinkage: float = 10.0, max_audience: int = 100) -> None:
        super().__init__()
        self.n_neighbors, self.shrinkage, self.max_audience = n_neighbors, shrinkage, max_audience

    def fit(self, data: Interactions) -> "SparkUserKNNModel":
        if data.events is None:
            raise ValueError(f"{self.name} needs the events (Interactions.events)")
        pairs = _pairs_frame(data, self.max_audience, "item_row")
        nb = _cosine_neighbours(pairs, "u", "i", self.n_neighbors, self.shrinkage)
        self.neighbours = sp.csr_matrix((nb["sim"].to_numpy(np.float32),
                                         (nb["a"].to_numpy(), nb["b"].to_numpy())),
                                        shape=(data.n_users, data.n_users))
        self.binary = (data.matrix > 0).astype(np.float32).tocsr()
        self.data = data
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return (self.neighbours[np.asarray(user_rows)] @ self.binary).toarray()

    def servable(self):
        # known users keep Spark's neighbours; a user with new events is matched in numpy
        return "history", {"type": "user_user", "n_neighbors": self.n_neighbors,
                           "similarity": "cosine", "shrinkage": self.shrinkage}, \
            {"user_ids": self._fitted().user_ids.astype(str), **csr_arrays(self.binary, "binary"),
             **csr_arrays(self.neighbours, "neighbours")}

    def params(self) -> dict:
        return {"n_neighbors": self.n_neighbors, "shrinkage": self.shrinkage,
                "max_audience": self.max_audience}
