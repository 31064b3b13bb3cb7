"""The batch lane on real Spark (local), real Delta tables (delta-rs) and real MLflow (SQLite)."""

from __future__ import annotations

import csv
import json

import faiss
import numpy as np
import pyarrow as pa
import pytest

from freshrec.contracts.reports import latest_evaluation_path
from freshrec.storage.delta import DeltaStore
from recmodels.evaluation import top_k
from freshrec.interval import DataInterval
from freshrec.contracts.snapshot import Manifest, latest_snapshot
from freshrec.contracts.snapshot import load_snapshot
from serving.offline import recommend_to_csv
from spark_jobs import clean, features, ingest

pytestmark = pytest.mark.integration


def test_counts_balance_and_bad_rows_are_dead_lettered_with_reasons(lane):
    store = DeltaStore(lane["settings"])
    c = lane["results"]["clean"]
    assert c["raw"] == lane["synth"].n_events == store.count("events_raw")
    assert c["raw"] == c["clean"] + c["dead_letter"] + c["duplicates"]
    assert c["clean"] == store.count("events") and c["dead_letter"] == store.count("events_dead_letter")
    # every malformed row is in the dead-letter table (duplicated malformed rows too)
    assert c["dead_letter"] >= lane["synth"].n_malformed
    assert c["duplicates"] > 0
    reasons = set(store.read_arrow("events_dead_letter").column("reason").to_pylist())
    assert {"missing_user_id", "unparseable_ts", "unknown_event_type", "value_out_of_range",
            "id_too_long"} <= reasons
    ids = store.read_arrow("events", columns=["event_id"]).column("event_id")
    assert len(set(ids.to_pylist())) == len(ids)


def test_silver_is_typed_utc_and_weighted(lane):
    store = DeltaStore(lane["settings"])
    ev = store.read_arrow("events")
    assert ev.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    rows = ev.slice(0, 500).to_pylist()
    weights = lane["settings"].events.types
    for r in rows:
        expected = weights[r["event_type"]] * (r["value"] if r["event_type"] == "rating" else 1)
        assert r["weight"] == pytest.approx(expected)
    assert store.spec("events").change_data_feed
    from deltalake import DeltaTable
    assert DeltaTable(store.path("events")).metadata().configuration[
        "delta.enableChangeDataFeed"] == "true"


def test_validation_reasons_on_handmade_rows(spark, settings):
    rows = [
        ("e1", "u", "i", "view", None, "2026-11-01T00:00:00Z", None, "f:1", "f", "2026-11-27", None),
        ("e2", "", "i", "view", None, "2026-11-01T00:00:00Z", None, "f:2", "f", "2026-11-27", None),
        ("e3", "u", "i", "view", None, "tomorrow", None, "f:3", "f", "2026-11-27", None),
        ("e4", "u", "i", "view", None, "1989-01-01T00:00:00Z", None, "f:4", "f", "2026-11-27", None),
        ("e5", "u", "i", "view", None, "2031-01-01T00:00:00Z", None, "f:5", "f", "2026-11-27", None),
        ("e6", "u", "i", "hover", None, "2026-11-01T00:00:00Z", None, "f:6", "f", "2026-11-27", None),
        ("e7", "u", "i", "rating", "many", "2026-11-01T00:00:00Z", None, "f:7", "f", "2026-11-27", None),
        ("e8", "u", "i", "rating", "9", "2026-11-01T00:00:00Z", None, "f:8", "f", "2026-11-27", None),
        ("e9", "u", "i", "rating", "4", "1762000000", None, "f:9", "f", "2026-11-27", None),
    ]
    cols = ["event_id", "user_id", "item_id", "event_type", "value", "ts", "context", "raw_id",
            "source_file", "batch_date", "ingested_at"]
    df = spark.createDataFrame(rows, "event_id string, user_id string, item_id string, "
                               "event_type string, value string, ts string, context string, "
                               "raw_id string, source_file string, batch_date string, "
                               "ingested_at timestamp").select(*cols)
    out = {r["event_id"]: r for r in clean.validate(
        df, settings, DataInterval.for_day("2026-11-27")).collect()}
    assert out["e1"]["reason"] is None and out["e9"]["reason"] is None
    assert out["e9"]["weight"] == pytest.approx(4.0)
    assert [out[f"e{i}"]["reason"] for i in range(2, 9)] == [
        "missing_user_id", "unparseable_ts", "ts_too_old", "ts_in_future", "unknown_event_type",
        "bad_value", "value_out_of_range"]


def test_every_job_is_idempotent_per_interval(lane):
    settings, interval = lane["settings"], lane["interval"]
    store = DeltaStore(settings)
    before = store.versions()
    assert ingest.run(settings, interval)["rows"] == 0
    assert clean.run(settings, interval) == lane["results"]["clean"]
    features.run(settings, interval)
    assert store.versions() == before


def test_features_are_sane(lane):
    store = DeltaStore(lane["settings"])
    items = store.read_arrow("item_features").to_pylist()
    assert all(r["popularity_decayed"] <= r["popularity"] + 1e-9 for r in items)
    users = store.read_arrow("user_features").to_pylist()
    assert all(0 <= r["recency_days"] for r in users)
    top = max(users, key=lambda r: r["n_events"])
    scores = [a["score"] for a in top["category_affinities"]]
    # share of the user's event weight on items of each category (an item may have several)
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    nb = store.read_arrow("item_neighbors").to_pylist()
    assert nb and all(r["item_id"] != r["neighbor_id"] for r in nb)
    k = lane["settings"].features.neighbors_top_k
    per_item: dict[str, int] = {}
    for r in nb:
        per_item[r["item_id"]] = per_item.get(r["item_id"], 0) + 1
    assert max(per_item.values()) <= k


def test_evaluation_cf_beats_popularity_and_is_logged(lane):
    ev = lane["results"]["evaluate"]
    r = ev["results"]
    assert r["als"]["ndcg_at_10"] > 1.5 * r["most_popular"]["ndcg_at_10"]
    assert r["item_knn"]["ndcg_at_10"] > 1.5 * r["most_popular"]["ndcg_at_10"]
    for m in r.values():
        assert 0 <= m["recall_at_10"] <= m["recall_at_20"] <= 1
        assert 0 <= m["ndcg_at_10"] <= 1 and 0 <= m["hr_at_10"] <= m["hr_at_20"] <= 1
    report = latest_evaluation_path(lane["settings"].data_dir / "reports", lane["interval"].batch_date)
    assert report.name == f"evaluation-{lane['interval'].batch_date}-{ev['evaluation_run']}.json"
    assert json.loads(report.read_text())["results"] == json.loads(json.dumps(r))
    import mlflow

    mlflow.set_tracking_uri(lane["settings"].mlflow_tracking_uri)
    run = mlflow.search_runs(filter_string="tags.stage = 'evaluate'", output_format="list",
                             experiment_names=[lane["settings"].mlflow.experiment])[0]
    assert run.data.metrics["als.test_ndcg_at_10"] == pytest.approx(r["als"]["ndcg_at_10"])
    assert run.data.metrics["als.val_ndcg_at_10"] == pytest.approx(
        ev["validation"]["als"]["ndcg_at_10"])
    assert "als.ndcg_at_10" not in run.data.metrics  # every metric names its split
    arts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id)}
    assert {"evaluation.png", "evaluation_table.txt", "evaluation.json"} <= arts


def test_every_fit_is_a_run_with_params_metrics_versions_and_the_exported_model(lane):
    import mlflow

    ev = lane["results"]["evaluate"]
    mlflow.set_tracking_uri(lane["settings"].mlflow_tracking_uri)
    for name, run_id in ev["runs"].items():
        run = mlflow.get_run(run_id)
        assert run.data.tags["model"] == name and run.data.tags["stage"] == "fit"
        assert run.data.tags["mlflow.parentRunId"] == ev["evaluation_run"]
        assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(ev["results"][name]["ndcg_at_10"])
        assert run.data.metrics["val_ndcg_at_10"] == pytest.approx(
            ev["validation"][name]["ndcg_at_10"])
        assert run.data.params["delta_version.events"] == str(ev["delta_versions"]["events"])
        arts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path="model")}
        assert "model/MLmodel" in arts  # a pyfunc model, with the freshrec artifact inside
        assert ev["model_uris"][name].startswith("models:/")


def test_the_registered_model_is_refit_on_every_event_of_the_interval(lane):
    """The gate registers the candidate refitted on all of the interval's events, not its fit on
    the split's training part: the served model knows each user's newest events (which the split
    held out), while its metrics are still those measured on the split."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from freshrec.storage.delta import DeltaStore
    from freshrec.contracts.registry import RETRIEVAL
    from recmodels.pyfunc import FreshrecPyfunc

    ev, gate = lane["results"]["evaluate"], lane["results"]["gate"]
    best = gate["candidate"]
    refit = ev["refit"][best]
    events = DeltaStore(lane["settings"]).read_arrow(
        "events", columns=["user_id", "item_id", "ts"]).to_pandas()
    assert refit["n_events"] == len(events)
    mlflow.set_tracking_uri(lane["settings"].mlflow_tracking_uri)
    version = MlflowClient().get_model_version(RETRIEVAL, str(gate["version"]))
    assert version.run_id == refit["run"] != ev["runs"][best]
    run = mlflow.get_run(refit["run"])
    assert run.data.tags["stage"] == "refit" and run.data.tags["refit_of"] == ev["runs"][best]
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(ev["results"][best]["ndcg_at_10"])

    def histories(uri):
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        assert isinstance(model, FreshrecPyfunc)
        return model.users, model.model.item_ids

    newest = events.sort_values("ts").groupby("user_id").tail(1)
    for uri, knows_newest in ((refit["model_uri"], True), (refit["split_model_uri"], False)):
        users, item_ids = histories(uri)
        pos = {str(i): n for n, i in enumerate(item_ids)}
        known = 0
        for u, i in zip(newest["user_id"], newest["item_id"]):
            inp = users.user_input(u)
            known += int(i in pos and pos[i] in set(inp.items.tolist()))
        # the split held out each user's newest events; the refit saw all of them
        if knows_newest:
            assert known == len(newest)
        else:
            assert known < 0.5 * len(newest)


def test_the_champion_loads_as_a_pyfunc_model_in_a_fresh_interpreter(lane, tmp_path):
    """mlflow.pyfunc.load_model("models:/freshrec-retrieval@champion").predict(user ids) returns
    top-k items, from another directory, without the lanes on the path."""
    import json
    import subprocess
    import sys

    from freshrec.storage.delta import DeltaStore

    users = DeltaStore(lane["settings"]).read_arrow("events", columns=["user_id"]) \
        .column("user_id").to_pylist()[:2]
    code = ("import json, sys, mlflow, pandas as pd\n"
            f"mlflow.set_tracking_uri({lane['settings'].mlflow_tracking_uri!r})\n"
            "m = mlflow.pyfunc.load_model('models:/freshrec-retrieval@champion')\n"
            "out = m.predict(pd.DataFrame({'user_id': json.loads(sys.argv[1])}), params={'k': 5})\n"
            "print(out.to_json(orient='records'))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(users)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["user_id"] for r in rows] == [users[0]] * 5 + [users[1]] * 5
    assert [r["rank"] for r in rows[:5]] == [1, 2, 3, 4, 5]
    seen = set(DeltaStore(lane["settings"]).read_arrow("events", columns=["user_id", "item_id"])
               .to_pandas().query("user_id == @users[0]")["item_id"])
    assert len({r["item_id"] for r in rows[:5]}) == 5
    scores = [r["score"] for r in rows[:5]]
    assert scores == sorted(scores, reverse=True)
    assert len(seen) > 0


def test_gate_promotes_the_best_model_and_keeps_a_loser_visible(lane, tmp_path):
    """The lane's gate made the best evaluated model @champion. A later evaluation whose best is
    worse (popularity only) is registered but not promoted, and says why; re-running the gate
    changes nothing."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from freshrec.contracts.registry import RETRIEVAL
    from spark_jobs import evaluate, gate
    from tests.conftest import small_settings

    first = lane["results"]["gate"]
    results = lane["results"]["evaluate"]["validation"]  # the gate decides on validation
    best = max(results, key=lambda m: results[m]["ndcg_at_10"])
    assert first["candidate"] == best and first["promoted"] and first["reason"] == "no champion yet"
    shutil.copytree(lane["settings"].data_dir, tmp_path / "data")
    settings = small_settings(tmp_path / "data")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    champ = client.get_model_version_by_alias(RETRIEVAL, "champion")
    assert str(champ.version) == first["version"] and champ.tags["model"] == best

    evaluate.run(settings, lane["interval"], ["most_popular", "trending"])
    second = gate.run(settings, lane["interval"])
    assert not second["promoted"] and second["candidate"] in ("most_popular", "trending")
    assert "does not beat champion" in second["reason"]
    assert second["champion_metric_source"] == "recorded at its promotion"
    assert str(client.get_model_version_by_alias(RETRIEVAL, "champion").version) == first["version"]
    loser = client.get_model_version(RETRIEVAL, second["version"])
    assert loser.tags["gate"] == "rejected" and mlflow.get_run(loser.run_id).data.metrics
    # re-running the interval registers nothing new
    n_versions = len(client.search_model_versions(f"name = '{RETRIEVAL}'"))
    again = gate.run(settings, lane["interval"])
    assert again["version"] == second["version"] and not again["promoted"]
    evaluate.run(settings, lane["interval"], ["most_popular", "trending"])
    assert gate.run(settings, lane["interval"])["version"] == second["version"]
    assert len(client.search_model_versions(f"name = '{RETRIEVAL}'")) == n_versions

    # the champion's own method refitted on this split (the next day's interval: same data) is
    # compared on the same split
    evaluate.run(settings, DataInterval.for_day("2026-11-28"), [best, "most_popular"])
    third = gate.run(settings, DataInterval.for_day("2026-11-28"))
    assert third["champion_metric_source"] == "same split" and not third["promoted"]
    assert third["candidate_metric"] == pytest.approx(third["champion_metric"])


def test_snapshot_is_the_champion_and_self_contained(lane):
    """The snapshot holds the registered champion's artifact, its catalog, every user's history as
    in silver events, and (embedding models) an index that finds what exact search finds."""
    from freshrec.contracts.snapshot import USERS_FILE
    from recmodels.servable import load

    settings = lane["settings"]
    snap = latest_snapshot(settings.snapshots_dir)
    index, item_ids, manifest = load_snapshot(snap)
    gate = lane["results"]["gate"]
    assert manifest == Manifest.read(snap)
    assert manifest.model_version == f"freshrec-retrieval/{gate['version']} {gate['candidate']}"
    assert manifest.registry_version == int(gate["version"])
    model = load(snap / "model")
    assert [str(i) for i in model.item_ids] == item_ids == json.loads((snap / "item_ids.json").read_text())
    assert manifest.delta_versions["events"] == DeltaStore(settings).version("events")
    users = np.load(snap / USERS_FILE)
    ev = DeltaStore(settings).read_arrow("events", columns=["user_id", "item_id"]).to_pandas()
    u = str(users["user_ids"][0])
    row = 0
    got = {item_ids[i] for i in users["items"][users["indptr"][row]:users["indptr"][row + 1]]}
    assert got == set(ev.loc[ev["user_id"] == u, "item_id"]) & set(item_ids)
    if manifest.kind == "embedding":
        vecs = model.item_vectors()
        assert manifest.index_type == "flat" and index.ntotal <= len(item_ids)
        inactive = set(json.loads((snap / "items.json").read_text())["inactive"])
        q = vecs[:3]
        _, got_ids = index.search(q, 5)
        exact = q @ vecs.T
        exact[:, [item_ids.index(i) for i in inactive]] = -np.inf
        want = top_k(exact, 5)
        assert got_ids.tolist() == want.tolist()
    else:  # scored over histories: no snapshot index; the manifest names the model's retrieval
        assert index is None and manifest.index_type == model.index_type
        assert manifest.index_type in ("neighbour-lists", "sparse", "ranked-list") \
            or manifest.index_type.startswith("two-stage: ")


def test_ivf_index_above_the_exact_threshold(settings):
    from nearline.snapshots import build_index

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 16)).astype(np.float32)
    vecs = (centers[rng.integers(0, 20, 3000)] + 0.1 * rng.normal(size=(3000, 16))).astype(np.float32)
    cfg = settings.index.model_copy(update={"exact_max_items": 1000})
    index, kind, params = build_index(vecs, cfg)
    assert kind == "ivf" and params["nlist"] > 1
    exact = faiss.IndexFlatIP(16)
    exact.add(vecs)
    _, a = index.search(vecs[:50], 10)
    _, b = exact.search(vecs[:50], 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    assert recall > 0.9


def test_recommend_csv_excludes_seen_items_and_falls_back_for_strangers(lane, tmp_path):
    settings = lane["settings"]
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\nsomeone-new\n")
    out = tmp_path / "recs.csv"
    summary = recommend_to_csv(settings, users, 5, out)
    gate = lane["results"]["gate"]
    assert summary == {"users": 3, "cold_start_fallbacks": 1, "rows": 15, "model_version":
                       f"freshrec-retrieval/{gate['version']} {gate['candidate']}"}
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["user_id", "rank", "item_id", "score"]
    from freshrec.privacy.pseudonyms import pseudonymize
    store = DeltaStore(settings)
    seen = {r["item_id"] for r in store.read_arrow("events").to_pylist()
            if r["user_id"] == pseudonymize("u1", settings.privacy.hmac_key)}
    recs_u1 = [r["item_id"] for r in rows if r["user_id"] == "u1"]
    assert len(recs_u1) == 5 and not (set(recs_u1) & seen)
    assert [int(r["rank"]) for r in rows if r["user_id"] == "u2"] == [1, 2, 3, 4, 5]


def test_evaluate_compares_any_set_of_models_in_one_table(lane, tmp_path):
    import shutil

    from spark_jobs import evaluate
    from tests.conftest import small_settings

    shutil.copytree(lane["settings"].data_dir, tmp_path / "data")
    settings = small_settings(tmp_path / "data")
    out = evaluate.run(settings, lane["interval"],
                       ["trending", "user_knn", "content", "pure_svd", "ease"])
    assert set(out["results"]) == {"trending", "user_knn", "content", "pure_svd", "ease"}
    for name in ("user_knn", "pure_svd", "ease"):
        assert out["results"][name]["ndcg_at_10"] > out["results"]["trending"]["ndcg_at_10"]
    assert all(name in out["table"] for name in out["results"])
    with pytest.raises(ValueError, match="unknown model"):
        evaluate.run(settings, lane["interval"], ["nope"])
    tiny = small_settings(tmp_path / "data", evaluation={"ks": [10, 20]}, models={"ease": {"max_items": 10}})
    out = evaluate.run(tiny, lane["interval"], ["ease", "trending"])
    assert "ease" in out["skipped"] and "max_items" in out["skipped"]["ease"]
    assert "skipped" in out["table"]


def test_recommend_cli_writes_what_is_served(lane, tmp_path):
    """`freshrec recommend --users FILE --output CSV` (offline) answers with the served version."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "users.txt").write_text("u1\nu2\n")
    out = tmp_path / "recs.csv"
    r = subprocess.run([sys.executable, "-m", "freshrec.cli.main", "recommend", "--users",
                        str(tmp_path / "users.txt"), "--k", "3", "--output", str(out)],
                       env={**os.environ, "FRESHREC_DATA_DIR": str(lane["settings"].data_dir),
                            "PYTHONPATH": str(root)}, cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    gate = lane["results"]["gate"]
    assert f"from freshrec-retrieval/{gate['version']} {gate['candidate']}" in r.stdout
    assert len(list(csv.DictReader(out.open()))) == 6
