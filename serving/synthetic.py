"""A serving snapshot written from clustered random vectors, without Spark, Delta or MLflow: for the
tests and benchmarks of the serving processes (``freshrec serve`` loads it as the latest snapshot
when no registered model resolves)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from freshrec.privacy.pseudonyms import pseudonymize
from freshrec.contracts.snapshot import (IDS_FILE, INDEX_FILE, ITEMS_FILE, MODEL_DIR, USERS_FILE, Manifest,
                               publish)
from recmodels import servable
from recmodels.index import ItemIndex


def write_snapshot(snapshots_dir: Path, hmac_key: str, n_items: int = 20_000, dim: int = 32,
                   n_users: int = 500, index_type: str = "ivf", nlist: int = 0, nprobe: int = 8,
                   clusters: int = 100, seed: int = 0, name: str = "synthetic") -> Path:
    """A complete snapshot of an ALS-like factor model (items ``i<n>``, raw users ``u<n>``, each
    with 10 history items of its cluster) published as ``LATEST`` in ``snapshots_dir``."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    assign = rng.integers(0, clusters, n_items)
    vecs = (centers[assign] + 0.35 * rng.normal(size=(n_items, dim))).astype(np.float32)
    item_ids = [f"i{i}" for i in range(n_items)]
    users = [pseudonymize(f"u{u}", hmac_key) for u in range(n_users)]
    picks = rng.integers(0, n_items, n_users)
    uvecs = (vecs[picks] + 0.2 * rng.normal(size=(n_users, dim))).astype(np.float32)
    hist = np.stack([rng.choice(np.flatnonzero(assign == assign[p]), 10) for p in picks])
    out = Path(snapshots_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    servable.write(out / MODEL_DIR, "als", "embedding", {}, {"type": "factors"},
                   {"item_ids": np.asarray(item_ids), "item_factors": vecs,
                    "user_ids": np.asarray(users), "user_factors": uvecs})
    idx = ItemIndex.build(item_ids, vecs, index_type, nlist=nlist, nprobe=nprobe)
    faiss.write_index(idx.index, str(out / INDEX_FILE))
    indptr = np.arange(0, 10 * n_users + 1, 10, dtype=np.int64)
    np.savez(out / USERS_FILE, user_ids=np.asarray(users), indptr=indptr,
             items=hist.ravel().astype(np.int64), weights=np.ones(hist.size, np.float32),
             recent_indptr=indptr, recent=hist.ravel().astype(np.int64), user_vectors=uvecs)
    (out / IDS_FILE).write_text(json.dumps(item_ids))
    (out / ITEMS_FILE).write_text(json.dumps({"inactive": [], "categories": {},
                                              "popular": item_ids[:1000], "newest_event_ts": None}))
    Manifest(model_version=f"{name} als", index_type=index_type, metric="inner_product", dim=dim,
             n_items=n_items, kind="embedding", model_name="als").write(out)
    publish(Path(snapshots_dir), name)
    return out
