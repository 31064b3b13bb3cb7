"""Serve what the registry promotes: every model kind registered, loaded by version over gRPC and
answering as the model ranks; freshness per kind; rollout and rollback over two replicas; a failed
load or rollout leaves the old model serving."""

from __future__ import annotations

import json
import os
import shutil

import grpc
import numpy as np
import pyarrow as pa
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.privacy.pseudonyms import pseudonymize
from freshrec.contracts.snapshot import MODEL_DIR, USERS_FILE, find_snapshot
from recmodels.servable import UserInput, load
from nearline import refresher
from nearline import rollout
from freshrec.api.client import Client
from serving.server import FreshrecServer
from tests.conftest import register_fit, small_settings

pytestmark = pytest.mark.integration
KINDS = ["most_popular", "item_knn", "user_knn", "ease", "content", "als", "hybrid"]


@pytest.fixture(scope="module")
def fleet(lane, tmp_path_factory):
    """Two replicas on one copy of the lane's data, each version of every kind registered."""
    root = tmp_path_factory.mktemp("fleet")
    shutil.copytree(lane["settings"].data_dir, root / "data")
    base = small_settings(root / "data")
    versions = {m: register_fit(base, m) for m in KINDS}
    settings = small_settings(root / "data", serving={"port": 0, "metrics_port": -1,
                                                      "wal_flush_seconds": 3600})
    servers = [FreshrecServer(settings, use_gpu=False) for _ in range(2)]
    addrs = [f"127.0.0.1:{s.start()}" for s in servers]
    settings = settings.model_copy(update={"refresher": settings.refresher.model_copy(
        update={"replicas": addrs, "retries": 0, "backoff_seconds": 0.01})})
    yield {"settings": settings, "servers": servers, "addrs": addrs, "versions": versions,
           "admin": [Client(a, "dev-admin-token") for a in addrs],
           "client": [Client(a, "dev-client-token") for a in addrs]}
    for s in servers:
        s.stop(grace=0)


def _status(admin) -> str:
    return admin.call_admin("Status", admin.admin_pb2.StatusRequest()).model_version


def _load(admin, version) -> str:
    return admin.call_admin("LoadModel", admin.admin_pb2.LoadModelRequest(model=str(version))) \
        .model_version


def _known_users(settings, n: int = 3) -> list[str]:
    key = settings.privacy.hmac_key
    users = set(DeltaStore(settings).read_arrow("events", columns=["user_id"]).column("user_id")
                .to_pylist())
    return [f"u{i}" for i in range(2000) if pseudonymize(f"u{i}", key) in users][:n]


def _expected(snapshot, user: UserInput | str, k: int):
    """The model's own ranking from the snapshot's files: what a client must be served."""
    model = load(snapshot / MODEL_DIR)
    ids = [str(i) for i in model.item_ids]
    inactive = set(json.loads((snapshot / "items.json").read_text())["inactive"])
    allowed = np.array([i not in inactive for i in ids])
    if isinstance(user, str):
        z = np.load(snapshot / USERS_FILE)
        r = list(z["user_ids"]).index(user)
        lo, hi = z["indptr"][r], z["indptr"][r + 1]
        rlo, rhi = z["recent_indptr"][r], z["recent_indptr"][r + 1]
        user = UserInput(user, z["items"][lo:hi], z["weights"][lo:hi], z["recent"][rlo:rhi],
                         fresh=model.kind == "embedding")
    top, scores = model.recommend([user], k, allowed=allowed)
    return [ids[i] for i in top[0] if i >= 0], scores[0]


def _same_ranking(got, want_ids, want_scores) -> None:
    got_ids = [i.item_id for i in got.items]
    np.testing.assert_allclose([i.score for i in got.items], want_scores[:len(got_ids)],
                               rtol=1e-4, atol=1e-4)
    # ties may come in either order; everything else in the model's order
    assert len(got_ids) == len(want_ids) and (
        got_ids == want_ids or sorted(got_ids) == sorted(want_ids)
        or np.allclose(np.diff(want_scores[:len(got_ids)]), 0, atol=1e-6)), (got_ids, want_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_is_loaded_by_version_and_served_as_it_ranks(fleet, kind):
    admin, client = fleet["admin"][0], fleet["client"][0]
    version = fleet["versions"][kind]
    label = f"freshrec-retrieval/{version} {kind}"
    assert _load(admin, version) == label and _status(admin) == label
    snapshot = find_snapshot(fleet["settings"].snapshots_dir, version)
    key = fleet["settings"].privacy.hmac_key
    for raw in _known_users(fleet["settings"]):
        reply = client.recommend(raw, 10)
        assert reply.model_version == label and not reply.cold_start
        assert all(i.source == kind for i in reply.items)
        want_ids, want_scores = _expected(snapshot, pseudonymize(raw, key), 10)
        _same_ranking(reply, want_ids, want_scores)
    similar = client.similar(reply.items[0].item_id, 5)
    assert similar.model_version == label and len(similar.items) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_a_users_own_events_count_at_their_next_request_for_every_kind(fleet, kind):
    """RecordEvents on a replica: the next Recommend is the model's ranking for that history."""
    admin, client = fleet["admin"][0], fleet["client"][0]
    version = fleet["versions"][kind]
    _load(admin, version)
    state = fleet["servers"][0].state
    user = f"fresh-{kind}"
    assert client.recommend(user, 10).cold_start
    liked = [i for i in state.popular if state.categories.get(i)][5:8]
    assert client.record([{"user_id": user, "item_id": i, "event_type": "purchase"}
                          for i in liked]).accepted == 3
    after = client.recommend(user, 10)
    assert not after.cold_start and all(i.source == kind for i in after.items)
    assert not {i.item_id for i in after.items} & set(liked)
    pos = [state.items.position[i] for i in liked]
    w = fleet["settings"].events.types["purchase"]
    ui = UserInput(pseudonymize(user, fleet["settings"].privacy.hmac_key), np.array(pos),
                   np.full(3, w, np.float32), np.array(pos), fresh=True)
    want_ids, want_scores = _expected(state.path, ui, 10)
    _same_ranking(after, want_ids, want_scores)


def test_the_refresher_follows_a_history_model(fleet):
    """A replica serving item-kNN: new events in silver reach the user at the next round."""
    s = fleet["settings"]
    version = fleet["versions"]["item_knn"]
    for a in fleet["admin"]:
        _load(a, version)
    state = fleet["servers"][1].state
    raw = _known_users(s, 1)[0]
    user = pseudonymize(raw, s.privacy.hmac_key)
    before = [i.item_id for i in fleet["client"][1].recommend(raw, 10).items]
    new_items = [i for i in state.popular if i not in state.seen.get(user, ())][20:24]
    n = len(new_items)
    weight = s.events.types["purchase"]
    DeltaStore(s).write_arrow("events", pa.table({
        "event_id": [f"rf-{i}" for i in range(n)], "user_id": [user] * n, "item_id": new_items,
        "event_type": ["purchase"] * n, "value": pa.nulls(n, pa.float64()), "weight": [weight] * n,
        "ts": pa.array([state.loaded_at * 1e6] * n, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "context": pa.nulls(n, pa.string()), "raw_id": [f"rf:{i}" for i in range(n)],
        "batch_date": ["2026-11-28"] * n}))
    report = refresher.refresh_once(s)
    assert report["users"] >= 1 and report["models"] == [f"freshrec-retrieval/{version} item_knn"]
    after = fleet["client"][1].recommend(raw, 10)
    assert not {i.item_id for i in after.items} & set(new_items)  # now seen
    items, weights, _ = state.history(user)
    assert {state.catalog[i] for i in items} >= set(new_items)
    want_ids, want_scores = _expected(state.path, UserInput(user, items, weights, None, True), 10)
    _same_ranking(after, want_ids, want_scores)
    assert [i.item_id for i in after.items] != before


def test_rollout_then_rollback_over_two_replicas(fleet):
    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for

    s = fleet["settings"]
    mlflow_for(s)
    old = registry.resolve("champion")
    new = fleet["versions"]["als"] if old.model != "als" else fleet["versions"]["item_knn"]
    for a in fleet["admin"]:
        _load(a, old.version)
    # a promotion (as the gate records it), then the rollout every promotion triggers
    from mlflow.tracking import MlflowClient

    MlflowClient().set_model_version_tag(registry.RETRIEVAL, str(new), "previous_champion",
                                         str(old.version))
    registry.set_alias(new)
    report = rollout.rollout(s, "champion")
    label = registry.resolve(new).label
    assert [r["after"] for r in report["replicas"]] == [label, label]
    assert [_status(a) for a in fleet["admin"]] == [label, label]
    assert {c.recommend("u1", 5).model_version for c in fleet["client"]} == {label}
    back = rollout.rollback(s)
    assert back["from"] == label and registry.resolve("champion").version == old.version
    assert [_status(a) for a in fleet["admin"]] == [old.label, old.label]


def test_a_failed_rollout_names_the_replica_and_the_others_keep_their_model(fleet):
    s = fleet["settings"]
    live = fleet["addrs"][0]
    old = _load(fleet["admin"][0], fleet["versions"]["ease"])
    target = fleet["versions"]["item_knn"]
    with pytest.raises(rollout.RolloutFailed, match=r"127\.0\.0\.1:1.*took it: " + live):
        rollout.rollout(s, target, replicas=[live, "127.0.0.1:1"])
    assert _status(fleet["admin"][0]) == f"freshrec-retrieval/{target} item_knn" != old


@pytest.mark.parametrize("damage", ["unknown_version", "corrupt_arrays", "missing_model_json",
                                    "catalog_mismatch"])
def test_bad_models_are_refused_with_the_file_named_and_the_old_model_keeps_serving(fleet, damage):
    admin, client = fleet["admin"][1], fleet["client"][1]
    serving = _load(admin, fleet["versions"]["most_popular"])
    s = fleet["settings"]
    version = fleet["versions"]["user_knn"]
    if damage == "unknown_version":
        version, expect = 999, "no version 999"
    else:
        from nearline.snapshots import build_snapshot

        snap = find_snapshot(s.snapshots_dir, version) or \
            build_snapshot(s, version, publish_latest=False)["snapshot"]
        broken = s.snapshots_dir / f"v{version}-broken-{damage}"
        shutil.copytree(snap, broken)
        os.utime(broken)  # the newest snapshot of this version (copytree keeps the old time)
        if damage == "corrupt_arrays":
            (broken / MODEL_DIR / "arrays.npz").write_bytes(b"\0" * 64)
            expect = "arrays.npz"
        elif damage == "missing_model_json":
            (broken / MODEL_DIR / "model.json").unlink()
            expect = "model.json is missing"
        else:
            ids = json.loads((broken / "item_ids.json").read_text())
            (broken / "item_ids.json").write_text(json.dumps(ids[::-1]))
            expect = "do not match"
    with pytest.raises(grpc.RpcError) as e:
        _load(admin, version)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expect in e.value.details()
    if damage != "unknown_version":
        shutil.rmtree(broken)
    assert _status(admin) == serving and client.recommend("u1", 3).model_version == serving


def test_similar_items_of_a_model_without_item_similarity_come_from_gold_item_neighbors(fleet):
    admin, client = fleet["admin"][0], fleet["client"][0]
    _load(admin, fleet["versions"]["most_popular"])
    state = fleet["servers"][0].state
    nb = DeltaStore(fleet["settings"]).read_arrow("item_neighbors").to_pandas()
    item = nb.groupby("item_id").size().idxmax()
    want = nb[nb["item_id"] == item].sort_values(["rank"])["neighbor_id"].tolist()
    want = [i for i in want if i in state.items.position][:5]
    got = client.similar(item, 5)
    assert [i.item_id for i in got.items] == want
    assert all(i.source == "item_neighbors" for i in got.items)
