"""The gate decides on the validation split with a paired test: the evaluate job (real Delta
events via delta-rs, real MLflow registry; models that need no Spark) then the gate, over three
intervals of the same data."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.interval import DataInterval
from freshrec.settings import load_settings
from freshrec.storage.tables import EVENTS


def clustered_events(n_users=300, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        g = u % 2
        for t in range(20 if g == 0 else 12):
            rows.append((f"u{u}", f"g{g}_{rng.integers(0, 15)}", 1_700_000_000 + u * 1000 + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


@pytest.fixture
def settings(tmp_path):
    s = load_settings("local", env={}, paths={"data_dir": str(tmp_path / "data")},
                      evaluation={"max_users": 0, "ks": [10], "bootstrap_resamples": 2000,
                                  "refit": False})
    ev = clustered_events()
    n = len(ev)
    table = pa.table({
        "event_id": [f"e{i}" for i in range(n)], "user_id": ev["user_id"], "item_id": ev["item_id"],
        "event_type": ["view"] * n, "value": pa.nulls(n, pa.float64()), "weight": np.ones(n),
        "ts": pa.array(pd.to_datetime(ev["timestamp"], unit="s", utc=True)).cast(
            pa.timestamp("us", tz="UTC")),
        "context": pa.nulls(n, pa.string()), "raw_id": [f"{i:08d}" for i in range(n)],
        "batch_date": ["2026-11-01"] * n}, schema=EVENTS.schema)
    DeltaStore(s).write_arrow("events", table)
    return s


def _evaluate_and_gate(settings, day, models):
    from spark_jobs import evaluate, gate

    interval = DataInterval.for_day(day)
    summary = evaluate.run(settings, interval, models)
    return summary, gate.run(settings, interval)


def test_only_a_significant_gain_on_validation_is_promoted(settings):
    import mlflow
    from mlflow.tracking import MlflowClient

    from freshrec.contracts.registry import RETRIEVAL

    first, g1 = _evaluate_and_gate(settings, "2026-11-20", ["most_popular"])
    assert g1["promoted"] and g1["reason"] == "no champion yet"

    # EASE clearly beats the champion's method on the same validation users: promoted, p recorded
    ev2, g2 = _evaluate_and_gate(settings, "2026-11-21", ["most_popular", "ease"])
    assert g2["candidate"] == "ease" and g2["promoted"], g2["reason"]
    assert g2["p_value"] < 0.05 and g2["p_value"] == ev2["p_values"]["ease"]["most_popular"]
    assert "paired p" in g2["reason"] and g2["champion_metric_source"] == "same split"

    # item-kNN is ahead of EASE on validation, but not significantly: NOT promoted, says why
    ev3, g3 = _evaluate_and_gate(settings, "2026-11-22", ["ease", "item_knn"])
    val = ev3["validation"]
    assert val["item_knn"]["ndcg_at_10"] > val["ease"]["ndcg_at_10"]
    assert g3["candidate"] == "item_knn" and not g3["promoted"]
    assert g3["p_value"] >= 0.05 and "not significant" in g3["reason"]

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    champ = client.get_model_version_by_alias(RETRIEVAL, "champion")
    assert str(champ.version) == g2["version"] and champ.tags["model"] == "ease"
    rejected = client.get_model_version(RETRIEVAL, g3["version"])
    assert rejected.tags["gate"] == "rejected"
    assert float(rejected.tags["gate_p_value"]) == pytest.approx(g3["p_value"], abs=1e-6)
    run = mlflow.get_run(ev3["runs"]["item_knn"])
    assert run.data.metrics["gate_p_value"] == pytest.approx(g3["p_value"])
    assert run.data.tags["gate"] == "rejected"
    parent = mlflow.get_run(ev3["evaluation_run"])
    assert parent.data.metrics["p_value.item_knn.over.ease"] == pytest.approx(g3["p_value"])
    # a re-run of the interval's gate registers nothing and reports the recorded decision
    from spark_jobs import gate

    again = gate.run(settings, DataInterval.for_day("2026-11-22"))
    assert again["version"] == g3["version"] and not again["promoted"]
    assert again["p_value"] == pytest.approx(g3["p_value"], abs=1e-6)


def test_the_gate_never_reads_the_test_split(settings):
    """The candidate is the best on validation even where another model is best on test."""
    from spark_jobs import gate

    summary, _ = _evaluate_and_gate(settings, "2026-11-20", ["most_popular", "ease", "item_knn"])
    path = settings.data_dir / "reports" / "evaluation-2026-11-23.json"
    # the same evaluation, with the test metrics swapped to favour most_popular
    test = summary["results"]
    test["most_popular"]["ndcg_at_10"] = 1.0
    path.write_text(json.dumps({**summary, "batch_date": "2026-11-23", "results": test}))
    out = gate.run(settings, DataInterval.for_day("2026-11-23"))
    val = summary["validation"]
    assert out["candidate"] == max(val, key=lambda m: val[m]["ndcg_at_10"]) != "most_popular"


def test_too_few_validation_users_keep_the_champion(settings):
    """A bootstrap over a handful of users is overconfident: with 10 validation users the gate
    keeps the champion even where the candidate's p-value is small."""
    _, g1 = _evaluate_and_gate(settings, "2026-11-20", ["most_popular"])
    assert g1["promoted"]
    few = settings.model_copy(update={"evaluation": settings.evaluation.model_copy(
        update={"max_users": 10})})
    ev, g2 = _evaluate_and_gate(few, "2026-11-21", ["most_popular", "ease"])
    assert ev["n_validation_users"] == 10 and g2["candidate"] == "ease"
    assert ev["validation"]["ease"]["ndcg_at_10"] > ev["validation"]["most_popular"]["ndcg_at_10"]
    assert not g2["promoted"] and "too few for a paired test" in g2["reason"]
