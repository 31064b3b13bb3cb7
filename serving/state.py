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

from freshrec.delta import DeltaStore
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
    ev = store.read_arrow("events", version=ev_version, columns=["user_id", "item_id", "ts"]) \
        if ev_version is not None else store.read_arrow("events", columns=["user_id", "item_id", "ts"])
    seen: dict[str, set[str]] = {}
    for u, i in zip(ev.column("user_id").to_pylist(), ev.column("item_id").to_pylist()):
        seen.setdefault(u, set()).add(i)
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
        newest_event_ts=newest.timestamp() if newest else None)
    log.info("loaded snapshot %s: %d items (%s), %d users, in %.1fs", path, items.size,
             manifest.index_type, len(user_vectors), time.perf_counter() - t0)
    return state


def _reconstruct_all(index, n: int) -> np.ndarray:
    """The stored vectors by position (snapshot ids are positions 0..n-1)."""
    return index.reconstruct_batch(np.arange(n, dtype=np.int64)) if n else np.zeros((0, index.d))
