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
from freshrec.api.client import Client
from freshrec.api.replicas import LOCAL, expand_replicas, split_addresses
from serving.host import SLOW_LOAD_ENV
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


def _serve(data: Path, port: int, processes: int, log: Path, **env) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli.main", "serve", "--port",
                             str(port)], env={**_env(data, processes), **env}, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT)


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


def _load(address: str, seconds: float, channels: int = 4, reconnect: int = 0) -> dict:
    """``channels`` threads, each on its own channel (own connection), calling Recommend for
    ``seconds``; counts answers and failures (after the channel's retries). ``reconnect``: each
    thread opens a new channel (a new connection, as new clients do) every that many calls."""
    out = {"ok": 0, "failed": [], "items": set(), "stop": time.monotonic() + seconds}
    lock = threading.Lock()

    def run(n: int) -> None:
        c = Client(address, CLIENT, options=[("grpc.use_local_subchannel_pool", 1)])
        u, calls = n, 0
        while time.monotonic() < out["stop"]:  # the caller may move the end
            calls += 1
            if reconnect and calls % reconnect == 0:
                c.close()
                c = Client(address, CLIENT, options=[("grpc.use_local_subchannel_pool", 1)])
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
    # each process takes 2 s to load (as a large index would): a restarted one must not take
    # calls on the shared port meanwhile
    sup = _serve(data, port, 2, tmp_path / "serve.log", **{SLOW_LOAD_ENV: "2"})
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

        load = _load(addr, 120.0, reconnect=10)
        time.sleep(2.5)
        victim = procs[1].pid
        os.kill(victim, signal.SIGKILL)
        # the supervisor brings it back while the load goes on (new connections reach it): the
        # restarted process takes calls on the shared port only once it has loaded
        st = _wait(addr, 2, pids=(victim,), timeout=60)
        load["out"]["stop"] = time.monotonic() + 4.0  # 4 s more with both processes
        out = _join(load)
        assert out["failed"] == [] and out["ok"] > 100, out["failed"][:5]
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


# ---- the refresher over a multi-process host, with real Delta tables ----------------------------
@pytest.fixture
def fed(tmp_path):
    """A synthetic snapshot plus silver ``items`` and ``events`` tables the refresher reads."""
    import pyarrow as pa

    from freshrec.storage.delta import DeltaStore

    root = tmp_path / "data"
    key = load_settings("local", env={}).privacy.hmac_key
    write_snapshot(root / "snapshots", key, n_items=3000, dim=16, n_users=200, nlist=32)
    settings = load_settings("local", env=_env(root, 2),
                             refresher={"retries": 1, "backoff_seconds": 0.2,
                                        "timeout_seconds": 2.0})
    store = DeltaStore(settings)
    store.write_arrow("items", pa.table({
        "item_id": [f"i{i}" for i in range(3000)], "title": [None] * 3000,
        "categories": [[] for _ in range(3000)], "text": [None] * 3000,
        "attributes": [None] * 3000, "active": [True] * 3000, "updated_at": [None] * 3000},
        schema=store.spec("items").schema))
    return {"root": root, "settings": settings, "store": store, "key": key}


def _events(fed, user: str, items: list[str], tag: str) -> None:
    """Append ``user``'s clicks on ``items`` to silver ``events`` (one new version)."""
    import datetime as dt

    import pyarrow as pa

    from freshrec.privacy.pseudonyms import pseudonymize

    store, n = fed["store"], len(items)
    ts = dt.datetime.now(dt.timezone.utc)
    store.write_arrow("events", pa.table({
        "event_id": [f"{tag}-{j}" for j in range(n)],
        "user_id": [pseudonymize(user, fed["key"])] * n, "item_id": items,
        "event_type": ["click"] * n, "value": [None] * n, "weight": [1.0] * n,
        "ts": [ts + dt.timedelta(seconds=j) for j in range(n)], "context": [None] * n,
        "raw_id": [f"{tag}-{j}" for j in range(n)], "batch_date": ["2026-11-28"] * n},
        schema=store.spec("events").schema))


def _slates_by_process(addr: str, user: str, tries: int = 40) -> dict[int, list[str]]:
    """``user``'s slate from each process of the host: fresh connections to the shared port,
    each asked Recommend and then Status (the same connection, so the same process)."""
    out: dict[int, list[str]] = {}
    for _ in range(tries):
        c = Client(addr, CLIENT, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            items = [i.item_id for i in c.recommend(user, 10).items]
            st = c.admin.Status(c.admin_pb2.StatusRequest(), timeout=5,
                                metadata=(("authorization", f"Bearer {ADMIN}"), (LOCAL, "1")))
            out[st.process_index] = items
        finally:
            c.close()
        if len(out) == 2:
            break
    return out


def _tables(fed) -> dict:
    from freshrec.privacy.erasure import read_log

    store = fed["store"]
    return {"events": store.version("events"), "items": store.version("items"),
            "erasures": len(read_log(fed["settings"]))}


def _round(fed):
    from nearline.refresher import refresh_once

    return refresh_once(fed["settings"], ingest=False)


def test_a_restarted_process_catches_up_before_it_serves_and_a_round_covers_it(fed, tmp_path):
    """kill -9 of one process: the round while it is down fails naming it (never skipped); the
    restarted process reaches its sibling's versions before it takes a call on the port; the
    next round leaves every process at the tables' versions."""
    from nearline.refresher import ReplicaDown

    port = _free_port()
    addr = f"127.0.0.1:{port}"
    fed["settings"] = fed["settings"].model_copy(update={"refresher": fed["settings"].refresher
                                                         .model_copy(update={"replicas": [addr]})})
    _events(fed, "u1", ["i1", "i2"], "a")
    sup = _serve(fed["root"], port, 2, tmp_path / "serve.log")
    try:
        st = _wait(addr, 2)
        assert _round(fed)["replicas"] == 2
        st = _status(addr)
        assert [dict(p.delta_versions) for p in st.processes] == [_tables(fed)] * 2
        victim = next(p for p in st.processes if p.index == 1)
        before = _slates_by_process(addr, "u7")[1]
        # the supervisor is held (SIGSTOP) so the round surely runs while process 1 is down
        os.kill(sup.pid, signal.SIGSTOP)
        try:
            os.kill(victim.pid, signal.SIGKILL)
            time.sleep(0.3)
            # new events (u7 buys i2999) while process 1 is down: the round pushes them to
            # process 0 and fails naming process 1
            _events(fed, "u7", ["i2999"], "b")
            with pytest.raises(ReplicaDown, match=rf"process 1 \(pid {victim.pid}"):
                _round(fed)
        finally:
            os.kill(sup.pid, signal.SIGCONT)
        # restarted: before it answers on the port it holds what process 0 holds
        st = _wait(addr, 2, pids=(victim.pid,), timeout=60)
        back = next(p for p in st.processes if p.index == 1)
        assert dict(back.delta_versions) == _tables(fed), (dict(back.delta_versions), _tables(fed))
        slates = _slates_by_process(addr, "u7")
        assert set(slates) == {0, 1}
        assert slates[0] == slates[1] and slates[1] != before, (slates, before)
        assert "i2999" not in slates[1]  # in u7's history now: seen, left out
        _events(fed, "u8", ["i5"], "c")
        report = _round(fed)
        assert report["replicas"] == 2
        st = _status(addr)
        assert [dict(p.delta_versions) for p in st.processes] == [_tables(fed)] * 2
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)


def test_a_stopped_process_fails_the_round_by_name_and_the_next_round_catches_it_up(fed, tmp_path):
    from nearline.refresher import ReplicaDown

    port = _free_port()
    addr = f"127.0.0.1:{port}"
    fed["settings"] = fed["settings"].model_copy(update={"refresher": fed["settings"].refresher
                                                         .model_copy(update={"replicas": [addr]})})
    _events(fed, "u1", ["i1"], "a")
    sup = _serve(fed["root"], port, 2, tmp_path / "serve.log")
    try:
        st = _wait(addr, 2)
        _round(fed)
        stopped = next(p for p in st.processes if p.index == 1)
        _events(fed, "u2", ["i3", "i4"], "b")
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ReplicaDown) as down:
                _round(fed)
            assert f"process 1 (pid {stopped.pid}, admin {stopped.address})" in str(down.value)
            assert "process 0" not in str(down.value)
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        # process 0 took the round; process 1 is behind until the next round
        st = _status(stopped.address, local=True)
        assert dict(st.delta_versions)["events"] < _tables(fed)["events"]
        _round(fed)
        st = _status(addr)
        assert [(p.index, p.pid, dict(p.delta_versions)) for p in st.processes] == \
            [(p.index, p.pid, _tables(fed)) for p in st.processes]
        assert stopped.pid in {p.pid for p in st.processes}  # the same process, not a restart
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)


def test_a_host_started_with_nothing_to_serve_lists_its_processes_and_each_takes_a_load(tmp_path):
    """As `airflow dags test` meets it: `freshrec serve` before any model exists, then a load
    sent through host_processes reaches every process (the port's Status used to refuse with
    "no index loaded yet", so only the process behind the port got the model)."""
    root = tmp_path / "data"
    (root / "snapshots").mkdir(parents=True)
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    sup = _serve(root, port, 2, tmp_path / "serve.log")
    try:
        end, st = time.monotonic() + 120, None
        while time.monotonic() < end:
            try:
                st = _status(addr)
                if len(st.processes) == 2 and all(p.address for p in st.processes):
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        assert [(p.index, p.serving, p.error) for p in st.processes] == \
            [(0, False, "no index loaded yet"), (1, False, "no index loaded yet")]
        key = load_settings("local", env={}).privacy.hmac_key
        write_snapshot(root / "snapshots", key, n_items=3000, dim=16, n_users=200, nlist=32)
        settings = load_settings("local", env=_env(root, 2))
        targets = expand_replicas([addr], settings)
        assert len(targets) == 2
        for t in targets:
            c = Client(t, ADMIN)
            c.call_admin("LoadSnapshot", c.admin_pb2.LoadSnapshotRequest(path="synthetic"))
            c.close()
        assert {p.model_version for p in _wait(addr, 2).processes} == {"synthetic als"}
        out = _join(_load(addr, 3.0, reconnect=5))
        assert out["failed"] == [] and out["ok"] > 20, out["failed"][:5]
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)
