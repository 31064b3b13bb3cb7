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

Each child also listens on its own **admin address** (``serving.host``, an ephemeral port; same TLS
and tokens) and records it in ``<data_dir>/serving/hosts/<hostname>-<port>/process-<i>.json``.
Admin calls that change state (``ApplyDeltas``, ``LoadModel``, ``LoadSnapshot``, ``DeleteUser``)
must reach every process, each with its own ``state_id`` and applied versions, so the refresher
and the rollout do not send them to the shared port: :func:`expand_replicas` turns a host's
address into its processes' admin addresses (from ``Status.processes``), and each process is then
a replica of its own: a restarted child reports its snapshot's older versions and the next round
sends it everything since; a process that is down fails the round (reported, retried next round),
never skipped silently.

``Admin.Status`` answered by any child on the shared port lists every process of the host
(``processes``: index, pid, admin address, version, state id, applied versions, restarts, or the
error when it did not answer): the answering child reads the process files and asks each sibling's
admin address (metadata :data:`LOCAL` stops the recursion).
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

from freshrec.settings import Settings

log = logging.getLogger(__name__)
LOCAL = "x-freshrec-process-local"  # Status metadata: answer for this process only
PR_SET_PDEATHSIG = 1


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
        for p in self.siblings():
            ps = reply.processes.add(index=p["index"], pid=p["pid"], address=p["address"],
                                     restarts=p.get("restarts", 0))
            if p["index"] == self.index:
                st = reply
            else:
                st, err = _local_status(self.settings, p["address"], token)
                if st is None:
                    ps.serving, ps.error = False, err
                    continue
            ps.serving, ps.model_version, ps.state_id = True, st.model_version, st.state_id
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


def _admin_client(settings: Settings, address: str, token: str | None = None):
    """A client to a sibling's admin address. With TLS the sibling presents the host's server
    certificate: it is trusted as its own root (``serving.tls_cert_file``)."""
    from serving.client import Client

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
    """One serving process of a host: the shared port, its own admin address, its process file;
    runs until SIGTERM/SIGINT."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc

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
    server.start(port=port, load=False)
    _load_like_siblings(server, slot)
    admin = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                        interceptors=[GuardInterceptor(server)],
                        options=[("grpc.max_receive_message_length", cfg.max_message_bytes)])
    admin_grpc.add_AdminServicer_to_server(AdminServicer(server), admin)
    health_pb2_grpc.add_HealthServicer_to_server(server.health, admin)
    creds = server._credentials()
    bind = f"{cfg.host}:0"
    admin_port = admin.add_secure_port(bind, creds) if creds else admin.add_insecure_port(bind)
    admin.start()
    slot.publish(f"{_advertised(cfg.host)}:{admin_port}")
    log.info("process %d (pid %d) serving on :%d, admin %s", index, os.getpid(), port, slot.address)
    while not stopping:
        time.sleep(0.2)
    admin.stop(1)
    server.stop()
    return 0


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
        self._prebuild()
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

    def _prebuild(self) -> None:
        """Build the served snapshot once here, so N children do not build it side by side."""
        try:
            from serving.state import resolve_snapshot

            resolve_snapshot(self.settings)
        except Exception as e:  # noqa: BLE001 - each child logs why it has nothing to serve
            log.info("supervisor: no snapshot resolved before start (%s)", e)

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
def split_addresses(entries: list[str]) -> list[str]:
    """``host:port`` entries, with comma-separated lists split and ``dns:///name:port`` resolved
    to every address of the name (each replica behind a DNS name gets its own deltas)."""
    out: list[str] = []
    for entry in entries:
        for part in (p.strip() for p in entry.split(",")):
            if not part:
                continue
            if part.startswith("dns:"):
                name = part.split("/")[-1]
                host, _, port = name.rpartition(":")
                try:
                    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                except (socket.gaierror, ValueError) as e:
                    raise ValueError(f"replica {part!r}: cannot resolve ({e})") from None
                for ip in dict.fromkeys(i[4][0] for i in infos):
                    out.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
            else:
                out.append(part)
    return list(dict.fromkeys(out))


def expand_replicas(entries: list[str], settings: Settings, token: str | None = None) -> list[str]:
    """Every serving process behind ``entries``: a host running several processes becomes its
    processes' admin addresses (``Status.processes``); a single-process server, or one that does
    not answer, stays as given (its calls then fail and are reported where they are made)."""
    import grpc

    from serving.client import Client

    cfg = settings.refresher
    out: list[str] = []
    for address in split_addresses(entries):
        client = Client(address, token or cfg.bearer(), ca_file=cfg.ca_file or None)
        try:
            st = client.call_admin("Status", client.admin_pb2.StatusRequest(), timeout=10)
            out.extend(p.address for p in st.processes) if st.processes else out.append(address)
        except grpc.RpcError:
            out.append(address)
        finally:
            client.close()
    return list(dict.fromkeys(out))


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
