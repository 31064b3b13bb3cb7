"""A multi-process host's Status (serving/host.py) with siblings that hang, and a host whose Status
does not come back: real gRPC servers on loopback whose Admin.Status sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from freshrec.settings import load_settings
from freshrec.api import replicas
from serving import host
from nearline import refresher
from serving.server import admin_grpc, admin_pb2

ROOT = Path(__file__).resolve().parent.parent


class _SlowAdmin(admin_grpc.AdminServicer):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def Status(self, request, context):  # noqa: N802 - the gRPC method's name
        time.sleep(self.delay)
        return admin_pb2.StatusResponse(model_version="m@1")


@pytest.fixture
def slow_servers():
    started = []

    def start(delay: float) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        admin_grpc.add_AdminServicer_to_server(_SlowAdmin(delay), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in started:
        s.stop(0)


class _Context:
    def invocation_metadata(self):
        return ()


def _settings(tmp_path, **overrides):
    return load_settings("local", env={"FRESHREC_DATA_DIR": str(tmp_path)}, **overrides)


def test_a_host_status_with_hung_siblings_answers_within_the_callers_timeout(tmp_path,
                                                                              slow_servers):
    settings = _settings(tmp_path)
    hung = [slow_servers(30.0) for _ in range(3)]
    (tmp_path / "host.json").write_text(json.dumps({"processes": 4}))
    for i, address in enumerate(["127.0.0.1:1", *hung]):
        (tmp_path / f"process-{i}.json").write_text(json.dumps(
            {"index": i, "pid": 100 + i, "address": address, "restarts": 0}))
    slot = host.ProcessSlot(settings, 0, tmp_path)
    reply = admin_pb2.StatusResponse(model_version="m@1")
    t0 = time.monotonic()
    slot.describe(reply, _Context())
    took = time.monotonic() - t0
    # asked one after the other, 3 hung siblings took 3 x 3 s: past the host_processes timeout,
    # so the whole host looked like one process
    assert took < replicas.HOST_STATUS_TIMEOUT - 2, took
    assert replicas.SIBLING_DEADLINE + 1 < replicas.HOST_STATUS_TIMEOUT
    by_index = {p.index: p for p in reply.processes}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[0].serving
    for i in (1, 2, 3):
        assert not by_index[i].serving and "DEADLINE_EXCEEDED" in by_index[i].error


def test_a_host_whose_status_times_out_fails_the_refresher_round_naming_it(tmp_path, slow_servers,
                                                                           monkeypatch):
    address = slow_servers(3.0)
    monkeypatch.setattr(replicas, "HOST_STATUS_TIMEOUT", 0.5)
    settings = _settings(tmp_path, refresher={"replicas": [address], "retries": 0})
    (t,) = replicas.host_processes([address], settings)
    assert t.process is None and not t.serving and "DEADLINE_EXCEEDED" in t.error
    # never pushed blind to the shared port (one process of possibly several): the round fails
    with pytest.raises(refresher.ReplicaDown, match=rf"replica {address}: Admin.Status failed"):
        refresher.refresh_once(settings, ingest=False)


def test_a_restarted_process_catches_up_per_key_to_its_own_models_siblings_never_below_itself():
    mine = {"events": 2, "items": 4, "erasures": 1}
    siblings = [("m@1", {"events": 5, "items": 1, "erasures": 3}),
                ("m@2", {"events": 9, "items": 9, "erasures": 0}),  # another model (A/B, rollout)
                ("m@1", {"events": 3, "items": 2})]
    # the same model's siblings, largest per key, and never below its own items version
    assert host.catch_up_target(mine, "m@1", siblings) == {"events": 5, "items": 4, "erasures": 3}
    # no sibling serves its model: any sibling's, still never below its own
    assert host.catch_up_target(mine, "m@3", siblings) == {"events": 9, "items": 9, "erasures": 3}
    # no sibling refreshed yet: nothing to catch up to
    assert host.catch_up_target(mine, "m@1", [("m@1", {})]) is None


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (/proc/<pid>/status SigCgt)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def test_sigterm_while_a_child_loads_stops_it_before_it_listens_on_the_shared_port(tmp_path):
    directory = tmp_path / "host"
    directory.mkdir()
    env = {**os.environ, "FRESHREC_DATA_DIR": str(tmp_path), "FRESHREC_PROFILE": "local",
           "FRESHREC__SERVING__METRICS_PORT": "-1", host.SLOW_LOAD_ENV: "60",
           "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "serving.host", "child", "--index", "0",
                              "--port", "0", "--dir", str(directory), "--profile", "local"],
                             env=env, cwd=ROOT)
    try:
        end = time.monotonic() + 60
        while not _catches(child.pid, signal.SIGTERM) and time.monotonic() < end:
            assert child.poll() is None, "the child exited before it was asked to stop"
            time.sleep(0.1)
        time.sleep(0.5)  # into its (slow) load
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) == 0  # not after the 60 s load
        assert not (directory / "process-0.json").exists()  # it never served
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


class _EmptyAdmin(admin_grpc.AdminServicer):
    """Answers Status as a server with nothing loaded does (FreshrecServer.require_state's words),
    or with another UNAVAILABLE."""

    def __init__(self, details: str) -> None:
        self.details = details

    def Status(self, request, context):  # noqa: N802 - the gRPC method's name
        context.abort(grpc.StatusCode.UNAVAILABLE, self.details)


def test_a_single_server_with_nothing_loaded_is_one_target_to_load_not_a_failed_host(tmp_path):
    from types import SimpleNamespace

    from serving.errors import Unavailable
    from serving.server import FreshrecServer

    # the real server's answer when it has loaded nothing (as a fresh `freshrec serve` before the
    # first rollout of `make run` / tests/test_airflow_run.py): the servicers abort with it
    with pytest.raises(Unavailable) as got:
        FreshrecServer.require_state(SimpleNamespace(state=None))
    code, nothing_loaded = got.value.code, str(got.value)
    assert code == grpc.StatusCode.UNAVAILABLE
    servers = []
    try:
        addresses = []
        for details in (nothing_loaded, "the server is shutting down"):
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            admin_grpc.add_AdminServicer_to_server(_EmptyAdmin(details), server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            server.start()
            servers.append(server)
        empty, other = replicas.host_processes(addresses, _settings(tmp_path), tries=1, timeout=2)
        # reachable, nothing loaded: the rollout loads it through its own address
        assert (empty.address, empty.error, empty.process) == (addresses[0], "", None)
        # any other failure of Status: the round or rollout fails on it, naming it
        assert not other.serving and "shutting down" in other.error
    finally:
        for s in servers:
            s.stop(0)
