"""Matrix factorization and linear models: PureSVD (truncated SVD) and EASE (closed form)."""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import svds

from freshrec.models.base import FactorRecommender, Interactions, Recommender


class PureSVDModel(FactorRecommender):
    """Truncated SVD of the binarized user-item matrix; scores = U S Vᵀ (Cremonesi et al.)."""

    name = "pure_svd"

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
    catalog size, so refused above ``max_items``."""

    name = "ease"

    def __init__(self, l2: float = 200.0, max_items: int = 30_000) -> None:
        super().__init__()
        self.l2, self.max_items = l2, max_items

    def fit(self, data: Interactions) -> "EASEModel":
        if data.n_items > self.max_items:
            raise ValueError(f"EASE is dense in the catalog: {data.n_items:,} items is above "
                             f"max_items={self.max_items:,}; raise it (memory ~ 8 n² bytes) or "
                             "use item_knn / ALS")
        self.data = data
        x = (data.matrix > 0).astype(np.float32).tocsr()
        g = (x.T @ x).toarray()
        g[np.diag_indices_from(g)] += self.l2
        p = _spd_inverse(g)
        b = p / -np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        self.weights = b
        self.binary = x
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.binary[np.asarray(user_rows)] @ self.weights)

    def item_vectors(self) -> np.ndarray:
        return self.weights

    def export_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def params(self) -> dict:
        return {"l2": self.l2, "max_items": self.max_items}
