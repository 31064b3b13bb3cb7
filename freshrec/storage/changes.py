"""The Change Data Feed of silver ``events`` and ``items`` as deltas for a serving replica.

``read_changes`` reads a table's CDF between two versions; :func:`compute_deltas` turns the
changes since a replica's versions into :class:`Deltas`: whole user histories (as of the end
version), removed users (no events left, or erased since the replica's erasure-log position), and
removed and new or changed items with a vector for embedding models (:class:`ModelFactors`).
:func:`deltas_for` does it for one replica's ``Admin.Status``. Used by the nearline refresher and by
a serving host catching up a restarted process; the model's item vectors come from a loader the
caller passes (``recmodels.servable.model_factors``), so this module reads no model artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from freshrec.settings import Settings
from freshrec.storage.delta import DeltaStore

log = logging.getLogger(__name__)


class CdfGap(RuntimeError):
    """The Change Data Feed no longer holds the versions asked for (VACUUM or log clean-up)."""


@dataclass
class ModelFactors:
    """The item vectors of the model a replica serves (embedding models), from its snapshot."""

    model_version: str
    item_ids: list[str]
    matrix: np.ndarray
    position: dict[str, int]


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
    from freshrec.privacy.erasure import read_log

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


def deltas_for(settings: Settings, store: DeltaStore, st, factors_of: dict,
               load_factors: Callable[[Settings, str], ModelFactors | None],
               end: dict[str, int] | None = None) -> tuple[Deltas, list[tuple[str, Deltas]]]:
    """The deltas a replica whose ``Admin.Status`` is ``st`` needs (to ``end``, default the
    tables' current versions), and its other arms' item vectors; ``factors_of`` caches each
    model's item vectors, read by ``load_factors(settings, model_version)``."""
    others = tuple(sorted({a.model_version for a in st.arms} - {st.model_version}))
    for m in (st.model_version, *others):
        if m not in factors_of:
            factors_of[m] = load_factors(settings, m)
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
