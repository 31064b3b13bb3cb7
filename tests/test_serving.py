"""The gRPC server for real: 127.0.0.1, an ephemeral port, a real client, the batch lane's data."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.storage.delta import DeltaStore
from freshrec.privacy.pseudonyms import pseudonymize
from freshrec.api.client import Client
from recmodels.index import gpu_count
from serving.server import FreshrecServer
from tests.conftest import register_fit, small_settings

pytestmark = pytest.mark.integration
CLIENT, ADMIN = "dev-client-token", "dev-admin-token"


def _settings(lane, root, **serving):
    """A copy of the lane's data, serving its ALS fit (registered here, pinned by version): the
    vector checks below need an embedding model; tests/test_model_serving.py covers every kind."""
    shutil.copytree(lane["settings"].data_dir, root / "data")
    version = register_fit(small_settings(root / "data"), "als")
    return small_settings(root / "data", serving={"metrics_port": 0, "port": 0,
                                                  "wal_flush_seconds": 3600, "model": str(version),
                                                  **serving})


@pytest.fixture(scope="module")
def served(lane, tmp_path_factory):
    settings = _settings(lane, tmp_path_factory.mktemp("serve"))
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start(load=False)
    addr = f"127.0.0.1:{port}"
    yield {"server": server, "addr": addr, "settings": settings,
           "client": Client(addr, CLIENT), "admin": Client(addr, ADMIN)}
    server.stop(grace=1)


def _known_user(settings, skip: int = 0) -> tuple[str, str]:
    """A raw user id of the synthetic data that the model knows (the ``skip``-th such), and its
    pseudonym."""
    key = settings.privacy.hmac_key
    users = set(DeltaStore(settings).read_arrow("events", columns=["user_id"]).column("user_id")
                .to_pylist())
    for n in range(1000):
        if pseudonymize(f"u{n}", key) in users:
            if skip == 0:
                return f"u{n}", pseudonymize(f"u{n}", key)
            skip -= 1
    raise AssertionError("no known user")


def test_health_is_not_serving_until_a_snapshot_is_loaded(served):
    health = health_pb2_grpc.HealthStub(served["client"].channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="")).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        served["client"].recommend("u1", 5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    admin = served["admin"]
    reply = admin.call_admin("LoadSnapshot", admin.admin_pb2.LoadSnapshotRequest())
    assert reply.n_items > 0 and reply.model_version.startswith("freshrec-retrieval/")
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def live(served):
    if served["server"].state is None:
        served["server"].load()
    return served


def test_recommend_known_user_excludes_seen_and_names_sources(live):
    raw, user = _known_user(live["settings"])
    reply = live["client"].recommend(raw, 10, explain=True)
    assert len(reply.items) == 10 and not reply.cold_start
    assert reply.model_version == live["server"].state.model_version
    seen = live["server"].state.seen[user]
    assert not {i.item_id for i in reply.items} & seen
    assert all(i.source == "als" and i.explanation.startswith("similar to ")
               for i in reply.items)
    assert reply.model_version == f"freshrec-retrieval/{live['settings'].serving.model} als"
    scores = [i.score for i in reply.items]
    assert scores == sorted(scores, reverse=True)
    with_seen = live["client"].recommend(raw, 10, exclude_seen=False)
    vec = live["server"].state.user_vectors[user]
    assert [i.item_id for i in with_seen.items] == \
        [i for i, _ in live["server"].state.items.search(vec, 10)]


def test_filters_apply_before_the_cut(live):
    raw, _ = _known_user(live["settings"])
    state = live["server"].state
    cat = sorted(next(iter(state.categories.values())))[0]
    reply = live["client"].recommend(raw, 15, include_categories=[cat])
    assert len(reply.items) == 15
    assert all(cat in state.categories[i.item_id] for i in reply.items)
    first = live["client"].recommend(raw, 5)
    banned = [i.item_id for i in first.items]
    again = live["client"].recommend(raw, 5, exclude_items=banned)
    assert len(again.items) == 5 and not {i.item_id for i in again.items} & set(banned)


def test_cold_start_uses_context_then_popularity(live):
    state = live["server"].state
    cat = sorted(next(iter(state.categories.values())))[0]
    reply = live["client"].recommend("a-brand-new-user", 8, context={"categories": cat})
    assert reply.cold_start and len(reply.items) == 8
    assert reply.items[0].source == "content"
    assert all(cat in state.categories[i.item_id] for i in reply.items if i.source == "content")
    plain = live["client"].recommend("another-new-user", 3)
    assert [i.item_id for i in plain.items] == state.popular[:3]


def test_similar_items_and_not_found(live):
    item = live["server"].state.popular[0]
    reply = live["client"].similar(item, 5)
    assert len(reply.items) == 5 and item not in {i.item_id for i in reply.items}
    with pytest.raises(grpc.RpcError) as e:
        live["client"].similar("no-such-item", 5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("call,code", [
    (lambda c: c.recommend("u1", 0), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.recommend("u1", 10_000), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.recommend("", 5), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.recommend("x" * 500, 5), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.record([]), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_invalid_argument_with_a_message(live, call, code):
    with pytest.raises(grpc.RpcError) as e:
        call(live["client"])
    assert e.value.code() == code and e.value.details()


def test_auth_per_role(live):
    addr = live["addr"]
    for token in (None, "wrong-token"):
        with pytest.raises(grpc.RpcError) as e:
            Client(addr, token).recommend("u1", 3)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    c = live["client"]
    with pytest.raises(grpc.RpcError) as e:
        c.call_admin("Status", c.admin_pb2.StatusRequest())
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    a = live["admin"]
    status = a.call_admin("Status", a.admin_pb2.StatusRequest())
    assert status.index_size == live["server"].state.items.size and status.device == "cpu"
    assert status.delta_versions["events"] >= 0
    assert a.recommend("u1", 2).items  # admins may use the Recommender too


def test_record_events_is_durable_and_counts_at_the_next_request(live):
    raw, user = _known_user(live["settings"])
    before = live["client"].recommend(raw, 5)
    top = before.items[0].item_id
    reply = live["client"].record([
        {"user_id": raw, "item_id": top, "event_type": "purchase", "event_id": "grpc-1"},
        {"user_id": raw, "item_id": "i1", "event_type": "teleport"},
        {"user_id": "", "item_id": "i1", "event_type": "view"},
        {"user_id": raw, "item_id": "i1", "event_type": "rating", "value": 99.0},
    ])
    assert reply.accepted == 1
    assert [(r.index, r.reason.split()[0]) for r in reply.rejections] == [
        (1, "unknown"), (2, "user_id"), (3, "value")]
    wal = (live["server"].wal.dir / "open.jsonl").read_text()  # this process's own log
    assert "grpc-1" in wal and raw not in wal and user in wal  # durable and pseudonymized
    after = live["client"].recommend(raw, 5)
    assert top not in {i.item_id for i in after.items}  # cache invalidated, event counted
    landed = live["server"].wal.land()
    assert landed == 1 and not list((live["settings"].data_dir / "wal").rglob("sealed-*"))
    files = list((live["settings"].landing_dir / "events").rglob("wal*.parquet"))
    assert len(files) == 1


def test_a_new_users_own_events_count_at_their_next_request(live):
    state = live["server"].state
    c = live["client"]
    anchor = state.popular[0]
    # three items close to the anchor in the model's space: the user's fresh taste
    liked = [anchor] + [i.item_id for i in c.similar(anchor, 2).items]
    assert c.recommend("fresh-face", 10).cold_start
    reply = c.record([{"user_id": "fresh-face", "item_id": i, "event_type": "purchase"}
                      for i in liked])
    assert reply.accepted == 3
    after = c.recommend("fresh-face", 10)
    assert not after.cold_start and all(i.source == "als" for i in after.items)
    assert not {i.item_id for i in after.items} & set(liked)
    # the folded-in vector points where the liked items are
    centroid = np.mean([state.items.vector(i) for i in liked], axis=0)
    rec_scores = [float(state.items.vector(i.item_id) @ centroid) for i in after.items]
    pop_scores = [float(state.items.vector(i) @ centroid) for i in state.popular[1:11]]
    assert np.mean(rec_scores) > np.mean(pop_scores)


def test_apply_deltas_upserts_and_removals(live):
    a, c = live["admin"], live["client"]
    raw, user = _known_user(live["settings"], skip=1)  # one without events recorded here
    vec = live["server"].state.user_vectors[user]
    pb = a.admin_pb2
    a.call_admin("ApplyDeltas", pb.ApplyDeltasRequest(
        upsert_items=[pb.Vector(id="fresh-item", values=(vec * 100).tolist())]))
    assert c.recommend(raw, 3).items[0].item_id == "fresh-item"
    assert c.similar("fresh-item", 3).items
    reply = a.call_admin("ApplyDeltas", pb.ApplyDeltasRequest(remove_items=["fresh-item"]))
    assert reply.items_removed == 1
    for _ in range(3):
        assert "fresh-item" not in {i.item_id for i in c.recommend(raw, 50).items}
    with pytest.raises(grpc.RpcError) as e:
        c.similar("fresh-item", 3)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        a.call_admin("ApplyDeltas", pb.ApplyDeltasRequest(
            upsert_items=[pb.Vector(id="bad", values=[1.0, 2.0])]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dimension" in e.value.details()
    audit = (live["settings"].data_dir / "audit" / "admin.jsonl").read_text().splitlines()
    assert any('"ApplyDeltas"' in ln and '"who": "dev-admin"' in ln for ln in audit)
    assert any('"result": "error"' in ln for ln in audit)


def test_snapshot_swap_under_concurrent_requests(live):
    c, a = live["client"], live["admin"]
    raw, _ = _known_user(live["settings"])
    errors, versions = [], set()
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                r = c.recommend(raw, 10, exclude_items=[f"x{np.random.randint(9)}"])
                assert len(r.items) == 10
                versions.add(r.model_version)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(3):
        a.call_admin("LoadSnapshot", a.admin_pb2.LoadSnapshotRequest())
    stop.set()
    for t in threads:
        t.join()
    assert not errors and versions == {live["server"].state.model_version}


def test_metrics_endpoint(live):
    live["client"].recommend("u1", 3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{live['server'].metrics_port}/metrics").read()
    text = text.decode()
    for name in ("grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
                 "freshrec_cache_hits_total", "freshrec_index_size", "freshrec_model_info",
                 "freshrec_refresh_lag_seconds"):
        assert name in text


def test_reflection_lists_the_services(live):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(live["client"].channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), metadata=live["client"].metadata)  # reflection needs a token
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"freshrec.v1.Recommender", "freshrec.v1.Admin", "grpc.health.v1.Health"} <= names
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_delete_user_removes_vector_rows_and_cache(live):
    raw, user = _known_user(live["settings"])
    a = live["admin"]
    store = DeltaStore(live["settings"])
    import pyarrow.compute as pc
    n_before = store.read_arrow("events", filter=pc.field("user_id") == user).num_rows
    assert n_before > 0
    reply = a.call_admin("DeleteUser", a.admin_pb2.DeleteUserRequest(user_id=raw))
    assert reply.vector_removed and reply.rows_deleted >= n_before
    assert store.read_arrow("events", filter=pc.field("user_id") == user).num_rows == 0
    assert store.read_arrow("user_features", filter=pc.field("user_id") == user).num_rows == 0
    assert live["client"].recommend(raw, 3).cold_start
    audit = (live["settings"].data_dir / "audit" / "admin.jsonl").read_text()
    assert "DeleteUser" in audit and raw not in audit.replace(user, "")


def test_rate_limit_per_client(lane, tmp_path):
    settings = _settings(lane, tmp_path, rate_limit_per_second=0.01, rate_limit_burst=2)
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start()
    try:
        c = Client(f"127.0.0.1:{port}", CLIENT)
        c.recommend("u1", 1)
        c.recommend("u1", 1)
        with pytest.raises(grpc.RpcError) as e:
            c.recommend("u1", 1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert Client(f"127.0.0.1:{port}", ADMIN).recommend("u1", 1).items  # others unaffected
    finally:
        server.stop(grace=0)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(cn, issuer_key=None, issuer_name=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(name)
                   .issuer_name(issuer_name or name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("freshrec-test-ca", ca=True)
    files = {}
    for who in ("server", "client"):
        key, cert = make("localhost", ca_key, ca_cert.subject)
        files[f"{who}_key"] = tmp_path / f"{who}.key"
        files[f"{who}_cert"] = tmp_path / f"{who}.pem"
        files[f"{who}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        files[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["ca"] = tmp_path / "ca.pem"
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(lane, tmp_path, mutual):
    f = _self_signed(tmp_path)
    settings = _settings(lane, tmp_path, tls_cert_file=str(f["server_cert"]),
                         tls_key_file=str(f["server_key"]),
                         tls_client_ca_file=str(f["ca"]) if mutual else "")
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start()
    opts = [("grpc.ssl_target_name_override", "localhost")]
    try:
        addr = f"localhost:{port}"
        if mutual:
            ok = Client(addr, CLIENT, ca_file=str(f["ca"]), cert_file=str(f["client_cert"]),
                        key_file=str(f["client_key"]), options=opts)
            with pytest.raises(grpc.RpcError):
                Client(addr, CLIENT, ca_file=str(f["ca"]), options=opts).recommend("u1", 2,
                                                                                  timeout=3)
        else:
            ok = Client(addr, CLIENT, ca_file=str(f["ca"]), options=opts)
        assert len(ok.recommend("u1", 2).items) == 2
        with pytest.raises(grpc.RpcError):
            Client(addr, CLIENT).recommend("u1", 2, timeout=3)  # plaintext is refused
    finally:
        server.stop(grace=0)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="no CUDA GPU visible to FAISS on this machine")
def test_gpu_replica_never_returns_removed_items():
    from recmodels.index import ItemIndex

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(5000, 32)).astype(np.float32)
    for kind in ("flat", "ivf"):
        idx = ItemIndex.build([f"i{i}" for i in range(5000)], vecs, kind, use_gpu=True)
        idx.remove([f"i{i}" for i in range(100)])
        for q in vecs[:100]:
            assert all(int(i[1:]) >= 100 for i, _ in idx.search(q, 20))


def test_bandit_reranker_explores_logs_propensities_and_learns_from_clicks(lane, tmp_path):
    """A LinUCB policy re-ranks the top candidates inside the server: every served item carries
    its propensity, every slate is logged to the impressions file, and a click on a served item
    updates the bandit online."""
    import json

    policy = tmp_path / "policy"
    policy.mkdir()
    np.savez(policy / "arrays.npz", A=np.eye(6), b=np.array([0, 1.0, 0.2, 0, 0, 0.5]),
             alpha=np.array(0.5), epsilon=np.array(0.2), kind=np.array("linucb"))
    (policy / "model.json").write_text(json.dumps({"name": "linucb", "kind": "reranker"}))
    settings = _settings(lane, tmp_path, reranker=str(policy), rerank_candidates=20)
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start()
    try:
        client = Client(f"127.0.0.1:{port}", CLIENT)
        raw, user = _known_user(settings)
        seen = set()
        for _ in range(10):
            reply = client.recommend(raw, 5)
            assert len(reply.items) == 5 and all(0 < it.propensity <= 1 for it in reply.items)
            assert all(it.source.endswith("+linucb") for it in reply.items)
            seen |= {it.item_id for it in reply.items}
        assert len(seen) > 5  # explored beyond one fixed slate
        from nearline.impressions import take_impressions

        server.impressions.flush()
        assert take_impressions(settings)["impressions"] == 10
        logged = DeltaStore(settings).read_arrow("impressions").sort_by("ts").to_pylist()
        assert len(logged) == 10 and logged[-1]["user_id"] == user
        assert logged[-1]["request_id"] == reply.request_id
        assert logged[-1]["items"] == [it.item_id for it in reply.items]
        assert [round(p, 5) for p in logged[-1]["propensities"]] == \
            [round(it.propensity, 5) for it in reply.items]
        # the candidates the policy chose from travel with the slate (off-policy learning needs
        # them): every shown item is one of them, and there are rerank_candidates of them
        cands = logged[-1]["candidates"]
        assert len(cands) == 20 and set(logged[-1]["items"]) <= set(cands)
        assert len(logged[-1]["candidate_scores"]) == 20
        b_before = server.reranker.policy.b.copy()
        client.record([{"user_id": raw, "item_id": reply.items[0].item_id, "event_type": "click"}])
        assert not np.allclose(server.reranker.policy.b, b_before)
    finally:
        server.stop(grace=1)


def test_online_bandit_state_survives_a_server_restart(lane, tmp_path):
    """Clicks update the LinUCB state online; stop writes it, a new server on the same data
    directory starts from it (not from the exported policy)."""
    import json

    policy = tmp_path / "policy"
    policy.mkdir()
    np.savez(policy / "arrays.npz", A=np.eye(6), b=np.zeros(6), alpha=np.array(0.5),
             epsilon=np.array(0.2), kind=np.array("linucb"))
    (policy / "model.json").write_text(json.dumps({"name": "linucb", "kind": "reranker"}))
    settings = _settings(lane, tmp_path, reranker=str(policy), rerank_candidates=20)
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start()
    try:
        client = Client(f"127.0.0.1:{port}", CLIENT)
        raw, _ = _known_user(settings)
        for _ in range(3):
            reply = client.recommend(raw, 5)
            client.record([{"user_id": raw, "item_id": reply.items[0].item_id, "event_type": "click"}])
        A, b = server.reranker.policy.A.copy(), server.reranker.policy.b.copy()
        assert not np.allclose(b, 0)
    finally:
        server.stop(grace=1)
    again = FreshrecServer(settings, use_gpu=False)
    try:
        assert again.reranker.restored
        np.testing.assert_array_equal(again.reranker.policy.A, A)
        np.testing.assert_array_equal(again.reranker.policy.b, b)
    finally:
        again.stop(grace=1)


def test_reranker_setting_pointing_nowhere_is_a_clear_error(lane, tmp_path):
    settings = _settings(lane, tmp_path, reranker=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no model.json there"):
        FreshrecServer(settings, use_gpu=False)
