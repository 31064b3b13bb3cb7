"""Nearline refresh against real servers on loopback: fold-in, item changes, replica failures,
CDF gaps after VACUUM, and SIGKILL of the refresher or the server at several points."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from freshrec.storage.delta import DeltaStore
from recmodels.foldin import fold_in, gram
from freshrec.data.importers import import_items_table, normalize_items
from freshrec.privacy.pseudonyms import pseudonymize
from nearline import refresher
from freshrec.api.client import Client
from serving.server import FreshrecServer
from tests.conftest import register_fit, small_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _copy(lane, root: Path):
    shutil.copytree(lane["settings"].data_dir, root / "data")
    return root / "data"


def _with_replicas(settings, *addrs, **more):
    return settings.model_copy(update={"refresher": settings.refresher.model_copy(
        update={"replicas": list(addrs), "backoff_seconds": 0.05, "retries": 1, **more})})


def _add_events(settings, rows: list[tuple[str, str, str]], batch: str) -> None:
    """Append validated events (as the clean job would) for raw user ids."""
    key = settings.privacy.hmac_key
    now = datetime.now(timezone.utc)
    n = len(rows)
    weights = settings.events.types
    DeltaStore(settings).write_arrow("events", pa.table({
        "event_id": [f"nl-{batch}-{i}" for i in range(n)],
        "user_id": [pseudonymize(u, key) for u, _, _ in rows],
        "item_id": [i for _, i, _ in rows], "event_type": [t for _, _, t in rows],
        "value": pa.nulls(n, pa.float64()), "weight": [weights[t] for _, _, t in rows],
        "ts": pa.array([now] * n, pa.timestamp("us", tz="UTC")), "context": pa.nulls(n, pa.string()),
        "raw_id": [f"nl:{batch}:{i}" for i in range(n)], "batch_date": [batch] * n}))


def _replica_versions(addr: str) -> dict:
    """The Delta versions a replica reports it reflects: the refresher's checkpoint."""
    c = Client(addr, "dev-admin-token")
    return dict(c.call_admin("Status", c.admin_pb2.StatusRequest()).delta_versions)


def _expected_vector(settings, user: str, server) -> np.ndarray:
    """ALS fold-in of the user's whole history in silver events against the served model's item
    factors (computed here from the table, not from what the refresher sent)."""
    store = DeltaStore(settings)
    model = server.state.model
    position = {str(i): n for n, i in enumerate(model.item_ids)}
    h = store.read_arrow("events", filter=pc.field("user_id") == user).group_by(
        ["item_id"]).aggregate([("weight", "sum")])
    items = [(i, w) for i, w in zip(h.column("item_id").to_pylist(),
                                    h.column("weight_sum").to_pylist()) if i in position]
    vecs = model.item_vectors()
    return fold_in(vecs[[position[i] for i, _ in items]], np.array([w for _, w in items]),
                   gram(vecs), settings.als.alpha, settings.als.reg_param,
                   per_rating=settings.als.solver == "mllib")  # cg: reg_param, not per rating


@pytest.fixture
def env(lane, tmp_path):
    """A server on a copy of the lane's data serving its ALS fit (pinned by version): the vector
    checks need an embedding model; history models are refreshed in test_model_serving.py."""
    data = _copy(lane, tmp_path)
    version = register_fit(small_settings(data), "als")
    settings = small_settings(data, serving={"port": 0, "metrics_port": -1,
                                             "wal_flush_seconds": 3600, "model": str(version)})
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start()
    addr = f"127.0.0.1:{port}"
    yield {"settings": _with_replicas(settings, addr), "server": server, "addr": addr,
           "data": data, "lane": lane}
    server.stop(grace=0)


def test_new_events_fold_into_user_vectors_and_move_the_replica_versions(env):
    s, server = env["settings"], env["server"]
    first = refresher.refresh_once(s)
    assert first["users"] == 0 and first["events"] == 0
    assert _replica_versions(env["addr"])["events"] == DeltaStore(s).version("events")
    popular = server.state.popular[:3]
    _add_events(s, [("u1", popular[0], "purchase"), ("brand-new", popular[1], "click"),
                    ("brand-new", popular[2], "purchase")], "2026-11-28")
    report = refresher.refresh_once(s)
    assert report["users"] == 2 and report["events"] == 3 and not report["full"]
    key = s.privacy.hmac_key
    for raw in ("u1", "brand-new"):
        got = server.state.user_vectors[pseudonymize(raw, key)]
        np.testing.assert_allclose(got, _expected_vector(s, pseudonymize(raw, key), server),
                                   rtol=1e-3, atol=1e-4)
    assert _replica_versions(env["addr"])["events"] == DeltaStore(s).version("events")
    c = Client(env["addr"], "dev-admin-token")
    assert not c.recommend("brand-new", 5).cold_start
    status = c.call_admin("Status", c.admin_pb2.StatusRequest())
    assert status.delta_versions["events"] == DeltaStore(s).version("events")
    assert 0 <= status.refresh_lag_seconds < 3600
    # the same round again is harmless: nothing new, vectors unchanged
    before = server.state.user_vectors[pseudonymize("u1", key)].copy()
    again = refresher.refresh_once(s)
    assert again["users"] == 0
    np.testing.assert_array_equal(server.state.user_vectors[pseudonymize("u1", key)], before)


def test_item_changes_remove_deactivated_and_add_new_items(env):
    s, server = env["settings"], env["server"]
    gone = server.state.popular[0]
    cats = sorted(server.state.categories[server.state.popular[1]])
    items = normalize_items(pa.table({
        "item_id": [gone, "brand-new-item"], "title": ["gone", "new"],
        "categories": pa.array([[], cats], pa.list_(pa.string())), "text": ["", ""],
        "active": [False, True]}), "test")
    import_items_table(s, items, "test")
    report = refresher.refresh_once(s)
    assert report["removed"] == 1 and report["items"] == 1
    c = Client(env["addr"], "dev-client-token")
    for u in ("u1", "u2", "nobody"):
        assert gone not in {i.item_id for i in c.recommend(u, 50).items}
    assert c.similar("brand-new-item", 5).items  # a content-based vector in factor space


def test_replica_down_is_retried_reported_and_nothing_committed(env):
    s = _with_replicas(env["settings"], env["addr"], "127.0.0.1:1")
    _add_events(s, [("u9", env["server"].state.popular[0], "view")], "2026-11-28")
    with pytest.raises(refresher.ReplicaDown, match=r"127\.0\.0\.1:1.*checkpoint not committed"):
        refresher.refresh_once(s)
    # the live replica took its deltas; the down one is sent everything next round
    assert _replica_versions(env["addr"])["events"] == DeltaStore(s).version("events")


def test_cdf_gap_after_vacuum_falls_back_to_a_full_refresh(env, caplog):
    s, server = env["settings"], env["server"]
    store = DeltaStore(s)
    _add_events(s, [("u3", server.state.popular[0], "view")], "2026-11-29")
    # replace that batch's rows (as a clean re-run would) and vacuum: its first file is gone
    rows = store.read_arrow("events", filter=pc.field("batch_date") == "2026-11-29")
    store.write_arrow("events", rows, mode="overwrite", predicate="batch_date = '2026-11-29'")
    DeltaTable(store.path("events")).vacuum(retention_hours=0, enforce_retention_duration=False,
                                            dry_run=False)
    with caplog.at_level("WARNING"):
        report = refresher.refresh_once(s)
    assert report["full"] and "falling back to a full refresh" in caplog.text
    user = pseudonymize("u3", s.privacy.hmac_key)
    np.testing.assert_allclose(server.state.user_vectors[user], _expected_vector(s, user, server),
                               rtol=1e-3, atol=1e-4)


def _cli_env(data: Path) -> dict:
    return {**os.environ, "FRESHREC_DATA_DIR": str(data), "FRESHREC__SERVING__METRICS_PORT": "-1",
            "FRESHREC__SERVING__JSON_LOGS": "false", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("point", ["after_status", "after_read", "mid_push", "before_commit",
                                   "after_commit"])
def test_sigkill_of_the_refresher_at_any_point_loses_nothing(env, point):
    s, server = env["settings"], env["server"]
    _add_events(s, [("u4", server.state.popular[0], "purchase"),
                    ("u5", server.state.popular[1], "purchase")], "2026-11-30")
    crashed = subprocess.run(
        [sys.executable, "-m", "freshrec.cli.main", "refresh", "--replica", env["addr"]],
        env={**_cli_env(env["data"]), refresher.CRASH_ENV: point}, cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    refresher.refresh_once(s)  # the restarted refresher
    for raw in ("u4", "u5"):
        user = pseudonymize(raw, s.privacy.hmac_key)
        np.testing.assert_allclose(server.state.user_vectors[user], _expected_vector(s, user, server),
                                   rtol=1e-3, atol=1e-4)
    assert _replica_versions(env["addr"])["events"] == DeltaStore(s).version("events")


def _wait_serving(addr: str, deadline: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.time() + deadline
    while time.time() < end:
        try:
            stub = health_pb2_grpc.HealthStub(Client(addr).channel)
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"server at {addr} did not come up")


def test_sigkill_of_the_server_then_restart_equals_a_clean_refresh(lane, tmp_path):
    import socket

    data = _copy(lane, tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    s = _with_replicas(small_settings(data), addr)
    cmd = [sys.executable, "-m", "freshrec.cli.main", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=_cli_env(data), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_serving(addr)
        popular = DeltaStore(s).read_arrow("item_features").sort_by(
            [("popularity_decayed", "descending")]).column("item_id").to_pylist()
        _add_events(s, [("u6", popular[0], "purchase"), ("u7", popular[1], "click")], "2026-12-01")
        refresher.refresh_once(s)
        c = Client(addr, "dev-client-token")
        fresh = {u: [i.item_id for i in c.recommend(u, 10).items] for u in ("u6", "u7")}
        c.record([{"user_id": "u8", "item_id": popular[2], "event_type": "view"}])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = subprocess.Popen(cmd, env=_cli_env(data), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _wait_serving(addr)
        # the restarted server starts from the snapshot; the next round brings it back
        refresher.refresh_once(s)
        c = Client(addr, "dev-client-token")
        assert {u: [i.item_id for i in c.recommend(u, 10).items] for u in ("u6", "u7")} == fresh
        # the event acknowledged before the kill was not lost: it is in the landing zone now
        landed = [f for f in (data / "landing" / "events").rglob("wal*.parquet")]
        assert landed and any(pseudonymize("u8", s.privacy.hmac_key) in
                              pa.parquet.read_table(f).column("user_id").to_pylist() for f in landed)
    finally:
        proc.kill()
        proc.wait(timeout=30)
