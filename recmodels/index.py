"""The serving index: item vectors in FAISS with an id map, upserts and removals on every index type.

Knows nothing of gRPC. Items are addressed by their string id; FAISS holds int64 positions. A CPU
index is the master copy: Flat and IVF remove vectors with ``remove_ids``; HNSW cannot, so removed
positions become tombstones, excluded at search with an ``IDSelectorNot`` and dropped by a rebuild
once they pass a share of the index. Where a GPU is present, searches go to a GPU replica of the
master (FAISS GPU indexes cannot remove vectors): removed positions are tombstoned for the replica
and filtered from its results until the replica is re-copied from the master. Removed items
therefore never come back in a result, whatever the index. Concurrency: searches share a read
lock, deltas take the write lock.

The GPU replica is FAISS's (``index_cpu_to_gpu``) where FAISS has a GPU build, else an exact
top-k in torch on the CUDA device (:class:`recmodels.batcher.TorchExactSearch`). With
``batch_window_ms`` > 0, concurrent searches of the replica (or, for tests and benchmarks, of a
CPU flat or IVF index) go through a :class:`recmodels.batcher.SearchBatcher`: queries arriving
within the window are answered by one batched search. A batch runs while each of its callers
holds the read lock, so no delta lands in the middle of one.

A **read-only** index (``read_only=True``: the snapshot's index memory-mapped with
``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``, its pages shared by every process of a host) is never
written: FAISS aborts the process on an add or remove there. Removals become tombstones filtered at
search with an ``IDSelectorNot`` (flat, IVF and HNSW alike), upserts go to a small in-memory overlay
(an exact inner-product index) searched next to it and merged by score. When tombstones and overlay
together pass a share of the index, the index is copied into this process's memory with them
applied, and is an ordinary writable index from then on (its pages are no longer shared).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from contextlib import contextmanager

import faiss
import numpy as np

log = logging.getLogger(__name__)

REBUILD_TOMBSTONE_SHARE = 0.1


class _Reading:
    """``with lock.read():`` without a generator per call (searches take it on every request)."""

    __slots__ = ("lock",)

    def __init__(self, lock: "ReadWriteLock") -> None:
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire_read()

    def __exit__(self, *exc) -> None:
        self.lock.release_read()


class ReadWriteLock:
    """Many readers or one writer; writers wait for readers to drain and block new ones."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._reading = _Reading(self)

    # Readers take the mutex directly (C calls), not through the Condition's Python-level
    # __enter__/__exit__: every search takes and releases the read side.
    def acquire_read(self) -> None:
        mutex = self._mutex
        mutex.acquire()
        try:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        finally:
            mutex.release()

    def release_read(self) -> None:
        mutex = self._mutex
        mutex.acquire()
        self._readers -= 1
        if not self._readers and self._waiting_writers:
            self._cond.notify_all()
        mutex.release()

    def read(self) -> _Reading:
        return self._reading

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def _training_sample(vectors: np.ndarray, nlist: int, per_list: int = 64) -> np.ndarray:
    """k-means needs tens of points per list, not all of them: train on a seeded sample."""
    n = per_list * nlist
    if len(vectors) <= n:
        return vectors
    pick = np.random.default_rng(0).choice(len(vectors), n, replace=False)
    return vectors[np.sort(pick)]


class ItemIndex:
    """Item vectors by string id over a FAISS index (flat, ivf or hnsw)."""

    def __init__(self, index: faiss.Index, item_ids: list[str], vectors: np.ndarray,
                 index_type: str, use_gpu: bool = False, read_only: bool = False,
                 batch_window_ms: float = 0.0, batch_max: int = 256,
                 replica_device: str = "cuda") -> None:
        if read_only and use_gpu:
            raise ValueError("a read-only (memory-mapped) index has no GPU replica: load it "
                             "into memory (serving.mmap_index: off) to search on the GPU")
        self.index = index
        self.read_only = read_only
        self.overlay: faiss.Index | None = None  # upserts of a read-only index
        self._selector = None  # (tombstone count, IDSelectorNot, its id array) of a read-only index
        self.index_type = index_type
        self.item_ids: list[str | None] = list(item_ids)
        self.position = {item: i for i, item in enumerate(item_ids)}
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n_vectors = len(item_ids)
        self.tombstones: set[int] = set()  # removed positions still inside a FAISS index
        self.lock = ReadWriteLock()
        self._gpu = None
        self._gpu_tombstones: set[int] = set()
        self.replica_device = replica_device  # the torch replica's device (no FAISS GPU build)
        if use_gpu:
            self._make_gpu_replica()
        self.batcher = None
        if batch_window_ms > 0:
            if self._gpu is None and (read_only or index_type == "hnsw"):
                raise ValueError("batched search (serving.gpu_batch_window_ms) needs a GPU "
                                 f"replica or an in-memory flat or IVF index, not a "
                                 f"{'read-only' if read_only else index_type} one")
            from recmodels.batcher import SearchBatcher

            self.batcher = SearchBatcher(self._search_many, batch_window_ms, batch_max)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, item_ids: list[str], vectors: np.ndarray, index_type: str = "flat",
              nlist: int = 0, nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128,
              use_gpu: bool = False) -> "ItemIndex":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        ids = np.arange(n, dtype=np.int64)
        if index_type == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        elif index_type == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efSearch = ef_search
            index = faiss.IndexIDMap2(hnsw)
        elif index_type == "ivf":
            nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(_training_sample(vectors, nlist))
            index.nprobe = nprobe
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        else:
            raise ValueError(f"unknown index type {index_type!r}; use flat, ivf or hnsw")
        index.add_with_ids(vectors, ids)
        return cls(index, item_ids, vectors, index_type, use_gpu)

    def _make_gpu_replica(self) -> None:
        """FAISS's GPU copy of the master (removed positions tombstoned for it), or (no FAISS GPU
        build) an exact torch search on ``replica_device`` over the live vectors only, answering
        with their positions (removed ones masked until the next rebuild)."""
        if gpu_count() > 0 and self.replica_device.startswith("cuda"):
            res = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(res, 0, self.index)
            self._gpu_res = res
            self._gpu_tombstones = set()
            return
        from recmodels.batcher import TorchExactSearch, torch_cuda_reason

        why = torch_cuda_reason() if self.replica_device.startswith("cuda") else None
        if why is not None:
            raise RuntimeError(f"a GPU index was asked for but FAISS has no GPU build and {why}: "
                               "install the gpu extra or set device: cpu")
        live = np.fromiter(sorted(set(self.position.values()) - self.tombstones), np.int64)
        self._gpu = None  # the old copy's device memory goes before the new one is made
        self._gpu = TorchExactSearch(self.vectors[live], self.replica_device, ids=live)
        self._gpu_tombstones = set()  # the torch replica masks removed rows itself

    def _search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One search of a batch of queries (the batcher's): the GPU replica, else the index."""
        target = self._gpu if self._gpu is not None else self.index
        return target.search(queries, k)

    # ---- reads ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Items that can be served (removed ones excluded)."""
        return len(self.position)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def vector(self, item_id: str) -> np.ndarray | None:
        pos = self.position.get(item_id)
        return None if pos is None else self.vectors[pos]

    def search(self, query: np.ndarray, n: int) -> list[tuple[str, float]]:
        """Up to ``n`` (item id, score) by inner product, best first; removed items never appear."""
        return [(i, s) for _, i, s in self.search_positions(query, n)]

    def search_positions(self, query: np.ndarray, n: int) -> list[tuple[int, str, float]]:
        """Up to ``n`` (position, item id, score), best first; removed items never appear."""
        q = query if query.dtype == np.float32 and query.flags.c_contiguous else \
            np.ascontiguousarray(query, dtype=np.float32)
        with self.lock.read():
            return self._search(q.reshape(1, -1), n)

    def _search(self, q: np.ndarray, n: int) -> list[tuple[int, str, float]]:
        n = min(n, self.size)
        if n <= 0:
            return []
        if self._gpu is not None:
            fetch = min(n + len(self._gpu_tombstones), self._gpu.ntotal)
            scores, ids = self.batcher.search(q, fetch) if self.batcher is not None else \
                self._gpu.search(q, fetch)
            skip = self._gpu_tombstones | self.tombstones
        elif self.read_only:
            return self._search_read_only(q, n)
        elif self.tombstones and self.index_type == "hnsw":
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64)))
            hnsw = faiss.downcast_index(self.index.index).hnsw
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(hnsw.efSearch, n))
            scores, ids = self.index.search(q, n, params=params)
            skip = self.tombstones
        elif self.batcher is not None:
            scores, ids = self.batcher.search(q, n)
            skip = self.tombstones
        else:
            scores, ids = self.index.search(q, n)
            skip = self.tombstones
        names = self.item_ids
        if skip:
            out = [(i, names[i], s) for i, s in zip(ids[0].tolist(), scores[0].tolist())
                   if i >= 0 and i not in skip and names[i] is not None]
        else:  # (a comprehension: no per-candidate method lookups; every request runs this)
            out = [(i, names[i], s) for i, s in zip(ids[0].tolist(), scores[0].tolist())
                   if i >= 0 and names[i] is not None]
        return out if len(out) <= n else out[:n]

    def _search_params(self):
        """Search parameters excluding the tombstones (read-only index), or None without any."""
        if not self.tombstones:
            return None
        if self._selector is None or self._selector[0] != len(self.tombstones):
            arr = np.fromiter(self.tombstones, np.int64)
            self._selector = (len(self.tombstones),
                              faiss.IDSelectorNot(faiss.IDSelectorBatch(arr)), arr)
        sel = self._selector[1]
        if self.index_type == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=faiss.downcast_index(self.index).nprobe)
        if self.index_type == "hnsw":
            hnsw = faiss.downcast_index(self.index.index).hnsw
            return faiss.SearchParametersHNSW(sel=sel, efSearch=hnsw.efSearch)
        return faiss.SearchParameters(sel=sel)

    def _search_read_only(self, q: np.ndarray, n: int) -> list[tuple[int, str, float]]:
        params = self._search_params()
        if params is not None and self.index_type == "hnsw":
            params.efSearch = max(params.efSearch, n)
        scores, ids = self.index.search(q, n, params=params) if params is not None else \
            self.index.search(q, n)
        hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        if self.overlay is not None and self.overlay.ntotal:
            s2, i2 = self.overlay.search(q, min(n, self.overlay.ntotal))
            hits += [(float(s), int(i)) for s, i in zip(s2[0], i2[0]) if i >= 0]
            hits.sort(key=lambda h: -h[0])
        out = []
        for s, i in hits:
            item = self.item_ids[i] if i not in self.tombstones else None
            if item is not None:
                out.append((i, item, s))
        return out[:n]

    # ---- writes ---------------------------------------------------------------------------
    def upsert(self, items: Iterable[tuple[str, np.ndarray]]) -> int:
        """Insert new items or replace the vectors of known ones; returns how many."""
        items = list(items)
        if not items:
            return 0
        ids = [i for i, _ in items]
        if len(set(ids)) != len(ids):  # a second copy would stay searchable after a removal
            dup = next(i for n, i in enumerate(ids) if i in ids[:n])
            raise ValueError(f"item {dup!r} appears twice in one upsert")
        with self.lock.write():
            replaced = [self.position[i] for i, _ in items if i in self.position]
            self._remove_positions(replaced)
            vecs = np.ascontiguousarray(np.stack([v for _, v in items]), dtype=np.float32)
            if vecs.shape[1] != self.dim:
                raise ValueError(f"vectors have dimension {vecs.shape[1]}, the index {self.dim}")
            start = self.n_vectors
            ids = np.arange(start, start + len(items), dtype=np.int64)
            self._grow(start + len(items))
            self.vectors[start:start + len(items)] = vecs
            for (item, _), pos in zip(items, ids):
                self.item_ids.append(item)
                self.position[item] = int(pos)
            self.n_vectors += len(items)
            if self.read_only:
                if self.overlay is None:
                    self.overlay = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
                self.overlay.add_with_ids(vecs, ids)
            else:
                self.index.add_with_ids(vecs, ids)
            if self._gpu is not None:
                self._gpu.add_with_ids(vecs, ids)
            self._maybe_compact()
            return len(items)

    def remove(self, item_ids: Iterable[str]) -> int:
        with self.lock.write():
            positions = [self.position[i] for i in item_ids if i in self.position]
            self._remove_positions(positions)
            self._maybe_compact()
            return len(positions)

    def _remove_positions(self, positions: list[int]) -> None:
        if not positions:
            return
        for p in positions:
            item = self.item_ids[p]
            if item is not None:
                del self.position[item]
            self.item_ids[p] = None
        arr = np.asarray(positions, dtype=np.int64)
        if self.read_only:
            base = self.index.ntotal  # positions below are in the mapped index: tombstones
            self.tombstones.update(p for p in positions if p < base)
            over = arr[arr >= base]
            if len(over):
                self.overlay.remove_ids(faiss.IDSelectorArray(len(over), faiss.swig_ptr(over)))
        elif self.index_type == "hnsw":
            self.tombstones.update(positions)
        else:
            self.index.remove_ids(faiss.IDSelectorArray(len(arr), faiss.swig_ptr(arr)))
        if self._gpu is not None:
            if hasattr(self._gpu, "mask_positions"):  # TorchExactSearch: never returns them
                self._gpu.mask_positions(positions)
            else:
                self._gpu_tombstones.update(positions)

    def _grow(self, n: int) -> None:
        if n > len(self.vectors):
            bigger = np.zeros((max(n, int(len(self.vectors) * 1.5) + 16), self.dim), np.float32)
            bigger[:len(self.vectors)] = self.vectors
            self.vectors = bigger

    def _maybe_compact(self) -> None:
        dead = len(self.tombstones) + len(self._gpu_tombstones)
        dead += getattr(self._gpu, "masked", 0)  # the torch replica's masked rows take memory too
        if self.read_only and self.overlay is not None:
            dead += self.overlay.ntotal
        if dead and dead > REBUILD_TOMBSTONE_SHARE * max(1, self.size):
            self._compact()

    def _to_memory(self) -> None:
        """The read-only index copied into this process's memory with its tombstones removed and
        its overlay added: writable from now on."""
        index = faiss.deserialize_index(faiss.serialize_index(self.index))  # owned, not mapped
        if self.index_type != "hnsw" and self.tombstones:
            dead = np.fromiter(self.tombstones, np.int64)
            index.remove_ids(faiss.IDSelectorArray(len(dead), faiss.swig_ptr(dead)))
            self.tombstones.clear()
        if self.overlay is not None and self.overlay.ntotal:
            ids = faiss.vector_to_array(faiss.downcast_index(self.overlay).id_map).astype(np.int64)
            index.add_with_ids(self.vectors[ids], ids)
        self.index, self.overlay, self.read_only, self._selector = index, None, False, None
        log.info("index: the memory-mapped index was copied into memory to take its deltas "
                 "(%d live items); its pages are no longer shared", self.size)

    def _compact(self) -> None:
        """Rebuild without tombstones (HNSW) and re-copy the GPU replica (the torch one over the
        live rows only)."""
        if self.read_only:
            self._to_memory()
        if self.tombstones and self.index_type == "hnsw":
            live = np.fromiter(self.position.values(), np.int64)
            old = faiss.downcast_index(self.index.index).hnsw
            # nb_neighbors(0) is 2*M (the base layer), nb_neighbors(1) is M: keep M as built
            fresh = faiss.IndexHNSWFlat(self.dim, old.nb_neighbors(1),
                                        faiss.METRIC_INNER_PRODUCT)
            fresh.hnsw.efSearch = old.efSearch
            fresh.hnsw.efConstruction = old.efConstruction
            idx = faiss.IndexIDMap2(fresh)
            idx.add_with_ids(self.vectors[live], live)
            self.index = idx
            self.tombstones.clear()
            log.info("index: HNSW rebuilt without removed items (%d live)", len(live))
        if self._gpu is not None:
            self._make_gpu_replica()


class Catalog:
    """The served items of a model scored over histories (no vectors, no FAISS): positions by id,
    removals. Same reads as :class:`ItemIndex` where they make sense."""

    index_type = "none"
    dim = 0

    def __init__(self, item_ids: list[str], index_type: str = "none") -> None:
        self.item_ids: list[str | None] = list(item_ids)
        self.position = {item: i for i, item in enumerate(item_ids)}
        self.n_vectors = len(item_ids)
        self.index_type = index_type  # the model's own retrieval (e.g. the hybrid's sources)
        self.lock = ReadWriteLock()

    @property
    def size(self) -> int:
        return len(self.position)

    def vector(self, item_id: str):
        return None

    def search(self, query, n):
        raise TypeError("this model is scored over histories, not searched by vector")

    def upsert(self, items) -> int:
        items = list(items)
        if items:
            raise ValueError("the served model scores over histories and has no item vectors: new "
                             "items reach it at its next training")
        return 0

    def remove(self, item_ids: Iterable[str]) -> int:
        with self.lock.write():
            n = 0
            for i in item_ids:
                p = self.position.pop(i, None)
                if p is not None:
                    self.item_ids[p] = None
                    n += 1
            return n
