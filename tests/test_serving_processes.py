"""Several serving processes per host and replicas behind a client-side balancer, for real:
`freshrec serve` subprocesses on loopback over a synthetic snapshot (no Spark), kill -9 mid-load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from freshrec.settings import load_settings
from serving.client import Client
from serving.host import LOCAL, expand_replicas, split_addresses
from serving.synthetic import write_snapshot

ROOT = Path(__file__).resolve().parent.parent
CLIENT, ADMIN = "dev-client-token", "dev-admin-token"
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(data: Path, processes: int) -> dict:
    return {**os.environ, "FRESHREC_DATA_DIR": str(data), "FRESHREC_PROFILE": "local",
            "FRESHREC__SERVING__METRICS_PORT": "-1", "FRESHREC__SERVING__JSON_LOGS": "false",
            "FRESHREC__SERVING__PROCESSES": str(processes), "FRESHREC__SERVING__WORKERS": "4",
            "FRESHREC__REFRESHER__TOKEN": ADMIN, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("procs")
    key = load_settings("local", env={}).privacy.hmac_key
    write_snapshot(root / "snapshots", key, n_items=3000, dim=16, n_users=200, nlist=32,
                   name="second", seed=1)
    write_snapshot(root / "snapshots", key, n_items=5000, dim=16, n_users=200, nlist=32)
    return root


def _serve(data: Path, port: int, processes: int, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli.main", "serve", "--port",
                             str(port)], env=_env(data, processes), cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT)


def _status(addr: str, local: bool = False):
    c = Client(addr, ADMIN)
    try:
        return c.admin.Status(c.admin_pb2.StatusRequest(), timeout=5,
                              metadata=c.metadata + (((LOCAL, "1"),) if local else ()))
    finally:
        c.close()


def _wait(addr: str, processes: int, timeout: float = 120.0, pids=()):
    """Status of the host once ``processes`` processes serve (none of them with a pid in
    ``pids``)."""
    end, last = time.monotonic() + timeout, None
    while time.monotonic() < end:
        try:
            st = _status(addr)
            ok = [p for p in st.processes if p.serving and p.pid not in pids]
            if (processes == 1 and not st.processes) or len(ok) == processes:
                return st
            last = st
        except grpc.RpcError as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{addr}: {processes} processes did not come up ({last})")


def _load(address: str, seconds: float, channels: int = 4) -> dict:
    """``channels`` threads, each on its own channel (own connection), calling Recommend for
    ``seconds``; counts answers and failures (after the channel's retries)."""
    out = {"ok": 0, "failed": [], "items": set()}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(n: int) -> None:
        c = Client(address, CLIENT, options=[("grpc.use_local_subchannel_pool", 1)])
        u = n
        while time.monotonic() < stop:
            u = (u + channels) % 200
            try:
                reply = c.recommend(f"u{u}", 10, timeout=10)
                with lock:
                    out["ok"] += 1
                    out["items"].add(reply.items[0].item_id)
            except grpc.RpcError as e:
                with lock:
                    out["failed"].append(f"{e.code().name}: {e.details()}")
        c.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(channels)]
    for t in threads:
        t.start()
    return {"threads": threads, "out": out}


def _join(load: dict) -> dict:
    for t in load["threads"]:
        t.join()
    return load["out"]


def test_a_host_with_two_processes_and_a_child_killed_under_load(data, tmp_path):
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    sup = _serve(data, port, 2, tmp_path / "serve.log")
    try:
        st = _wait(addr, 2)
        procs = {p.index: p for p in st.processes}
        assert sorted(procs) == [0, 1] and len({p.pid for p in procs.values()}) == 2
        assert {p.model_version for p in procs.values()} == {"synthetic als"}
        assert st.process_index in (0, 1)
        # each process answers on its own admin address for itself only
        for p in procs.values():
            own = _status(p.address, local=True)
            assert own.process_index == p.index and not own.processes
        # the refresher's view: the host is two replicas, one per process
        settings = load_settings("local", env=_env(data, 2))
        assert sorted(expand_replicas([addr], settings)) == sorted(p.address for p in procs.values())

        load = _load(addr, 8.0)
        time.sleep(2.5)
        victim = procs[1].pid
        os.kill(victim, signal.SIGKILL)
        out = _join(load)
        assert out["failed"] == [] and out["ok"] > 100, out["failed"][:5]
        # the supervisor brought it back: a new pid in slot 1, counted as a restart
        st = _wait(addr, 2, pids=(victim,), timeout=60)
        slot = next(p for p in st.processes if p.index == 1)
        assert slot.pid != victim and slot.restarts == 1 and slot.serving
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)
    # a stopped supervisor leaves no process on the port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_deltas_reach_every_process_through_their_admin_addresses(data, tmp_path):
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    sup = _serve(data, port, 2, tmp_path / "serve.log")
    try:
        _wait(addr, 2)
        settings = load_settings("local", env=_env(data, 2))
        targets = expand_replicas([addr], settings)
        assert len(targets) == 2
        vec = np.full(16, 0.5, np.float32)
        for t in targets:
            c = Client(t, ADMIN)
            pb = c.admin_pb2
            r = c.call_admin("ApplyDeltas", pb.ApplyDeltasRequest(
                upsert_items=[pb.Vector(id="fresh-item", values=vec.tolist())],
                remove_items=["i0"], applied_versions={"events": 7}))
            assert r.items_upserted == 1 and r.items_removed == 1
            c.close()
        st = _status(addr)
        assert [dict(p.delta_versions).get("events") for p in st.processes] == [7, 7]
        # whichever process answers, the new item is served and the removed one is gone
        seen = set()
        for _ in range(12):
            c = Client(addr, CLIENT, options=[("grpc.use_local_subchannel_pool", 1)])
            items = [i.item_id for i in c.similar("fresh-item", 50).items]
            assert "i0" not in items and items
            seen.add(_status(addr).process_index)
            c.close()
        assert seen == {0, 1}  # both processes answered over the shared port
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)


def test_two_replicas_behind_round_robin_one_killed_mid_load(data, tmp_path):
    ports = [_free_port(), _free_port()]
    servers = [_serve(data, p, 1, tmp_path / f"r{p}.log") for p in ports]
    try:
        for p in ports:
            _wait(f"127.0.0.1:{p}", 1)
        both = ",".join(f"127.0.0.1:{p}" for p in ports)
        load = _load(both, 8.0, channels=2)
        time.sleep(2.5)
        servers[0].send_signal(signal.SIGKILL)
        out = _join(load)
        assert out["failed"] == [] and out["ok"] > 100, out["failed"][:5]
    finally:
        for s in servers:
            s.kill()
            s.wait(timeout=30)


def test_replica_lists_split_and_resolve(data):
    assert split_addresses(["a:1,b:2", " c:3 ", "a:1"]) == ["a:1", "b:2", "c:3"]
    assert "127.0.0.1:9" in split_addresses(["dns:///localhost:9"])
    with pytest.raises(ValueError, match="cannot resolve"):
        split_addresses(["dns:///no-such-host.invalid:9"])


def test_a_process_that_cannot_take_deltas_is_reported_then_caught_up(data, tmp_path):
    from serving.refresher import Deltas, Replica, ReplicaDown

    port = _free_port()
    addr = f"127.0.0.1:{port}"
    sup = _serve(data, port, 2, tmp_path / "serve.log")
    try:
        st = _wait(addr, 2)
        settings = load_settings("local", env=_env(data, 2),
                                 refresher={"retries": 1, "backoff_seconds": 0.1})
        # a rollout to every process first: the second snapshot (not the one the settings name)
        for t in expand_replicas([addr], settings):
            c = Client(t, ADMIN)
            c.call_admin("LoadSnapshot", c.admin_pb2.LoadSnapshotRequest(path="second"))
            c.close()
        st = _status(addr)
        assert {p.model_version for p in st.processes} == {"second als"}
        victim = next(p for p in st.processes if p.index == 1)
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.3)
        # the host says which process is down ...
        st = _status(addr)
        down = next(p for p in st.processes if p.index == 1)
        assert not down.serving and "UNAVAILABLE" in down.error
        # ... and a push reaches the live one and fails for the dead one, naming it
        d = Deltas(items=["pushed"], item_vectors=np.ones((1, 16), np.float32),
                   versions={"events": 5, "items": 3})
        targets = expand_replicas([addr], settings)
        assert victim.address in targets and len(targets) == 2
        failed = []
        for t in targets:
            r = Replica(t, settings)
            try:
                r.status()
                r.push(d, 100)
            except ReplicaDown as e:
                failed.append(str(e))
        assert len(failed) == 1 and victim.address in failed[0]
        # the supervisor restarted it from the snapshot: older versions, so the next round
        # (re-expanded) sends it the deltas again; then every process reflects them
        st = _wait(addr, 2, pids=(victim.pid,), timeout=60)
        back = next(p for p in st.processes if p.index == 1)
        assert back.address != victim.address and dict(back.delta_versions).get("events") is None
        assert back.model_version == "second als"  # what its sibling serves, not the settings'
        for t in expand_replicas([addr], settings):
            r = Replica(t, settings)
            if dict(r.status().delta_versions).get("events") != 5:
                r.push(d, 100)
        st = _status(addr)
        assert [dict(p.delta_versions) for p in st.processes] == \
            [{"events": 5, "items": 3, "erasures": 0}] * 2
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)
