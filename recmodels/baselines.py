"""Reference recommenders that need no training framework: most-popular and item-kNN (cosine).

Both score from a users x items interaction matrix (CSR) and are used by the evaluation harness as
baselines, and by serving as the cold-start fallback (popularity).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


SIMILARITY_BLOCK = 20_000_000  # item-kNN: co-occurrence entries computed at once (about)


class MostPopular:
    """Scores every item by its total interaction weight in training."""

    def __init__(self, train: sp.csr_matrix) -> None:
        self.popularity = np.asarray(train.sum(axis=0)).ravel().astype(np.float32)

    def score(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity, (len(rows), len(self.popularity))).copy()


class ItemKNN:
    """Item-based CF: cosine similarity of items' user sets, top-``n_neighbors`` per item;
    a user's score for an item is the summed similarity to the items they interacted with."""

    def __init__(self, train: sp.csr_matrix, n_neighbors: int = 100,
                 block_entries: int | None = None) -> None:
        self.train = (train > 0).astype(np.float32).tocsr()
        x = self.train
        norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
        norms[norms == 0] = 1.0
        inv_norms = 1.0 / norms
        inv = sp.diags(inv_norms)
        # the item x item co-occurrences a block of items at a time, each block pruned to its top
        # n_neighbors per item before the next: the full matrix (dense as histories grow) is
        # never held, only about block_entries (default SIMILARITY_BLOCK) of it
        n = x.shape[1]
        block = max(1, (block_entries or SIMILARITY_BLOCK) // max(n, 1))
        xt = x.T.tocsr()
        parts = []
        for lo in range(0, n, block):
            sim = (xt[lo:lo + block] @ x).tocsr().astype(np.float32)
            sim.setdiag(0, k=lo)
            sim.eliminate_zeros()
            sim = (sp.diags(inv_norms[lo:lo + block]) @ sim @ inv).tocsr()
            parts.append(_top_per_row(sim, n_neighbors))
            del sim
        self.similarity = sp.vstack(parts, format="csr") if parts else \
            sp.csr_matrix((n, n), dtype=np.float64)

    def score(self, rows: np.ndarray) -> np.ndarray:
        return (self.train[rows] @ self.similarity.T).toarray()


def shrunk_similarity(co: np.ndarray, a: np.ndarray, b: np.ndarray, similarity: str,
                      shrinkage: float) -> np.ndarray:
    """Cosine or Jaccard similarity from co-occurrence counts ``co`` and set sizes ``a``, ``b``,
    shrunk by ``co / (co + shrinkage)`` (user-based CF, fitted and served)."""
    if similarity == "cosine":
        sim = co / np.sqrt(np.maximum(a * b, 1e-9))
    else:
        sim = co / np.maximum(a + b - co, 1e-9)
    return sim * co / (co + shrinkage)


def _top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    data, indices, indptr = [], [], [0]
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        vals, cols = m.data[lo:hi], m.indices[lo:hi]
        if len(vals) > k:  # ties broken by column, so any order of the input gives one answer
            keep = np.lexsort((cols, -vals))[:k]
            vals, cols = vals[keep], cols[keep]
        data.append(vals)
        indices.append(cols)
        indptr.append(indptr[-1] + len(vals))
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)),
                         shape=m.shape)
