"""One contract suite for every recommender, on a checkerboard whose right answer is known:
two user groups, each interacting only with its own half of the catalog."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from recmodels.base import Interactions
from recmodels import MODELS, SPARK_MODELS, make_model

N_USERS, N_ITEMS = 40, 20
POPULARITY_ONLY = {"most_popular", "trending"}


def group_of_item(i: int) -> int:
    return 0 if i < N_ITEMS // 2 else 1


@pytest.fixture(scope="module")
def board() -> Interactions:
    rng = np.random.default_rng(0)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = []
    for u in range(N_USERS):
        group = 0 if u < N_USERS // 2 else 1
        half = np.arange(N_ITEMS // 2) + group * (N_ITEMS // 2)
        for n, i in enumerate(rng.choice(half, size=6, replace=False)):
            rows.append((f"u{u:02d}", f"i{i:02d}", 1.0 + (i % 3), start + timedelta(hours=u + n),
                         4.0 + (i % 2)))
        rows.append((f"u{u:02d}", f"i{half[0]:02d}", 1.0, start + timedelta(days=5), 5.0))  # popular
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "weight", "ts", "value"])
    items = pd.DataFrame({
        "item_id": [f"i{i:02d}" for i in range(N_ITEMS)],
        "title": [f"{'alpha' if group_of_item(i) == 0 else 'beta'} thing {i}" for i in range(N_ITEMS)],
        "categories": [["left"] if group_of_item(i) == 0 else ["right"] for i in range(N_ITEMS)],
        "text": ["red round" if group_of_item(i) == 0 else "blue square" for i in range(N_ITEMS)]})
    return Interactions.from_events(events, items, as_of=start + timedelta(days=6))


def small_params(name: str) -> dict:
    return {"user_knn": {"n_neighbors": 10}, "item_knn": {"n_neighbors": 10},
            "pure_svd": {"rank": 4}, "ease": {"l2": 10.0},
            "als": {"rank": 4, "iterations": 8}, "als_explicit": {"rank": 4, "iterations": 8},
            "trending": {"half_life_days": 2.0},
            "spark_item_knn": {"n_neighbors": 10}, "spark_user_knn": {"n_neighbors": 10},
            # the board's popularity is skewed on purpose (one item per half met by everyone): a
            # light prior keeps the content signal what the known answer tests
            "content": {"popularity_weight": 0.25},
            # deep models: a second or two on the CPU each; SASRec memorizes 40 short sequences
            # (and the popular last item of every user) without strong dropout
            "two_tower": {"epochs": 20, "dim": 16, "max_len": 8, "batch_size": 64, "seed": 0},
            "sasrec": {"epochs": 30, "dim": 32, "max_len": 8, "batch_size": 64, "lr": 5e-3,
                       "dropout": 0.5, "negatives": 64, "seed": 0},
            # on the board the newest event of everyone is one popular item: a larger validation
            # share gives the blender held-out items that are not all that one
            "hybrid": {"validation_fraction": 0.4,
                       "source_params": {"content": {"popularity_weight": 0.25},
                                         "user_knn": {"n_neighbors": 10},
                                         "item_knn": {"n_neighbors": 10},
                                         "pure_svd": {"rank": 4}}}}.get(name, {})


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, board):
    if request.param in SPARK_MODELS:
        request.getfixturevalue("spark")  # one Spark session for the run
    return make_model(request.param, **small_params(request.param)).fit(board)


def test_recommend_returns_k_unseen_items_best_first(model, board):
    users = np.arange(N_USERS)
    top, scores = model.recommend(users, 5)
    assert top.shape == (N_USERS, 5)
    for u in users:
        seen = set(board.matrix[u].indices)
        assert not seen & set(top[u].tolist()), model.name
        s = scores[u][~np.isnan(scores[u])]
        assert list(s) == sorted(s, reverse=True)


def test_known_answer_users_get_their_own_half(model, board):
    if model.name in POPULARITY_ONLY:
        pop = np.asarray(board.matrix.sum(axis=0)).ravel() if model.name == "most_popular" \
            else model.popularity
        _, scores = model.recommend(np.arange(N_USERS), 3, exclude_seen=False)
        np.testing.assert_allclose(scores, np.tile(np.sort(pop)[::-1][:3], (N_USERS, 1)),
                                   rtol=1e-5)
        if model.name == "trending":  # recent events count more than old ones of equal weight
            raw = np.asarray(board.matrix.sum(axis=0)).ravel()
            assert not np.allclose(pop / pop.max(), raw / raw.max())
        return
    if model.name == "als_explicit":
        pytest.skip("explicit ratings here are all high (no negatives to learn from): "
                    "test_explicit_als_ranks_by_learned_ratings has its own known answer")
    top, _ = model.recommend(np.arange(N_USERS), 3)
    right = [group_of_item(i) == (0 if u < N_USERS // 2 else 1)
             for u in range(N_USERS) for i in top[u] if i >= 0]
    assert np.mean(right) >= 0.9, f"{model.name}: {np.mean(right):.2f} in the user's own half"


def test_filters_apply_before_the_cut(model):
    allowed = np.zeros(N_ITEMS, dtype=bool)
    allowed[[1, 3, 5, 11, 13, 15]] = True
    top, _ = model.recommend(np.arange(N_USERS), 2, exclude_seen=False, allowed=allowed)
    assert (top >= 0).all() and allowed[top].all()


def test_similar_items_stay_in_their_half(model):
    if model.name in POPULARITY_ONLY:
        return  # co-occurrence fallback: answers, but no latent structure to check
    items, _ = model.similar_items(2, 3)
    assert 2 not in items
    assert np.mean([group_of_item(i) == 0 for i in items]) >= 2 / 3


def test_explain_names_items_from_the_users_history(model, board):
    top, _ = model.recommend(np.array([0]), 1)
    why = model.explain(0, int(top[0, 0]))
    assert why and set(i for i, _ in why) <= set(board.matrix[0].indices)


def test_export_is_device_neutral(model, tmp_path):
    out = model.export(tmp_path / model.name)
    meta = json.loads((out / "model.json").read_text())
    arrays = np.load(out / "arrays.npz")
    assert meta["name"] == model.name and len(arrays["item_ids"]) == N_ITEMS
    assert all(arrays[k].dtype != object for k in arrays.files)


def _inputs(board, users, fresh=False):
    from recmodels.servable import UserInput

    out = []
    for u in users:
        row = board.matrix[u]
        ev = board.events[board.events["user_row"] == u].sort_values("ts", kind="stable")
        out.append(UserInput(str(board.user_ids[u]), row.indices.astype(np.int64),
                             row.data.astype(np.float32),
                             ev["item_row"].to_numpy(np.int64), fresh))
    return out


def test_exported_artifact_serves_the_fitted_models_ranking(model, board, tmp_path, monkeypatch):
    """load(export(m)) needs no training code and ranks a known user's items as m.recommend."""
    import sys

    from recmodels.servable import load

    out = model.export(tmp_path / model.name)
    for mod in [m for m in sys.modules if m.startswith(("spark_jobs", "training", "pyspark"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_Forbid(), *sys.meta_path])
    served = load(out)
    users = np.arange(N_USERS)
    expected, exp_scores = model.recommend(users, 5)
    got, got_scores = served.recommend(_inputs(board, users), 5)
    np.testing.assert_allclose(got_scores, exp_scores, rtol=1e-4, atol=1e-4)
    # the same ranking wherever scores are not tied
    same = (got == expected) | np.isclose(got_scores, exp_scores, atol=1e-4)
    assert same.all(), (model.name, got[~same.all(axis=1)], expected[~same.all(axis=1)])
    assert served.item_ids.tolist() == board.item_ids.astype(str).tolist()


def test_exported_artifact_counts_new_events(model, board, tmp_path):
    """Freshness for every kind: a user whose history grows is scored from the new history."""
    from recmodels.servable import UserInput, load

    served = load(model.export(tmp_path / model.name))
    left = UserInput("newcomer", np.array([0, 1, 2]), np.ones(3, np.float32), np.array([0, 1, 2]), True)
    right = UserInput("newcomer", np.array([10, 11, 12]), np.ones(3, np.float32),
                      np.array([10, 11, 12]), True)
    top, _ = served.recommend([left, right], 3)
    if model.name in POPULARITY_ONLY:
        assert (top[0] >= 0).all()
        return
    for row, group in ((top[0], 0), (top[1], 1)):
        own = [group_of_item(int(i)) == group for i in row]
        if model.name in ("als", "als_explicit"):  # rank-4 Spark ALS on 40 users: a folded-in
            assert own[0] and sum(own) >= 2, (model.name, top)  # newcomer leans to their half
        else:
            assert all(own), (model.name, top)


class _Forbid:
    """An import hook that fails any import of the lanes or Spark."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("spark_jobs", "training", "pyspark", "mlflow"):
            raise ImportError(f"{name} imported while loading a servable model")
        return None


def test_a_broken_artifact_is_refused_with_the_file_named(board, tmp_path):
    from recmodels.servable import ArtifactError, load

    model = make_model("item_knn", n_neighbors=5).fit(board)
    out = model.export(tmp_path / "m")
    (out / "arrays.npz").write_bytes(b"not an npz")
    with pytest.raises(ArtifactError, match="arrays.npz.*item_knn"):
        load(out)
    (out / "model.json").unlink()
    with pytest.raises(ArtifactError, match="model.json is missing"):
        load(out)


def test_bad_input_gets_clear_messages(board):
    with pytest.raises(ValueError, match="unknown model 'nope'; known models"):
        make_model("nope")
    with pytest.raises(RuntimeError, match="not fitted"):
        make_model("item_knn").recommend(np.array([0]), 3)
    with pytest.raises(ValueError, match="no training events"):
        Interactions.from_events(pd.DataFrame(columns=["user_id", "item_id", "weight", "ts"]))
    with pytest.raises(ValueError, match="k must be at least 1"):
        make_model("most_popular").fit(board).recommend(np.array([0]), 0)
    no_meta = Interactions(board.user_ids, board.item_ids, board.matrix, board.events, None,
                           board.as_of)
    with pytest.raises(ValueError, match="needs item metadata"):
        make_model("content").fit(no_meta)
    with pytest.raises(ValueError, match="max_items"):
        make_model("ease", max_items=5).fit(board)
    with pytest.raises(ValueError, match="blender must be"):
        make_model("hybrid", blender="magic")
    with pytest.raises(ValueError, match="needs explicit ratings"):
        no_ratings = Interactions(board.user_ids, board.item_ids, board.matrix,
                                  board.events.drop(columns="value"), board.items, board.as_of)
        make_model("als_explicit").fit(no_ratings)


def test_hybrid_leaves_out_sources_it_cannot_use_and_says_so(board):
    no_meta = Interactions(board.user_ids, board.item_ids, board.matrix, board.events, None,
                           board.as_of)
    m = make_model("hybrid", ease_max_items=5, **small_params("hybrid")).fit(no_meta)
    assert set(m.params()["skipped_sources"]) == {"ease", "content"}
    top, _ = m.recommend(np.arange(N_USERS), 3)
    assert (top >= 0).all()
    with pytest.raises(ValueError, match="no usable hybrid source"):
        make_model("hybrid", sources=("content",)).fit(no_meta)



@pytest.mark.parametrize("catalog", ["no item file", "items without metadata"])
def test_hybrid_on_interactions_alone_leaves_content_out_and_says_why(board, catalog, tmp_path):
    """Events imported without items (or items with no categories, title or text): content cannot
    fit, so it is left out with the reason; the other sources make the hybrid, which serves."""
    from recmodels.servable import load

    items = None if catalog == "no item file" else pd.DataFrame(
        {"item_id": board.item_ids, "title": None, "categories": None, "text": None})
    data = Interactions(board.user_ids, board.item_ids, board.matrix, board.events, items,
                        board.as_of)
    m = make_model("hybrid", **small_params("hybrid")).fit(data)
    skipped = m.params()["skipped_sources"]
    assert set(skipped) == {"content"}
    assert ("no item metadata" if items is None else "nothing to learn from") in skipped["content"]
    assert "content" not in m.params()["sources"] and "ease" in m.params()["sources"]
    top, _ = m.recommend(np.arange(N_USERS), 3)
    assert (top >= 0).all()
    right = [group_of_item(i) == (0 if u < N_USERS // 2 else 1) for u in range(N_USERS) for i in top[u]]
    assert np.mean(right) >= 0.9
    served = load(m.export(tmp_path / "hybrid"))
    got, got_scores = served.recommend(_inputs(board, np.arange(N_USERS)), 5)
    expected, exp_scores = m.recommend(np.arange(N_USERS), 5)
    np.testing.assert_allclose(got_scores, exp_scores, rtol=1e-4, atol=1e-4)



def test_a_source_that_fails_on_all_the_data_leaves_the_others_blended(board, monkeypatch, tmp_path):
    """A source that fitted the validation split but fails on all of the data is left out with
    the reason; the ranker (whose features name it) gives way to a linear blend of the rest."""
    from recmodels.hybrid import HybridModel
    from recmodels.servable import load

    make = HybridModel._make

    def flaky(self, name):
        m = make(self, name)
        if name == "item_knn":
            fit = m.fit

            def fit_or_fail(data):
                if data.matrix.nnz == board.matrix.nnz:
                    raise MemoryError("out of memory on the full data")
                return fit(data)
            m.fit = fit_or_fail
        return m

    monkeypatch.setattr(HybridModel, "_make", flaky)
    m = make_model("hybrid", blender="ranker", **small_params("hybrid")).fit(board)
    assert "MemoryError" in m.params()["skipped_sources"]["item_knn"]
    assert m.params()["blender_used"] == "linear" and "item_knn" not in m.params()["sources"]
    top, scores = m.recommend(np.arange(N_USERS), 3)
    assert (top >= 0).all()
    assert np.mean([group_of_item(i) == (0 if u < N_USERS // 2 else 1)
                    for u in range(N_USERS) for i in top[u]]) >= 0.9
    served = load(m.export(tmp_path / "hybrid"))
    _, got_scores = served.recommend(_inputs(board, np.arange(N_USERS)), 3)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-4, atol=1e-4)

def test_ease_on_the_most_popular_items_serves_exactly(board, tmp_path):
    """EASE fitted on the top_items most popular items: the others score 0 and carry no weight,
    and the exported artifact (dense, or sparse top-N rows) gives the fitted model's scores."""
    from recmodels.servable import load

    m = make_model("ease", l2=10.0, top_items=8).fit(board)
    users_per_item = np.asarray((board.matrix > 0).sum(axis=0)).ravel()
    assert m.params()["fitted_items"] == 8 and len(m.kept) == 8
    assert users_per_item[m.kept].min() >= np.delete(users_per_item, m.kept).max()
    out = np.delete(np.arange(N_ITEMS), m.kept)
    scores = m.score(np.arange(N_USERS))
    assert scores.shape == (N_USERS, N_ITEMS) and (scores[:, out] == 0).all()
    full = make_model("ease", l2=10.0).fit(board)
    assert not np.allclose(scores[:, m.kept], full.score(np.arange(N_USERS))[:, m.kept])
    served = load(m.export(tmp_path / "dense"))
    np.testing.assert_allclose(served.scores(_inputs(board, np.arange(N_USERS))), scores,
                               rtol=1e-5, atol=1e-6)
    sparse = make_model("ease", l2=10.0, top_items=8, serve_dense_max_items=5, serve_top_n=3).fit(board)
    matrix = load(sparse.export(tmp_path / "sparse")).matrix.toarray()
    assert not matrix[out].any() and not matrix[:, out].any()
    kept_rows = matrix[np.ix_(sparse.kept, sparse.kept)]
    assert ((kept_rows != 0).sum(axis=1) <= 3).all()
    np.testing.assert_allclose(kept_rows[kept_rows != 0], sparse.weights[kept_rows != 0], rtol=1e-6)
    with pytest.raises(ValueError, match="top_items"):
        make_model("ease", top_items=-1)
    # max_items limits what is fitted: a subset below it fits a catalog above it
    assert make_model("ease", max_items=10, top_items=8).fit(board).params()["fitted_items"] == 8

def test_trending_picks_a_short_half_life_when_tastes_move_fast():
    """Items popular in the first weeks are never met again; the newest events all go to other
    items. The auto half-life must be short, and trending must rank the new favourites first."""
    start = datetime(2026, 10, 1, tzinfo=timezone.utc)
    rows = []
    for u in range(60):
        for d in range(20):  # old favourites: many events, long ago
            rows.append((f"u{u}", f"old{d % 5}", 1.0, start + timedelta(days=d)))
        for d in range(5):  # new favourites: few events, recent
            rows.append((f"u{u}", f"new{(u + d) % 5}", 1.0, start + timedelta(days=40 + d, hours=u)))
    data = Interactions.from_events(pd.DataFrame(rows, columns=["user_id", "item_id", "weight", "ts"]))
    m = make_model("trending").fit(data)
    assert m.params()["fitted_half_life_days"] <= 7
    top = data.item_ids[np.argsort(-m.popularity)[:5]]
    assert all(str(i).startswith("new") for i in top)
    assert make_model("most_popular").fit(data).popularity.argmax() != m.popularity.argmax()


def test_users_with_no_history_get_a_ranking_not_an_empty_result(board):
    """A user whose only events are in the future of the split has an empty row: the popularity
    prior (content) or the blend still ranks the whole catalog."""
    events = pd.concat([board.events.assign(user_id=board.user_ids[board.events["user_row"]],
                                            item_id=board.item_ids[board.events["item_row"]])])
    m = make_model("content").fit(board)
    empty = Interactions(np.append(board.user_ids, "nobody"), board.item_ids,
                         __import__("scipy.sparse", fromlist=["vstack"]).vstack(
                             [board.matrix, np.zeros((1, N_ITEMS), np.float32)]).tocsr(),
                         board.events, board.items, board.as_of)
    m.fit(empty)
    top, _ = m.recommend(np.array([N_USERS]), 5)
    assert (top >= 0).all() and len(events)


def test_explicit_als_ranks_by_learned_ratings(spark):
    """Users rate their own half 5 and a few items of the other half 1: unseen items of their
    own half must get higher predicted ratings than unseen items of the other half."""
    rng = np.random.default_rng(1)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = []
    for u in range(N_USERS):
        group = 0 if u < N_USERS // 2 else 1
        own = np.arange(N_ITEMS // 2) + group * (N_ITEMS // 2)
        other = np.arange(N_ITEMS // 2) + (1 - group) * (N_ITEMS // 2)
        for n, i in enumerate(rng.choice(own, 5, replace=False)):
            rows.append((f"u{u:02d}", f"i{i:02d}", 1.0, start + timedelta(hours=n), 5.0))
        for n, i in enumerate(rng.choice(other, 3, replace=False)):
            rows.append((f"u{u:02d}", f"i{i:02d}", 1.0, start + timedelta(hours=10 + n), 1.0))
    data = Interactions.from_events(pd.DataFrame(rows, columns=["user_id", "item_id", "weight",
                                                                "ts", "value"]))
    m = make_model("als_explicit", rank=4, iterations=10, reg_param=0.05,
                   popularity_weight=0.0).fit(data)
    pred = m.predict_ratings(np.arange(N_USERS))
    own_better = []
    for u in range(N_USERS):
        group = 0 if u < N_USERS // 2 else 1
        unseen = np.setdiff1d(np.arange(N_ITEMS), data.matrix[u].indices)
        own = [i for i in unseen if group_of_item(i) == group]
        other = [i for i in unseen if group_of_item(i) != group]
        own_better.append(pred[u, own].mean() > pred[u, other].mean())
    assert np.mean(own_better) >= 0.9
    top, _ = m.recommend(np.arange(N_USERS), 3)
    assert np.mean([group_of_item(i) == (0 if u < N_USERS // 2 else 1)
                    for u in range(N_USERS) for i in top[u]]) >= 0.9
