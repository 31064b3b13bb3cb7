"""The gate decides on the validation split with a paired test: the evaluate job (real Delta
events via delta-rs, real MLflow registry; models that need no Spark) then the gate, over three
intervals of the same data."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from freshrec.contracts.reports import (INDEX, evaluation_runs, evaluations, latest_evaluation_path,
                                        write_evaluation)
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
    # the same evaluation, with the test metrics swapped to favour most_popular
    test = summary["results"]
    test["most_popular"]["ndcg_at_10"] = 1.0
    write_evaluation(settings.data_dir / "reports", {**summary, "batch_date": "2026-11-23",
                                                     "evaluation_run": "swapped", "results": test})
    out = gate.run(settings, DataInterval.for_day("2026-11-23"))
    val = summary["validation"]
    assert out["candidate"] == max(val, key=lambda m: val[m]["ndcg_at_10"]) != "most_popular"
    assert out["evaluation_report"] == "evaluation-2026-11-23-swapped.json"


def test_a_challenger_better_on_test_only_never_takes_the_champion(settings):
    """EASE is @champion; most-popular (the only model the gate may register here) loses to it on
    validation but is made the best on test: it is registered, rejected, and says why."""
    from mlflow.tracking import MlflowClient

    from freshrec.contracts.registry import RETRIEVAL
    from spark_jobs import evaluate, gate

    _, g1 = _evaluate_and_gate(settings, "2026-11-20", ["most_popular", "ease"])
    assert g1["candidate"] == "ease" and g1["promoted"]
    only_pop = settings.model_copy(update={"evaluation": settings.evaluation.model_copy(
        update={"gate_models": ["most_popular"]})})
    summary = evaluate.run(only_pop, DataInterval.for_day("2026-11-21"), ["most_popular", "ease"])
    val = summary["validation"]
    assert val["ease"]["ndcg_at_10"] > val["most_popular"]["ndcg_at_10"]
    test = summary["results"]
    test["most_popular"]["ndcg_at_10"] = 0.99  # better on test only
    write_evaluation(settings.data_dir / "reports", {**summary, "evaluation_run": "test-only",
                                                     "results": test})
    g2 = gate.run(only_pop, DataInterval.for_day("2026-11-21"))
    assert g2["candidate"] == "most_popular" and not g2["promoted"]
    assert g2["evaluation_report"] == "evaluation-2026-11-21-test-only.json"
    assert "loses to ease" in g2["reason"] and "same split" in g2["reason"]
    assert "\n" not in g2["reason"] and g2["metric_name"] == "val_ndcg_at_10"
    client = MlflowClient()
    champ = client.get_model_version_by_alias(RETRIEVAL, "champion")
    assert str(champ.version) == g1["version"] and champ.tags["model"] == "ease"
    loser = client.get_model_version(RETRIEVAL, g2["version"])
    assert loser.tags["gate"] == "rejected" and loser.tags["gate_reason"] == g2["reason"]
    assert loser.tags["test_ndcg_at_10"] == "0.990000"
    assert float(loser.tags["val_ndcg_at_10"]) == pytest.approx(val["most_popular"]["ndcg_at_10"],
                                                                abs=1e-6)
    assert "ndcg_at_10" not in loser.tags and "ndcg_at_10" not in champ.tags
    assert float(champ.tags["val_ndcg_at_10"]) == pytest.approx(g1["candidate_metric"], abs=1e-6)


def test_every_evaluate_run_keeps_its_own_report(settings):
    """A second evaluate of the same interval writes its own report; the first stays as it was,
    and the gate and `freshrec report` read the newest."""
    from freshrec.cli.report import render
    from spark_jobs import evaluate, gate

    day = DataInterval.for_day("2026-11-20")
    reports = settings.data_dir / "reports"
    first = evaluate.run(settings, day, ["most_popular"])
    first_file = reports / first["report"]
    kept = first_file.read_text()
    second = evaluate.run(settings, day, ["most_popular", "ease"])
    assert first["report"] == f"evaluation-2026-11-20-{first['evaluation_run']}.json"
    assert second["report"] != first["report"] and first_file.read_text() == kept
    assert [r["file"] for r in evaluation_runs(reports, "2026-11-20")] == \
        [first["report"], second["report"]]
    assert latest_evaluation_path(reports, "2026-11-20") == reports / second["report"]
    out = gate.run(settings, day)
    assert out["evaluation_report"] == second["report"] and out["candidate"] == "ease"
    assert f"the newest run of 2026-11-20, {second['report']}" in render(settings, "2026-11-20")


def test_reports_from_before_the_index_are_still_read(tmp_path):
    """A data directory written before the index: its one report per date is found, and an index
    line whose file is missing (or cut short) is skipped."""
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "evaluation-2026-11-20.json").write_text(json.dumps({"batch_date": "2026-11-20"}))
    assert latest_evaluation_path(reports, "2026-11-20") == reports / "evaluation-2026-11-20.json"
    assert latest_evaluation_path(reports) == reports / "evaluation-2026-11-20.json"
    assert latest_evaluation_path(reports, "2026-11-21") is None
    (reports / INDEX).write_text('{"batch_date": "2026-11-20", "run_id": "gone", '
                                 '"file": "evaluation-2026-11-20-gone.json"}\n{"batch_da')
    new = write_evaluation(reports, {"batch_date": "2026-11-20", "evaluation_run": "r2"})
    assert latest_evaluation_path(reports, "2026-11-20") == new
    assert [p.name for p, _ in evaluations(reports)] == [new.name, "evaluation-2026-11-20.json"]
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_evaluation(reports, {"batch_date": "2026-11-20", "evaluation_run": "r2"})


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
