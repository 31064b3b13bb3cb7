"""ALS on Spark as a library function: (user_id, item_id, strength) rows -> factors keyed by id.

Two solvers for implicit feedback (``als.solver``):

* ``cg`` (default): blocked ALS on the executors with a conjugate-gradient solve per row, the
  algorithm of the `implicit` library (Takács et al. 2011), whose compiled kernel each task calls.
  The ratings are grouped once into ``num_blocks`` user blocks and ``num_blocks`` item blocks (CSR
  of confidences, cached on the executors); each half-iteration broadcasts the fixed side's
  factors, every task solves its block's rows (``cg_steps`` CG steps from their previous values)
  and the driver gathers only the new factors (rows x rank). Objective: confidence
  ``c = 1 + alpha * r`` with preference ``r > 0``, regularization ``reg_param * |x|^2`` per row.
* ``mllib``: Spark MLlib's ALS (a Cholesky solve per row; regularization scaled by each row's
  number of ratings). Explicit ratings (``als_explicit``) always use it.

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
    if implicit and cfg.solver == "cg":
        return fit_als_cg(pairs, cfg)
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


def fit_als_cg(pairs: DataFrame, cfg: AlsSettings
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Implicit ALS with a conjugate-gradient solver on the executors (see the module doc) on
    (u, i, strength) rows of int indices; returns what :func:`fit_als_indexed` returns: only the
    users and items that have ratings, in index order."""
    t0 = time.perf_counter()
    sc = pairs.sparkSession.sparkContext
    from concurrent.futures import ThreadPoolExecutor

    cached = pairs.storageLevel.useMemory or pairs.storageLevel.useDisk
    source = pairs if cached else pairs.select("u", "i", "strength").persist()  # read once, not
    try:  # once per layout (a frame made on the driver ships its rows with every job's tasks)
        if not cached:
            source.count()  # filled before the two layouts read it at once
        with ThreadPoolExecutor(2) as pool:  # both layouts at once: one alone leaves cores idle
            jobs = [pool.submit(_blocks, source, by, other, cfg.num_blocks, cfg.alpha)
                    for by, other in (("u", "i"), ("i", "u"))]
            (by_user, u_top), (by_item, i_top) = (j.result() for j in jobs)
    finally:
        if not cached:
            source.unpersist()
    if u_top < 0:
        by_user.unpersist()
        by_item.unpersist()
        raise ValueError("ALS has no ratings to fit: the (u, i, strength) frame is empty")
    n_users, n_items = u_top + 1, i_top + 1
    rng = np.random.default_rng(cfg.seed)  # what implicit draws for the same seed
    users = rng.random((n_users, cfg.rank), dtype=np.float32) * np.float32(0.01)
    items = rng.random((n_items, cfg.rank), dtype=np.float32) * np.float32(0.01)
    try:
        for _ in range(cfg.iterations):
            u_ids = _half_step(sc, by_user, users, items, cfg)
            i_ids = _half_step(sc, by_item, items, users, cfg)
    finally:
        by_user.unpersist()
        by_item.unpersist()
    fit_seconds = time.perf_counter() - t0
    return u_ids, users[u_ids], i_ids, items[i_ids], fit_seconds


def _blocks(pairs: DataFrame, by: str, other: str, n_blocks: int, alpha: float):
    """The ratings as ``n_blocks`` cached blocks keyed by ``by``: (row ids, CSR of confidences
    over ``other``), one per partition, built on the executors; and the largest ``by`` index
    (-1 when there are no ratings)."""
    from pyspark import StorageLevel

    def build(batches):
        import pyarrow as pa
        import scipy.sparse as sp

        table = pa.Table.from_batches(list(batches))
        if table.num_rows == 0:
            return
        keys = table.column(by).to_numpy().astype(np.int64)
        cols = table.column(other).to_numpy().astype(np.int64)
        strength = table.column("strength").to_numpy().astype(np.float64)
        ids, rows = np.unique(keys, return_inverse=True)
        m = sp.csr_matrix((strength, (rows, cols)), shape=(len(ids), int(cols.max()) + 1))
        m.sum_duplicates()  # one strength per pair, then its confidence; r <= 0: preference 0,
        r = m.data  # which implicit's kernel reads from a negative confidence
        m.data = np.where(r > 0, 1.0 + alpha * r, -(1.0 + alpha * np.abs(r)))
        yield pa.RecordBatch.from_pydict({
            "ids": [ids.astype(np.int32).tobytes()], "indptr": [m.indptr.astype(np.int32).tobytes()],
            "indices": [m.indices.astype(np.int32).tobytes()],
            "data": [m.data.astype(np.float32).tobytes()], "width": [m.shape[1]]})

    def decode(row):
        import scipy.sparse as sp

        ids = np.frombuffer(row["ids"], np.int32)
        m = sp.csr_matrix((np.frombuffer(row["data"], np.float32),
                           np.frombuffer(row["indices"], np.int32),
                           np.frombuffer(row["indptr"], np.int32)), shape=(len(ids), row["width"]))
        return ids, m

    blocks = (pairs.select(by, other, "strength").repartition(n_blocks, by)
              .mapInArrow(build, "ids binary, indptr binary, indices binary, data binary, width long")
              .rdd.map(decode).persist(StorageLevel.MEMORY_ONLY))
    top = blocks.map(lambda b: int(b[0][-1])).fold(-1, max)  # ids are sorted; also fills the cache
    return blocks, top

def _half_step(sc, blocks, own: np.ndarray, other: np.ndarray, cfg: AlsSettings) -> np.ndarray:
    """One side's rows solved on the executors against the other side's fixed factors; ``own``
    is updated in place. Returns the ids of the rows that have ratings, sorted."""
    factors = sc.broadcast((own, other))  # one broadcast: a file and a fetch fewer than two
    reg, steps = float(cfg.reg_param), int(cfg.cg_steps)

    def solve(part):
        from implicit.cpu._als import least_squares_cg
        from threadpoolctl import threadpool_limits

        mine, theirs = factors.value
        fixed = np.require(theirs, requirements="W")  # the kernel takes writable buffers
        with threadpool_limits(1, "blas"):  # one core a task: no BLAS threads beside it
            for ids, m in part:
                x = np.ascontiguousarray(mine[ids])
                for a in ("data", "indices", "indptr"):
                    setattr(m, a, np.require(getattr(m, a), requirements="W"))
                least_squares_cg(m, x, fixed, reg, num_threads=1, cg_steps=steps)
                yield ids, x

    try:
        done = blocks.mapPartitions(solve).collect()
    finally:
        factors.destroy()
    for ids, x in done:
        own[ids] = x
    return np.sort(np.concatenate([ids for ids, _ in done])) if done else np.zeros(0, np.int32)
