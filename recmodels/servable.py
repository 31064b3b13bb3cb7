"""The servable model: what ``Recommender.export`` writes and :func:`load` reads back, with no
training code, Spark or MLflow (numpy and scipy; scikit-learn for the hybrid's ranker; torch only for
an exported user encoder).

An artifact directory holds ``model.json`` (format, name, kind, params, the scorer's settings) and
``arrays.npz`` (``item_ids`` - the catalog, column order of every score - ``user_ids`` where the
model stores per-user state, and the scorer's arrays). Hybrid artifacts hold one sub-directory per
source under ``sources/`` and the ranker as ``ranker.pkl``.

Every servable scores users from what serving knows about them: a :class:`UserInput` with the
user's id, their history as catalog positions and summed weights, and their recent items in time
order. For a user of the training data, given their training history, the scores equal the fitted
model's ``score`` (the contract suite checks this for every model). Kinds:

* ``embedding``: item vectors for FAISS and a user vector (stored factors, an ALS fold-in or a
  projection over the history, or a TorchScript encoder over the recent items);
* ``history``: scores computed over the user's history at request time (item-item lists or a
  dense matrix, user-user neighbours, content profiles, rating predictions with a prior);
* ``popularity``: one score vector for everyone;
* ``hybrid``: the sources above, candidates merged and ranked by the learned ranker.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from recmodels.base import standardize_rows
from recmodels.ranking import ITEM_FEATURES, Ranker, candidate_features, feature_names

if TYPE_CHECKING:
    from freshrec.storage.changes import ModelFactors

FORMAT = "freshrec-model/1"
MODEL_FILE = "model.json"
ARRAYS_FILE = "arrays.npz"


class ArtifactError(ValueError):
    """An artifact that cannot be served: missing, incomplete, corrupt or of an unknown kind."""


@dataclass
class UserInput:
    """One user as serving sees them. ``items`` are catalog positions (unique), ``weights`` their
    summed event weights; ``recent`` the newest positions in time order (oldest first)."""

    user_id: str | None
    items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    recent: np.ndarray | None = None
    fresh: bool = False  # True when the history holds events the stored user state has not seen

    def row(self, n_items: int, binary: bool = False) -> sp.csr_matrix:
        w = np.ones(len(self.items), np.float32) if binary else np.asarray(self.weights, np.float32)
        return sp.csr_matrix((w, (np.zeros(len(self.items), np.int64), np.asarray(self.items))),
                             shape=(1, n_items))


def history_matrix(users: list[UserInput], n_items: int, binary: bool = False) -> sp.csr_matrix:
    rows = np.concatenate([np.full(len(u.items), n, np.int64) for n, u in enumerate(users)]) \
        if users else np.zeros(0, np.int64)
    cols = np.concatenate([np.asarray(u.items, np.int64) for u in users]) if users else rows
    vals = np.ones(len(cols), np.float32) if binary else \
        (np.concatenate([np.asarray(u.weights, np.float32) for u in users]) if users
         else np.zeros(0, np.float32))
    m = sp.csr_matrix((vals, (rows, cols)), shape=(len(users), n_items))
    m.sum_duplicates()
    if binary:
        m.data[:] = 1.0
    return m


def _csr(arrays, prefix: str, shape) -> sp.csr_matrix:
    return sp.csr_matrix((arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"],
                          arrays[f"{prefix}_indptr"]), shape=shape)


def csr_arrays(m: sp.csr_matrix, prefix: str) -> dict[str, np.ndarray]:
    m = sp.csr_matrix(m)
    return {f"{prefix}_data": m.data.astype(np.float32), f"{prefix}_indices": m.indices,
            f"{prefix}_indptr": m.indptr}


NEIGHBOR_LISTS = 100  # top-N neighbour list per item kept by an item-item source for retrieval
EXACT_MAX_ITEMS = 50_000  # a factor source searches exactly up to this many items, IVF above


def top_per_row(m, n: int) -> sp.csr_matrix:
    """The ``n`` largest positive entries of each row of ``m`` (dense or sparse) as CSR; ties go
    to the lower column, so the lists are the same however ``m`` was built."""
    if sp.issparse(m):
        c = sp.csr_matrix(m)
        c.sum_duplicates()
        rows = np.repeat(np.arange(c.shape[0]), np.diff(c.indptr))
        keep = c.data > 0
        rows, cols, vals = rows[keep], c.indices[keep], c.data[keep]
        order = np.lexsort((cols, -vals, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        starts = np.searchsorted(rows, np.arange(c.shape[0]))
        rank = np.arange(len(rows)) - starts[rows]
        keep = rank < n
        out = sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=c.shape, dtype=np.float32)
    else:
        d = np.asarray(m, np.float32)
        k = min(n, d.shape[1])
        idx = np.argpartition(-d, k - 1, axis=1)[:, :k] if k < d.shape[1] else \
            np.tile(np.arange(d.shape[1]), (d.shape[0], 1))
        vals = np.take_along_axis(d, idx, axis=1)
        rows = np.repeat(np.arange(d.shape[0]), idx.shape[1])
        keep = vals.ravel() > 0
        out = sp.csr_matrix((vals.ravel()[keep], (rows[keep], idx.ravel()[keep])), shape=d.shape,
                            dtype=np.float32)
    out.sum_duplicates()
    return out


def _member(a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """``np.isin(a, b)`` for a sorted ``b`` (a user's history positions are sorted)."""
    if not len(sorted_b) or not len(a):
        return np.zeros(len(a), bool)
    at = np.searchsorted(sorted_b, a)
    return sorted_b[np.minimum(at, len(sorted_b) - 1)] == a


class View:
    """One source's answer for a batch of users: ``top(r, n)`` the best ``n`` unseen catalog
    positions of user ``r`` and their scores (from the source's index), ``lookup(r, pos)`` its
    scores of given positions (0 where it has none)."""

    def __init__(self, users: list[UserInput]) -> None:
        self.users = users

    def _seen(self, r: int) -> np.ndarray:
        return np.asarray(self.users[r].items, np.int64)

    @staticmethod
    def _best(pos: np.ndarray, vals: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(pos) > n:
            keep = np.argpartition(-vals, n - 1)[:n]
            pos, vals = pos[keep], vals[keep]
        order = np.lexsort((pos, -vals))
        return pos[order], vals[order]


class DenseView(View):
    """Scores over the whole catalog (a model with no index: the fallback)."""

    def __init__(self, users, scores: np.ndarray) -> None:
        super().__init__(users)
        self.s = np.asarray(scores, np.float64)

    def top(self, r, n):
        row = self.s[r].copy()
        row[self._seen(r)] = -np.inf
        pos = np.flatnonzero(np.isfinite(row))
        return self._best(pos, row[pos], n)

    def lookup(self, r, pos):
        return np.nan_to_num(self.s[r, pos], neginf=0.0, posinf=0.0)


class SparseView(View):
    """Scores that are non-zero on few items (neighbour lists, co-occurrence): a CSR row each."""

    def __init__(self, users, m: sp.csr_matrix) -> None:
        super().__init__(users)
        self.m = sp.csr_matrix(m)
        self.m.sum_duplicates()  # sorted column indices per row

    def top(self, r, n):
        lo, hi = self.m.indptr[r], self.m.indptr[r + 1]
        pos, vals = self.m.indices[lo:hi].astype(np.int64), self.m.data[lo:hi].astype(np.float64)
        keep = ~_member(pos, self._seen(r)) & (vals > 0)
        return self._best(pos[keep], vals[keep], n)

    def lookup(self, r, pos):
        lo, hi = self.m.indptr[r], self.m.indptr[r + 1]
        cols, vals = self.m.indices[lo:hi], self.m.data[lo:hi]
        if not len(cols):
            return np.zeros(len(pos), np.float64)
        at = np.minimum(np.searchsorted(cols, pos), len(cols) - 1)
        return np.where(cols[at] == pos, vals[at], 0.0).astype(np.float64)


class VectorView(View):
    """User vectors searched in a FAISS index of the item vectors (inner product)."""

    def __init__(self, users, user_vectors: np.ndarray, items: np.ndarray, index) -> None:
        super().__init__(users)
        self.uv, self.items, self.index = user_vectors, items, index
        self._hits: tuple[int, np.ndarray, np.ndarray] | None = None

    def _search(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every user's query in one FAISS call (one OpenMP region, not one per user)."""
        fetch = min(n + max((len(u.items) for u in self.users), default=0), self.index.size)
        if self._hits is None or self._hits[0] < fetch:
            with self.index.lock.read():
                d, i = self.index.index.search(np.ascontiguousarray(self.uv, np.float32), fetch)
            self._hits = (fetch, i, d)
        return self._hits[1], self._hits[2]

    def top(self, r, n):
        ids, d = self._search(n)
        pos, vals = ids[r].astype(np.int64), d[r].astype(np.float64)
        keep = (pos >= 0) & (pos < len(self.items)) & ~_member(pos, self._seen(r))
        if self.index.tombstones:
            keep &= ~np.isin(pos, np.fromiter(self.index.tombstones, np.int64))
        return pos[keep][:n], vals[keep][:n]

    def lookup(self, r, pos):
        return (self.items[pos] @ self.uv[r]).astype(np.float64)


class RankedView(View):
    """A fixed order over the catalog (popularity): the same list for every user."""

    def __init__(self, users, order: np.ndarray, values: np.ndarray) -> None:
        super().__init__(users)
        self.order, self.values = order, values

    def top(self, r, n):
        seen = self._seen(r)
        pos = self.order[: n + len(seen)]
        pos = pos[~_member(pos, seen)][:n]
        return pos, self.values[pos].astype(np.float64)

    def lookup(self, r, pos):
        return self.values[pos].astype(np.float64)


def _item_index(vectors: np.ndarray):
    """A FAISS index over item vectors for a factor or encoder source: exact up to
    :data:`EXACT_MAX_ITEMS`, IVF above."""
    from recmodels.index import ItemIndex

    n = len(vectors)
    return ItemIndex.build([str(i) for i in range(n)], vectors,
                           "flat" if n <= EXACT_MAX_ITEMS else "ivf")


class Servable(ABC):
    """A loaded model. ``scores`` is dense over ``item_ids``; higher is better."""

    kind = "history"

    def __init__(self, name: str, item_ids: np.ndarray, params: dict, user_ids=None) -> None:
        self.name, self.params = name, params
        self.item_ids = np.asarray(item_ids).astype(str)
        self.user_ids = None if user_ids is None else np.asarray(user_ids).astype(str)
        self._user_pos = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_row(self, user_id: str | None) -> int | None:
        if self.user_ids is None or user_id is None:
            return None
        if self._user_pos is None:
            self._user_pos = {u: n for n, u in enumerate(self.user_ids)}
        return self._user_pos.get(user_id)

    @abstractmethod
    def scores(self, users: list[UserInput]) -> np.ndarray:
        """(len(users), n_items) scores."""

    # embedding kinds override these
    def item_vectors(self) -> np.ndarray | None:
        return None

    def user_vectors(self, users: list[UserInput]) -> np.ndarray | None:
        return None

    def recommend(self, users: list[UserInput], k: int, exclude_seen: bool = True,
                  allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k catalog positions and scores per user (padded with -1 / NaN), seen items and
        disallowed items removed before the cut."""
        from recmodels.evaluation import top_k

        s = np.asarray(self.scores(users), dtype=np.float64).copy()
        if exclude_seen:
            for n, u in enumerate(users):
                s[n, np.asarray(u.items, np.int64)] = -np.inf
        if allowed is not None:
            s[:, ~np.asarray(allowed, bool)] = -np.inf
        top = top_k(s, min(k, s.shape[1]))
        ts = np.take_along_axis(s, top, axis=1)
        return np.where(np.isfinite(ts), top, -1), np.where(np.isfinite(ts), ts, np.nan)

    def view(self, users: list[UserInput]) -> View:
        """This model as a candidate source for ``users`` (see :class:`View`): answered from an
        index by the subclasses that have one; this fallback scores the catalog densely."""
        return DenseView(users, self.scores(users))

    def candidates(self, users: list[UserInput], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The best ``n`` unseen catalog positions and their scores per user, from the index."""
        v = self.view(users)
        return [v.top(r, n) for r in range(len(users))]

    @property
    def index_type(self) -> str:
        """How candidates are retrieved: ``faiss-flat``/``faiss-ivf``, ``neighbour-lists``,
        ``ranked-list``, ``sparse`` or ``dense`` (the full catalog, no index)."""
        return "dense"

    def _vector_view(self, users: list[UserInput]) -> VectorView:
        """Models with item vectors: the user vectors searched in a FAISS index of them, built
        at the first request."""
        if getattr(self, "_index", None) is None:
            self._index = _item_index(self.item_vectors())
        return VectorView(users, self.user_vectors(users), self.item_vectors(), self._index)

    def _vector_index_type(self) -> str:
        return "faiss-flat" if self.n_items <= EXACT_MAX_ITEMS else "faiss-ivf"

    def similar_items(self, pos: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Items like catalog position ``pos``: by item vectors where the model has them, else by
        the model's own scores for a user who met only that item."""
        vecs = self.item_vectors()
        if vecs is not None:
            v = vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9)
            sims = v @ v[pos]
        else:
            sims = self.scores([UserInput(None, np.array([pos]), np.array([1.0], np.float32),
                                          np.array([pos]), True)])[0].astype(np.float64)
        sims = np.asarray(sims, np.float64).copy()
        sims[pos] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        top = top[np.isfinite(sims[top])]
        return top, sims[top]


class PopularityServable(Servable):
    kind = "popularity"

    def __init__(self, name, item_ids, params, popularity) -> None:
        super().__init__(name, item_ids, params)
        self.popularity = np.asarray(popularity, np.float32)

    def scores(self, users):
        return np.broadcast_to(self.popularity, (len(users), self.n_items)).copy()

    def view(self, users):
        if getattr(self, "_order", None) is None:
            self._order = np.lexsort((np.arange(self.n_items), -self.popularity))
        return RankedView(users, self._order, self.popularity)

    @property
    def index_type(self):
        return "ranked-list"


class FactorServable(Servable):
    """Dot products of user and item factors. The user side: stored factors for a known user
    whose history the model has seen; otherwise ``user_side``: ``als`` folds the history in
    (one k x k solve), ``project`` projects the binary history (PureSVD: u = x V). With a ``prior``
    the ranking score is the standardized dot product plus ``prior_weight`` times the prior (then it
    is not an inner product, and serving scores densely instead of through FAISS)."""

    def __init__(self, name, item_ids, params, item_factors, user_ids=None, user_factors=None,
                 user_side: str = "als", alpha: float = 1.0, reg: float = 0.1,
                 prior=None, prior_weight: float = 0.0, reg_per_rating: bool = True) -> None:
        super().__init__(name, item_ids, params, user_ids)
        self.items = np.ascontiguousarray(item_factors, np.float32)
        self.users = None if user_factors is None else np.asarray(user_factors, np.float32)
        self.user_side, self.alpha, self.reg = user_side, alpha, reg
        self.reg_per_rating = reg_per_rating  # the fold-in regularizes as the model was fitted
        self.prior = None if prior is None else np.asarray(prior, np.float32)
        self.prior_weight = prior_weight
        self.kind = "history" if self.prior is not None else "embedding"
        self._yty = None

    def item_vectors(self):
        return self.items

    def _fold(self, u: UserInput) -> np.ndarray:
        from recmodels.foldin import fold_in, gram

        if len(u.items) == 0:
            return np.zeros(self.items.shape[1], np.float32)
        if self.user_side == "project":
            return (np.ones(len(u.items), np.float32) @ self.items[np.asarray(u.items)]).astype(np.float32)
        if self._yty is None:
            self._yty = gram(self.items)
        return fold_in(self.items[np.asarray(u.items)], np.asarray(u.weights), self._yty,
                       self.alpha, self.reg, self.reg_per_rating)

    def user_vectors(self, users):
        out = np.zeros((len(users), self.items.shape[1]), np.float32)
        for n, u in enumerate(users):
            row = self.user_row(u.user_id)
            out[n] = self.users[row] if row is not None and self.users is not None and not u.fresh \
                else self._fold(u)
        return out

    def scores(self, users):
        s = self.user_vectors(users) @ self.items.T
        if self.prior is not None:
            return standardize_rows(s) + self.prior_weight * self.prior
        return s

    def view(self, users):
        if self.prior is not None:  # not an inner product: scored densely
            return DenseView(users, self.scores(users))
        return self._vector_view(users)

    @property
    def index_type(self):
        return "dense" if self.prior is not None else self._vector_index_type()


class EncoderServable(Servable):
    """Deep retrieval (two-tower, SASRec): a TorchScript encoder over the user's ``max_len`` most
    recent items (1-based positions, right-aligned, 0 = padding) gives the user vector."""

    kind = "embedding"

    def __init__(self, name, item_ids, params, item_vectors, encoder_path: Path, max_len: int,
                 device: str = "cpu") -> None:
        super().__init__(name, item_ids, params)
        import torch

        self.torch = torch
        self.items = np.ascontiguousarray(item_vectors, np.float32)
        self.max_len, self.device = max_len, device
        try:
            self.encoder = torch.jit.load(str(encoder_path), map_location=device).eval()
        except Exception as e:  # a truncated or foreign file
            raise ArtifactError(f"{encoder_path}: cannot load the user encoder ({e})") from None

    def item_vectors(self):
        return self.items

    def user_vectors(self, users):
        seq = np.zeros((len(users), self.max_len), np.int64)
        for n, u in enumerate(users):
            recent = u.recent if u.recent is not None else u.items
            recent = np.asarray(recent, np.int64)[-self.max_len:]
            if len(recent):
                seq[n, -len(recent):] = recent + 1
        with self.torch.no_grad():
            out = self.encoder(self.torch.as_tensor(seq, device=self.device))
        return out.float().cpu().numpy()

    def scores(self, users):
        return self.user_vectors(users) @ self.items.T

    def view(self, users):
        return self._vector_view(users)

    @property
    def index_type(self):
        return self._vector_index_type()


class ItemItemServable(Servable):
    """score = x @ M over the user's history ``x`` (binary or weighted): item-kNN neighbour lists
    (sparse M) or EASE's weights (dense M below a size limit, its top-N per item above)."""

    def __init__(self, name, item_ids, params, matrix, binary: bool = True) -> None:
        super().__init__(name, item_ids, params)
        self.matrix, self.binary = matrix, binary

    def scores(self, users):
        x = history_matrix(users, self.n_items, self.binary)
        out = x @ self.matrix
        return out.toarray() if sp.issparse(out) else np.asarray(out)

    def neighbour_lists(self) -> sp.csr_matrix:
        """Each item's top ``neighbour_lists`` (default :data:`NEIGHBOR_LISTS`) entries of its
        row of the model's matrix: the index this source answers from."""
        if getattr(self, "_lists", None) is None:
            self._lists = top_per_row(self.matrix, int(self.params.get("neighbour_lists",
                                                                       NEIGHBOR_LISTS)))
        return self._lists

    def view(self, users):
        x = history_matrix(users, self.n_items, self.binary)
        return SparseView(users, x @ self.neighbour_lists())

    @property
    def index_type(self):
        return "neighbour-lists"

    def similar_items(self, pos, k):
        col = self.matrix[:, pos] if not sp.issparse(self.matrix) else \
            self.matrix.T[pos].toarray().ravel()  # items whose history points at pos
        row = self.matrix[pos].toarray().ravel() if sp.issparse(self.matrix) else self.matrix[pos]
        sims = np.maximum(np.asarray(row, np.float64), np.asarray(col, np.float64).ravel())
        sims[pos] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        top = top[sims[top] > 0]
        return top, sims[top]


class UserUserServable(Servable):
    """User-based CF over the stored binary training matrix: the user's top ``n_neighbors`` by
    cosine or Jaccard with shrinkage (stored neighbour lists for known users where the model has
    them, e.g. Spark's), who vote for their items."""

    def __init__(self, name, item_ids, params, user_ids, binary: sp.csr_matrix, n_neighbors: int,
                 similarity: str, shrinkage: float, neighbours: sp.csr_matrix | None = None) -> None:
        super().__init__(name, item_ids, params, user_ids)
        self.binary, self.n_neighbors = binary.tocsr(), n_neighbors
        self.similarity, self.shrinkage, self.neighbours = similarity, shrinkage, neighbours
        self.sizes = np.asarray(self.binary.sum(axis=1)).ravel()
        self._bt = self.binary.T.tocsr()

    def _neighbour_row(self, u: UserInput) -> sp.csr_matrix:
        from recmodels.baselines import _top_per_row, shrunk_similarity

        row = self.user_row(u.user_id)
        if self.neighbours is not None and row is not None and not u.fresh:
            return self.neighbours[row]
        x = u.row(self.n_items, binary=True)
        x.data[:] = 1.0
        co = (x @ self._bt).tocsr()  # (1, n_users) co-rated counts
        sim = shrunk_similarity(co.data, float(x.nnz), self.sizes[co.indices], self.similarity,
                                self.shrinkage).astype(np.float32)
        if row is not None:
            sim[co.indices == row] = 0.0  # not their own neighbour
        m = sp.csr_matrix((sim, co.indices, [0, len(sim)]), shape=co.shape)
        m.eliminate_zeros()
        return _top_per_row(m, self.n_neighbors)

    def scores(self, users):
        if not users:
            return np.zeros((0, self.n_items), np.float32)
        return self._votes(users).toarray()

    def _votes(self, users) -> sp.csr_matrix:
        """Each user's neighbours' votes for items (sparse)."""
        return sp.vstack([self._neighbour_row(u) for u in users]).tocsr() @ self.binary

    def view(self, users):
        if not users:
            return SparseView(users, sp.csr_matrix((0, self.n_items), dtype=np.float32))
        return SparseView(users, self._votes(users))

    @property
    def index_type(self):
        return "sparse"


class ContentServable(Servable):
    """Content-based: the standardized similarity of the user's TF-IDF profile to each item plus
    ``popularity_weight`` times the popularity prior. A known user's stored (time-decayed) profile
    is used until they have new events; then the profile is rebuilt from the history's weights."""

    def __init__(self, name, item_ids, params, user_ids, item_matrix, profiles, prior,
                 popularity_weight: float) -> None:
        super().__init__(name, item_ids, params, user_ids)
        self.item_matrix, self.profiles = item_matrix.tocsr(), profiles.tocsr()
        self.prior, self.popularity_weight = np.asarray(prior, np.float32), popularity_weight

    def _profiles(self, users) -> sp.csr_matrix:
        from sklearn.preprocessing import normalize

        rows = []
        for u in users:
            r = self.user_row(u.user_id)
            if r is not None and not u.fresh:
                rows.append(self.profiles[r])
            else:
                rows.append(normalize(u.row(self.n_items) @ self.item_matrix))
        return sp.vstack(rows).tocsr() if rows else sp.csr_matrix((0, self.item_matrix.shape[1]))

    def view(self, users):
        """Cosine of the profile to each item sharing a term with it (sparse): new items with
        metadata and no events are reachable here."""
        return SparseView(users, self._profiles(users) @ self.item_matrix.T)

    @property
    def index_type(self):
        return "sparse"

    def scores(self, users):
        sim = (self._profiles(users) @ self.item_matrix.T).toarray()
        return standardize_rows(sim) + self.popularity_weight * self.prior


class HybridServable(Servable):
    """The two-stage hybrid: each source proposes its best ``candidates`` unseen items from its
    index (FAISS for factor and encoder sources, neighbour lists for item-item ones, sparse
    co-occurrence for user-kNN and content, a ranked list for popularity); the merged candidates
    are described by :func:`recmodels.ranking.candidate_features` and ordered by the ranker. No
    source scores the whole catalog on this path (``scores`` is for offline evaluation: the ranked
    candidates first, every other item below them in popularity order)."""

    two_stage = True

    def __init__(self, name, item_ids, params, sources: dict[str, Servable], ranker: Ranker,
                 item_feats: dict[str, np.ndarray], item_categories: sp.csr_matrix | None,
                 candidates: int) -> None:
        super().__init__(name, item_ids, params)
        self.sources, self.names = sources, list(sources)
        self.ranker, self.candidates_per_source = ranker, candidates
        self.item_feats, self.item_categories = item_feats, item_categories

    @property
    def index_type(self):
        return "two-stage: " + ", ".join(f"{s} {self.sources[s].index_type}" for s in self.names)

    def retrieve(self, users: list[UserInput]):
        """Per user: the merged candidates, each source's scores of them, which source proposed
        which, and the features (the first stage and the ranker's input)."""
        views = [self.sources[s].view(users) for s in self.names]
        out = []
        for r, u in enumerate(users):
            tops = [v.top(r, self.candidates_per_source) for v in views]
            cands = np.unique(np.concatenate([t[0] for t in tops])) if tops else np.zeros(0, np.int64)
            scores = [v.lookup(r, cands) for v in views]
            proposed = []
            for t in tops:
                flag = np.zeros(len(cands), bool)
                flag[np.searchsorted(cands, t[0])] = True
                proposed.append(flag)
            x = candidate_features(cands, scores, proposed, self.item_feats,
                                   np.asarray(u.items, np.int64), self.item_categories)
            out.append((cands, x, proposed))
        return out

    def rank(self, users: list[UserInput], n: int | None = None):
        """Per user: (positions, ranker scores, proposing source) best first, at most ``n``."""
        found = self.retrieve(users)
        xs = [x for _, x, _ in found]
        p = self.ranker.predict(np.concatenate(xs), self.names) if any(len(x) for x in xs) else []
        out, start = [], 0
        for cands, _, proposed in found:
            sc = np.asarray(p[start:start + len(cands)], np.float64)
            start += len(cands)
            order = np.lexsort((cands, -sc))[: n if n is not None else len(cands)]
            who = np.argmax(np.column_stack(proposed), axis=1) if proposed and len(cands) else \
                np.zeros(len(cands), np.int64)
            out.append((cands[order], sc[order], [self.names[w] for w in who[order]]))
        return out

    def candidates(self, users, n):
        return [(c, s) for c, s, _ in self.rank(users, n)]

    def scores(self, users):
        base = self.item_feats["log_pop"].astype(np.float64) * 1e-3 - 1e6
        out = np.broadcast_to(base, (len(users), self.n_items)).copy()
        for r, (cands, sc, _) in enumerate(self.rank(users)):
            out[r, cands] = sc
        return out


# ---- reading and writing ------------------------------------------------------------------------
def write(directory: Path, name: str, kind: str, params: dict, scorer: dict,
          arrays: dict[str, np.ndarray]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / ARRAYS_FILE, **arrays)
    (directory / MODEL_FILE).write_text(json.dumps(
        {"format": FORMAT, "name": name, "kind": kind, "params": params, "scorer": scorer},
        indent=2, default=str))
    return directory


def describe(directory: Path) -> dict:
    """``model.json`` of an artifact, checked for the format (no arrays read)."""
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        raise ArtifactError(f"{path} is missing: {directory} is not a freshrec model artifact "
                            "(export it with Recommender.export)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or "scorer" not in meta:
        raise ArtifactError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; this model "
                            f"({meta.get('name')!r}) was exported by an older freshrec and cannot be "
                            "served: refit it")
    return meta


def load(directory: Path, device: str = "cpu") -> Servable:
    """The servable model in ``directory`` (see the module doc); :class:`ArtifactError` names the
    file when the artifact is missing, incomplete, corrupt or of a kind that cannot be served."""
    directory = Path(directory)
    meta = describe(directory)
    name, sc, params = meta["name"], meta["scorer"], meta.get("params", {})
    try:
        with np.load(directory / ARRAYS_FILE, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ArtifactError(f"{directory / ARRAYS_FILE} is missing: the artifact of {name!r} is "
                            "incomplete") from None
    except Exception as e:
        raise ArtifactError(f"{directory / ARRAYS_FILE}: cannot read the arrays of {name!r} ({e})") \
            from None
    if "item_ids" not in a:
        raise ArtifactError(f"{directory / ARRAYS_FILE} has no item_ids: the artifact of {name!r} "
                            "is incomplete")
    items, users = a["item_ids"], a.get("user_ids")
    n = len(items)
    t = sc.get("type")
    try:
        if t == "popularity":
            return PopularityServable(name, items, params, a["popularity"])
        if t == "factors":
            return FactorServable(name, items, params, a["item_factors"], users, a.get("user_factors"),
                                  sc.get("user_side", "als"), sc.get("alpha", 1.0), sc.get("reg", 0.1),
                                  a.get("popularity_prior"), sc.get("prior_weight", 0.0),
                                  sc.get("reg_per_rating", True))
        if t == "encoder":
            return EncoderServable(name, items, params, a["item_vectors"],
                                   directory / sc["encoder"], int(sc["max_len"]), device)
        if t == "item_item":
            m = a["matrix"] if "matrix" in a else _csr(a, "matrix", (n, n))
            return ItemItemServable(name, items, params, m, sc.get("binary", True))
        if t == "user_user":
            nu = len(users)
            nb = _csr(a, "neighbours", (nu, nu)) if "neighbours_indptr" in a else None
            return UserUserServable(name, items, params, users, _csr(a, "binary", (nu, n)),
                                    int(sc["n_neighbors"]), sc.get("similarity", "cosine"),
                                    float(sc.get("shrinkage", 10.0)), nb)
        if t == "content":
            nf = int(sc["n_features"])
            return ContentServable(name, items, params, users, _csr(a, "tfidf", (n, nf)),
                                   _csr(a, "profiles", (len(users), nf)), a["popularity_prior"],
                                   float(sc["popularity_weight"]))
        if t == "hybrid":
            if "ranker_file" not in sc:
                raise ArtifactError(f"{directory / MODEL_FILE}: a hybrid exported by an older "
                                    "freshrec (a pickled ranker, no candidate sources): refit it "
                                    "(freshrec run evaluate, then gate)")
            sources = {s: load(directory / "sources" / s, device) for s in sc["sources"]}
            names = feature_names(list(sources))
            try:
                ranker = Ranker.load(directory, sc["ranker_file"], names)
            except ValueError as e:
                raise ArtifactError(str(e)) from None
            cats = _csr(a, "item_categories", (n, int(sc["n_categories"]))) \
                if int(sc.get("n_categories", 0)) else None
            feats = {f: a[f] for f in ITEM_FEATURES}
            return HybridServable(name, items, {**params, "sources_used": sc["sources"]}, sources,
                                  ranker, feats, cats, int(sc["candidates"]))
    except KeyError as e:
        raise ArtifactError(f"{directory}: the artifact of {name!r} lacks {e}; it is incomplete") \
            from None
    except FileNotFoundError as e:
        raise ArtifactError(f"{directory}: the artifact of {name!r} is incomplete ({e})") from None
    raise ArtifactError(f"{directory / MODEL_FILE}: model {name!r} has scorer type {t!r}, which "
                        "freshrec cannot serve")


def model_factors(settings, model_version: str) -> "ModelFactors | None":
    """The item vectors of the registered model ``model_version`` ("name/N ...") as its snapshot
    serves them, for the nearline deltas (new items' vectors); None when the model has no item
    vectors (it is scored over histories) or no snapshot of it exists."""
    from freshrec.contracts.snapshot import MODEL_DIR, find_snapshot
    from freshrec.storage.changes import ModelFactors

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
    return ModelFactors(model_version, ids, vecs, {i: n for n, i in enumerate(ids)})

