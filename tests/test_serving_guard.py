"""The server under hostile or careless callers, for real on loopback: idle streams, missing and
wrong tokens, floods, oversized messages and contexts, millions of new user ids, bad admin input,
concurrent admin calls. The served state is built in memory (an ALS-like factor model over a flat
FAISS index), so these tests need neither Spark nor MLflow."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import grpc
import numpy as np
import pyarrow as pa
import pytest

from freshrec.api.client import Client
from tests.conftest import small_settings

CLIENT, ADMIN = "dev-client-token", "dev-admin-token"
N_ITEMS, DIM, N_USERS = 200, 8, 40


def make_state(settings, seed: int = 0, label: str = "test als"):
    from freshrec.privacy.pseudonyms import pseudonymizer
    from recmodels.servable import FactorServable
    from recmodels.index import ItemIndex
    from serving.state import build_state

    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    item_ids = [f"i{i}" for i in range(N_ITEMS)]
    index = ItemIndex.build(item_ids, vecs, "flat")
    p = pseudonymizer(settings)
    users = [p(f"u{u}") for u in range(N_USERS)]
    per = 5
    indptr = np.arange(0, N_USERS * per + 1, per, dtype=np.int64)
    items = rng.integers(0, N_ITEMS, N_USERS * per).astype(np.int64)
    hist = {"indptr": indptr, "items": items, "weights": np.ones(len(items), np.float32),
            "recent_indptr": indptr.copy(), "recent": items.copy()}
    model = FactorServable("als", np.asarray(item_ids), {}, vecs)
    uvecs = rng.normal(size=(N_USERS, DIM)).astype(np.float32)
    return build_state(model, label, users, hist, index=index, index_type="flat",
                       user_vectors=dict(zip(users, uvecs)), popular=item_ids[:50])


def start(tmp_path, **serving):
    from serving.server import FreshrecServer

    settings = small_settings(tmp_path / "data", serving={
        "port": 0, "metrics_port": -1, "wal_flush_seconds": 3600, "workers": 8, **serving})
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start(load=False)
    server.swap(make_state(settings))
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def served(tmp_path):
    server, addr = start(tmp_path, stream_idle_seconds=60)
    yield server, addr
    server.stop(grace=0)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


# ---- no starvation ----------------------------------------------------------------------------
def test_64_idle_unauthenticated_streams_leave_recommend_answering(served):
    """Today's server (8 workers, open reflection) times out here: 8 idle streams hold every
    worker."""
    server, addr = served
    stop = threading.Event()

    def idle():
        stop.wait()
        return
        yield  # a request stream that never sends anything

    channels, calls = [], []
    try:
        for n in range(64):
            ch = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(ch)
            kind = n % 4
            if kind == 0:  # reflection stream, never a request
                calls.append(ch.stream_stream(
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(idle()))
            elif kind == 1:  # a unary method opened as a stream whose body never comes
                calls.append(ch.stream_unary("/freshrec.v1.Recommender/Recommend").future(idle()))
            elif kind == 2:  # health Check whose body never comes (open service)
                calls.append(ch.stream_unary("/grpc.health.v1.Health/Check").future(idle()))
            else:  # health Watch, waiting for changes
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                calls.append(health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service="")))
        time.sleep(1.0)  # let every stream reach the server
        client = Client(addr, CLIENT)
        for n in range(5):
            reply = client.recommend(f"u{n}", 5, timeout=2.0)
            assert len(reply.items) == 5
        client.close()
    finally:
        stop.set()
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()


# ---- authentication and roles -----------------------------------------------------------------
def _methods():
    from serving.server import admin_pb2, rec_pb2

    out = []
    for desc, service in ((rec_pb2.DESCRIPTOR, "Recommender"), (admin_pb2.DESCRIPTOR, "Admin")):
        for m in desc.services_by_name[service].methods:
            out.append((service, f"/freshrec.v1.{service}/{m.name}"))
    return out


def test_every_method_refuses_missing_wrong_and_underprivileged_tokens(served):
    _, addr = served
    ch = grpc.insecure_channel(addr)
    cases = 0
    for service, path in [*_methods(),
                          ("Reflection", "/grpc.reflection.v1alpha.ServerReflection/"
                                         "ServerReflectionInfo")]:
        call = ch.unary_unary(path)
        for meta, want in ((None, grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer not-a-token"),),
                            grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "dev-admin-token"),),  # no Bearer
                            grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", f"Bearer {CLIENT}"),),
                            grpc.StatusCode.PERMISSION_DENIED if service == "Admin" else None)):
            if want is None:
                continue
            got = _code(lambda call=call, meta=meta: call(b"", metadata=meta, timeout=5))
            assert got == want, (path, meta, got)
            cases += 1
    assert cases == 3 * (len(_methods()) + 1) + 5  # 5 Admin methods also tried with a client token
    # made-up methods are refused too, without minting a metric series per name
    for n in range(20):
        assert _code(lambda n=n: ch.unary_unary(f"/x.Y/Made{n}")(b"", timeout=5)) == \
            grpc.StatusCode.UNAUTHENTICATED
    reg = served[0].metrics.registry
    other = {"grpc_type": "unary", "grpc_service": "other", "grpc_code": "UNAUTHENTICATED"}
    assert reg.get_sample_value("grpc_server_handled_total",
                                {**other, "grpc_method": "Made3"}) is None
    assert reg.get_sample_value("grpc_server_handled_total",
                                {**other, "grpc_method": "other"}) == 20
    ch.close()


def test_per_address_limit_covers_unauthenticated_calls(tmp_path):
    server, addr = start(tmp_path, peer_rate_limit_per_second=0.01, peer_rate_limit_burst=5)
    try:
        ch = grpc.insecure_channel(addr)
        call = ch.unary_unary("/freshrec.v1.Recommender/Recommend")
        codes = [_code(lambda: call(b"", timeout=5)) for _ in range(8)]
        assert codes[:5] == [grpc.StatusCode.UNAUTHENTICATED] * 5
        assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        # the address is spent, whatever the token
        client = Client(addr, CLIENT)
        assert _code(lambda: client.recommend("u1", 3)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        client.close()
        ch.close()
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("tls, named", [
    ({"tls_cert_file": "/nonexistent/cert.pem", "tls_key_file": "/nonexistent/key.pem"},
     r"serving\.tls_key_file /nonexistent/key\.pem cannot be read"),
    ({"tls_cert_file": "EMPTY", "tls_key_file": "EMPTY"}, r"serving\.tls_key_file .* holds no PEM"),
])
def test_unusable_tls_files_stop_start_up_naming_the_setting(tmp_path, tls, named):
    from freshrec.settings import SettingsError
    from serving.server import FreshrecServer

    empty = tmp_path / "empty.pem"
    empty.write_text("")
    tls = {k: str(empty) if v == "EMPTY" else v for k, v in tls.items()}
    settings = small_settings(tmp_path / "data", serving={"port": 0, "metrics_port": -1, **tls})
    server = FreshrecServer(settings, use_gpu=False)
    with pytest.raises(SettingsError, match=named):
        server.start(load=False)


# ---- bounded input and memory -----------------------------------------------------------------
def test_oversized_messages_and_contexts_are_refused_naming_the_field(served):
    server, addr = served
    client = Client(addr, CLIENT)
    with pytest.raises(grpc.RpcError) as e:
        client.recommend("u1", 5, context={"blob": "x" * (8 << 20)})  # 8 MiB > 4 MiB
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:
        client.recommend("u1", 5, context={"blob": "x" * 100_000})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context holds 100004 bytes" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.recommend("u1", 5, context={f"k{n}": "v" for n in range(40)})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context has 40 entries; at most 32" in e.value.details()
    now = datetime.now(timezone.utc).isoformat()
    reply = client.record([{"user_id": "u1", "item_id": "i1", "event_type": "view", "ts": now,
                            "context": {"note": "y" * 10_000}}])
    assert reply.accepted == 0 and "context holds" in reply.rejections[0].reason
    assert len(client.recommend("u1", 5).items) == 5  # still serving
    client.close()


def test_recent_event_memory_is_an_lru_under_its_cap(tmp_path):
    server, addr = start(tmp_path, max_recent_users=50)
    try:
        client = Client(addr, CLIENT)
        now = datetime.now(timezone.utc).isoformat()
        for n in range(0, 80, 10):  # 80 distinct new users, oldest first
            client.record([{"user_id": f"new{u}", "item_id": "i3", "event_type": "view", "ts": now}
                           for u in range(n, n + 10)])
        held = list(server.recent)
        assert len(held) == 50
        assert held == [server.pseudonym(f"new{u}") for u in range(30, 80)]  # the 30 oldest went
        m = server.metrics.registry
        assert m.get_sample_value("freshrec_recent_users") == 50
        assert m.get_sample_value("freshrec_recent_evictions_total") == 30
        # a user active again moves to the young end and survives the next evictions
        client.record([{"user_id": "new30", "item_id": "i4", "event_type": "view", "ts": now}])
        client.record([{"user_id": f"later{u}", "item_id": "i3", "event_type": "view", "ts": now}
                       for u in range(5)])
        assert server.pseudonym("new30") in server.recent
        assert server.pseudonym("new31") not in server.recent and len(server.recent) == 50
        client.close()
    finally:
        server.stop(grace=0)


# ---- admin input ------------------------------------------------------------------------------
def _admin(addr):
    a = Client(addr, ADMIN)
    return a, a.admin_pb2


def test_load_snapshot_only_from_the_snapshots_directory(served, tmp_path):
    server, addr = served
    admin, pb = _admin(addr)
    root = server.settings.snapshots_dir
    root.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    (root / "sneaky").symlink_to(outside)
    for path in ("../elsewhere", "../../etc", str(outside), "/etc", "sneaky", "a/../../x"):
        with pytest.raises(grpc.RpcError) as e:
            admin.call_admin("LoadSnapshot", pb.LoadSnapshotRequest(path=path))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert "outside the snapshots directory" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        admin.call_admin("LoadSnapshot", pb.LoadSnapshotRequest(path="no-such-snapshot"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    for model in ("models:/freshrec-retrieval@champion", "../3", "a b", "x" * 100):
        with pytest.raises(grpc.RpcError) as e:
            admin.call_admin("LoadModel", pb.LoadModelRequest(model=model))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "neither a version" in \
            e.value.details()
    assert server.state.model_version == "test als"  # nothing was swapped
    admin.close()


@pytest.mark.parametrize("build, named", [
    (lambda pb, v: dict(upsert_items=[pb.Vector(id="i1", values=v), pb.Vector(id="i1", values=v)]),
     "upsert_items[1]: 'i1' appears twice"),
    (lambda pb, v: dict(upsert_items=[pb.Vector(id="i2", values=v)], remove_items=["i2"]),
     "item 'i2' is both upserted and removed"),
    (lambda pb, v: dict(remove_items=["i5", "i5"]), "remove_items[1]: 'i5' appears twice"),
    (lambda pb, v: dict(upsert_items=[pb.Vector(id="new", values=v[:-1])]),
     "upsert_items[0] (item 'new') has 7 values; the index has dimension 8"),
    (lambda pb, v: dict(upsert_items=[pb.Vector(id="new", values=[float("nan")] * 8)]),
     "upsert_items[0] (item 'new') holds NaN"),
    (lambda pb, v: dict(upsert_items=[pb.Vector(id="big", values=[1e30] * 8)]),
     "upsert_items[0] (item 'big') has norm"),
    (lambda pb, v: dict(upsert_users=[pb.Vector(id="u1", values=[1e4] * 8)]),
     "upsert_users[0] (user p_"),
    (lambda pb, v: dict(upsert_users=[pb.Vector(id="u1", values=v), pb.Vector(id="u1", values=v)]),
     "upsert_users[1]: user p_"),
])
def test_apply_deltas_refuses_bad_vectors_and_changes_nothing(served, build, named):
    server, addr = served
    admin, pb = _admin(addr)
    state = server.state
    before = (state.items.size, len(state.items.item_ids), dict(state.user_vectors))
    with pytest.raises(grpc.RpcError) as e:
        admin.call_admin("ApplyDeltas", pb.ApplyDeltasRequest(**build(pb, [0.5] * 8)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in e.value.details()
    assert (state.items.size, len(state.items.item_ids)) == before[:2]
    assert all(np.array_equal(before[2][u], state.user_vectors[u]) for u in before[2])
    admin.close()


def test_a_removed_item_never_comes_back_after_a_repeated_upsert():
    from recmodels.index import ItemIndex

    idx = ItemIndex.build([f"i{i}" for i in range(20)], np.eye(20, 8, dtype=np.float32), "flat")
    with pytest.raises(ValueError, match="'x' appears twice"):
        idx.upsert([("x", np.ones(8, np.float32)), ("x", 2 * np.ones(8, np.float32))])
    idx.upsert([("x", np.ones(8, np.float32))])
    idx.remove(["x"])
    assert "x" not in [i for i, _ in idx.search(np.ones(8, np.float32), 20)]


# ---- shared state under concurrency -----------------------------------------------------------
def test_a_delta_round_computed_for_one_state_is_refused_after_a_load(served):
    """Today's server applies the round's last batch (with its versions) to the state loaded in
    between, which then claims versions whose first batches it never saw."""
    server, addr = served
    admin, pb = _admin(addr)
    sid = admin.call_admin("Status", pb.StatusRequest()).state_id
    assert sid == server.state_id > 0
    first = pb.ApplyDeltasRequest(expect_state_id=sid, upsert_items=[pb.Vector(id="n1",
                                                                               values=[0.1] * 8)])
    admin.call_admin("ApplyDeltas", first)
    server.swap(make_state(server.settings, seed=1, label="reloaded"))  # what a load does
    last = pb.ApplyDeltasRequest(expect_state_id=sid, applied_versions={"events": 7})
    with pytest.raises(grpc.RpcError) as e:
        admin.call_admin("ApplyDeltas", last)
    assert e.value.code() == grpc.StatusCode.ABORTED and "read Status" in e.value.details()
    assert server.state.delta_versions.get("events") is None
    assert admin.call_admin("Status", pb.StatusRequest()).state_id == sid + 1
    admin.close()


def test_concurrent_loads_and_deltas_never_lose_an_acknowledged_delta(served):
    """Threads apply deltas (each naming the state it read) while another swaps states: every
    acknowledged delta is in the state that was current when it was acknowledged, and the final
    state holds every delta acknowledged after its swap."""
    server, addr = served
    errors, acked = [], []
    stop = threading.Event()

    def swapper():
        n = 0
        while not stop.is_set():
            n += 1
            server.swap(make_state(server.settings, seed=n, label=f"s{n}"))
            time.sleep(0.01)

    def writer(w: int):
        admin, pb = _admin(addr)
        for n in range(40):
            sid = admin.call_admin("Status", pb.StatusRequest()).state_id
            item = f"w{w}-{n}"
            try:
                admin.call_admin("ApplyDeltas", pb.ApplyDeltasRequest(
                    expect_state_id=sid, upsert_items=[pb.Vector(id=item, values=[0.2] * 8)]))
                acked.append((sid, item))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ABORTED:
                    errors.append(e)
        admin.close()

    t = threading.Thread(target=swapper)
    t.start()
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for x in writers:
        x.start()
    for x in writers:
        x.join()
    stop.set()
    t.join()
    assert not errors
    final = server.state_id
    mine = [i for sid, i in acked if sid == final]
    assert all(i in server.state.items.position for i in mine)


def test_concurrent_delete_user_calls_all_succeed_and_erase(served):
    from freshrec.storage.delta import DeltaStore
    from freshrec.storage.tables import EVENTS

    server, addr = served
    store = DeltaStore(server.settings)
    ts = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = [{"event_id": f"e{u}-{n}", "user_id": server.pseudonym(f"u{u}"), "item_id": "i1",
             "event_type": "view", "value": None, "weight": 1.0, "ts": ts, "context": None,
             "raw_id": f"f:{u}{n}", "batch_date": "2026-11-01"} for u in range(6) for n in range(3)]
    store.write_arrow("events", pa.Table.from_pylist(rows, schema=EVENTS.schema))
    codes: list = []

    def delete(u: int):
        admin, pb = _admin(addr)
        codes.append(_code(lambda: admin.call_admin("DeleteUser", pb.DeleteUserRequest(
            user_id=f"u{u % 4}"))))
        admin.close()

    threads = [threading.Thread(target=delete, args=(u,)) for u in range(8)]  # 4 users, twice
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [grpc.StatusCode.OK] * 8
    left = set(store.read_arrow("events", columns=["user_id"]).column("user_id").to_pylist())
    assert left == {server.pseudonym("u4"), server.pseudonym("u5")}


# ---- HNSW compaction --------------------------------------------------------------------------
def test_hnsw_compaction_keeps_m_and_never_returns_removed_items():
    import faiss

    from recmodels.index import ItemIndex

    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(500, 16)).astype(np.float32)
    ids = [f"i{i}" for i in range(500)]
    idx = ItemIndex.build(ids, vecs, "hnsw", hnsw_m=16, ef_search=64)
    hnsw = faiss.downcast_index(idx.index.index).hnsw
    assert hnsw.nb_neighbors(1) == 16
    gone = ids[:80]  # 16% > the rebuild share: compaction runs
    idx.remove(gone)
    assert not idx.tombstones  # rebuilt
    rebuilt = faiss.downcast_index(idx.index.index).hnsw
    assert rebuilt.nb_neighbors(1) == 16 and rebuilt.nb_neighbors(0) == 32
    assert rebuilt.efSearch == 64
    for q in vecs[:20]:
        assert not {i for i, _ in idx.search(q, 50)} & set(gone)
