"""ALS with the conjugate-gradient solver on Spark's executors (recmodels/spark_als.py,
``als.solver: cg``): the same factors as the `implicit` library's CG fit of the same objective in
one process, whatever the block count; recommendations as good as MLlib's ALS on held-out pairs;
the fold-in of a served user regularizes as the fit did."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from freshrec.settings import AlsSettings

pytestmark = pytest.mark.integration


def _pairs(seed: int = 5, n_users: int = 300, n_items: int = 120, per_user: int = 12):
    """Clustered (user, item, strength) pairs: users of a taste pick items of that taste."""
    rng = np.random.default_rng(seed)
    taste_u, taste_i = rng.integers(0, 4, n_users), rng.integers(0, 4, n_items)
    u, i = [], []
    for user in range(n_users):
        liked = np.flatnonzero(taste_i == taste_u[user])
        other = np.flatnonzero(taste_i != taste_u[user])
        pick = np.r_[rng.choice(liked, per_user - 2, replace=False), rng.choice(other, 2, replace=False)]
        u += [user] * per_user
        i += list(pick)
    strength = rng.choice([1.0, 2.0, 5.0], len(u))
    strength[:3] = -1.0  # a dislike: preference 0
    return np.array(u, np.int32), np.array(i, np.int32), strength


def _frame(spark, u, i, s):
    return spark.createDataFrame(pa.table({"u": pa.array(u, pa.int32()), "i": pa.array(i, pa.int32()),
                                           "strength": pa.array(s, pa.float64())}))


def _implicit_fit(u, i, s, cfg: AlsSettings):
    """implicit's own CG fit of the same objective: confidence 1 + alpha * r (negative for r <= 0,
    implicit's way of saying preference 0), regularization reg_param."""
    from implicit.cpu.als import AlternatingLeastSquares

    c = np.where(s > 0, 1 + cfg.alpha * s, -(1 + cfg.alpha * np.abs(s))).astype(np.float32)
    m = sp.csr_matrix((c, (u, i)), shape=(u.max() + 1, i.max() + 1))
    model = AlternatingLeastSquares(factors=cfg.rank, regularization=cfg.reg_param, alpha=1.0,
                                    iterations=cfg.iterations, use_cg=True, random_state=cfg.seed,
                                    calculate_training_loss=False, num_threads=1)
    model.fit(m, show_progress=False)
    return model.user_factors, model.item_factors


@pytest.mark.parametrize("blocks,exchange", [(1, "barrier"), (3, "barrier"), (3, "broadcast")])
def test_cg_on_spark_gives_implicits_factors(spark, blocks, exchange):
    """Both ways of swapping factors between tasks: one barrier stage whose tasks send each other
    their rows (3 blocks on local[2]: capped to the 2 task slots), and one job per half-iteration
    with a broadcast."""
    from recmodels.spark_als import fit_als_cg

    u, i, s = _pairs()
    cfg = AlsSettings(rank=8, iterations=4, reg_param=0.1, alpha=2.0, num_blocks=blocks, seed=3)
    uid, uf, iid, itf, _ = fit_als_cg(_frame(spark, u, i, s), cfg, exchange=exchange)
    ref_u, ref_i = _implicit_fit(u, i, s, cfg)
    assert np.array_equal(uid, np.arange(u.max() + 1)) and np.array_equal(iid, np.unique(i))
    assert np.allclose(uf, ref_u[uid], atol=2e-4) and np.allclose(itf, ref_i[iid], atol=2e-4)
    assert np.abs(uf).max() > 0.05  # it moved from the 0.01 initialisation


def test_the_barrier_fit_runs_the_same_few_jobs_however_many_iterations(spark):
    """The point of the barrier exchange: a fit's Spark jobs (each costs a scheduling round trip,
    ~0.2 s on a cluster) do not grow with the iterations, where the broadcast exchange runs one
    job per half-iteration."""
    from recmodels.spark_als import fit_als_cg

    u, i, s = _pairs()
    frame = _frame(spark, u, i, s)
    sc = spark.sparkContext

    def jobs(exchange, iterations):
        group = f"als-{exchange}-{iterations}"
        sc.setJobGroup(group, group)
        try:
            fit_als_cg(frame, AlsSettings(rank=4, iterations=iterations, num_blocks=2), exchange=exchange)
        finally:
            sc.setJobGroup("", "")
        return len(sc.statusTracker().getJobIdsForGroup(group))

    assert jobs("barrier", 2) == jobs("barrier", 6) <= 3
    assert jobs("broadcast", 6) - jobs("broadcast", 2) == 8  # two more jobs an iteration


def _recall(uf, itf, train, test, k=10):
    scores = uf @ itf.T
    scores[train.nonzero()] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :k]
    hits = [len(set(top[r]) & set(test.indices[test.indptr[r]:test.indptr[r + 1]]))
            for r in range(test.shape[0])]
    return sum(hits) / test.nnz


def test_cg_recommends_held_out_items_as_well_as_mllib(spark):
    from recmodels.spark_als import fit_als_indexed

    u, i, s = _pairs(seed=11, n_users=400, per_user=15)
    s = np.abs(s)
    rng = np.random.default_rng(0)
    test = rng.random(len(u)) < 0.2
    n_u, n_i = u.max() + 1, i.max() + 1
    train_m = sp.csr_matrix((s[~test], (u[~test], i[~test])), shape=(n_u, n_i))
    test_m = sp.csr_matrix((s[test], (u[test], i[test])), shape=(n_u, n_i))
    frame = _frame(spark, u[~test], i[~test], s[~test])
    recall = {}
    for solver in ("cg", "mllib"):
        cfg = AlsSettings(rank=8, iterations=8, reg_param=0.1, alpha=1.0, num_blocks=2, seed=1,
                          solver=solver)
        uid, uf, iid, itf, _ = fit_als_indexed(frame, cfg)
        users = np.zeros((n_u, 8), np.float32)
        items = np.zeros((n_i, 8), np.float32)
        users[uid], items[iid] = uf, itf
        recall[solver] = _recall(users, items, train_m, test_m)
    popular = np.argsort(-np.asarray(train_m.sum(0)).ravel())
    pop = _recall(np.ones((n_u, 1)), (np.argsort(popular)[::-1][:, None] + 0.0), train_m, test_m)
    assert recall["cg"] > 2 * pop, (recall, pop)  # it learnt the tastes
    assert recall["cg"] >= recall["mllib"] - 0.05, recall


def test_the_fold_in_of_a_cg_model_reproduces_its_fitted_user(spark):
    from recmodels.base import Interactions
    from recmodels.servable import UserInput
    from recmodels.spark_models import SparkALSModel
    import pandas as pd

    u, i, s = _pairs(seed=2)
    s = np.abs(s)
    events = pd.DataFrame({"user_id": [f"u{x:03d}" for x in u], "item_id": [f"i{x:03d}" for x in i],
                           "weight": s, "ts": pd.Timestamp("2026-11-28", tz="UTC")})
    data = Interactions.from_events(events)
    for solver, per_rating in (("cg", False), ("mllib", True)):
        model = SparkALSModel(rank=8, iterations=12, reg_param=0.1, alpha=1.0, num_blocks=2,
                              solver=solver, cg_steps=8).fit(data)
        kind, scorer, arrays = model.servable()
        assert scorer["reg_per_rating"] is per_rating
        from recmodels.servable import FactorServable

        served = FactorServable("als", arrays["user_ids"], {}, model.items, None, None, "als",
                                scorer["alpha"], scorer["reg"],
                                reg_per_rating=scorer["reg_per_rating"])
        row = 7
        lo, hi = data.matrix.indptr[row], data.matrix.indptr[row + 1]
        folded = served.user_vectors([UserInput(str(data.user_ids[row]), data.matrix.indices[lo:hi],
                                                data.matrix.data[lo:hi], [], fresh=True)])[0]
        fitted = model.users[row]
        cos = folded @ fitted / (np.linalg.norm(folded) * np.linalg.norm(fitted))
        assert cos > 0.99, (solver, cos)


def test_an_unknown_solver_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="solver"):
        AlsSettings(solver="lbfgs")
