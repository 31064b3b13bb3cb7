"""Matrix factorization and linear models: PureSVD (truncated SVD) and EASE (closed form)."""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import svds

from freshrec.models.base import Interactions, Recommender


class PureSVDModel(Recommender):
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

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return self.users[np.asarray(user_rows)] @ self.items.T

    def item_vectors(self) -> np.ndarray:
        return self.items

    def export_arrays(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.users, "item_factors": self.items}

    def params(self) -> dict:
        return {"rank": self.rank}


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
        x = (data.matrix > 0).astype(np.float64)
        g = (x.T @ x).toarray()
        g[np.diag_indices_from(g)] += self.l2
        p = np.linalg.inv(g)
        b = -p / np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        self.weights = b.astype(np.float32)
        self.binary = x.astype(np.float32).tocsr()
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.binary[np.asarray(user_rows)] @ self.weights)

    def item_vectors(self) -> np.ndarray:
        return self.weights

    def export_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def params(self) -> dict:
        return {"l2": self.l2, "max_items": self.max_items}
