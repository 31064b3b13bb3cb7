"""Nearline refresher: live events into the tables, then silver ``events`` / ``items`` changes ->
deltas -> every serving replica, whatever model each replica serves.

Each round first takes the live data (:func:`take_live_data`): every server's write-ahead log is
sealed and landed (:func:`serving.wal.land_all`) and every landed file not in bronze goes into
bronze ``events_raw`` and silver ``events`` / ``events_dead_letter`` with the batch clean's rules,
exactly once per file (:mod:`serving.ingest`). So an event acknowledged by one replica is in silver,
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
  :mod:`freshrec.erasure`), are sent as ``remove_users``: the replica drops their vector, history
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
(:func:`serving.host.expand_replicas`), so a restarted process is caught up like a restarted host.
A replica that is down is retried with backoff and
reported; the round raises :class:`ReplicaDown` and the next round resends. If the versions a
replica needs are gone from the Change Data Feed (VACUUM), the round says so and sends a full
refresh of every user instead of skipping data. ``freshrec refresh [--once|--loop]`` runs it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from freshrec.delta import DeltaStore
from freshrec.settings import Settings

log = logging.getLogger(__name__)
CRASH_ENV = "FRESHREC_REFRESHER_CRASH_AT"  # test hook: SIGKILL this process at a named point


class ReplicaDown(RuntimeError):
    """A replica did not acknowledge its deltas after the retries; its versions did not move."""


class LiveDataError(RuntimeError):
    """Landing, ingest, impressions or the feedback join failed in a round (after its push)."""


class CdfGap(RuntimeError):
    """The Change Data Feed no longer holds the versions asked for (VACUUM or log clean-up)."""


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.warning("test hook: killing the refresher at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ModelFactors:
    """The item vectors of the model a replica serves (embedding models), from its snapshot."""

    model_version: str
    item_ids: list[str]
    matrix: np.ndarray
    position: dict[str, int]

    @classmethod
    def for_replica(cls, settings: Settings, model_version: str) -> "ModelFactors | None":
        """None when the served model has no item vectors (it is scored over histories)."""
        from freshrec.snapshot import MODEL_DIR, find_snapshot
        from recmodels.servable import load

        try:
            version = int(model_version.split("/", 1)[1].split()[0])
        except (IndexError, ValueError):
            return None
        snap = find_snapshot(settings.snapshots_dir, version)
        if snap is None:
            return None
        model = load(snap / MODEL_DIR)
        vecs = model.item_vectors()
        if vecs is None or model.kind != "embedding":
            return None
        ids = [str(i) for i in model.item_ids]
        return cls(model_version, ids, vecs, {i: n for n, i in enumerate(ids)})


@dataclass
class Deltas:
    users: list[str] = field(default_factory=list)
    histories: list[tuple[list[str], list[float]]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    item_vectors: np.ndarray | None = None
    remove_items: list[str] = field(default_factory=list)
    remove_users: list[str] = field(default_factory=list)  # no events left (erased)
    versions: dict[str, int] = field(default_factory=dict)
    newest_event_ts: float = 0.0
    events_read: int = 0
    full: bool = False


def read_changes(path: str, start: int, end: int,
                 storage_options: dict[str, str] | None = None) -> pa.Table:
    """CDF rows of versions (start, end]; raises :class:`CdfGap` when they are gone."""
    if end <= start:
        return pa.table({})
    try:
        reader = DeltaTable(path, storage_options=storage_options).load_cdf(
            starting_version=start + 1, ending_version=end)
        table = pa.RecordBatchReader.from_stream(reader).read_all()
    except Exception as e:  # delta-rs raises generic errors for missing versions or files
        raise CdfGap(f"{path}: Change Data Feed of versions {start + 1}..{end} is not readable "
                     f"({type(e).__name__}: {e})") from e
    # delta-rs hands string columns (and _change_type) over as string_view
    return table.cast(pa.schema([pa.field(f.name, _no_views(f.type)) for f in table.schema]))


def _no_views(t: pa.DataType) -> pa.DataType:
    if t == pa.string_view():
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(_no_views(t.value_type))
    return t


def compute_deltas(settings: Settings, store: DeltaStore, factors: ModelFactors | None,
                   start: dict[str, int | None], end: dict[str, int] | None = None) -> Deltas:
    """Deltas from the versions ``start`` to ``end`` (default: the tables' current versions;
    a process catching up with its siblings asks for theirs)."""
    current = {"events": store.version("events") or 0, "items": store.version("items") or 0}
    end = {k: current[k] if end is None or end.get(k) is None else int(end[k]) for k in current}
    d = Deltas(versions=end)
    ev_start, it_start = start.get("events"), start.get("items")
    users_filter = None
    changed: list[str] = []
    try:
        if ev_start is None:
            raise CdfGap("the replica reports no events version")
        changes = read_changes(store.path("events"), ev_start, end["events"], store.options)
        changed = pc.unique(changes.column("user_id")).to_pylist() if changes.num_rows else []
        users_filter = pc.field("user_id").isin(pa.array(changed, pa.string()))
        d.events_read = changes.num_rows
        if changes.num_rows:
            d.newest_event_ts = pc.max(changes.column("ts")).as_py().timestamp()
    except CdfGap as gap:
        log.warning("refresher: %s; falling back to a full refresh of every user (no data is "
                    "skipped)", gap)
        d.full = True
    history = store.read_arrow("events", version=end["events"],
                               columns=["user_id", "item_id", "weight", "ts"], filter=users_filter)
    if d.full:
        d.events_read = history.num_rows
        if history.num_rows:
            d.newest_event_ts = pc.max(history.column("ts")).as_py().timestamp()
    per_user: dict[str, tuple[list[str], list[float]]] = {u: ([], []) for u in changed}
    if history.num_rows:
        df = history.to_pandas().sort_values(["user_id", "ts"], kind="stable")
        for u, items, weights in zip(df["user_id"].to_numpy(), df["item_id"].to_numpy(),
                                     df["weight"].to_numpy()):
            hit = per_user.setdefault(u, ([], []))
            hit[0].append(items)
            hit[1].append(float(weights))
    d.users = sorted(u for u, (items, _) in per_user.items() if items)
    # no events left (deleted), or erased since the replica's erasure-log position (a full
    # refresh after VACUUM does not see the deletes): the replica forgets them. A user with
    # events newer than their erasure keeps that new history.
    from freshrec.erasure import read_log

    erasures = read_log(settings)
    d.versions["erasures"] = len(erasures)
    erased = set(erasures.since(start.get("erasures"))) - set(d.users)
    d.remove_users = sorted({u for u, (items, _) in per_user.items() if not items} | erased)
    d.histories = [per_user[u] for u in d.users]
    _item_changes(store, factors, it_start, end["items"], d)
    return d


def _item_changes(store: DeltaStore, factors: ModelFactors | None, start: int | None, end: int,
                  d: Deltas) -> None:
    try:
        if start is None:
            raise CdfGap("the replica reports no items version")
        changes = read_changes(store.path("items"), start, end, store.options)
    except CdfGap as gap:
        log.warning("refresher: %s; re-sending every item's state", gap)
        changes = store.read_arrow("items").append_column(
            "_change_type", pa.array(["insert"] * store.count("items"), pa.string()))
    if not changes.num_rows:
        return
    latest: dict[str, dict] = {}
    for r in changes.to_pylist():
        if r["_change_type"] == "update_preimage":
            continue
        latest[r["item_id"]] = r  # CDF rows come in commit order: the last one wins
    catalog = store.read_arrow("items", columns=["item_id", "categories", "active"]).to_pylist()
    vectors = []
    if factors is not None:
        centroids = _category_centroids(catalog, factors)
        overall = factors.matrix.mean(axis=0)
    for item, r in latest.items():
        if r["_change_type"] == "delete" or not r["active"]:
            d.remove_items.append(item)
            continue
        if factors is None:
            continue  # scored over histories: new items reach the model at its next training
        if item in factors.position:
            vec = factors.matrix[factors.position[item]]
        else:
            cats = [centroids[c] for c in (r["categories"] or []) if c in centroids]
            vec = np.mean(cats, axis=0) if cats else overall
        d.items.append(item)
        vectors.append(vec)
    d.item_vectors = np.stack(vectors).astype(np.float32) if vectors else None


def _category_centroids(catalog: list[dict], factors: ModelFactors) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for r in catalog:
        pos = factors.position.get(r["item_id"])
        if pos is None or not r["active"]:
            continue
        for c in r["categories"] or ():
            sums[c] = sums.get(c, 0) + factors.matrix[pos]
            counts[c] = counts.get(c, 0) + 1
    return {c: sums[c] / counts[c] for c in sums}


class Replica:
    """Admin calls to one replica: a single-process server, or one process of a multi-process
    host (``name`` says which, in logs and in :class:`ReplicaDown`)."""

    def __init__(self, address: str, settings: Settings, client=None, name: str = "") -> None:
        from serving.client import Client

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


def deltas_for(settings: Settings, store: DeltaStore, st, factors_of: dict,
               end: dict[str, int] | None = None) -> tuple[Deltas, list[tuple[str, Deltas]]]:
    """The deltas a replica whose ``Admin.Status`` is ``st`` needs (to ``end``, default the
    tables' current versions), and its other arms' item vectors; ``factors_of`` caches each
    model's item vectors."""
    others = tuple(sorted({a.model_version for a in st.arms} - {st.model_version}))
    for m in (st.model_version, *others):
        if m not in factors_of:
            factors_of[m] = ModelFactors.for_replica(settings, m)
    v = st.delta_versions
    d = compute_deltas(settings, store, factors_of[st.model_version],
                       {"events": v.get("events"), "items": v.get("items"),
                        "erasures": v.get("erasures")}, end=end)
    arm_items = []
    for m in others:  # the other arms' embedding models: their own item vectors
        if factors_of[m] is not None:
            extra = Deltas()
            _item_changes(store, factors_of[m], v.get("items"), d.versions["items"], extra)
            arm_items.append((m, extra))
    return d, arm_items


def _lagging(t, want: dict[str, int]) -> str:
    """Why process ``t`` (a :class:`serving.host.Target`) does not reflect ``want``, or ""."""
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
    from serving.host import host_processes

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
                        d, arm_items = deltas_for(settings, store, r.status(), factors_of)
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
    bronze taken into bronze and silver (:mod:`serving.ingest`), every server's impression log
    taken into ``impressions`` (:mod:`serving.impressions`), then the feedback join
    (:mod:`serving.feedback`, when ``feedback.in_nearline``)."""
    from serving.feedback import run_feedback
    from serving.impressions import take_impressions
    from serving.ingest import ingest_landed
    from serving.wal import land_all

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
    from serving.host import host_processes

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
            d, arm_items = deltas_for(settings, store, statuses[key], factors_of)
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
