import math

import numpy as np
import pandas as pd
import pytest

from recmodels.baselines import ItemKNN, MostPopular
from recmodels.evaluation import evaluate_scorer, ranking_metrics, temporal_split, top_k


def test_metrics_known_answer():
    recs = np.array([[0, 1, 2], [3, 4, 5]])
    relevant = [np.array([1, 9]), np.array([7])]
    m = ranking_metrics(recs, relevant, [3], n_items=10)
    assert m["recall_at_3"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["hr_at_3"] == pytest.approx(0.5)
    ndcg_user0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg_at_3"] == pytest.approx(ndcg_user0 / 2)
    assert m["coverage_at_3"] == pytest.approx(0.6)


def test_ideal_dcg_uses_min_of_relevant_and_k():
    recs = np.array([[5, 0, 1]])
    m = ranking_metrics(recs, [np.array([5])], [3], n_items=6)
    assert m["ndcg_at_3"] == pytest.approx(1.0)


def test_top_k_orders_by_score():
    s = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert top_k(s, 3).tolist() == [[1, 3, 2]]


def _events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "weight"])


def test_temporal_split_takes_each_users_last_fifth_and_at_least_one():
    rows = [("a", f"i{j}", j, 1.0) for j in range(10)] + [("b", "i0", 0, 1.0), ("b", "i5", 1, 1.0)]
    rows += [("c", "i1", 0, 1.0)]  # one event: no training history, left out of the test
    split = temporal_split(_events(rows), 0.2)
    users = {split.user_ids[u]: set(split.item_ids[i] for i in items if i >= 0)
             for u, items in zip(split.test_users, split.test_items)}
    assert users["a"] == set() or users["a"] <= {"i8", "i9"}
    assert split.n_test_events == 2 + 1
    assert "c" not in users
    # training never holds a test-period event
    a = np.searchsorted(split.user_ids, "a")
    assert set(split.item_ids[split.train[a].indices]) == {f"i{j}" for j in range(8)}


def test_training_items_are_excluded_from_ranking():
    rows = [("u", "x", 0, 1.0), ("u", "y", 1, 1.0), ("u", "z", 2, 1.0), ("u", "w", 3, 1.0),
            ("u", "z", 4, 1.0), ("v", "x", 0, 1.0), ("v", "w", 1, 1.0), ("v", "y", 2, 1.0)]
    split = temporal_split(_events(rows), 0.2)
    # u re-viewed z (seen in training): not relevant; v's last item y is relevant
    assert [split.user_ids[u] for u in split.test_users] == ["v"]
    m = evaluate_scorer(split, MostPopular(split.train).score, [1])
    assert 0.0 <= m["ndcg_at_1"] <= 1.0


def test_item_knn_beats_popularity_on_clustered_data():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(200):
        group = u % 2
        for t in range(10):
            rows.append((f"u{u}", f"g{group}_{rng.integers(0, 10)}", t, 1.0))
        if group == 0:  # group 0 is bigger in volume: popularity favours its items
            rows += [(f"u{u}", f"g0_{rng.integers(0, 10)}", 10 + t, 1.0) for t in range(5)]
    split = temporal_split(_events(rows), 0.2)
    pop = evaluate_scorer(split, MostPopular(split.train).score, [5])
    knn = evaluate_scorer(split, ItemKNN(split.train, 20).score, [5])
    assert knn["ndcg_at_5"] > pop["ndcg_at_5"] * 1.2


def test_empty_events_give_a_clear_error():
    with pytest.raises(ValueError, match="no events to evaluate"):
        temporal_split(_events([]), 0.2)
