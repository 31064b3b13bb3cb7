"""ALS on Spark as a library function: (user_id, item_id, strength) rows -> factors keyed by id.

Two solvers for implicit feedback (``als.solver``):

* ``cg`` (default): blocked ALS on the executors with a conjugate-gradient solve per row, the
  algorithm of the `implicit` library (Takács et al. 2011), whose compiled kernel each task calls.
  Each rating goes once to its user's block and once to its item's block (``num_blocks`` of each,
  CSR of confidences); one barrier stage runs the whole fit: task p keeps user block p and item
  block p, solves their rows (``cg_steps`` CG steps from their previous values) every
  half-iteration and sends the new rows straight to the other tasks, and the driver gathers the
  factors (rows x rank) once at the end. Sessions with dynamic allocation, which barrier stages do
  not support, run one job per half-iteration with the factors broadcast instead. Objective:
  confidence ``c = 1 + alpha * r`` with preference ``r > 0``, regularization
  ``reg_param * |x|^2`` per row.
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


def fit_als_cg(pairs: DataFrame, cfg: AlsSettings, exchange: str | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Implicit ALS with a conjugate-gradient solver on the executors (see the module doc) on
    (u, i, strength) rows of int indices; returns what :func:`fit_als_indexed` returns: only the
    users and items that have ratings, in index order.

    ``exchange`` (None: chosen from the session) is how the tasks get each other's factors:
    ``barrier``, one barrier stage whose tasks keep their blocks and swap new factors directly
    every half-iteration (one Spark job per fit); ``broadcast``, one job per half-iteration whose
    tasks read the factors from a broadcast, for sessions with dynamic allocation, which barrier
    stages do not support."""
    if exchange is None:
        conf = pairs.sparkSession.sparkContext.getConf()
        dynamic = conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true"
        exchange = "broadcast" if dynamic else "barrier"
    if exchange not in ("barrier", "broadcast"):
        raise ValueError(f"ALS exchange {exchange!r}: use 'barrier' or 'broadcast'")
    t0 = time.perf_counter()
    fit = _fit_barrier if exchange == "barrier" else _fit_broadcast
    u_ids, users, i_ids, items = fit(pairs, cfg)
    return u_ids, users, i_ids, items, time.perf_counter() - t0


def _confidence_block(alpha: float):
    """A function (keys, others, strength) -> (sorted row ids int32, CSR of confidences over the
    other side's index: float32 data, int32 indices) that both exchanges' executors run. Made by
    this factory, not defined at module level, so that Spark ships it by value with the tasks
    (executors need not import this module)."""
    def block(keys: np.ndarray, others: np.ndarray, strength: np.ndarray):
        import scipy.sparse as sp

        keys, others = keys.astype(np.int64), others.astype(np.int64)
        ids, rows = np.unique(keys, return_inverse=True)
        width = int(others.max()) + 1 if len(others) else 0
        m = sp.csr_matrix((strength.astype(np.float64), (rows, others)), shape=(len(ids), width))
        m.sum_duplicates()  # one strength per pair, then its confidence; r <= 0: preference 0,
        r = m.data  # which implicit's kernel reads from a negative confidence
        m.data = np.where(r > 0, 1.0 + alpha * r, -(1.0 + alpha * np.abs(r))).astype(np.float32)
        m.indices, m.indptr = m.indices.astype(np.int32), m.indptr.astype(np.int32)
        return ids.astype(np.int32), m
    return block


def _no_ratings() -> ValueError:
    return ValueError("ALS has no ratings to fit: the (u, i, strength) frame is empty")


def _fit_barrier(pairs: DataFrame, cfg: AlsSettings):
    """CG ALS as one barrier stage: each rating goes once to its user's block and once to its
    item's block (one shuffle); task p builds user block p and item block p, and all tasks, started
    together, run every iteration: solve their rows, then send them to every other task over TCP
    (addresses swapped with ``allGather``; a per-fit token guards the connections), so that each
    task holds the whole fixed side for the next half-iteration. The driver gathers each task's
    final rows once. Tasks: ``num_blocks``, at most the cluster's task slots (all start at once)."""
    import secrets

    sc = pairs.sparkSession.sparkContext
    slots = sc.defaultParallelism // max(1, int(sc.getConf().get("spark.task.cpus", "1")))
    n_tasks = max(1, min(cfg.num_blocks, slots))
    rank, reg, steps, iterations, seed = (int(cfg.rank), float(cfg.reg_param), int(cfg.cg_steps),
                                          int(cfg.iterations), int(cfg.seed))
    block, token = _confidence_block(float(cfg.alpha)), secrets.token_bytes(16)

    def train(batches):
        import json
        import socket
        import struct
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow as pa
        from implicit.cpu._als import least_squares_cg
        from pyspark import BarrierTaskContext
        from threadpoolctl import threadpool_limits

        ctx = BarrierTaskContext.get()
        me = ctx.partitionId()
        batches = list(batches)
        cols = {c: np.concatenate([b.column(c).to_numpy(zero_copy_only=False) for b in batches])
                if batches else np.zeros(0) for c in ("side", "key", "other", "strength")}

        (u_ids, cui), (i_ids, ciu) = (
            block(cols["key"][at], cols["other"][at], cols["strength"][at])
            for at in (cols["side"] == 0, cols["side"] == 1))
        host = ctx.getTaskInfos()[me].address.rsplit(":", 1)[0]
        listener = socket.create_server((host, 0))
        conns: dict[int, tuple[socket.socket, socket.socket]] = {}
        opened = [listener]  # every socket, closed at the end whatever happens
        pool = ThreadPoolExecutor(max(1, 2 * (len(ctx.getTaskInfos()) - 1)))
        try:
            tops = (int(u_ids[-1]) if len(u_ids) else -1, int(i_ids[-1]) if len(i_ids) else -1)
            peers = [json.loads(m) for m in ctx.allGather(
                json.dumps([host, listener.getsockname()[1], *tops]))]  # in partition order
            n_users, n_items = max(p[2] for p in peers) + 1, max(p[3] for p in peers) + 1
            if n_users == 0:
                return
            rng = np.random.default_rng(seed)  # what implicit draws for the same seed
            users = rng.random((n_users, rank), dtype=np.float32) * np.float32(0.01)
            items = rng.random((n_items, rank), dtype=np.float32) * np.float32(0.01)
            outgoing = {}
            for q, (peer_host, port, _, _) in enumerate(peers):
                if q != me:
                    s = socket.create_connection((peer_host, port), timeout=3600)
                    opened.append(s)
                    s.sendall(token + struct.pack("<i", me))
                    outgoing[q] = s
            incoming = {}
            listener.settimeout(3600)
            while len(incoming) < len(outgoing):
                c, _ = listener.accept()
                opened.append(c)
                c.settimeout(30)  # a stranger that sends nothing is dropped, not waited for
                try:
                    hello = bytes(recv(c, len(token) + 4))
                except (ConnectionError, OSError):
                    continue
                if hello[:len(token)] != token:  # not one of this fit's tasks: ignored
                    continue
                c.settimeout(3600)
                incoming[struct.unpack("<i", hello[len(token):])[0]] = c
            conns = {q: (outgoing[q], incoming[q]) for q in outgoing}

            def swap(payload, read):  # payload to every peer, read(q, sock) from each, all at
                sends = [pool.submit(o.sendall, payload) for o, _ in conns.values()]  # once: no
                got = {q: pool.submit(read, q, i) for q, (_, i) in conns.items()}  # task waits
                out = {q: f.result() for q, f in got.items()}  # on a peer that is itself sending
                for f in sends:
                    f.result()
                return out

            def ids_of(q, sock):  # a peer's header, then its user and item row ids
                nu, ni = struct.unpack("<ii", bytes(recv(sock, 8)))
                ids = np.frombuffer(recv(sock, 4 * (nu + ni)), np.int32)
                return ids[:nu], ids[nu:]

            theirs = swap(struct.pack("<ii", len(u_ids), len(i_ids)) + u_ids.tobytes()
                          + i_ids.tobytes(), ids_of)

            def share(full, mine, side):  # my new rows to every peer; theirs into ``full``
                rows = swap(memoryview(np.ascontiguousarray(mine)).cast("B"),
                            lambda q, sock: recv(sock, len(theirs[q][side]) * rank * 4))
                for q, got in rows.items():
                    full[theirs[q][side]] = np.frombuffer(got, np.float32).reshape(-1, rank)

            with threadpool_limits(1, "blas"):  # one core a task: no BLAS threads beside it
                for _ in range(iterations):
                    for full, fixed, ids, m, side in ((users, items, u_ids, cui, 0),
                                                      (items, users, i_ids, ciu, 1)):
                        x = np.ascontiguousarray(full[ids])
                        if len(ids):
                            least_squares_cg(m, x, fixed, reg, num_threads=1, cg_steps=steps)
                        full[ids] = x
                        share(full, x, side)
            yield pa.RecordBatch.from_pydict({
                "side": pa.array([0, 1], pa.int32()), "ids": [u_ids.tobytes(), i_ids.tobytes()],
                "factors": [users[u_ids].tobytes(), items[i_ids].tobytes()]})
        finally:  # closing the sockets ends any pool thread still waiting on a peer
            for s in opened:
                s.close()
            pool.shutdown(wait=False)

    def recv(sock, n):  # exactly n bytes, or the peer is gone
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError("an ALS task's peer closed its connection mid-fit "
                                      "(it failed or was killed; Spark retries the stage)")
            got += k
        return buf

    both = pairs.select(F.inline(F.array(
        F.struct(F.lit(0).alias("side"), F.col("u").cast("int").alias("key"),
                 F.col("i").cast("int").alias("other"), F.col("strength").cast("double").alias("strength")),
        F.struct(F.lit(1).alias("side"), F.col("i").cast("int").alias("key"),
                 F.col("u").cast("int").alias("other"), F.col("strength").cast("double").alias("strength")))))
    out = (both.repartition(n_tasks, "side", "key")
           .mapInArrow(train, "side int, ids binary, factors binary", barrier=True).toArrow())
    parts = {0: [], 1: []}
    for side, ids, f in zip(*(out.column(c).to_pylist() for c in ("side", "ids", "factors"))):
        parts[side].append((np.frombuffer(ids, np.int32), np.frombuffer(f, np.float32)))
    if not parts[0]:
        raise _no_ratings()
    result = []
    for side in (0, 1):
        ids = np.concatenate([i for i, _ in parts[side]])
        f = np.concatenate([f for _, f in parts[side]]).reshape(len(ids), rank)
        order = np.argsort(ids, kind="stable")
        result += [ids[order], f[order]]
    return tuple(result)


def _fit_broadcast(pairs: DataFrame, cfg: AlsSettings):
    """CG ALS with one Spark job per half-iteration: the ratings as cached user and item blocks,
    the factors broadcast to every task each half-iteration."""
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
        raise _no_ratings()
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
    return u_ids, users[u_ids], i_ids, items[i_ids]


def _blocks(pairs: DataFrame, by: str, other: str, n_blocks: int, alpha: float):
    """The ratings as ``n_blocks`` cached blocks keyed by ``by``: (row ids, CSR of confidences
    over ``other``), one per partition, built on the executors; and the largest ``by`` index
    (-1 when there are no ratings)."""
    from pyspark import StorageLevel

    block = _confidence_block(alpha)

    def build(batches):
        import pyarrow as pa

        table = pa.Table.from_batches(list(batches))
        if table.num_rows == 0:
            return
        ids, m = block(table.column(by).to_numpy(), table.column(other).to_numpy(),
                       table.column("strength").to_numpy())
        yield pa.RecordBatch.from_pydict({
            "ids": [ids.tobytes()], "indptr": [m.indptr.tobytes()], "indices": [m.indices.tobytes()],
            "data": [m.data.tobytes()], "width": [m.shape[1]]})

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
