"""What one loaded snapshot serves: the item index, user vectors, seen items, item metadata.

Built from a snapshot directory (index, id map, manifest) and the Delta tables the manifest names
(``user_factors`` of the same model version, ``events`` for seen items, ``items`` for categories,
``item_features`` for popularity). The server swaps whole states by reference, so a request sees
one snapshot from start to end.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import scipy.sparse as sp

from freshrec.delta import DeltaStore
from freshrec.foldin import fold_in, gram
from freshrec.settings import Settings
from freshrec.snapshot import Manifest, latest_snapshot
from serving.index import ItemIndex

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    model_version: str
    manifest: Manifest
    items: ItemIndex
    user_vectors: dict[str, np.ndarray]
    seen: dict[str, set[str]]
    categories: dict[str, frozenset[str]]
    popular: list[str]  # active item ids, most popular (time-decayed) first
    delta_versions: dict[str, int | None] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    newest_event_ts: float | None = None
    users_lock: threading.Lock = field(default_factory=threading.Lock)
    # Interaction weights per user (rows) and snapshot item position (columns), for fold-in.
    history: sp.csr_matrix | None = None
    history_rows: dict[str, int] = field(default_factory=dict)
    alpha: float = 1.0
    reg: float = 0.1
    _yty: np.ndarray | None = None

    @property
    def yty(self) -> np.ndarray:
        if self._yty is None:
            live = np.fromiter(self.items.position.values(), np.int64)
            self._yty = gram(self.items.vectors[live])
        return self._yty

    def items_changed(self) -> None:
        self._yty = None

    def fold_in_user(self, user: str, recent: list[tuple[str, float]]) -> np.ndarray | None:
        """The user's vector from their stored history plus ``recent`` (item, weight) events."""
        weights: dict[str, float] = {}
        row = self.history_rows.get(user)
        if row is not None and self.history is not None:
            lo, hi = self.history.indptr[row], self.history.indptr[row + 1]
            for pos, w in zip(self.history.indices[lo:hi], self.history.data[lo:hi]):
                item = self.items.item_ids[pos] if pos < len(self.items.item_ids) else None
                if item is not None:
                    weights[item] = weights.get(item, 0.0) + float(w)
        for item, w in recent:
            weights[item] = weights.get(item, 0.0) + w
        known = [(i, w) for i, w in weights.items() if i in self.items.position]
        if not known:
            return None
        vecs = np.stack([self.items.vectors[self.items.position[i]] for i, _ in known])
        return fold_in(vecs, np.array([w for _, w in known]), self.yty, self.alpha, self.reg)

    def user_vector(self, user: str) -> np.ndarray | None:
        return self.user_vectors.get(user)

    def upsert_users(self, vectors: dict[str, np.ndarray]) -> int:
        with self.users_lock:
            for u, v in vectors.items():
                if v.shape != (self.items.dim,):
                    raise ValueError(f"user vector for {u} has shape {v.shape}, expected "
                                     f"({self.items.dim},)")
            self.user_vectors.update(vectors)
        return len(vectors)

    def remove_users(self, users: list[str]) -> int:
        with self.users_lock:
            return sum(self.user_vectors.pop(u, None) is not None for u in users)

    def forget_user(self, user: str) -> bool:
        self.seen.pop(user, None)
        return self.remove_users([user]) == 1


def load_state(settings: Settings, snapshot_dir: Path | None = None,
               use_gpu: bool = False) -> ServingState:
    from serving.index_snapshot import load_snapshot

    root = settings.snapshots_dir
    path = snapshot_dir or latest_snapshot(root)
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"no index snapshot in {root}: run the batch DAG (make run) or "
                                "`freshrec run build-index --date D` first")
    t0 = time.perf_counter()
    index, item_ids, manifest = load_snapshot(Path(path))
    vectors = _reconstruct_all(index, len(item_ids))
    items = ItemIndex(index, item_ids, vectors, manifest.index_type, use_gpu=use_gpu)
    store = DeltaStore(settings)
    uf = store.read_arrow("user_factors", filter=pc.field("model_version") == manifest.model_version)
    user_vectors = {}
    if uf.num_rows:
        mat = np.stack(uf.column("factors").to_numpy(zero_copy_only=False)).astype(np.float32)
        user_vectors = dict(zip(uf.column("user_id").to_pylist(), mat))
    ev_version = manifest.delta_versions.get("events")
    cols = ["user_id", "item_id", "ts", "weight"]
    ev = store.read_arrow("events", version=ev_version, columns=cols) \
        if ev_version is not None else store.read_arrow("events", columns=cols)
    user_list = ev.column("user_id").to_pylist()
    item_list = ev.column("item_id").to_pylist()
    seen: dict[str, set[str]] = {}
    for u, i in zip(user_list, item_list):
        seen.setdefault(u, set()).add(i)
    history_rows = {u: n for n, u in enumerate(seen)}
    pos = items.position
    keep = [n for n, i in enumerate(item_list) if i in pos]
    history = sp.csr_matrix(
        (ev.column("weight").to_numpy()[keep],
         ([history_rows[user_list[n]] for n in keep], [pos[item_list[n]] for n in keep])),
        shape=(len(history_rows), len(item_ids)), dtype=np.float32)
    history.sum_duplicates()
    newest = pc.max(ev.column("ts")).as_py() if ev.num_rows else None
    meta = store.read_arrow("items", columns=["item_id", "categories", "active"])
    categories = {r["item_id"]: frozenset(r["categories"] or ()) for r in meta.to_pylist()}
    feats = store.read_arrow("item_features", columns=["item_id", "popularity_decayed"])
    order = np.argsort(-np.nan_to_num(feats.column("popularity_decayed").to_numpy(
        zero_copy_only=False).astype(np.float64)), kind="stable")
    fids = feats.column("item_id").to_pylist()
    popular = [fids[i] for i in order if fids[i] in items.position]
    state = ServingState(
        model_version=manifest.model_version, manifest=manifest, items=items,
        user_vectors=user_vectors, seen=seen, categories=categories, popular=popular,
        delta_versions=dict(manifest.delta_versions),
        newest_event_ts=newest.timestamp() if newest else None,
        history=history, history_rows=history_rows, alpha=settings.als.alpha,
        reg=settings.als.reg_param)
    log.info("loaded snapshot %s: %d items (%s), %d users, in %.1fs", path, items.size,
             manifest.index_type, len(user_vectors), time.perf_counter() - t0)
    return state


def _reconstruct_all(index, n: int) -> np.ndarray:
    """The stored vectors by position (snapshot ids are positions 0..n-1)."""
    return index.reconstruct_batch(np.arange(n, dtype=np.int64)) if n else np.zeros((0, index.d))
