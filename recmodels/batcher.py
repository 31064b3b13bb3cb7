"""Micro-batching of concurrent searches, and an exact GPU search written with torch.

A GPU answers one query in about the time it answers hundreds: what costs is the launch and the
copy, not the arithmetic. :class:`SearchBatcher` therefore collects the single-query searches that
arrive within a short window (``serving.gpu_batch_window_ms``, at most 1 ms) or until
``max_batch`` wait, runs them as ONE batched search on its own thread, and hands each caller its
row. The first query of a batch waits at most the window; the others less.

It knows nothing of the index behind it: any ``search(queries, k) -> (scores, ids)`` with FAISS's
shapes (``queries`` float32 ``(b, d)``, results ``(b, k)``) will do, so its logic is tested on
the CPU index (tests/test_serving_batcher.py) and used over a FAISS GPU replica or
:class:`TorchExactSearch` where a GPU is present (recmodels/index.py).

:class:`TorchExactSearch` is the GPU search where FAISS has no GPU build (faiss-gpu is not
installed, e.g. the wheels are missing for the machine's CUDA): the item matrix on the device
and the exact top-k of one matrix product per batch. Exact, so its recall is 1.0 (up to ties and,
in float16, rounding). Imports numpy only; torch is imported when one is built.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable

import numpy as np

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class _Pending:
    __slots__ = ("query", "k", "done", "scores", "ids", "error")

    def __init__(self, query: np.ndarray, k: int) -> None:
        self.query, self.k = query, k
        self.done = threading.Event()
        self.scores = self.ids = self.error = None


class SearchBatcher:
    """Concurrent single-query searches, batched: see the module docstring.

    ``calls`` counts the batched searches run and ``requests`` the queries answered, so
    ``requests / calls`` is the mean batch size. A bound method as ``search`` is held weakly: when
    its object (an index replaced by a new model) is gone, the batcher's thread ends by itself
    within a second instead of keeping the index (and its GPU memory) alive."""

    POLL = 0.5  # seconds: how often a waiting caller checks that the batcher's thread lives

    def __init__(self, search: SearchFn, window_ms: float = 1.0, max_batch: int = 256,
                 name: str = "search-batcher") -> None:
        if window_ms <= 0:
            raise ValueError(f"window_ms must be > 0, got {window_ms}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._search = weakref.WeakMethod(search) if hasattr(search, "__self__") else \
            (lambda: search)
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self.calls = 0
        self.requests = 0
        self._queue: list[_Pending] = []
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each of shape (1, k), as ``search(query.reshape(1, -1), k)``."""
        p = _Pending(np.asarray(query, dtype=np.float32).reshape(-1), k)
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the search batcher is closed" if self._closed else
                                   f"the search batcher's thread ({self._thread.name}) is dead "
                                   "(restart the server)")
            self._queue.append(p)
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._cond.notify()
        while not p.done.wait(self.POLL):
            if not self._thread.is_alive():  # died outside its try (a BaseException): never hang
                with self._cond:
                    if p in self._queue:
                        self._queue.remove(p)
                if p.done.is_set():
                    break
                raise RuntimeError(f"the search batcher's thread ({self._thread.name}) is dead: "
                                   "this search was never answered (restart the server)")
        if p.error is not None:
            raise p.error
        return p.scores, p.ids

    def _take(self) -> list[_Pending] | None:
        """The next batch: waits for a first query, then up to the window for more."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait(1.0)
                if not self._queue and self._search() is None:  # its index is gone
                    self._closed = True
            if not self._queue:
                return None
            end = time.monotonic() + self.window
            while len(self._queue) < self.max_batch and not self._closed:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._queue[:self.max_batch]
            del self._queue[:self.max_batch]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            k = max(p.k for p in batch)
            search = self._search()
            try:
                if search is None:
                    raise RuntimeError("the index behind this search batcher is gone")
                scores, ids = search(np.stack([p.query for p in batch]), k)
                self.calls += 1
                self.requests += len(batch)
                for n, p in enumerate(batch):
                    p.scores = scores[n:n + 1, :p.k]
                    p.ids = ids[n:n + 1, :p.k]
            except Exception as e:  # every caller of the batch gets the error, none hangs
                for p in batch:
                    p.error = e
            search = None  # hold the index only while searching
            for p in batch:
                p.done.set()

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)


def torch_cuda_reason() -> str | None:
    """None when torch sees a CUDA device, else why not (for skips and benchmark notes)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


class TorchExactSearch:
    """Exact inner-product top-k over an item matrix held on a torch device.

    ``ntotal`` (rows held), ``search(queries, k)`` and ``add_with_ids(vectors, ids)`` match the
    part of a FAISS index that recmodels/index.py uses for its GPU replica. Row ``r`` answers as id
    ``ids[r]`` (default: its row number); ``ids`` increase, and added rows take larger ids, so a
    copy built over the live positions only (after removals) answers with the same ids. Removed
    positions are masked (:meth:`mask_positions`: their score becomes -inf, so they never come
    back, id -1 when fewer than k rows are live); ``masked`` counts the masked rows, which still
    take memory until the copy is rebuilt. ``half``: keep the matrix in float16 (half the memory
    and bandwidth; scores round)."""

    def __init__(self, vectors: np.ndarray, device: str = "cuda", half: bool = False,
                 dead: list[int] | None = None, ids: np.ndarray | None = None) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.d = vectors.shape[1]
        n = len(vectors)
        ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(ids) != n or (n > 1 and not (np.diff(ids) > 0).all()):
            raise ValueError(f"TorchExactSearch: {len(ids)} ids for {n} rows, or ids not "
                             "increasing")
        cap = max(16, int(n * 1.25))
        self._m = torch.zeros((cap, self.d), dtype=self.dtype, device=self.device)
        self._m[:n] = torch.from_numpy(vectors).to(self.device, self.dtype)
        self._mask = torch.zeros(cap, dtype=torch.float32, device=self.device)
        self._ids = np.zeros(cap, dtype=np.int64)
        self._ids[:n] = ids
        self._dead: set[int] = set()  # masked rows
        self.ntotal = n
        if dead:
            self.mask_positions(dead)

    @property
    def masked(self) -> int:
        """Rows masked (removed positions) that still take memory."""
        return len(self._dead)

    def mask_positions(self, positions) -> None:
        """Rows never to return again (removed items), by id; ids it does not hold are ignored."""
        pos = np.asarray(list(positions), dtype=np.int64)
        if not len(pos) or not self.ntotal:
            return
        held = self._ids[:self.ntotal]
        rows = np.searchsorted(held, pos)
        ok = rows < self.ntotal
        ok[ok] = held[rows[ok]] == pos[ok]
        rows = rows[ok]
        if len(rows):
            self._mask[self.torch.from_numpy(rows).to(self.device)] = float("-inf")
            self._dead.update(rows.tolist())

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        last = int(self._ids[self.ntotal - 1]) if self.ntotal else -1
        if ids[0] <= last or (len(ids) > 1 and not (np.diff(ids) > 0).all()):
            raise ValueError("TorchExactSearch adds rows at the next positions only (increasing "
                             f"ids after {last}), got ids {ids[:5].tolist()}...")
        torch = self.torch
        n = self.ntotal + len(ids)
        if n > len(self._m):
            cap = int(n * 1.5) + 16
            bigger = torch.zeros((cap, self.d), dtype=self.dtype, device=self.device)
            bigger[:self.ntotal] = self._m[:self.ntotal]
            self._m = bigger
            mask = torch.zeros(cap, dtype=torch.float32, device=self.device)
            mask[:self.ntotal] = self._mask[:self.ntotal]
            self._mask = mask
            grown = np.zeros(cap, dtype=np.int64)
            grown[:self.ntotal] = self._ids[:self.ntotal]
            self._ids = grown
        self._m[self.ntotal:n] = torch.from_numpy(
            np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device, self.dtype)
        self._ids[self.ntotal:n] = ids
        self.ntotal = n

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        k_eff = min(k, self.ntotal)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(
            self.device, self.dtype)
        with torch.no_grad():
            scores = (q @ self._m[:self.ntotal].T).float() + self._mask[:self.ntotal]
            top, idx = torch.topk(scores, k_eff, dim=1)
        s = top.cpu().numpy()
        i = self._ids[idx.cpu().numpy()]
        i[~np.isfinite(s)] = -1  # masked rows: only reached when fewer than k are live
        if k_eff < k:  # FAISS pads with -1 ids
            s = np.pad(s, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, k - k_eff)), constant_values=-1)
        return s, i
