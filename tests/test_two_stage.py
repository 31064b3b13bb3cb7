"""The two-stage hybrid: candidates come from each source's index (no source scores the whole
catalog on the request path), a LightGBM ranker saved without pickle orders them, the candidate
recall of every source is recorded, and a ranker trained on other features is refused at load."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from recmodels import make_model
from recmodels.base import Interactions
from recmodels.hybrid import user_inputs
from recmodels.servable import ArtifactError, load

N_USERS, N_ITEMS, N_GROUPS = 240, 90, 3
SOURCES = ("ease", "item_knn", "pure_svd", "content", "trending")


def group(i: int) -> int:
    return i % N_GROUPS


@pytest.fixture(scope="module")
def clustered() -> Interactions:
    """Users of three tastes, each meeting 14 items of its own third over two weeks, in time order;
    items carry their taste as a category."""
    rng = np.random.default_rng(3)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = []
    for u in range(N_USERS):
        own = [i for i in range(N_ITEMS) if group(i) == u % N_GROUPS]
        # a popularity skew inside each taste, so the ranker has more than one signal
        p = 1.0 / np.arange(1, len(own) + 1)
        for n, i in enumerate(rng.choice(own, size=14, replace=False, p=p / p.sum())):
            rows.append((f"u{u:03d}", f"i{i:03d}", 1.0, start + timedelta(hours=n * 20 + u % 7)))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "weight", "ts"])
    items = pd.DataFrame({"item_id": [f"i{i:03d}" for i in range(N_ITEMS)],
                          "title": [f"thing {i}" for i in range(N_ITEMS)],
                          "categories": [[f"taste{group(i)}"] for i in range(N_ITEMS)],
                          "text": ["" for _ in range(N_ITEMS)]})
    return Interactions.from_events(events, items)


@pytest.fixture(scope="module")
def fitted(clustered):
    params = {"sources": SOURCES, "blender": "ranker", "candidates": 20, "ranker_rounds": 50,
              "source_params": {"item_knn": {"n_neighbors": 20}, "pure_svd": {"rank": 6}}}
    return make_model("hybrid", **params).fit(clustered)


def test_the_ranker_is_a_lightgbm_text_model_and_nothing_is_pickled(fitted, tmp_path):
    out = fitted.export(tmp_path / "hybrid")
    assert fitted.params()["blender_used"] == "ranker" and fitted.params()["ranker"] == "lightgbm"
    assert (out / "ranker.txt").read_text().startswith("tree")
    assert not list(out.rglob("*.pkl"))
    scorer = json.loads((out / "model.json").read_text())["scorer"]
    assert scorer["ranker_file"] == "ranker.txt" and scorer["sources"] == list(SOURCES)


def test_candidates_come_from_indexes_not_from_scoring_the_catalog(fitted, clustered, tmp_path):
    """Every source's dense ``scores`` is made to fail: the served ranking is unchanged, so the
    request path never scores the whole catalog; each source names its index."""
    served = load(fitted.export(tmp_path / "hybrid"))
    users = user_inputs(clustered, np.arange(0, N_USERS, 7))
    before = served.rank(users, 10)

    def refuse(*_a, **_k):
        raise AssertionError("a source scored the whole catalog on the request path")

    for s in served.sources.values():
        s.scores = refuse
    after = served.rank(users, 10)
    for (pa, sa, _), (pb, sb, _) in zip(before, after):
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_allclose(sa, sb)
    kinds = {s: served.sources[s].index_type for s in SOURCES}
    assert kinds == {"ease": "neighbour-lists", "item_knn": "neighbour-lists",
                     "pure_svd": "faiss-flat", "content": "sparse", "trending": "ranked-list"}
    assert served.index_type.startswith("two-stage: ease neighbour-lists")
    # the answers are the user's taste, unseen, best first
    for u, (pos, sc, who) in zip(users, after):
        assert len(pos) == 10 and not set(pos) & set(u.items.tolist())
        assert all(np.diff(sc) <= 1e-9) and set(who) <= set(SOURCES)
        taste = group(int(clustered.item_ids[u.items[0]][1:]))
        assert np.mean([group(int(clustered.item_ids[p][1:])) == taste for p in pos]) >= 0.9


def test_candidate_recall_is_reported_per_source_and_for_the_union(fitted):
    v = fitted.params()["validation"]
    per = [v[f"recall_{s}"] for s in SOURCES]
    assert all(0.0 <= r <= 1.0 for r in per)
    assert max(per) <= v["recall_union"] <= 1.0 and v["recall_union"] > 0.5
    assert "ranker_ndcg" in v and "linear_ndcg" in v


def test_a_ranker_of_other_features_or_a_pickled_hybrid_is_refused_naming_the_file(fitted,
                                                                                   tmp_path):
    out = fitted.export(tmp_path / "hybrid")
    meta = json.loads((out / "model.json").read_text())
    meta["scorer"]["sources"] = meta["scorer"]["sources"][:-1]  # the ranker names one more
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="ranker.txt: ranker features"):
        load(out)
    del meta["scorer"]["ranker_file"]  # what an older freshrec wrote (ranker.pkl)
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="older freshrec"):
        load(out)


def test_a_refit_keeps_the_choice_and_trains_the_ranker_on_the_new_data(clustered):
    """evaluate refits the gate's candidate on every event: the ranker chosen on validation is
    trained again on that data (its features then come from the sources it will rank)."""
    params = {"sources": SOURCES, "blender": "ranker", "candidates": 20, "ranker_rounds": 50,
              "source_params": {"item_knn": {"n_neighbors": 20}, "pure_svd": {"rank": 6}}}
    m = make_model("hybrid", **params).fit(clustered)
    before = m.ranker
    more = Interactions.from_events(
        pd.concat([pd.DataFrame({"user_id": clustered.user_ids[clustered.events["user_row"]],
                                 "item_id": clustered.item_ids[clustered.events["item_row"]],
                                 "weight": clustered.events["weight"], "ts": clustered.events["ts"]})]),
        clustered.items)
    m.refit(more)
    assert m.ranker is not before and m.blender_used == "ranker"
    assert m.params()["blender"] == "ranker" and m.params()["sources"] == list(SOURCES)
