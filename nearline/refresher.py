"""Nearline refresher: live events into the tables, then silver ``events`` / ``items`` changes ->
deltas -> every serving replica, whatever model each replica serves.

Each round first takes the live data (:func:`take_live_data`): every server's write-ahead log is
sealed and landed (:func:`freshrec.storage.landing.land_all`) and every landed file not in bronze goes into
bronze ``events_raw`` and silver ``events`` / ``events_dead_letter`` with the batch clean's rules,
exactly once per file (:mod:`nearline.ingest`). So an event acknowledged by one replica is in silver,
and reaches every replica, within one round. Served slates go from every server's impression log
into ``impressions`` and, with the events, through the feedback join into ``feedback``.

Then it asks every replica (``Admin.Status``) which model it serves and which Delta versions its
state reflects, reads the Change Data Feed of ``events`` and ``items`` from there to the tables'
current versions, and sends ``Admin.ApplyDeltas`` in batches:

* users with new (or deleted) events get their whole history as of the current version (items in
  time order with their weights). The replica rebuilds the user's state from it with its own
  model: an ALS fold-in or PureSVD projection for factor models, the encoder over the newest items
  for two-tower/SASRec, nothing more for models scored over the history (kNN, EASE, content, the
  hybrid). Sending the full history, not increments, is what makes a repeated or resumed round
  harmless: the same versions always give the same state. So the refresher needs no model of its
  own and follows a retrain or a rollout without a restart. Users with no events left, and users
  erased since the replica's position in the erasure log (``delta_versions["erasures"]``, see
  :mod:`freshrec.privacy.erasure`), are sent as ``remove_users``: the replica drops their vector, history
  and recent events;
* items that were deactivated or deleted are removed; for embedding models new or changed active
  items get a vector: the model's own when it has one, else the mean vector of the items sharing
  their categories (content mapped into the model's space), else of the whole catalog.

A replica running an A/B experiment serves several models (``Status.arms``): histories and
removals reach every arm's state from one push, and item vectors are computed and sent once per
embedding model, each addressed to its model (``ApplyDeltasRequest.model_version``).

The last batch to a replica carries the versions it now reflects and the newest event time (for
its lag): those per-replica versions are the refresher's checkpoint (there is no local checkpoint
file): a replica that missed a round, restarted from its snapshot or is new reports older
versions and is sent everything since. A ``refresher.replicas`` entry may list several addresses
(``a:1,b:2``) or a ``dns:///name:port`` (every address of the name); a host running several
serving processes (``serving.processes``) is expanded into its processes, each its own replica
(:func:`freshrec.api.replicas.expand_replicas`), so a restarted process is caught up like a restarted host.
A replica that is down is retried with backoff and
reported; the round raises :class:`ReplicaDown` and the next round resends. If the versions a
replica needs are gone from the Change Data Feed (VACUUM), the round says so and sends a full
refresh of every user instead of skipping data. ``freshrec refresh [--once|--loop]`` runs it.
"""

from __future__ import annotations

import logging
import time


from freshrec.api.replicas import CRASH_ENV, Replica, ReplicaDown, _crash_point  # noqa: F401 (CRASH_ENV: the test hook's name)
from freshrec.settings import Settings
from freshrec.storage.changes import ModelFactors, deltas_for
from freshrec.storage.delta import DeltaStore
from recmodels.servable import model_factors

log = logging.getLogger(__name__)




class LiveDataError(RuntimeError):
    """Landing, ingest, impressions or the feedback join failed in a round (after its push)."""
























def _lagging(t, want: dict[str, int]) -> str:
    """Why process ``t`` (a :class:`freshrec.api.replicas.Target`) does not reflect ``want``, or ""."""
    if not t.address or not t.serving or t.error:
        return t.error or "not serving"
    behind = {k: t.versions.get(k) for k, v in want.items() if t.versions.get(k, -1) < v}
    return f"reports versions {behind}, the round pushed {want}" if behind else ""


def _verify_hosts(settings: Settings, store: DeltaStore, targets: list, pushed: dict,
                  factors_of: dict) -> tuple[list[str], set[str]]:
    """After the push: each multi-process host's Status (through its port) must show every one
    of its processes at the versions the round pushed (a process restarted or started meanwhile
    included). A process that does not is pushed again (its own Status, its own deltas); one
    still behind fails the round, named. Returns the failures and the names of the processes
    found at the round's versions."""
    from freshrec.api.replicas import host_processes

    if not pushed:  # nothing applied anywhere: the push's own failures say why
        return [], set()
    floor = {k: min(v[k] for v in pushed.values()) for k in next(iter(pushed.values()))}
    failures: list[str] = []
    ok: set[str] = set()
    for host in dict.fromkeys(t.host for t in targets if t.process is not None):
        why: dict[str, str] = {}
        for attempt in range(2):
            if attempt:
                time.sleep(settings.refresher.backoff_seconds)
            why = {}
            for t in host_processes([host], settings):
                if t.process is None:
                    if t.error:  # the host's Status failed: its processes cannot be checked
                        why[str(t)] = t.error
                    continue
                reason = _lagging(t, pushed.get(t.address, floor))
                if not reason:
                    ok.add(str(t))
                    continue
                if t.address and attempt == 0:  # retried: its own Status, its own deltas
                    r = Replica(t.address, settings, name=str(t))
                    try:
                        d, arm_items = deltas_for(settings, store, r.status(), factors_of, model_factors)
                        r.push(d, settings.refresher.batch_size, arm_items)
                        pushed[t.address] = dict(d.versions)
                        ok.add(str(t))
                        log.warning("refresher: %s had not applied the round (%s); pushed again",
                                    t, reason)
                        continue
                    except ReplicaDown as e:
                        reason = str(e)
                    finally:
                        r.close()
                why[str(t)] = reason
            if not why:
                break
        ok -= set(why)
        failures += [f"replica {name}: did not apply the round: {reason}"
                     for name, reason in why.items()]
    return failures, ok


def take_live_data(settings: Settings) -> dict:
    """The round's first step: every server's write-ahead log landed, every landed file not in
    bronze taken into bronze and silver (:mod:`nearline.ingest`), every server's impression log
    taken into ``impressions`` (:mod:`serving.impressions`), then the feedback join
    (:mod:`nearline.feedback`, when ``feedback.in_nearline``)."""
    from nearline.feedback import run_feedback
    from nearline.impressions import take_impressions
    from nearline.ingest import ingest_landed
    from freshrec.storage.landing import land_all

    landed = land_all(settings)
    _crash_point("after_land")
    report = ingest_landed(settings, crash=_crash_point)
    report["landed_events"] = landed
    report["impressions"] = take_impressions(settings, crash=_crash_point)
    if settings.feedback.in_nearline:
        report["feedback"] = run_feedback(settings)
    return report


def refresh_once(settings: Settings, ingest: bool = True) -> dict:
    """One round: live events into the tables (``ingest``), then deltas to every replica; returns
    a report. Raises ReplicaDown when a replica did not take its deltas (it is sent them again
    next round: its reported versions did not move)."""
    t0 = time.perf_counter()
    taken, live_error = None, None
    if ingest:
        try:
            taken = take_live_data(settings)
        except Exception as e:  # noqa: BLE001 - what silver holds is still pushed; raised below
            log.exception("refresher: taking the live data failed; pushing what silver holds")
            live_error = e
    from freshrec.api.replicas import host_processes

    store = DeltaStore(settings)
    # a host running several processes is one replica per process (its own state and versions)
    targets = host_processes(settings.refresher.replicas, settings)
    failures: list[str] = []
    replicas: list[Replica] = []
    try:
        for t in targets:
            if t.process is None and t.error:  # a host whose Status failed: never push blind
                failures.append(f"replica {t}: {t.error}")
            elif t.address:
                replicas.append(Replica(t.address, settings, name=str(t)))
        groups: dict[tuple, list[Replica]] = {}
        statuses: dict[tuple, object] = {}
        for r in replicas:
            try:
                st = r.status()
            except ReplicaDown as e:
                failures.append(str(e))
                continue
            others = tuple(sorted({a.model_version for a in st.arms} - {st.model_version}))
            v = st.delta_versions
            key = (st.model_version, v.get("events"), v.get("items"), others, v.get("erasures"))
            groups.setdefault(key, []).append(r)
            statuses.setdefault(key, st)
        _crash_point("after_status")
        report: dict = {"replicas": len(targets),
                        "models": sorted({m for k in groups for m in (k[0], *k[3])}),
                        "users": 0, "items": 0, "removed": 0, "events": 0, "full": False,
                        "erased_users": 0, "ingest": taken}
        factors_of: dict[str, ModelFactors | None] = {}
        pushed: dict[str, dict[str, int]] = {}  # admin address -> the versions it now reflects
        for key, members in groups.items():
            d, arm_items = deltas_for(settings, store, statuses[key], factors_of, model_factors)
            _crash_point("after_read")
            report.update(users=max(report["users"], len(d.users)),
                          items=max(report["items"], len(d.items)),
                          removed=max(report["removed"], len(d.remove_items)),
                          erased_users=max(report["erased_users"], len(d.remove_users)),
                          events=max(report["events"], d.events_read),
                          full=report["full"] or d.full, versions=d.versions)
            for r in members:
                try:
                    r.push(d, settings.refresher.batch_size, arm_items)
                    pushed[r.address] = dict(d.versions)
                except ReplicaDown as e:
                    failures.append(str(e))
    finally:  # every connection closed, whatever failed above
        for r in replicas:
            r.close()
    # a process whose push failed is retried there; one caught up then no longer fails the round
    late, caught_up = _verify_hosts(settings, store, targets, pushed, factors_of)
    failures = [f for f in failures if not any(f.startswith(f"replica {n}:") for n in caught_up)]
    failures += [f for f in late if f not in failures]
    if failures:
        raise ReplicaDown("; ".join(failures) + " (checkpoint not committed: the replica's "
                          "versions did not move)")
    _crash_point("before_commit")
    # Nothing to commit here: each replica's applied versions (Admin.Status) are the checkpoint,
    # moved by the last ApplyDeltas of its push; the old checkpoint.json was never read.
    _crash_point("after_commit")
    if live_error is not None:
        raise LiveDataError(f"the round pushed what silver holds, but taking the live data failed "
                            f"({type(live_error).__name__}: {live_error}); the next round retries "
                            "(nothing was taken twice or lost)") from live_error
    report["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("refresher: %s", report)
    return report


def loop(settings: Settings, interval: float, rounds: int | None = None) -> None:
    n = 0
    while rounds is None or n < rounds:
        started = time.monotonic()
        try:
            refresh_once(settings)
        except Exception as e:  # noqa: BLE001 - a failed round commits nothing; the next retries
            log.error("refresher round failed: %s; retrying next round", e, exc_info=True)
        n += 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
