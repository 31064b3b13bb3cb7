"""Replica addressing and the replica client the nearline lane and rollouts push through.

A ``refresher.replicas`` entry may list several addresses (``a:1,b:2``) or a ``dns:///name:port``;
a host running several serving processes is expanded into its processes (:func:`expand_replicas`,
asking the host's ``Admin.Status``), each its own :class:`Replica`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field


from freshrec.settings import Settings
from freshrec.storage.changes import Deltas

log = logging.getLogger(__name__)


class Replica:
    """Admin calls to one replica: a single-process server, or one process of a multi-process
    host (``name`` says which, in logs and in :class:`ReplicaDown`)."""

    def __init__(self, address: str, settings: Settings, client=None, name: str = "") -> None:
        from freshrec.api.client import Client

        cfg = settings.refresher
        self.address, self.name = address, name or address
        self.client = client or Client(address, cfg.bearer(), ca_file=cfg.ca_file or None)
        self.pb = self.client.admin_pb2
        self.retries, self.backoff = cfg.retries, cfg.backoff_seconds
        self.timeout = cfg.timeout_seconds

    def call(self, method: str, request):
        import grpc

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return self.client.call_admin(method, request, timeout=self.timeout)
            except grpc.RpcError as e:
                retriable = e.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED,
                                         grpc.StatusCode.RESOURCE_EXHAUSTED)
                if not retriable or attempt == self.retries:
                    raise ReplicaDown(f"replica {self.name}: {method} failed after "
                                      f"{attempt + 1} tries: {e.code().name} {e.details()}") from e
                log.warning("replica %s: %s %s; retrying in %.1fs", self.name, method,
                            e.code().name, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def status(self):
        st = self.call("Status", self.pb.StatusRequest())
        if not st.model_version:  # a process of a multi-process host with nothing loaded
            raise ReplicaDown(f"replica {self.name}: no index loaded yet (load a model there: "
                              "freshrec model rollout)")
        self.state_id = st.state_id  # the deltas of this round are computed against this state
        return st

    def push(self, d: Deltas, batch: int, arm_items: list[tuple[str, Deltas]] = ()) -> None:
        """``arm_items``: (model_version, deltas with its item vectors) of the replica's other
        arms' models."""
        pb = self.pb
        requests = []
        for i in range(0, len(d.users), batch):
            requests.append(pb.ApplyDeltasRequest(users_pseudonymized=True, upsert_histories=[
                pb.UserHistory(user_id=u, item_ids=items, weights=weights) for u, (items, weights)
                in zip(d.users[i:i + batch], d.histories[i:i + batch])]))
        for i in range(0, len(d.items), batch):
            requests.append(pb.ApplyDeltasRequest(upsert_items=[
                pb.Vector(id=u, values=v.tolist()) for u, v in
                zip(d.items[i:i + batch], d.item_vectors[i:i + batch])]))
        for model_version, extra in arm_items:
            for i in range(0, len(extra.items), batch):
                requests.append(pb.ApplyDeltasRequest(model_version=model_version, upsert_items=[
                    pb.Vector(id=u, values=v.tolist()) for u, v in
                    zip(extra.items[i:i + batch], extra.item_vectors[i:i + batch])]))
        for i in range(0, len(d.remove_items), batch):
            requests.append(pb.ApplyDeltasRequest(remove_items=d.remove_items[i:i + batch]))
        for i in range(0, len(d.remove_users), batch):
            requests.append(pb.ApplyDeltasRequest(users_pseudonymized=True,
                                                  remove_users=d.remove_users[i:i + batch]))
        requests.append(pb.ApplyDeltasRequest(applied_versions=d.versions,
                                              newest_event_ts=d.newest_event_ts))
        for n, req in enumerate(requests):
            req.expect_state_id = getattr(self, "state_id", 0)  # ABORTED if it loaded meanwhile
            self.call("ApplyDeltas", req)
            if n == len(requests) // 2:
                _crash_point("mid_push")


    def close(self) -> None:
        self.client.close()


LOCAL = "x-freshrec-process-local"  # Status metadata: answer for this process only


SIBLING_DEADLINE = 3.0


HOST_STATUS_TIMEOUT = SIBLING_DEADLINE + 5.0


NOTHING_LOADED = "no index loaded yet"


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


@dataclass
class Target:
    """One place the refresher or the rollout sends admin calls to: a single-process server
    (``process`` None), or one process of a multi-process host as the host's Status lists it
    (``address`` its admin address, empty while it starts; ``error`` why it did not answer)."""

    host: str
    address: str
    process: int | None = None
    pid: int = 0
    serving: bool = True
    error: str = ""
    model_version: str = ""
    versions: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if self.process is None:
            return self.host
        return (f"{self.host} process {self.process} (pid {self.pid or '?'}, admin "
                f"{self.address or 'not published'})")


def host_processes(entries: list[str], settings: Settings, token: str | None = None,
                   tries: int = 3, timeout: float | None = None) -> list[Target]:
    """Every serving process behind ``entries``, as each host's ``Admin.Status`` lists them
    (every slot its supervisor runs, including one restarting or not yet caught up: never left
    out). A Status that does not come back within ``timeout`` (default
    :data:`HOST_STATUS_TIMEOUT`) is asked again on a new connection (``tries``: one process on the
    shared port may be stopped); a single-process server stays one target with its own address,
    also while it has loaded nothing (its Status answers UNAVAILABLE :data:`NOTHING_LOADED`: the
    rollout loads it there). A host whose Status does not come back after ``tries`` is one target
    with its ``error`` set and ``serving`` False: the refresher and the rollout fail on it, naming
    the host (pushing to its shared port would reach one process of possibly several,
    unverified)."""
    import grpc

    from freshrec.api.client import Client

    cfg = settings.refresher
    token = token or cfg.bearer()
    timeout = HOST_STATUS_TIMEOUT if timeout is None else timeout
    out: list[Target] = []
    for address in split_addresses(entries):
        st, why, empty = None, "no answer", False
        for _ in range(max(1, tries)):
            client = Client(address, token, ca_file=cfg.ca_file or None,
                            options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                st = client.call_admin("Status", client.admin_pb2.StatusRequest(),
                                       timeout=timeout)
                break
            except grpc.RpcError as e:
                why = f"{e.code().name}: {e.details()}"
                # a single-process server that answered but has loaded nothing yet (a host of
                # several processes answers Status then, listing them): one target, to load
                empty = (e.code() == grpc.StatusCode.UNAVAILABLE
                         and (e.details() or "").startswith(NOTHING_LOADED))
                if empty or e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                             grpc.StatusCode.DEADLINE_EXCEEDED):
                    break
            finally:
                client.close()
        if empty:
            out.append(Target(address, address))
            continue
        if st is None:
            out.append(Target(address, address, serving=False,
                              error=f"Admin.Status failed ({why})"))
            continue
        if not st.processes:
            out.append(Target(address, address))
            continue
        for p in st.processes:
            out.append(Target(address, p.address, p.index, p.pid, p.serving, p.error,
                              p.model_version, dict(p.delta_versions)))
    seen: set[tuple] = set()
    return [t for t in out if (t.host, t.process, t.address) not in seen
            and not seen.add((t.host, t.process, t.address))]


def expand_replicas(entries: list[str], settings: Settings, token: str | None = None) -> list[str]:
    """The admin addresses of :func:`host_processes` (a process with none published yet is left
    out here: the refresher and the rollout use :func:`host_processes` and report it)."""
    return list(dict.fromkeys(t.address for t in host_processes(entries, settings, token)
                              if t.address))


CRASH_ENV = "FRESHREC_REFRESHER_CRASH_AT"  # test hook: SIGKILL this process at a named point


class ReplicaDown(RuntimeError):
    """A replica did not acknowledge its deltas after the retries; its versions did not move."""


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.warning("test hook: killing the refresher at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)
