"""A/B experiments and online monitoring: sticky arms over real gRPC on two servers, one model
version per arm, deltas reaching every arm, per-arm metrics from hand-made ``feedback`` rows, the
online gate, the refusals of a bad experiment, drift gauges and the alert rules file."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
import yaml

from freshrec.contracts import online
from freshrec.storage.delta import DeltaStore
from freshrec.contracts.experiments import Assigner, ExperimentError
from freshrec.contracts.reports import latest_evaluation
from freshrec.privacy.pseudonyms import pseudonymize
from freshrec.settings import PROJECT_ROOT, ExperimentSettings, SettingsError
from tests.conftest import register_fit, small_settings

TWO_ARMS = {"name": "ranker-test", "salt": "s1",
            "arms": [{"name": "control", "model": "champion", "share": 0.5},
                     {"name": "challenger", "model": "challenger", "share": 0.5}]}


# ---- assignment ---------------------------------------------------------------------------------
def test_assignment_is_sticky_deterministic_and_respects_shares():
    exp = ExperimentSettings(name="e", salt="salt-1", arms=[
        {"name": "a", "model": "champion", "share": 0.2},
        {"name": "b", "model": "3", "share": 0.3},
        {"name": "c", "model": "4", "share": 0.5}])
    one, two = Assigner(exp), Assigner(exp)  # two "replicas" or a restart: no shared state
    users = [f"user-{i}" for i in range(100_000)]
    arms = [one.arm(u).name for u in users]
    assert arms == [two.arm(u).name for u in users]
    assert arms[:50] == [one.arm(u).name for u in users[:50]]  # repeated requests
    share = Counter(arms)
    for name, want in (("a", 0.2), ("b", 0.3), ("c", 0.5)):
        assert abs(share[name] / len(users) - want) < 0.01, share
    resalted = Assigner(exp.model_copy(update={"salt": "salt-2"}))
    moved = sum(a != resalted.arm(u).name for a, u in zip(arms, users))
    assert moved > 40_000  # a new salt reshuffles (~62% move between 3 arms of these shares)


def test_shares_that_do_not_sum_to_one_are_refused_naming_the_arms(tmp_path):
    bad = {"name": "x", "arms": [{"name": "control", "model": "champion", "share": 0.5},
                                 {"name": "challenger", "model": "7", "share": 0.4}]}
    with pytest.raises(SettingsError) as e:
        small_settings(tmp_path / "d", serving={"experiment": bad})
    msg = str(e.value)
    assert "serving.experiment" in msg and "sum to 0.9" in msg
    assert "control 0.5" in msg and "challenger 0.4" in msg
    dup = {"arms": [{"name": "a", "model": "1", "share": 0.5}, {"name": "a", "model": "2", "share": 0.5}]}
    with pytest.raises(SettingsError, match="repeated: a"):
        small_settings(tmp_path / "d", serving={"experiment": dup})


# ---- per-arm metrics ----------------------------------------------------------------------------
def _slates(arm, version, n_slates, items_of, clicks, ts, prefix):
    """Feedback rows: ``n_slates`` slates of 10 items; ``clicks`` = {(slate, position)}."""
    rows = []
    for s in range(n_slates):
        for p, item in enumerate(items_of(s)):
            hit = (s, p) in clicks
            rows.append({"request_id": f"{prefix}-{s}", "user_id": f"u{prefix}{s}",
                         "model_version": version, "arm": arm, "item_id": item, "position": p,
                         "score": 1.0 - p / 10, "propensity": 1.0, "clicked": hit,
                         "reward": 2.0 if hit else 0.0, "impression_ts": ts,
                         "event_id": f"e-{prefix}-{s}-{p}" if hit else None,
                         "event_type": "click" if hit else None,
                         "event_ts": ts + timedelta(minutes=1) if hit else None, "organic": False,
                         "batch_date": ts.strftime("%Y-%m-%d")})
    return rows


def write_feedback(settings, control_version, challenger_version, worse=False):
    """Control: 10 slates showing the same 10 items, 10 clicks (slates 0-4, positions 1 and 5).
    Challenger: 10 slates of distinct items, 20 clicks (every slate, positions 0 and 9). Plus an
    organic click and an impression too old to count. ``worse`` swaps the click patterns."""
    now = datetime.now(timezone.utc)
    few = {(s, p) for s in range(5) for p in (1, 5)}
    many = {(s, p) for s in range(10) for p in (0, 9)}
    rows = _slates("control", control_version, 10, lambda s: [f"i{j}" for j in range(10)],
                   many if worse else few, now, "c")
    rows += _slates("challenger", challenger_version, 10,
                    lambda s: [f"i{s * 10 + j}" for j in range(10)], few if worse else many, now, "x")
    rows += _slates("control", control_version, 3, lambda s: ["old"] * 10, {(0, 0)},
                    now - timedelta(days=60), "old")
    organic = dict(rows[0], request_id=None, organic=True, clicked=True, item_id="i150")
    DeltaStore(settings).write_arrow("feedback", pa.Table.from_pylist(rows + [organic]))


def test_per_arm_ctr_hit_rate_coverage_and_test_are_the_hand_computed_values(tmp_path):
    settings = small_settings(tmp_path / "d", serving={"experiment": TWO_ARMS},
                              online={"hit_rate_k": 3})
    write_feedback(settings, "freshrec-retrieval/1 als", "freshrec-retrieval/2 item_knn")
    r = online.compute(settings, catalog=200)
    by = {a["arm"]: a for a in r["arms"]}
    c, x = by["control"], by["challenger"]
    assert (c["impressions"], c["clicks"], x["impressions"], x["clicks"]) == (100, 10, 100, 20)
    assert c["ctr"] == 0.1 and x["ctr"] == 0.2
    # Wilson 95%: 10/100 -> [0.0552, 0.1744], 20/100 -> [0.1334, 0.2888]
    assert c["ctr_ci"] == pytest.approx([0.05523, 0.17437], abs=5e-5)
    assert x["ctr_ci"] == pytest.approx([0.13337, 0.28883], abs=5e-5)
    # hit-rate@3: control 5 of 10 slates (a click at position 1), challenger 10 of 10 (position 0)
    assert (c["hit_rate"], x["hit_rate"]) == (0.5, 1.0)
    assert c["hit_rate_ci"] == pytest.approx([0.23659, 0.76341], abs=5e-5)
    assert x["hit_rate_ci"] == pytest.approx([0.72249, 1.0], abs=5e-5)
    # coverage: 10 and 100 distinct items of 200; every control slate is the same: no spread
    assert (c["coverage"], x["coverage"]) == (0.05, 0.5)
    assert c["coverage_ci"] == pytest.approx([0.05, 0.05])
    lo, hi = x["coverage_ci"]
    assert lo < 0.5 < hi and hi - lo < 0.5
    # pooled z-test, 0.2 vs 0.1 on 100 each: z = 0.1 / sqrt(0.15 * 0.85 * 0.02) = 1.9803
    (t,) = r["tests"]
    assert (t["arm"], t["control"]) == ("challenger", "control")
    assert t["z"] == pytest.approx(1.9803, abs=1e-4)
    assert t["p_one_sided"] == pytest.approx(0.02383, abs=1e-4)
    assert t["p_two_sided"] == pytest.approx(0.04767, abs=1e-4)
    text = online.render(r)
    assert "0.1000 [0.0552, 0.1744]" in text and "0.2000 [0.1334, 0.2888]" in text


def test_report_online_prints_the_table_and_records_an_mlflow_run(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from freshrec.cli.main import main
    from freshrec.tracking import mlflow_for

    data = tmp_path / "d"
    settings = small_settings(data, serving={"experiment": TWO_ARMS})
    write_feedback(settings, "freshrec-retrieval/1 als", "freshrec-retrieval/2 item_knn")
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(data))
    monkeypatch.setenv("FRESHREC__SERVING__EXPERIMENT", yaml.safe_dump(TWO_ARMS, default_flow_style=True))
    assert main(["report", "--online", "--replica", "127.0.0.1:1"]) == 0
    out = capsys.readouterr().out
    assert "challenger vs control: CTR diff +0.1000, z 1.980" in out
    assert "127.0.0.1:1: no answer (UNAVAILABLE)" in out
    mlflow_for(settings, settings.online.experiment)
    (run,) = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name(settings.online.experiment).experiment_id])
    assert run.data.metrics["challenger.ctr"] == 0.2 and run.data.metrics["control.ctr"] == 0.1
    assert run.data.metrics["control.ctr_lower"] == pytest.approx(0.05523, abs=5e-5)
    arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"ctr_by_arm.png", "online.json", "online.txt"} <= arts
    png = MlflowClient().download_artifacts(run.info.run_id, "ctr_by_arm.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the file the server exports as CTR gauges
    latest = yaml.safe_load((data / "reports" / "online-latest.json").read_text())
    assert {(a["arm"], a["ctr"]) for a in latest["arms"]} == {("control", 0.1), ("challenger", 0.2)}


# ---- serving with arms (registry + lane) ---------------------------------------------------------
@pytest.fixture(scope="module")
def ab(lane, tmp_path_factory):
    """Two servers on one copy of the lane's data with a 50/50 experiment: control on @champion
    (ALS), challenger on @challenger (item-kNN)."""
    from mlflow.tracking import MlflowClient

    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for
    from freshrec.api.client import Client
    from serving.server import FreshrecServer

    root = tmp_path_factory.mktemp("ab")
    shutil.copytree(lane["settings"].data_dir, root / "data")
    base = small_settings(root / "data")
    versions = {m: register_fit(base, m) for m in ("als", "item_knn", "most_popular")}
    mlflow_for(base)
    registry.set_alias(versions["als"])
    MlflowClient().set_registered_model_alias(registry.RETRIEVAL, "challenger",
                                              str(versions["item_knn"]))
    settings = small_settings(root / "data", serving={
        "port": 0, "metrics_port": -1, "wal_flush_seconds": 3600, "experiment": TWO_ARMS,
        "monitor": {"sample_every": 1, "reference_users": 50}})
    from nearline.snapshots import ensure_served

    ensure_served(settings)  # as `freshrec serve` does: the servers only load snapshots
    servers = [FreshrecServer(settings, use_gpu=False) for _ in range(2)]
    addrs = [f"127.0.0.1:{s.start()}" for s in servers]
    settings = settings.model_copy(update={"refresher": settings.refresher.model_copy(
        update={"replicas": addrs, "retries": 0, "backoff_seconds": 0.01})})
    yield {"settings": settings, "servers": servers, "addrs": addrs, "versions": versions,
           "admin": [Client(a, "dev-admin-token") for a in addrs],
           "client": [Client(a, "dev-client-token") for a in addrs]}
    for s in servers:
        s.stop(grace=0)


def _label(ab, model):
    return f"freshrec-retrieval/{ab['versions'][model]} {model}"


def test_each_user_keeps_one_arm_on_every_request_and_replica_and_gets_its_model(ab):
    settings = ab["settings"]
    assigner = Assigner(settings.serving.experiment)
    want_model = {"control": _label(ab, "als"), "challenger": _label(ab, "item_knn")}
    seen = Counter()
    for i in range(120):
        raw = f"u{i}"
        replies = [c.recommend(raw, 5) for c in ab["client"] for _ in range(2)]
        arms = {r.arm for r in replies}
        assert len(arms) == 1, (raw, arms)
        arm = arms.pop()
        assert arm == assigner.arm(pseudonymize(raw, settings.privacy.hmac_key)).name
        assert {r.model_version for r in replies} == {want_model[arm]}
        seen[arm] += 1
    assert 35 <= seen["control"] <= 85 and seen["control"] + seen["challenger"] == 120
    # counters per arm and version: every Recommend of server 0 (2 per user)
    served = {(s.labels["arm"], s.labels["model_version"]): s.value
              for m in ab["servers"][0].metrics.served.collect() for s in m.samples
              if s.name.endswith("_total")}
    assert served == {("control", want_model["control"]): 2 * seen["control"],
                      ("challenger", want_model["challenger"]): 2 * seen["challenger"]}
    st = ab["admin"][1].call_admin("Status", ab["admin"][1].admin_pb2.StatusRequest())
    assert st.experiment == "ranker-test" and st.model_version == want_model["control"]
    assert [(a.name, a.model, a.model_version, a.share) for a in st.arms] == [
        ("control", "champion", want_model["control"], 0.5),
        ("challenger", "challenger", want_model["challenger"], 0.5)]


def test_deltas_reach_every_arm_and_load_model_replaces_the_named_arm(ab):
    from nearline import refresher

    s, server = ab["settings"], ab["servers"][0]
    control, challenger = server.arms[0].state, server.arms[1].state
    assert control is not challenger
    raw = next(f"u{i}" for i in range(2000)
               if pseudonymize(f"u{i}", s.privacy.hmac_key) in control.user_rows)
    user = pseudonymize(raw, s.privacy.hmac_key)
    new = [i for i in control.popular if i not in control.seen.get(user, ())][30:33]
    n = len(new)
    DeltaStore(s).write_arrow("events", pa.table({
        "event_id": [f"ab-{i}" for i in range(n)], "user_id": [user] * n, "item_id": new,
        "event_type": ["purchase"] * n, "value": pa.nulls(n, pa.float64()),
        "weight": [s.events.types["purchase"]] * n,
        "ts": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        "context": pa.nulls(n, pa.string()), "raw_id": [f"ab:{i}" for i in range(n)],
        "source_file": ["test"] * n, "batch_date": ["2026-11-28"] * n,
        "ingested_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC"))}))
    report = refresher.refresh_once(s)
    assert set(report["models"]) == {_label(ab, "als"), _label(ab, "item_knn")}
    for state in (control, challenger):  # histories are model-independent: both arms have them
        assert set(new) <= state.seen.get(user, set())
        assert state.delta_versions["events"] == DeltaStore(s).version("events")
    # LoadModel with an arm replaces that arm; without one, the control (what rollout relies on)
    admin, pb = ab["admin"][0], ab["admin"][0].admin_pb2
    r = admin.call_admin("LoadModel", pb.LoadModelRequest(model=str(ab["versions"]["most_popular"]),
                                                           arm="challenger"))
    assert (r.arm, r.model_version, r.previous_model_version) == (
        "challenger", _label(ab, "most_popular"), _label(ab, "item_knn"))
    st = admin.call_admin("Status", pb.StatusRequest())
    assert st.model_version == _label(ab, "als")
    assert [a.model_version for a in st.arms] == [_label(ab, "als"), _label(ab, "most_popular")]
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        admin.call_admin("LoadModel", pb.LoadModelRequest(model="1", arm="nope"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "arms: control, challenger" in \
        e.value.details()
    r = admin.call_admin("LoadModel", pb.LoadModelRequest())  # every arm from the settings again
    assert [a.state.model_version for a in server.arms] == [_label(ab, "als"), _label(ab, "item_knn")]


def test_an_arm_naming_a_missing_model_is_refused_at_start(ab):
    from serving.server import FreshrecServer

    bad = {**TWO_ARMS, "arms": [TWO_ARMS["arms"][0], {"name": "challenger", "model": "999",
                                                       "share": 0.5}]}
    settings = small_settings(ab["settings"].data_dir, serving={"port": 0, "metrics_port": -1,
                                                                 "experiment": bad})
    server = FreshrecServer(settings, use_gpu=False)
    with pytest.raises(ExperimentError) as e:
        server.start()
    msg = str(e.value)
    assert "\n" not in msg and "arm 'challenger'" in msg and "'999'" in msg
    assert server._server is None  # nothing was bound


def test_drift_gauges_follow_served_slates_and_alert_rules_name_exported_metrics(ab):
    from prometheus_client import generate_latest

    server, s = ab["servers"][1], ab["settings"]
    arm = server.arms[0]  # control, ALS
    ref = arm.monitor.reference
    assert ref is not None and ref.slates > 0
    # the reference users' own slates, as served: no drift
    users = sorted(arm.state.user_rows)
    import numpy as np

    from serving.logic import Filters, recommend

    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(users), size=min(50, len(users)), replace=False))
    arm.monitor.window.clear()
    for r in pick:
        res = recommend(arm.state, users[r], 10, Filters(), {}, [], s.serving.overfetch)
        if not res.cold_start:
            arm.monitor.add([x.item_id for x in res.items], [x.score for x in res.items])
    now = server.update_monitor()["control"]
    assert now["score_drift"] == pytest.approx(0, abs=1e-9)
    assert now["popularity_drift"] == pytest.approx(0, abs=1e-9)
    # the top popular items leave the catalog: served slates no longer hold them
    top = list(arm.monitor.top)
    pb = ab["admin"][1].admin_pb2
    ab["admin"][1].call_admin("ApplyDeltas", pb.ApplyDeltasRequest(remove_items=top))
    arm.monitor.window.clear()
    key = s.privacy.hmac_key
    for i in range(400):
        raw = f"u{i}"
        if Assigner(s.serving.experiment).arm(pseudonymize(raw, key)).name == "control":
            ab["client"][1].recommend(raw, 10)
    now = server.update_monitor()["control"]
    assert now["popular_share"] == 0 and now["popularity_drift"] == pytest.approx(-ref.popular_share)
    assert ref.popular_share > 0.2
    text = generate_latest(server.metrics.registry).decode()
    label = f'arm="control",model_version="{_label(ab, "als")}"'
    (gauge,) = re.findall(rf"^freshrec_popularity_drift{{{re.escape(label)}}} (\S+)$", text, re.M)
    assert float(gauge) == pytest.approx(-ref.popular_share)
    st = ab["admin"][1].call_admin("Status", pb.StatusRequest())
    assert st.arms[0].popularity_drift == pytest.approx(-ref.popular_share)
    # CTR gauges: the latest online report, exported by the server
    write_feedback(s, _label(ab, "als"), _label(ab, "item_knn"))
    online.write_latest(s, online.compute(s))
    text = generate_latest(server.metrics.registry).decode()
    assert f'freshrec_online_ctr{{{label}}} 0.1' in text
    exported = set(re.findall(r"^(freshrec_\w+)", text, re.M))
    rules = yaml.safe_load((PROJECT_ROOT / "conf" / "alerts" / "freshrec-rules.yml").read_text())
    names = set()
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert rule["alert"] and re.fullmatch(r"\d+[smhd]", rule["for"])
            expr = rule["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]")
            used = set(re.findall(r"\bfreshrec_\w+", expr))
            assert used and used <= exported, (rule["alert"], used - exported)
            names.add(rule["alert"])
    assert {"FreshrecScoreDrift", "FreshrecPopularityDrift", "FreshrecCtrDrop"} <= names


# ---- the online gate ----------------------------------------------------------------------------
def test_online_gate_promotes_only_a_significant_winner_with_enough_impressions(ab, tmp_path, capsys,
                                                                                 monkeypatch):
    from mlflow.tracking import MlflowClient

    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for

    src = ab["settings"]
    data = tmp_path / "data"
    shutil.copytree(src.data_dir / "mlflow", data / "mlflow")  # the registry, not the servers'
    exp = {"experiment": TWO_ARMS}
    settings = small_settings(data, serving=exp, online={"min_impressions": 50})
    mlflow_for(settings)
    c, x = _label(ab, "als"), _label(ab, "item_knn")
    registry.set_alias(ab["versions"]["als"])
    MlflowClient().set_registered_model_alias(registry.RETRIEVAL, "challenger",
                                              str(ab["versions"]["item_knn"]))
    write_feedback(settings, c, x, worse=True)
    d = online.promote_online(settings)
    assert not d["promoted"] and "does not beat" in d["reason"]
    shutil.rmtree(settings.tables_dir / "feedback")
    write_feedback(settings, c, x)
    strict = small_settings(data, serving=exp, online={"min_impressions": 1000})
    d = online.promote_online(strict)
    assert not d["promoted"] and "not enough impressions" in d["reason"] and "1,000" in d["reason"]
    d = online.promote_online(small_settings(data, serving=exp, online={"min_impressions": 50,
                                                                        "alpha": 0.01}))
    assert not d["promoted"] and "not significantly" in d["reason"]
    from freshrec.cli.main import main

    monkeypatch.setenv("FRESHREC_DATA_DIR", str(data))
    monkeypatch.setenv("FRESHREC__SERVING__EXPERIMENT", yaml.safe_dump(TWO_ARMS, default_flow_style=True))
    assert main(["model", "promote-online", "--no-reload"]) == 0  # default: 1000 impressions
    out = capsys.readouterr().out
    assert f"control control {c}: CTR 0.1000 (10/100)" in out
    assert "not promoted: not enough impressions yet: control 100, challenger 100" in out
    assert registry.resolve("champion").version == ab["versions"]["als"]
    d = online.promote_online(settings)
    assert d["promoted"] and d["p_one_sided"] == pytest.approx(0.02383, abs=1e-4)
    champ = registry.resolve("champion")
    assert champ.version == ab["versions"]["item_knn"]
    assert champ.tags["previous_champion"] == str(ab["versions"]["als"])
    assert champ.tags["gate"] == "promoted-online"


def test_offline_gate_with_require_online_win_sets_the_challenger_not_the_champion(ab, tmp_path):
    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for

    data = tmp_path / "data"
    shutil.copytree(ab["settings"].data_dir / "mlflow", data / "mlflow")
    settings = small_settings(data, registry={"require_online_win": True})
    mlflow = mlflow_for(settings)
    registry.set_alias(ab["versions"]["most_popular"])
    _, summary = latest_evaluation(ab["settings"].data_dir / "reports", "2026-11-27")
    uri, run_id = summary["model_uris"]["ease"], summary["runs"]["ease"]
    g = registry.gate(mlflow, run_id, "ease", "val_ndcg_at_10", 0.99, lambda champion: 0.01,
                      name=registry.RETRIEVAL, model_uri=uri,
                      alias=settings.registry.challenger_alias)
    assert not g.promoted and "@challenger" in g.reason
    assert registry.resolve("champion").version == ab["versions"]["most_popular"]
    assert registry.resolve("challenger").version == int(g.version)
