"""Neighbourhood CF: item-based (cosine item neighbours) and user-based (top-N similar users)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recmodels.baselines import ItemKNN, _top_per_row, shrunk_similarity
from recmodels.base import Interactions, Recommender
from recmodels.servable import csr_arrays


class ItemKNNModel(Recommender):
    """Cosine similarity of items' user sets with shrinkage, ``n_neighbors`` per item."""

    name = "item_knn"

    def __init__(self, n_neighbors: int = 100) -> None:
        super().__init__()
        self.n_neighbors = n_neighbors

    def fit(self, data: Interactions) -> "ItemKNNModel":
        self.data = data
        self.knn = ItemKNN(data.matrix, self.n_neighbors)
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return self.knn.score(np.asarray(user_rows))

    def similar_items(self, item_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.knn.similarity[item_row]
        order = np.argsort(-row.data)[:k]
        return row.indices[order], row.data[order]

    def servable(self):
        # score = binary history @ similarity^T: exported as the item-item matrix M = similarity^T
        return "history", {"type": "item_item", "binary": True}, \
            csr_arrays(self.knn.similarity.T.tocsr(), "matrix")

    def params(self) -> dict:
        return {"n_neighbors": self.n_neighbors}


class UserKNNModel(Recommender):
    """User-based CF: cosine or Jaccard similarity between users' item sets, shrunk by
    ``n / (n + shrinkage)`` (n = co-rated items), top ``n_neighbors`` users vote for items."""

    name = "user_knn"

    def __init__(self, n_neighbors: int = 50, similarity: str = "cosine",
                 shrinkage: float = 10.0) -> None:
        super().__init__()
        if similarity not in ("cosine", "jaccard"):
            raise ValueError(f"similarity must be cosine or jaccard, got {similarity!r}")
        self.n_neighbors, self.similarity, self.shrinkage = n_neighbors, similarity, shrinkage

    def fit(self, data: Interactions) -> "UserKNNModel":
        self.data = data
        self.binary = (data.matrix > 0).astype(np.float32).tocsr()
        return self

    def _neighbours(self, user_rows: np.ndarray) -> sp.csr_matrix:
        x = self.binary
        overlap = (x[user_rows] @ x.T).tocsr().astype(np.float32)  # co-rated counts
        sizes = np.asarray(x.sum(axis=1)).ravel()
        coo = overlap.tocoo()
        sim = shrunk_similarity(coo.data, sizes[user_rows][coo.row], sizes[coo.col],
                                self.similarity, self.shrinkage)
        sim[coo.col == np.asarray(user_rows)[coo.row]] = 0.0  # not their own neighbour
        m = sp.csr_matrix((sim, (coo.row, coo.col)), shape=overlap.shape)
        m.eliminate_zeros()
        return _top_per_row(m, self.n_neighbors)

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return (self._neighbours(np.asarray(user_rows)) @ self.binary).toarray()

    def servable(self):
        return "history", {"type": "user_user", "n_neighbors": self.n_neighbors,
                           "similarity": self.similarity, "shrinkage": self.shrinkage}, \
            {"user_ids": self._fitted().user_ids.astype(str), **csr_arrays(self.binary, "binary")}

    def params(self) -> dict:
        return {"n_neighbors": self.n_neighbors, "similarity": self.similarity,
                "shrinkage": self.shrinkage}
