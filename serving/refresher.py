"""Nearline refresher: silver ``events`` / ``items`` changes -> vector deltas -> every serving replica.

Each round asks every replica (``Admin.Status``) which Delta versions its vectors reflect, reads the
Change Data Feed of ``events`` and ``items`` from there to the tables' current versions, and sends
``Admin.ApplyDeltas`` in batches:

* users with new (or deleted) events get their vector recomputed by closed-form ALS fold-in over
  their whole history as of the current version, against the served model's item factors (confidence
  weights as in training; batched solves on cupy where the device choice finds a GPU, numpy
  otherwise). Recomputing from the full history, not adding increments, is what makes a repeated or
  resumed round harmless: the same versions always give the same vectors;
* items that were deactivated or deleted are removed; new or changed active items get a vector:
  their ALS factors when the model has them, else the mean factors of the items sharing their
  categories (content mapped into the factor space), else of the whole catalog.

The last batch to a replica carries the versions it now reflects and the newest event time (for
its lag). Only after every replica acknowledged does the local checkpoint (the versions processed)
move. A replica that is down is retried with backoff and reported; nothing is committed. If the
versions a replica needs are gone from the Change Data Feed (VACUUM), the round says so and sends a
full refresh of every user instead of skipping data. ``freshrec refresh [--loop]`` runs it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from freshrec.delta import DeltaStore
from freshrec.device import resolve_device
from freshrec.foldin import fold_in_batch, gram
from freshrec.settings import Settings

log = logging.getLogger(__name__)
CRASH_ENV = "FRESHREC_REFRESHER_CRASH_AT"  # test hook: SIGKILL this process at a named point


class ReplicaDown(RuntimeError):
    """A replica did not acknowledge its deltas after the retries; the checkpoint did not move."""


class CdfGap(RuntimeError):
    """The Change Data Feed no longer holds the versions asked for (VACUUM or log clean-up)."""


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.warning("test hook: killing the refresher at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ModelFactors:
    model_version: str
    item_ids: list[str]
    matrix: np.ndarray
    position: dict[str, int]
    yty: np.ndarray

    @classmethod
    def load(cls, store: DeltaStore) -> "ModelFactors":
        t = store.read_arrow("item_factors")
        if t.num_rows == 0:
            raise ValueError("item_factors is empty: run the batch DAG before the refresher")
        ids = t.column("item_id").to_pylist()
        mat = np.stack(t.column("factors").to_numpy(zero_copy_only=False)).astype(np.float32)
        return cls(t.column("model_version")[0].as_py(), ids, mat,
                   {i: n for n, i in enumerate(ids)}, gram(mat))


@dataclass
class Deltas:
    users: list[str] = field(default_factory=list)
    user_vectors: np.ndarray | None = None
    items: list[str] = field(default_factory=list)
    item_vectors: np.ndarray | None = None
    remove_items: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    newest_event_ts: float = 0.0
    events_read: int = 0
    unknown_item_events: int = 0
    full: bool = False


def read_changes(path: str, start: int, end: int) -> pa.Table:
    """CDF rows of versions (start, end]; raises :class:`CdfGap` when they are gone."""
    if end <= start:
        return pa.table({})
    try:
        reader = DeltaTable(path).load_cdf(starting_version=start + 1, ending_version=end)
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


def compute_deltas(settings: Settings, store: DeltaStore, factors: ModelFactors,
                   start: dict[str, int | None], xp=np) -> Deltas:
    end = {"events": store.version("events") or 0, "items": store.version("items") or 0}
    d = Deltas(versions=end)
    ev_start, it_start = start.get("events"), start.get("items")
    users_filter = None
    try:
        if ev_start is None:
            raise CdfGap("the replica reports no events version")
        changes = read_changes(store.path("events"), ev_start, end["events"])
        changed = pc.unique(changes.column("user_id")) if changes.num_rows else pa.array([], pa.string())
        users_filter = pc.field("user_id").isin(changed)
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
    if history.num_rows:
        pairs = history.group_by(["user_id", "item_id"]).aggregate([("weight", "sum")])
        item_ids = pairs.column("item_id").to_pylist()
        known = np.array([i in factors.position for i in item_ids])
        d.unknown_item_events = int((~known).sum())
        users = pairs.column("user_id").to_pylist()
        d.users = sorted({u for u, k in zip(users, known) if k})
        row = {u: n for n, u in enumerate(d.users)}
        sel = np.flatnonzero(known)
        d.user_vectors = fold_in_batch(
            factors.matrix, np.array([row[users[i]] for i in sel], dtype=np.int64),
            np.array([factors.position[item_ids[i]] for i in sel], dtype=np.int64),
            pairs.column("weight_sum").to_numpy()[sel].astype(np.float32), len(d.users),
            settings.als.alpha, settings.als.reg_param, yty=factors.yty, xp=xp)
    _item_changes(store, factors, it_start, end["items"], d)
    return d


def _item_changes(store: DeltaStore, factors: ModelFactors, start: int | None, end: int,
                  d: Deltas) -> None:
    try:
        if start is None:
            raise CdfGap("the replica reports no items version")
        changes = read_changes(store.path("items"), start, end)
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
    centroids = _category_centroids(catalog, factors)
    overall = factors.matrix.mean(axis=0)
    vectors = []
    for item, r in latest.items():
        if r["_change_type"] == "delete" or not r["active"]:
            d.remove_items.append(item)
            continue
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
    def __init__(self, address: str, settings: Settings) -> None:
        from serving.client import Client

        cfg = settings.refresher
        self.address = address
        self.client = Client(address, cfg.token, ca_file=cfg.ca_file or None)
        self.pb = self.client.admin_pb2
        self.retries, self.backoff = cfg.retries, cfg.backoff_seconds

    def call(self, method: str, request):
        import grpc

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return self.client.call_admin(method, request)
            except grpc.RpcError as e:
                retriable = e.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED,
                                         grpc.StatusCode.RESOURCE_EXHAUSTED)
                if not retriable or attempt == self.retries:
                    raise ReplicaDown(f"replica {self.address}: {method} failed after "
                                      f"{attempt + 1} tries: {e.code().name} {e.details()}") from e
                log.warning("replica %s: %s %s; retrying in %.1fs", self.address, method,
                            e.code().name, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def status(self):
        return self.call("Status", self.pb.StatusRequest())

    def push(self, d: Deltas, batch: int) -> None:
        pb = self.pb
        requests = []
        for i in range(0, len(d.users), batch):
            requests.append(pb.ApplyDeltasRequest(users_pseudonymized=True, upsert_users=[
                pb.Vector(id=u, values=v.tolist()) for u, v in
                zip(d.users[i:i + batch], d.user_vectors[i:i + batch])]))
        for i in range(0, len(d.items), batch):
            requests.append(pb.ApplyDeltasRequest(upsert_items=[
                pb.Vector(id=u, values=v.tolist()) for u, v in
                zip(d.items[i:i + batch], d.item_vectors[i:i + batch])]))
        for i in range(0, len(d.remove_items), batch):
            requests.append(pb.ApplyDeltasRequest(remove_items=d.remove_items[i:i + batch]))
        requests.append(pb.ApplyDeltasRequest(applied_versions=d.versions,
                                              newest_event_ts=d.newest_event_ts))
        for n, req in enumerate(requests):
            self.call("ApplyDeltas", req)
            if n == len(requests) // 2:
                _crash_point("mid_push")


def checkpoint_path(settings: Settings) -> Path:
    return settings.data_dir / "refresher" / "checkpoint.json"


def read_checkpoint(settings: Settings) -> dict:
    path = checkpoint_path(settings)
    return json.loads(path.read_text()) if path.exists() else {}


def write_checkpoint(settings: Settings, state: dict) -> None:
    path = checkpoint_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, path)


def refresh_once(settings: Settings) -> dict:
    """One round over every replica; returns a report. Raises ReplicaDown without committing."""
    t0 = time.perf_counter()
    store = DeltaStore(settings)
    factors = ModelFactors.load(store)
    device = resolve_device(settings.device, need=("cupy",))
    xp = __import__("cupy") if device.cupy else np
    replicas = [Replica(a, settings) for a in settings.refresher.replicas]
    failures: list[str] = []
    groups: dict[tuple, list[Replica]] = {}
    for r in replicas:
        try:
            st = r.status()
        except ReplicaDown as e:
            failures.append(str(e))
            continue
        if st.model_version != factors.model_version:
            failures.append(f"replica {r.address} serves {st.model_version} but item_factors hold "
                            f"{factors.model_version}: load the new snapshot (Admin.LoadSnapshot)")
            continue
        key = (st.delta_versions.get("events"), st.delta_versions.get("items"))
        groups.setdefault(key, []).append(r)
    _crash_point("after_status")
    report: dict = {"replicas": len(replicas), "model_version": factors.model_version,
                    "users": 0, "items": 0, "removed": 0, "events": 0, "full": False}
    for (ev, it), members in groups.items():
        d = compute_deltas(settings, store, factors, {"events": ev, "items": it}, xp=xp)
        _crash_point("after_read")
        report.update(users=max(report["users"], len(d.users)),
                      items=max(report["items"], len(d.items)),
                      removed=max(report["removed"], len(d.remove_items)),
                      events=max(report["events"], d.events_read),
                      full=report["full"] or d.full, versions=d.versions,
                      unknown_item_events=d.unknown_item_events)
        for r in members:
            try:
                r.push(d, settings.refresher.batch_size)
            except ReplicaDown as e:
                failures.append(str(e))
    if failures:
        raise ReplicaDown("; ".join(failures) + " (checkpoint not committed)")
    _crash_point("before_commit")
    if "versions" in report:
        write_checkpoint(settings, {**report["versions"], "model_version": factors.model_version})
    _crash_point("after_commit")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("refresher: %s", report)
    return report


def loop(settings: Settings, interval: float, rounds: int | None = None) -> None:
    n = 0
    while rounds is None or n < rounds:
        started = time.monotonic()
        try:
            refresh_once(settings)
        except (ReplicaDown, ValueError) as e:
            log.error("refresher round failed: %s; retrying next round", e)
        n += 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
