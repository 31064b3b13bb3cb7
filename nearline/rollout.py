"""Roll a registered version out to every serving replica, one at a time, health-checked; roll back.

``rollout(settings, spec)`` resolves ``spec`` (an alias such as ``champion``, or a version number)
to one version, builds its snapshot once (shared by every replica on this data directory) and then,
replica by replica in ``refresher.replicas`` (a host running several processes: process by process,
through each one's admin address): ``Admin.LoadModel(<version>)`` (by number, so an alias
moved mid-rollout cannot split the fleet), then the gRPC health check must say SERVING and
``Admin.Status`` must name the new version. The first replica that fails stops the rollout with
:class:`RolloutFailed` naming it and why; the replicas before it keep the new version, it and the
ones after keep the old one (a failed load never replaces a serving model).

``rollback(settings)`` moves ``@champion`` back to the version it replaced (the ``previous_champion``
tag the gate writes at promotion), or to a version given, and rolls that out the same way.
"""

from __future__ import annotations

import logging
import time

from freshrec.contracts import registry
from freshrec.settings import Settings
from freshrec.tracking import mlflow_for

log = logging.getLogger(__name__)


class RolloutFailed(RuntimeError):
    """A replica did not take the new version; the message names it."""


def _client(address: str, settings: Settings):
    from freshrec.api.client import Client

    cfg = settings.refresher
    return Client(address, cfg.bearer(), ca_file=cfg.ca_file or None)


def _roll_one(address: str, settings: Settings, ref: registry.ModelRef, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client = _client(address, settings)
    pb = client.admin_pb2
    try:
        try:
            before = client.call_admin("Status", pb.StatusRequest()).model_version \
                or "(nothing loaded)"  # a process of a multi-process host answers regardless
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or "no index loaded" not in (e.details() or ""):
                raise
            before = "(nothing loaded)"
        reply = client.call_admin("LoadModel", pb.LoadModelRequest(model=str(ref.version)),
                                  timeout=timeout)
        if reply.model_version != ref.label:
            raise RolloutFailed(f"replica {address} loaded {reply.model_version!r}, not {ref.label}")
        health = health_pb2_grpc.HealthStub(client.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise RolloutFailed(f"replica {address} is not SERVING after loading {ref.label}")
        now = client.call_admin("Status", pb.StatusRequest()).model_version
        if now != ref.label:
            raise RolloutFailed(f"replica {address} reports {now!r} after loading {ref.label}")
        return before
    except grpc.RpcError as e:
        raise RolloutFailed(f"replica {address}: {e.code().name}: {e.details()}") from None
    finally:
        client.close()


def rollout(settings: Settings, spec: str | int = "champion", replicas: list[str] | None = None,
            timeout: float = 600.0) -> dict:
    """Build ``spec``'s snapshot and load it on every replica, one at a time; see the module doc."""
    from nearline.snapshots import build_snapshot

    mlflow_for(settings)
    ref = registry.resolve(spec)
    t0 = time.perf_counter()
    snap = build_snapshot(settings, ref.version)
    from freshrec.api.replicas import host_processes

    # every process of a multi-process host loads it (serving/host.py), each by its own address
    targets = host_processes(list(settings.refresher.replicas if replicas is None else replicas),
                             settings)
    done: list[dict] = []

    def stop(why: str) -> RolloutFailed:
        took = ", ".join(d["replica"] for d in done) or "none"
        return RolloutFailed(f"rollout of {ref.label} stopped at {why}. Replicas that took it: "
                             f"{took}; the others keep their model")

    for t in targets:
        if not t.address or (t.process is None and t.error):  # never load blind on a host
            raise stop(f"replica {t}: {t.error or 'no admin address'}")
        try:
            before = _roll_one(t.address, settings, ref, timeout)
        except RolloutFailed as e:
            raise stop(str(e).replace(f"replica {t.address}", f"replica {t}", 1)) from None
        done.append({"replica": str(t), "before": before, "after": ref.label})
        log.info("rollout: %s now serves %s (was %s)", t, ref.label, before)
    # each multi-process host must now say the new version for every process (one restarted
    # meanwhile included): a process that does not is loaded again, then named if it still fails
    for host in dict.fromkeys(t.host for t in targets if t.process is not None):
        for attempt in range(2):
            behind = [p for p in host_processes([host], settings)
                      if (p.process is not None and p.model_version != ref.label)
                      or (p.process is None and p.error)]  # the host's Status failed
            if not behind:
                break
            if attempt:
                raise stop("; ".join(f"replica {p}: serves {p.model_version or 'nothing'} "
                                     f"({p.error or 'answered'}) after the rollout"
                                     for p in behind))
            for p in behind:
                if p.address and p.process is not None:
                    try:
                        _roll_one(p.address, settings, ref, timeout)
                        log.warning("rollout: %s had not taken %s; loaded it again", p, ref.label)
                    except RolloutFailed as e:
                        log.error("rollout: retrying %s failed: %s", p, e)
            time.sleep(settings.refresher.backoff_seconds)
    replicas = targets
    report = {"model_version": ref.label, "snapshot": snap["snapshot"], "replicas": done,
              "seconds": round(time.perf_counter() - t0, 2)}
    if not replicas:
        report["note"] = "no replicas configured (refresher.replicas): snapshot built only"
    return report


def rollback(settings: Settings, to: int | None = None, replicas: list[str] | None = None) -> dict:
    """Move ``@champion`` back (to ``to``, else the version the champion replaced) and roll out."""
    from mlflow.tracking import MlflowClient

    mlflow_for(settings)
    current = registry.resolve(registry.ALIAS)
    target = to
    if target is None:
        prev = current.tags.get("previous_champion")
        if not prev:
            raise LookupError(f"{current.label} replaced no earlier champion: name a version "
                              "with --to N")
        target = int(prev)
    ref = registry.resolve(target)
    registry.set_alias(ref.version)
    MlflowClient().set_model_version_tag(ref.registered_model, str(ref.version), "rolled_back_from",
                                         str(current.version))
    log.info("rollback: @champion %s -> %s", current.label, ref.label)
    return {"from": current.label, **rollout(settings, ref.version, replicas)}
