"""Build the snapshot of a registered model: the version's artifact, its catalog, every user's
history and, for embedding models, a FAISS index over its item vectors (see
:mod:`freshrec.contracts.snapshot`).

``run`` (the batch DAG's ``build_index`` task, after the gate) builds the snapshot of
``serving.model`` (default ``@champion``). Exact inner-product search (``IndexFlatIP``) for catalogs
up to ``index.exact_max_items``; above it IVF (``nlist`` from settings or 4*sqrt(n)) or HNSW, as
settings say. Inactive items (``items.active = false``) are left out of the index and marked in
``items.json``. Histories are read once here, from silver ``events`` at a pinned version, so a
replica reads no table to start. The snapshot is written to a temporary directory, renamed into
place and published as LATEST; one that exists for the same version and inputs is left as it is.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from freshrec.storage.crypto import cipher_for, save_npz
from freshrec.storage.delta import DeltaStore
from freshrec.durable import fsync_path, fsync_tree
from freshrec.privacy.erasure import guarded, scrub_arrays, scrub_tree
from freshrec.interval import DataInterval, run_job
from freshrec.settings import IndexSettings, Settings
from freshrec.contracts.snapshot import (IDS_FILE, INDEX_FILE, ITEMS_FILE, MANIFEST_FILE, MODEL_DIR,
                                         NEIGHBORS_FILE, USERS_FILE, Manifest, find_snapshot,
                                         latest_snapshot, publish)
from recmodels.index import ItemIndex

log = logging.getLogger(__name__)
RECENT_ITEMS = 50  # newest items kept per user, in time order (the deep encoders' input)


def build_index(vectors: np.ndarray, cfg: IndexSettings) -> tuple[faiss.Index, str, dict[str, int]]:
    """Exact search up to ``cfg.exact_max_items`` items, the configured ANN index above."""
    n = len(vectors)
    kind = "flat" if n <= cfg.exact_max_items else cfg.ann_type
    built = ItemIndex.build([str(i) for i in range(n)], vectors, kind, nlist=cfg.ivf_nlist,
                            nprobe=cfg.ivf_nprobe, hnsw_m=cfg.hnsw_m, ef_search=cfg.hnsw_ef_search)
    params = {"flat": {}, "hnsw": {"m": cfg.hnsw_m, "ef_search": cfg.hnsw_ef_search},
              "ivf": {"nlist": getattr(built.index, "nlist", 0), "nprobe": cfg.ivf_nprobe}}[kind]
    return built.index, kind, params


def _histories(store: DeltaStore, version: int | None, item_ids: list[str]):
    """users, CSR (indptr, items, weights) over catalog positions and the newest items in order.

    The events are scanned a record batch at a time (twice: distinct users first) and kept as
    numbers (user row, catalog position, ts, weight: 24 bytes an event), never as Python or pandas
    string objects, so the driver holds a few arrays of the events' length, not their ids."""
    cols = ["user_id", "item_id", "ts", "weight"]
    z = np.zeros(0, np.int64)
    empty = ([], np.zeros(1, np.int64), z, np.zeros(0, np.float32), np.zeros(1, np.int64), z)
    catalog = pa.array(item_ids, pa.string())
    seen: list[pa.Array] = []  # distinct users, first pass
    newest = None
    for batch in store.scan_batches("events", version=version, columns=["user_id", "ts"]):
        seen.append(pc.unique(batch.column("user_id")))
        if len(seen) > 64:
            seen = [pc.unique(pa.concat_arrays(seen))]
        m = pc.max(batch.column("ts"))
        if m.is_valid and (newest is None or m.value > newest.value):
            newest = m
    if newest is None:
        return (*empty, None)
    everyone = pc.unique(pa.concat_arrays(seen)) if seen else pa.array([], pa.string())
    everyone = everyone.take(pc.sort_indices(everyone))  # byte order = code point order
    total = store.table("events", version).to_pyarrow_dataset().count_rows()  # from metadata
    row = np.empty(total, np.int32)  # filled in place: no second copy from concatenating
    item = np.empty(total, np.int32)
    when = np.empty(total, np.int64)
    w = np.empty(total, np.float64)
    n = 0
    for batch in store.scan_batches("events", version=version, columns=cols):
        p = pc.index_in(batch.column("item_id"), value_set=catalog)
        keep = pc.is_valid(p)
        b = batch.filter(keep)
        m = n + b.num_rows
        row[n:m] = pc.index_in(b.column("user_id"), value_set=everyone).to_numpy()
        item[n:m] = p.filter(keep).to_numpy()
        when[n:m] = b.column("ts").cast(pa.int64()).to_numpy()
        w[n:m] = b.column("weight").to_numpy()
        n = m
    row, item, when, w = row[:n], item[:n], when[:n], w[:n]
    pa.default_memory_pool().release_unused()
    present = np.bincount(row, minlength=len(everyone)) > 0  # users with a catalog item
    users = everyone.filter(pa.array(present)).to_pylist()
    row = (np.cumsum(present) - 1).astype(np.int32)[row]
    # weights summed per (user, item) pair in float64, rows and columns sorted
    pairs = sp.csr_matrix((w, (row, item)), shape=(len(users), len(item_ids)))
    pairs.sum_duplicates()
    del w
    indptr = pairs.indptr.astype(np.int64)
    order = np.lexsort((when, row))  # by user, then time; ties keep the scan's order
    del when
    counts = np.bincount(row, minlength=len(users))
    del row
    kept = np.minimum(counts, RECENT_ITEMS)  # each user's newest, the last ``kept`` of their run
    rptr = np.r_[0, np.cumsum(kept)].astype(np.int64)
    ends = np.cumsum(counts)
    take = np.repeat(ends - kept - rptr[:-1], kept) + np.arange(rptr[-1])
    recent = item[order[take]].astype(np.int64)
    newest_s = pd.Timestamp(newest.value, unit=newest.type.unit).timestamp()
    return (users, indptr, pairs.indices.astype(np.int64), pairs.data.astype(np.float32), rptr,
            recent, newest_s)


def _user_vectors(model, users, indptr, items, weights, rptr, recent) -> np.ndarray:
    """Embedding models: each user's vector from their whole history (the stored state of the
    model only knew the training part)."""
    from recmodels.servable import UserInput

    out = []
    for lo in range(0, len(users), 1024):
        batch = [UserInput(users[r], items[indptr[r]:indptr[r + 1]], weights[indptr[r]:indptr[r + 1]],
                           recent[rptr[r]:rptr[r + 1]], fresh=True)
                 for r in range(lo, min(lo + 1024, len(users)))]
        out.append(model.user_vectors(batch))
    dim = model.item_vectors().shape[1]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def build_snapshot(settings: Settings, spec: str | int | None = None, interval: str = "",
                   publish_latest: bool = True) -> dict[str, object]:
    """The snapshot of registered version ``spec`` (alias or number; default ``serving.model``)."""
    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for
    from recmodels.servable import load

    mlflow_for(settings)
    ref = registry.resolve(spec if spec is not None else settings.serving.model)
    store = DeltaStore(settings)
    with guarded(settings) as erasures:  # the erasure log position these versions reflect
        versions = {t: store.version(t) for t in ("events", "items")}
    erased_at_build = len(erasures)
    root = settings.snapshots_dir
    name = f"v{ref.version}-{ref.model}-events{versions['events']}-items{versions['items']}"
    final = root / name
    if (final / MANIFEST_FILE).exists():
        if publish_latest and latest_snapshot(root) != final:
            publish(root, name)
        log.info("build_index: snapshot %s already built; nothing to do", name)
        return {"snapshot": str(final), "skipped": True, "model_version": ref.label}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with tempfile.TemporaryDirectory() as dl:
        model_dir, _ = registry.download(ref, dl)
        shutil.copytree(model_dir, tmp / MODEL_DIR)
    model = load(tmp / MODEL_DIR)
    item_ids = [str(i) for i in model.item_ids]
    position = {i: n for n, i in enumerate(item_ids)}
    meta = store.read_arrow("items", columns=["item_id", "categories", "active"]) \
        if store.exists("items") else None
    active = np.ones(len(item_ids), bool)
    categories: dict[str, list[str]] = {}
    if meta is not None:
        for r in meta.to_pylist():
            p = position.get(r["item_id"])
            if p is not None:
                active[p] = bool(r["active"]) if r["active"] is not None else True
                categories[r["item_id"]] = list(r["categories"] or [])
    popularity = np.zeros(len(item_ids), np.float64)
    if store.exists("item_features"):
        feats = store.read_arrow("item_features", columns=["item_id", "popularity_decayed"])
        for i, v in zip(feats.column("item_id").to_pylist(),
                        feats.column("popularity_decayed").to_pylist()):
            if i in position and v is not None:
                popularity[position[i]] = v
    users, indptr, items, weights, rptr, recent, newest = _histories(store, versions["events"],
                                                                     item_ids)
    if not popularity.any() and len(items):  # no features table: raw counts
        popularity = np.bincount(items, weights=weights, minlength=len(item_ids))
    order = [item_ids[i] for i in np.argsort(-popularity, kind="stable") if active[i]]
    arrays = {"user_ids": np.asarray(users, dtype=str), "indptr": indptr, "items": items,
              "weights": weights, "recent_indptr": rptr, "recent": recent}
    # a model scored over histories names its own retrieval (the hybrid: each source's index)
    kind, index_type, params, dim = model.kind, model.index_type, {}, 0
    if model.kind == "embedding":
        vectors = model.item_vectors()
        dim = int(vectors.shape[1])
        arrays["user_vectors"] = _user_vectors(model, users, indptr, items, weights, rptr, recent)
        index, index_type, params = build_index(vectors, settings.index)
        idx = ItemIndex(index, item_ids, vectors, index_type)
        idx.remove([i for i, a in zip(item_ids, active) if not a])
        faiss.write_index(idx.index, str(tmp / INDEX_FILE))
    if store.exists("item_neighbors"):  # gold co-occurrence neighbours: SimilarItems for models
        nb = store.read_arrow("item_neighbors", columns=["item_id", "neighbor_id", "score"])  # that
        a = [position.get(i) for i in nb.column("item_id").to_pylist()]  # have no item similarity
        b = [position.get(i) for i in nb.column("neighbor_id").to_pylist()]
        keep = [n for n, (x, y) in enumerate(zip(a, b)) if x is not None and y is not None]
        m = sp.csr_matrix((nb.column("score").to_numpy()[keep].astype(np.float32),
                           ([a[n] for n in keep], [b[n] for n in keep])),
                          shape=(len(item_ids), len(item_ids)))
        np.savez(tmp / NEIGHBORS_FILE, indptr=m.indptr, indices=m.indices, data=m.data)
    (tmp / IDS_FILE).write_text(json.dumps(item_ids))
    (tmp / ITEMS_FILE).write_text(json.dumps({
        "inactive": [i for i, a in zip(item_ids, active) if not a], "categories": categories,
        "popular": order, "newest_event_ts": newest}))
    manifest = Manifest(model_version=ref.label, index_type=index_type, metric="inner_product",
                        dim=dim, n_items=len(item_ids),
                        delta_versions={**versions, "erasures": erased_at_build},
                        built_for_interval=interval, params=params,
                        registered_model=ref.registered_model, registry_version=ref.version,
                        model_name=ref.model, kind=kind)
    manifest.write(tmp)
    with guarded(settings) as erasures:  # users erased while this was built stay out of it
        for user in erasures.since(erased_at_build):
            scrub_arrays(arrays, user)
            scrub_tree(tmp / MODEL_DIR, user)
        save_npz(tmp / USERS_FILE, arrays, cipher_for(settings))
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_path(root)
    if publish_latest:
        publish(root, name)
    log.info("build_index: snapshot of %s (%s, %s index, %d items, %d users) -> %s", ref.label,
             kind, index_type, len(item_ids), len(users), final)
    return {"snapshot": str(final), "skipped": False, "model_version": ref.label,
            "index_type": index_type, "n_items": len(item_ids), "n_users": len(users)}


def run(settings: Settings, interval: DataInterval) -> dict[str, object]:
    return build_snapshot(settings, None, interval.batch_date)




def main(argv: list[str] | None = None) -> dict[str, object]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()


def build_for_serving(settings: Settings, version: int) -> str:
    """The :data:`serving.state.SnapshotBuilder` the command line hands to the loaders: the
    snapshot directory of registered ``version``, built now (not published as the latest)."""
    return str(build_snapshot(settings, version, publish_latest=False)["snapshot"])


def ensure_served(settings: Settings) -> list[str]:
    """Before ``freshrec serve`` starts its processes: the snapshot of ``serving.model`` and of
    every experiment arm's model, built here once when missing, so the server processes only load
    them (N processes never build one side by side). A model that does not resolve is left to the
    server, which says why it has nothing to serve. Returns the snapshot directories."""
    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for

    specs = [settings.serving.model, *(a.model for a in settings.serving.experiment.arms)]
    found = []
    for spec in dict.fromkeys(specs):
        try:
            mlflow_for(settings)
            ref = registry.resolve(spec)
            path = find_snapshot(settings.snapshots_dir, ref.version)
            if path is None:
                log.info("no snapshot of %s yet: building it before serving", ref.label)
                path = build_for_serving(settings, ref.version)
            found.append(str(path))
        except Exception as e:  # noqa: BLE001 - the server reports what it cannot serve
            log.info("snapshot of %r not prepared before serving (%s)", spec, e)
    return found

