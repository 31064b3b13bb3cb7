"""Several serving processes per host: a supervisor, its children, one Status per host.

``freshrec serve`` with ``serving.processes`` other than 1 (0: one per core) runs a
:class:`Supervisor`. It reserves ``serving.port`` (a bound, never listening ``SO_REUSEPORT`` socket, so
port 0 resolves once for every child) and starts N children (``python -m serving.host child``),
each a whole :class:`~serving.server.FreshrecServer` listening on the shared port: gRPC sets
``SO_REUSEPORT`` on its listeners, so the kernel spreads new connections over the children. A
child that exits without being asked is started again (backoff doubling from 0.5 s to 30 s while it
keeps dying within a minute of its start); the others keep answering meanwhile. A supervisor that
is stopped (SIGTERM) stops its children gracefully; one that dies (kill -9) takes them with it at
once (``PR_SET_PDEATHSIG`` = SIGKILL), as a single server killed would go: no orphans on the port,
and no old process still answering next to a restarted host's (acknowledged events are already
fsynced in each process's write-ahead log).

A child starts in this order: its own **admin address** (``serving.host``, an ephemeral port; same
TLS and tokens; Admin and health only), the model its live siblings serve, then the refresher's
deltas from its own (snapshot) versions to its most advanced sibling's, erasures included
(:func:`_catch_up`); only then does it listen on the shared port and record its admin address in
``<data_dir>/serving/hosts/<hostname>-<port>/process-<i>.json``. So a (re)started process takes
no call on the port before it serves what its siblings serve (a catch-up that fails exits the
child, and the supervisor starts it again). ``host.json`` there says how many processes the
supervisor runs, so the host's Status lists a slot not yet published as not serving.
Admin calls that change state (``ApplyDeltas``, ``LoadModel``, ``LoadSnapshot``, ``DeleteUser``)
must reach every process, each with its own ``state_id`` and applied versions, so the refresher
and the rollout do not send them to the shared port: :func:`expand_replicas` turns a host's
address into its processes' admin addresses (from ``Status.processes``), and each process is then
a replica of its own (:func:`host_processes`). After its push the refresher reads the host's
Status again and checks every process's applied versions (the rollout: its model version); a
process behind is pushed again, and one still behind fails the round naming it (``ReplicaDown``;
the rollout: ``RolloutFailed``), never skipped silently.

``Admin.Status`` answered by any child on the shared port lists every process of the host
(``processes``: index, pid, admin address, version, state id, applied versions, restarts, or the
error when it did not answer): the answering child reads the process files and asks every
sibling's admin address at once, within :data:`SIBLING_DEADLINE` (metadata :data:`LOCAL` stops the
recursion). A host whose Status does not come back fails the refresher's round and the rollout,
named (:func:`host_processes`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

from freshrec.api.replicas import LOCAL, NOTHING_LOADED, SIBLING_DEADLINE
from freshrec.settings import Settings

log = logging.getLogger(__name__)
SLOW_LOAD_ENV = "FRESHREC_TEST_SLOW_LOAD"  # test hook: seconds a child waits before loading
PR_SET_PDEATHSIG = 1
# A host's Status asks every sibling at once, all within SIBLING_DEADLINE seconds; who asks a
# host (host_processes) waits HOST_STATUS_TIMEOUT, longer, so hung siblings cannot time it out.
# how a server with no model loaded answers Recommend and Status (FreshrecService.require_state)


def process_count(settings: Settings) -> int:
    n = settings.serving.processes
    return n if n > 0 else (os.cpu_count() or 1)


def hosts_dir(settings: Settings, port: int) -> Path:
    return settings.data_dir / "serving" / "hosts" / f"{socket.gethostname()}-{port}"


def _advertised(host: str) -> str:
    """The host name other machines use for an address bound on ``host``."""
    return socket.getfqdn() if host in ("0.0.0.0", "::", "[::]", "") else host


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---- the child --------------------------------------------------------------------------------
class ProcessSlot:
    """What a child knows about its host: its index, the process files, how to ask a sibling."""

    def __init__(self, settings: Settings, index: int, directory: Path) -> None:
        self.settings, self.index, self.dir = settings, index, directory
        self.address = ""

    def publish(self, address: str) -> None:
        self.address = address
        restarts = 0
        old = self.dir / f"process-{self.index}.json"
        if old.exists():
            try:
                restarts = int(json.loads(old.read_text()).get("restarts", 0)) + 1
            except (ValueError, OSError):
                restarts = 0
        _write_json(old, {"index": self.index, "pid": os.getpid(), "address": address,
                          "started": time.time(), "restarts": restarts})

    def expected(self) -> int:
        """How many processes the supervisor runs on this host (``host.json``)."""
        try:
            return int(json.loads((self.dir / "host.json").read_text())["processes"])
        except (ValueError, OSError, KeyError):
            return 0

    def siblings(self) -> list[dict]:
        out = []
        for f in sorted(self.dir.glob("process-*.json")):
            try:
                out.append(json.loads(f.read_text()))
            except (ValueError, OSError):  # being replaced right now
                continue
        return sorted(out, key=lambda p: p["index"])

    def describe(self, reply, context) -> None:
        """Fill ``reply.process_index`` and, unless the caller asked for this process only,
        ``reply.processes`` with every process of the host."""
        reply.process_index = self.index
        metadata = dict(context.invocation_metadata() or ())
        if LOCAL in metadata:
            return
        token = metadata.get("authorization", "")
        published = {p["index"]: p for p in self.siblings()}
        answers = _local_statuses(self.settings, [p["address"] for i, p in published.items()
                                                  if i != self.index], token, SIBLING_DEADLINE)
        for i in sorted(set(range(self.expected())) | set(published)):
            p = published.get(i)
            if p is None:  # started by the supervisor, not yet loaded and caught up
                reply.processes.add(index=i, serving=False,
                                    error="starting: not loaded and caught up yet (no admin "
                                          "address published)")
                continue
            ps = reply.processes.add(index=p["index"], pid=p["pid"], address=p["address"],
                                     restarts=p.get("restarts", 0))
            if p["index"] == self.index:
                st = reply
            else:
                st, err = answers[p["address"]]
                if st is None:
                    ps.serving, ps.error = False, err
                    continue
            loaded = bool(st.model_version)  # a process with nothing loaded answers Status too
            ps.serving, ps.model_version, ps.state_id = loaded, st.model_version, st.state_id
            if not loaded:
                ps.error = NOTHING_LOADED
            ps.delta_versions.update(dict(st.delta_versions))


def _local_status(settings: Settings, address: str, authorization: str, timeout: float = 3.0):
    """(StatusResponse, "") of one process's admin address, or (None, why)."""
    import grpc

    client = _admin_client(settings, address)
    try:
        md = ((LOCAL, "1"),) + ((("authorization", authorization),) if authorization else ())
        return client.admin.Status(client.admin_pb2.StatusRequest(), timeout=timeout,
                                   metadata=md), ""
    except grpc.RpcError as e:
        return None, f"{e.code().name}: {e.details()}"
    finally:
        client.close()


def _local_statuses(settings: Settings, addresses: list[str], authorization: str,
                    deadline: float) -> dict[str, tuple]:
    """:func:`_local_status` of every address at once, all answered (or given up on, with why)
    within about ``deadline`` seconds: a few hung siblings cost one deadline, not one each."""
    addresses = list(dict.fromkeys(addresses))
    if not addresses:
        return {}
    pool = futures.ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="sibling")
    try:
        jobs = {a: pool.submit(_local_status, settings, a, authorization, deadline)
                for a in addresses}
        futures.wait(jobs.values(), timeout=deadline + 1.0)
        out = {}
        for a, f in jobs.items():
            if not f.done():
                out[a] = (None, f"DEADLINE_EXCEEDED: no Status within {deadline:.0f}s")
            elif f.exception() is not None:
                out[a] = (None, f"{type(f.exception()).__name__}: {f.exception()}")
            else:
                out[a] = f.result()
        return out
    finally:
        pool.shutdown(wait=False)


def _admin_client(settings: Settings, address: str, token: str | None = None):
    """A client to a sibling's admin address. With TLS the sibling presents the host's server
    certificate: it is trusted as its own root (``serving.tls_cert_file``)."""
    from freshrec.api.client import Client

    cfg = settings.serving
    return Client(address, token, ca_file=cfg.tls_cert_file or None,
                  cert_file=cfg.tls_cert_file if cfg.tls_client_ca_file else None,
                  key_file=cfg.tls_key_file if cfg.tls_client_ca_file else None)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the supervisor's stop() still ends its children
        pass


def run_child(settings: Settings, index: int, port: int, directory: Path,
              parent: int | None = None) -> int:
    """One serving process of a host: its own admin address first, then the model its siblings
    serve, caught up to their deltas and erasures (:func:`_catch_up`), and only then the shared
    port and its process file; runs until SIGTERM/SIGINT (one that comes while it loads or catches
    up ends it before it listens on the shared port). So a (re)started process takes no
    Recommend call before it serves what its siblings serve: no client sees "no index loaded
    yet" from it. Returns 1 when the catch-up failed (the supervisor starts it again)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.server import AdminServicer, FreshrecServer, GuardInterceptor, admin_grpc

    _die_with_parent()
    if parent is not None and os.getppid() != parent:  # the supervisor died before prctl
        return 1
    cfg = settings.serving
    update = {"mmap_index": True if cfg.mmap_index == "auto" else cfg.mmap_index}
    if cfg.metrics_port > 0:  # one /metrics per process: port + index
        update["metrics_port"] = cfg.metrics_port + index
    settings = settings.model_copy(update={"serving": cfg.model_copy(update=update)})
    cfg = settings.serving
    server = FreshrecServer(settings)
    server.host = slot = ProcessSlot(settings, index, directory)
    stopping = []  # a signal handler only appends: Event.set there deadlocks on a second signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    admin = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                        interceptors=[GuardInterceptor(server)],
                        options=[("grpc.max_receive_message_length", cfg.max_message_bytes)])
    admin_grpc.add_AdminServicer_to_server(AdminServicer(server), admin)
    health_pb2_grpc.add_HealthServicer_to_server(server.health, admin)
    creds = server._credentials()
    bind = f"{cfg.host}:0"
    admin_port = admin.add_secure_port(bind, creds) if creds else admin.add_insecure_port(bind)
    admin.start()
    address = f"{_advertised(cfg.host)}:{admin_port}"
    end = time.monotonic() + float(os.environ.get(SLOW_LOAD_ENV) or 0)  # a large index: slow
    while not stopping and time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    if not stopping:
        _load_like_siblings(server, slot)
    if server.state is not None and not stopping:
        try:
            caught = _catch_up(server, slot, address)
        except Exception:  # noqa: BLE001 - never serve behind the siblings: exit, be restarted
            log.exception("process %d: catching up with its siblings failed; exiting (the "
                          "supervisor starts it again)", index)
            admin.stop(0)
            return 1
        if caught:
            log.info("process %d caught up with its siblings: %s", index, caught)
    if stopping:  # asked to stop while loading or catching up: never listen on the shared port
        log.info("process %d stopped before it served on the shared port", index)
        admin.stop(0)
        server.stop(grace=0)
        return 0
    server.start(port=port, load=False)  # the shared port, only now
    if server.state is not None:
        server.set_health(health_pb2.HealthCheckResponse.SERVING)
    slot.publish(address)
    log.info("process %d (pid %d) serving on :%d, admin %s", index, os.getpid(), port, slot.address)
    while not stopping:
        time.sleep(0.2)
    admin.stop(1)
    server.stop()
    return 0


def _catch_up(server, slot: ProcessSlot, address: str) -> dict | None:
    """Bring this process to the Delta versions (and erasure-log position) its live siblings
    reflect (:func:`catch_up_target`): the refresher's deltas from this process's own versions
    (its snapshot's, after a restart) to theirs, applied through its own admin address. Returns
    the versions reached, or None when there was nothing to do (no sibling, or none refreshed
    yet, or already there)."""
    from freshrec.storage.delta import DeltaStore
    from freshrec.api.replicas import Replica
    from freshrec.storage.changes import deltas_for
    from recmodels.servable import model_factors

    settings = slot.settings
    token = _admin_token(settings)
    found = []
    for p in slot.siblings():
        if p["index"] == slot.index:
            continue
        st, _ = _local_status(settings, p["address"], f"Bearer {token}" if token else "")
        if st is not None:
            found.append((st.model_version, dict(st.delta_versions)))
    if not found:
        return None
    own = Replica(address, settings, client=_admin_client(settings, address, token or None),
                  name=f"process {slot.index} (own admin address {address})")
    try:
        st = own.status()
        mine = dict(st.delta_versions)
        target = catch_up_target(mine, st.model_version, found)
        if target is None:
            return None
        if all(mine.get(k) == target.get(k) for k in ("events", "items")) \
                and mine.get("erasures", -1) >= target.get("erasures", 0):
            return None
        d, arm_items = deltas_for(settings, DeltaStore(settings), st, {}, model_factors, end=target)
        own.push(d, settings.refresher.batch_size, arm_items)
        return dict(d.versions)
    finally:
        own.close()


def catch_up_target(mine: dict, model: str, siblings: list[tuple[str, dict]]) -> dict | None:
    """The versions a (re)started process catches up to, from its own ``mine`` and its siblings'
    (model version, applied versions): per key (events, items, erasures) the largest among the
    siblings serving ``model`` (any sibling's when none does), never below ``mine``. None when no
    sibling has been refreshed yet (no events version)."""
    refreshed = [(m, v) for m, v in siblings if "events" in v]
    pool = [v for m, v in refreshed if m == model] or [v for _, v in refreshed]
    if not pool:
        return None
    target = {}
    for k in ("events", "items", "erasures"):
        have = [v[k] for v in (*pool, mine) if k in v]
        if have:
            target[k] = max(have)
    return target


def _load_like_siblings(server, slot: ProcessSlot) -> None:
    """Load what a live sibling serves (a process restarted after a rollout must not go back to
    ``serving.model``), else what the settings name. Any A/B experiment reloads from the settings
    (its arms name aliases)."""
    from pathlib import Path as _Path

    spec = None
    if server.assigner is None:
        token = _admin_token(slot.settings)
        for p in slot.siblings():
            if p["index"] == slot.index:
                continue
            st, _ = _local_status(slot.settings, p["address"], f"Bearer {token}" if token else "")
            if st is not None and len(st.arms) == 1 and st.arms[0].model:
                spec = st.arms[0].model
                break
    if spec == str(slot.settings.serving.model):
        spec = None  # what the settings name (with its fall-back to the latest snapshot)
    if server.assigner is not None:
        server.check_experiment()  # an arm naming a model that does not exist stops start-up
    try:
        if spec is None:
            server.load()
        else:
            try:
                if _Path(spec).is_dir():
                    server.load(snapshot=_Path(spec))
                else:
                    server.load(model=spec)
                log.info("process %d loaded %s, as its siblings serve", slot.index, spec)
            except (FileNotFoundError, LookupError, ValueError) as e:
                log.error("process %d: loading %s as its siblings serve failed (%s); loading "
                          "what the settings name", slot.index, spec, e)
                server.load()
    except (FileNotFoundError, LookupError, ValueError) as e:
        log.warning("%s; serving NOT_SERVING until Admin.LoadModel", e)


def _admin_token(settings: Settings) -> str:
    """The admin token a process uses to ask its siblings (the refresher's), or "" without auth
    or without one (then it cannot ask, and loads what the settings name)."""
    if not settings.serving.auth_enabled:
        return ""
    return settings.refresher.token.get_secret_value()


# ---- the supervisor ---------------------------------------------------------------------------
class Supervisor:
    """Starts ``n`` children on one port (the first alone, then the others once it has loaded)
    and keeps them running (see the module doc)."""

    def __init__(self, settings: Settings, port: int | None = None, n: int | None = None,
                 env: dict | None = None) -> None:
        self.settings = settings
        self.n = n or process_count(settings)
        self.env = dict(os.environ if env is None else env)
        cfg = settings.serving
        self._reserve = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        self._reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._reserve.bind((cfg.host, cfg.port if port is None else port))
        self.port = self._reserve.getsockname()[1]
        self.dir = hosts_dir(settings, self.port)
        self.children: list[subprocess.Popen | None] = [None] * self.n
        self.started = [0.0] * self.n
        self.backoff = [0.5] * self.n
        self.restarts = [0] * self.n
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, i: int) -> None:
        cmd = [sys.executable, "-m", "serving.host", "child", "--index", str(i), "--port",
               str(self.port), "--dir", str(self.dir), "--parent", str(os.getpid()),
               "--profile", self.settings.profile]
        self.children[i] = subprocess.Popen(cmd, env=self.env)
        self.started[i] = time.monotonic()

    def start(self, wait: float = 120.0) -> int:
        """Start every child; returns the port once each has published its admin address (or
        raises after ``wait`` seconds naming the ones that did not)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in self.dir.glob("process-*.json"):  # a previous supervisor's
            f.unlink()
        # every slot, so the host's Status names the ones not up yet (never skipped silently)
        _write_json(self.dir / "host.json", {"processes": self.n, "supervisor": os.getpid()})
        # the first process alone (it serves as soon as a single process would: N loading side by
        # side would take N times as long on N cores), then the others (they load what it serves)
        self._spawn(0)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            missing = [i for i in range(self.n) if not (self.dir / f"process-{i}.json").exists()]
            if 0 not in missing and self.children[-1] is None:
                for i in range(1, self.n):
                    self._spawn(i)
            dead = [i for i in range(self.n)
                    if self.children[i] is not None and self.children[i].poll() is not None]
            if dead:
                self.stop()
                raise RuntimeError(f"serving process(es) {dead} exited at start-up (exit codes "
                                   f"{[self.children[i].returncode for i in dead]}); see their log")
            if not missing:
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"serving process(es) {missing} did not start within {wait:.0f}s")
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()
        log.info("supervisor: %d processes on %s:%d", self.n, self.settings.serving.host, self.port)
        return self.port

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for i, child in enumerate(self.children):
                if child is None or child.poll() is None or self._stop.is_set():
                    continue
                lived = time.monotonic() - self.started[i]
                self.backoff[i] = 0.5 if lived > 60 else min(30.0, self.backoff[i] * 2)
                log.error("supervisor: process %d (pid %d) exited with %s after %.1fs; "
                          "restarting in %.1fs", i, child.pid, child.returncode, lived,
                          self.backoff[i])
                if self._stop.wait(self.backoff[i]):
                    return
                self.restarts[i] += 1
                self._spawn(i)

    def pids(self) -> list[int]:
        return [c.pid for c in self.children if c is not None]

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM every child (each lets its calls finish and lands its logs), then SIGKILL
        whatever is left after the grace period plus 10 s."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        grace = self.settings.serving.grace_seconds if grace is None else grace
        for c in self.children:
            if c is not None and c.poll() is None:
                c.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace + 10
        for c in self.children:
            if c is None:
                continue
            try:
                c.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("supervisor: process pid %d did not stop in time; killing it", c.pid)
                c.kill()
                c.wait()
        self._reserve.close()


# ---- reaching every process -------------------------------------------------------------------








def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one serving process of a host (started by the "
                                 "supervisor of `freshrec serve`)")
    ap.add_argument("role", choices=["child"])
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--parent", type=int)
    ap.add_argument("--profile")
    args = ap.parse_args(argv)
    from freshrec.logs import configure
    from freshrec.settings import load_settings

    settings = load_settings(args.profile)
    configure(json_lines=settings.serving.json_logs)
    return run_child(settings, args.index, args.port, Path(args.dir), args.parent)


if __name__ == "__main__":
    sys.exit(main())
