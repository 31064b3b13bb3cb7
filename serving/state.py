"""What one loaded snapshot serves: the registered model, its catalog (a FAISS index for embedding
models), every user's history, item metadata.

Built from a snapshot directory alone (see :mod:`freshrec.contracts.snapshot`): the model artifact is loaded
with :func:`recmodels.servable.load`, no training code and no Delta table is read. The server swaps
whole states by reference, so a request sees one model from start to end. The same loader serves
``freshrec serve``, offline ``freshrec recommend``, the report and the refresher's view of a replica.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freshrec.settings import Settings
from freshrec.contracts.snapshot import (ITEMS_FILE, MODEL_DIR, NEIGHBORS_FILE, USERS_FILE, Manifest,
                               find_snapshot, latest_snapshot)
from recmodels.servable import Servable, UserInput
from recmodels.index import Catalog, ItemIndex

log = logging.getLogger(__name__)


class SeenItems:
    """user -> set of item ids they met, read from the histories on demand."""

    def __init__(self, state: "ServingState") -> None:
        self.state = state

    def get(self, user: str, default=()):
        items, _, _ = self.state.history(user)
        if not len(items):
            return default
        cat = self.state.catalog
        return {cat[i] for i in items}

    def __getitem__(self, user: str) -> set[str]:
        got = self.get(user, None)
        if got is None:
            raise KeyError(user)
        return got

    def pop(self, user: str, default=None):
        return self.state.forget_history(user) or default


@dataclass
class ServingState:
    model_version: str  # the registry label, e.g. "freshrec-retrieval/3 two_tower"
    manifest: Manifest
    model: Servable
    items: ItemIndex | Catalog
    catalog: list[str]  # the model's item ids by position
    user_rows: dict[str, int]
    arrays: dict[str, np.ndarray]  # users.npz: indptr, items, weights, recent_indptr, recent
    user_vectors: dict[str, np.ndarray]
    categories: dict[str, frozenset[str]]
    popular: list[str]  # active item ids, most popular (time-decayed) first
    path: Path | None = None
    neighbors: object = None  # gold item_neighbors (CSR over catalog positions) or None
    delta_versions: dict[str, int | None] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    newest_event_ts: float | None = None
    users_lock: threading.Lock = field(default_factory=threading.Lock)
    # histories the refresher replaced since the snapshot: user -> (items, weights, recent)
    overrides: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    skipped_snapshots: list[str] = field(default_factory=list)  # newer ones start-up could not use

    def __post_init__(self) -> None:
        self.seen = SeenItems(self)

    @property
    def embedding(self) -> bool:
        return isinstance(self.items, ItemIndex)

    # ---- histories -------------------------------------------------------------------------
    def history(self, user: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(catalog positions, summed weights, newest positions in time order) of a user."""
        hit = self.overrides.get(user)
        if hit is not None:
            return hit
        r = self.user_rows.get(user)
        a = self.arrays
        if r is None:
            z = np.zeros(0, np.int64)
            return z, np.zeros(0, np.float32), z
        lo, hi = a["indptr"][r], a["indptr"][r + 1]
        rlo, rhi = a["recent_indptr"][r], a["recent_indptr"][r + 1]
        return a["items"][lo:hi], a["weights"][lo:hi], a["recent"][rlo:rhi]

    def user_input(self, user: str, recent: list[tuple[str, float]] = ()) -> UserInput:
        """The user's history plus ``recent`` (item, weight) events not in it yet."""
        items, weights, seq = self.history(user)
        fresh = user in self.overrides
        if recent:
            n = self.model.n_items
            extra = [(self.items.position.get(i), w) for i, w in recent]
            extra = [(p, w) for p, w in extra if p is not None and p < n]
            if extra:
                merged: dict[int, float] = dict(zip(items.tolist(), weights.tolist()))
                for p, w in extra:
                    merged[p] = merged.get(p, 0.0) + float(w)
                items = np.fromiter(merged.keys(), np.int64, len(merged))
                weights = np.fromiter(merged.values(), np.float32, len(merged))
                seq = np.r_[seq, [p for p, _ in extra]].astype(np.int64)
                fresh = True
        return UserInput(user, items, weights, seq, fresh)

    def set_history(self, user: str, items: list[str], weights: list[float]) -> bool:
        """Replace a user's history (the refresher's delta, items oldest first); recomputes their
        vector for embedding models. Items outside the model's catalog are left out."""
        n = self.model.n_items
        pos = [(self.items.position.get(i), float(w)) for i, w in zip(items, weights)]
        pos = [(p, w) for p, w in pos if p is not None and p < n]
        merged: dict[int, float] = {}
        for p, w in pos:
            merged[p] = merged.get(p, 0.0) + w
        seq = np.array([p for p, _ in pos][-50:], np.int64)
        hist = (np.fromiter(merged.keys(), np.int64, len(merged)),
                np.fromiter(merged.values(), np.float32, len(merged)), seq)
        vec = None
        if self.embedding and len(hist[0]):
            vec = self.model.user_vectors([UserInput(user, *hist, fresh=True)])[0]
        with self.users_lock:
            self.overrides[user] = hist
            if vec is not None:
                self.user_vectors[user] = vec
            elif not len(hist[0]):
                self.user_vectors.pop(user, None)
        return True

    def forget_history(self, user: str) -> bool:
        had = user in self.user_rows or user in self.overrides
        with self.users_lock:
            z = np.zeros(0, np.int64)
            self.overrides[user] = (z, np.zeros(0, np.float32), z)
        return had

    # ---- user side ---------------------------------------------------------------------------
    def fold_in_user(self, user: str, recent: list[tuple[str, float]]) -> np.ndarray | None:
        """Embedding models: the user's vector from their history plus ``recent`` events (ALS
        fold-in, PureSVD projection or the deep encoder, whichever the model is)."""
        if not self.embedding:
            return None
        ui = self.user_input(user, recent)
        if not len(ui.items):
            return None
        return self.model.user_vectors([ui])[0]

    def user_vector(self, user: str) -> np.ndarray | None:
        return self.user_vectors.get(user)

    def knows(self, user: str) -> bool:
        return len(self.history(user)[0]) > 0 or user in self.user_vectors

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
        had = self.forget_history(user)
        return (self.remove_users([user]) == 1) or had


def build_state(model: Servable, label: str, users: list[str], arrays: dict[str, np.ndarray],
                index=None, index_type: str = "flat", user_vectors: dict | None = None,
                categories: dict | None = None, popular: list[str] | None = None) -> ServingState:
    """A state from parts already in memory (benchmarks, tests): ``arrays`` as in ``users.npz``
    (indptr, items, weights, recent_indptr, recent); ``index`` an ItemIndex for embedding models."""
    ids = [str(i) for i in model.item_ids]
    kind = "embedding" if index is not None else model.kind
    manifest = Manifest(model_version=label, index_type=index_type if index is not None else "none",
                        metric="inner_product", dim=index.dim if index is not None else 0,
                        n_items=len(ids), model_name=label.split()[-1], kind=kind)
    return ServingState(
        model_version=label, manifest=manifest, model=model,
        items=index if index is not None else Catalog(ids), catalog=ids,
        user_rows={u: n for n, u in enumerate(users)}, arrays=arrays,
        user_vectors=user_vectors or {}, categories=categories or {},
        popular=popular if popular is not None else ids[:1000])


# builds the snapshot of a registered version and returns its directory (nearline.snapshots, passed
# in by the command line: serving never builds a snapshot itself)
SnapshotBuilder = Callable[[Settings, int], "str | Path"]


def resolve_snapshot(settings: Settings, spec: str | int | None = None,
                     build: SnapshotBuilder | None = None) -> Path:
    """The snapshot directory of registered version ``spec`` (alias or number; default
    ``serving.model``): the newest one built for it, else (``build``, a
    :data:`SnapshotBuilder` the command line passes) built now. A server process passes none: it
    loads snapshots that the gate, the rollout or ``freshrec serve`` built."""
    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for

    root = settings.snapshots_dir
    spec = settings.serving.model if spec is None else spec
    try:
        mlflow_for(settings)
        ref = registry.resolve(spec)
    except LookupError:
        raise  # names the alias or version that is missing
    except Exception as e:  # no tracking store at all
        raise LookupError(f"cannot resolve model {spec!r} in the registry ({e})") from None
    path = find_snapshot(root, ref.version)
    if path is None and build is not None:  # the command line's loaders; a server only loads
        log.info("no snapshot of %s yet: building it", ref.label)
        path = Path(build(settings, ref.version))
    if path is None:
        raise FileNotFoundError(f"no snapshot of {ref.label} in {root}: build it with "
                                f"`freshrec model rollout {ref.version}`")
    return path


def snapshot_candidates(settings: Settings, model: str | int | None = None,
                        build: SnapshotBuilder | None = None) -> list[Path]:
    """The snapshots start-up may serve, best first: the one :func:`resolve_snapshot` picks for
    ``model`` (an alias or a version; default ``serving.model``), the older ones of the same
    registered version, and for the default model (no version asked for) every other complete
    snapshot, newest first (an older model beats not serving at all)."""
    from freshrec.contracts.snapshot import MANIFEST_FILE

    root = settings.snapshots_dir
    first: Path | None = None
    version = None
    try:
        first = resolve_snapshot(settings, model, build)
        version = Manifest.read(first).registry_version
    except LookupError:
        if model is not None:
            raise
        first = latest_snapshot(root)
        if first is not None:
            log.warning("no registered model %r: serving the latest snapshot %s",
                        settings.serving.model, first)
    except ValueError as e:  # the manifest of the chosen one is unreadable: try the others
        log.error("snapshot %s: unreadable manifest (%s)", first, e)
    others = []
    if root.exists():
        for d in root.iterdir():
            if d.name.startswith(".") or d == first or not (d / MANIFEST_FILE).exists():
                continue
            try:
                v = json.loads((d / MANIFEST_FILE).read_text()).get("registry_version")
            except (ValueError, OSError):
                continue
            same = version is not None and v == version
            if same or model is None:
                others.append((not same, -d.stat().st_mtime, d))
    return ([first] if first is not None else []) + [d for *_, d in sorted(others)]


def mmap_index(settings: Settings, use_gpu: bool = False) -> bool:
    """Whether the snapshot's index is memory-mapped read-only (``serving.mmap_index`` true; the
    supervisor of several processes turns auto into true for its children). Never with a GPU
    replica."""
    return not use_gpu and settings.serving.mmap_index is True


def load_state(settings: Settings, snapshot_dir: Path | None = None, use_gpu: bool = False,
               model: str | int | None = None, fallback: bool = False,
               build: SnapshotBuilder | None = None) -> ServingState:
    """Load a snapshot: ``snapshot_dir`` if given, else the snapshot of ``model`` (an alias or a
    version; default ``serving.model``). With ``fallback`` (start-up) and no ``snapshot_dir``,
    an unusable snapshot (a 0-byte ``index.faiss``, a corrupt ``users.npz``...) is logged and
    skipped for the next one of :func:`snapshot_candidates`; the state's ``skipped_snapshots``
    names what was skipped and why. Raises FileNotFoundError / LookupError / ArtifactError
    naming what is wrong; nothing is swapped in by this function. Users erased after the
    snapshot was built are left out."""
    if snapshot_dir is not None:
        return _load_one(settings, Path(snapshot_dir), use_gpu)
    candidates = snapshot_candidates(settings, model, build)
    if not candidates:
        raise FileNotFoundError(
            f"no snapshot in {settings.snapshots_dir} and no registered champion: run the "
            "batch DAG (make run) or `freshrec run all --date D` first")
    if not fallback:  # an admin's load names the broken file instead
        return _load_one(settings, candidates[0], use_gpu)
    skipped: list[str] = []
    for path in candidates:
        try:
            state = _load_one(settings, path, use_gpu)
        except Exception as e:  # noqa: BLE001 - any unusable snapshot: try the next older one
            why = f"{path.name}: {type(e).__name__}: {str(e)[:300]}"
            log.error("snapshot %s is unusable (%s); trying the next older one", path, why)
            skipped.append(why)
            continue
        if skipped:
            log.warning("serving the older snapshot %s: %d newer one(s) unusable (%s)", path,
                        len(skipped), "; ".join(skipped))
        state.skipped_snapshots = skipped
        return state
    raise FileNotFoundError(f"no usable snapshot in {settings.snapshots_dir}: "
                            + "; ".join(skipped))


def _load_one(settings: Settings, snapshot_dir: Path, use_gpu: bool) -> ServingState:
    from freshrec.storage.crypto import cipher_for, load_npz
    from freshrec.privacy.erasure import read_log
    from recmodels.servable import load
    from freshrec.contracts.snapshot import load_snapshot

    path = Path(snapshot_dir)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"{path}: not a snapshot (no manifest.json)")
    t0 = time.perf_counter()
    mmap = mmap_index(settings, use_gpu)
    index, item_ids, manifest = load_snapshot(path, mmap=mmap)
    model_obj = load(path / MODEL_DIR, device="cuda" if use_gpu else "cpu")
    if [str(i) for i in model_obj.item_ids] != list(item_ids):
        from recmodels.servable import ArtifactError

        raise ArtifactError(f"{path / MODEL_DIR}: the model's item ids do not match the snapshot's "
                            f"catalog ({path / 'item_ids.json'}); rebuild the snapshot")
    meta = json.loads((path / ITEMS_FILE).read_text())
    arrays = load_npz(path / USERS_FILE, cipher_for(settings))
    users = arrays.pop("user_ids").tolist()
    vecs = arrays.pop("user_vectors", None)
    if manifest.kind == "embedding":
        vectors = model_obj.item_vectors()
        cfg = settings.serving
        items: ItemIndex | Catalog = ItemIndex(
            index, item_ids, vectors, manifest.index_type, use_gpu=use_gpu, read_only=mmap,
            batch_window_ms=cfg.gpu_batch_window_ms if use_gpu else 0.0,
            batch_max=cfg.gpu_batch_max)
        for i in meta["inactive"]:  # removed from the index already; not served
            items.position.pop(i, None)
        user_vectors = dict(zip(users, vecs)) if vecs is not None else {}
    else:
        items = Catalog(item_ids, model_obj.index_type)
        items.remove(meta["inactive"])
        user_vectors = {}
    neighbors = None
    if (path / NEIGHBORS_FILE).exists():
        import scipy.sparse as sp

        with np.load(path / NEIGHBORS_FILE) as z:
            neighbors = sp.csr_matrix((z["data"], z["indices"], z["indptr"]),
                                      shape=(len(item_ids), len(item_ids)))
    state = ServingState(
        neighbors=neighbors, model_version=manifest.model_version, manifest=manifest,
        model=model_obj, items=items,
        catalog=list(item_ids), user_rows={u: n for n, u in enumerate(users)}, arrays=arrays,
        user_vectors=user_vectors,
        categories={i: frozenset(c) for i, c in meta["categories"].items()},
        popular=list(meta["popular"]), path=path, delta_versions=dict(manifest.delta_versions),
        newest_event_ts=meta.get("newest_event_ts"))
    erasures = read_log(settings)
    gone = [u for u in erasures.since(manifest.delta_versions.get("erasures"))
            if u in state.user_rows or u in state.user_vectors]
    for u in gone:  # erased after this snapshot was built
        state.forget_user(u)
    state.delta_versions["erasures"] = len(erasures)
    log.info("loaded %s from %s: %d items (%s, %s), %d users (%d erased since it was built), "
             "in %.1fs", state.model_version, path, items.size, manifest.kind,
             manifest.index_type, len(users), len(gone), time.perf_counter() - t0)
    return state
