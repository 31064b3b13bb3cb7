"""Matrix factorization and linear models: PureSVD (truncated SVD) and EASE (closed form)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from recmodels.base import FactorRecommender, Interactions, Recommender
from recmodels.servable import csr_arrays


class PureSVDModel(FactorRecommender):
    """Truncated SVD of the binarized user-item matrix; scores = U S Vᵀ (Cremonesi et al.)."""

    name = "pure_svd"
    user_side = "project"  # users = X V: a new history is projected, exactly as in training

    def __init__(self, rank: int = 64) -> None:
        super().__init__()
        self.rank = rank

    def fit(self, data: Interactions) -> "PureSVDModel":
        self.data = data
        x = (data.matrix > 0).astype(np.float32)
        rank = max(1, min(self.rank, min(x.shape) - 1))
        u, s, vt = svds(x, k=rank, random_state=0)
        self.users = (u * s).astype(np.float32)
        self.items = vt.T.astype(np.float32)
        return self

    def params(self) -> dict:
        return {"rank": self.rank}


def _spd_inverse(g: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive-definite matrix in float32 through Cholesky (LAPACK potrf +
    potri, in place): about a third of the flops of a general inverse, at half the memory."""
    from scipy.linalg import lapack

    g = np.asarray(g, dtype=np.float32, order="F")
    c, info = lapack.spotrf(g, lower=True, overwrite_a=True, clean=False)
    if info != 0:
        raise ValueError(f"EASE: the Gram matrix is not positive definite (potrf info={info}); "
                         "raise l2")
    inv, info = lapack.spotri(c, lower=True, overwrite_c=True)
    if info != 0:
        raise ValueError(f"EASE: inverse failed (potri info={info}); raise l2")
    lower = np.tril(inv)
    return lower + np.tril(inv, -1).T


class EASEModel(Recommender):
    """EASE (Steck 2019): B = I - P / diag(P), P = (XᵀX + λI)⁻¹, zero diagonal. Dense in the
    catalog size, so refused above ``max_items``.

    ``top_items`` (0: every item) fits B on the ``top_items`` most popular items only (by users
    who met them): an n³ inverse and n² memory in that number, whatever the catalog. The other
    items have no weights: they score 0 and are never among the items a score is made of (exactly
    what the exported matrix gives, whose rows and columns for them are empty). A Zipf-like catalog
    keeps most interactions in its head, so little of the ranking is lost; ``max_items`` then
    limits the fitted items, not the catalog."""

    name = "ease"

    def __init__(self, l2: float = 200.0, max_items: int = 30_000,
                 serve_dense_max_items: int = 8_000, serve_top_n: int = 200,
                 top_items: int = 0) -> None:
        super().__init__()
        if top_items < 0:
            raise ValueError(f"top_items must be 0 (every item) or positive, got {top_items}")
        self.l2, self.max_items, self.top_items = l2, max_items, top_items
        self.serve_dense_max_items, self.serve_top_n = serve_dense_max_items, serve_top_n
        self.kept: np.ndarray | None = None  # catalog positions of B's rows/columns (None: all)

    def fit(self, data: Interactions) -> "EASEModel":
        x = (data.matrix > 0).astype(np.float32).tocsr()
        kept = None
        if 0 < self.top_items < data.n_items:
            users_per_item = np.asarray(x.sum(axis=0)).ravel()
            kept = np.sort(np.argsort(-users_per_item, kind="stable")[:self.top_items])
        n = data.n_items if kept is None else len(kept)
        if n > self.max_items:
            raise ValueError(f"EASE is dense in the catalog: {n:,} items is above "
                             f"max_items={self.max_items:,}; raise it (memory ~ 8 n² bytes), set "
                             "top_items to fit the most popular items only, or use item_knn / ALS")
        self.data, self.kept = data, kept
        xk = x if kept is None else x[:, kept].tocsr()
        g = (xk.T @ xk).toarray()
        g[np.diag_indices_from(g)] += self.l2
        p = _spd_inverse(g)
        b = p / -np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        self.weights = b  # over the kept items (all items when kept is None)
        self.binary = xk
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        s = np.asarray(self.binary[np.asarray(user_rows)] @ self.weights)
        if self.kept is None:
            return s
        out = np.zeros((s.shape[0], self._fitted().n_items), dtype=s.dtype)
        out[:, self.kept] = s
        return out

    def item_vectors(self) -> np.ndarray | None:
        # on a subset, items outside it have no weights: similar items and explanations fall
        # back to co-occurrence (Recommender's default)
        return self.weights if self.kept is None else None

    def _full_weights(self) -> np.ndarray:
        """B over the whole catalog (zero rows and columns for items outside ``kept``)."""
        if self.kept is None:
            return self.weights
        n = self._fitted().n_items
        full = np.zeros((n, n), dtype=self.weights.dtype)
        full[np.ix_(self.kept, self.kept)] = self.weights
        return full

    def servable(self):
        """score = binary history @ B over the catalog: B itself up to ``serve_dense_max_items``
        catalog items, above it the ``serve_top_n`` largest weights of each row (a sparse matrix,
        nearly the same ranking). With ``top_items`` the rows and columns of the items outside the
        fitted subset are empty, so they score 0 exactly as in ``score``."""
        n_items = self._fitted().n_items
        if n_items <= self.serve_dense_max_items:
            return "history", {"type": "item_item", "binary": True, "dense": True}, \
                {"matrix": self._full_weights()}
        w = self.weights
        n = min(self.serve_top_n, w.shape[1] - 1)
        top = np.argpartition(-w, n, axis=1)[:, :n]
        vals = np.take_along_axis(w, top, axis=1)
        rows = np.arange(w.shape[0]) if self.kept is None else self.kept
        cols = top if self.kept is None else self.kept[top]
        m = sp.csr_matrix((vals.ravel(), (np.repeat(rows, n), cols.ravel())),
                          shape=(n_items, n_items))
        return "history", {"type": "item_item", "binary": True, "dense": False,
                           "top_n": n}, csr_arrays(m, "matrix")

    def params(self) -> dict:
        return {"l2": self.l2, "max_items": self.max_items, "top_items": self.top_items,
                "fitted_items": None if self.data is None else
                (self.data.n_items if self.kept is None else int(len(self.kept))),
                "serve_dense_max_items": self.serve_dense_max_items, "serve_top_n": self.serve_top_n}
