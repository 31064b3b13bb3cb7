"""ALS fold-in: a user's vector from their interactions against fixed item vectors (closed form).

For implicit ALS (Hu, Koren, Volinsky) with confidence ``c = 1 + alpha * w`` and preference 1:

    x_u = (YᵀY + Σ_i (c_i - 1) y_i y_iᵀ + λ_u I)⁻¹ Σ_i c_i y_i,   λ_u = reg * n_u

(``λ_u`` scaled by the user's number of items, as Spark MLlib's ALS does; ``per_rating=False``:
``λ_u = reg``, as the ``cg`` solver and the `implicit` library fit it). One user is a k x k solve;
many users are solved as one batched ``solve`` over stacked matrices. The array module is numpy,
or cupy where the device choice says so (``xp``); results come back as numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def gram(item_factors: np.ndarray, xp: Any = np) -> Any:
    y = xp.asarray(item_factors, dtype=xp.float32)
    return y.T @ y


def fold_in(item_vectors: np.ndarray, weights: np.ndarray, yty: np.ndarray, alpha: float,
            reg: float, per_rating: bool = True) -> np.ndarray:
    """One user's vector from the vectors of the items they touched and the summed weights."""
    k = yty.shape[0]
    if len(weights) == 0:
        return np.zeros(k, np.float32)
    y = np.asarray(item_vectors, dtype=np.float64)
    c = 1.0 + alpha * np.asarray(weights, dtype=np.float64)
    lam = reg * len(c) if per_rating else reg
    a = yty.astype(np.float64) + (y.T * (c - 1.0)) @ y + lam * np.eye(k)
    return np.linalg.solve(a, y.T @ c).astype(np.float32)


def fold_in_batch(item_factors: np.ndarray, users: np.ndarray, items: np.ndarray,
                  weights: np.ndarray, n_users: int, alpha: float, reg: float,
                  yty: np.ndarray | None = None, xp: Any = np,
                  chunk: int = 8192, per_rating: bool = True) -> np.ndarray:
    """Vectors for ``n_users`` users from (user row, item row, weight) triples, batched.

    ``users`` index the output rows and ``items`` rows of ``item_factors``; each (user, item)
    pair should appear once (sum its weights first). Users without triples get zeros. Users are
    grouped by history length and padded into ``(users, items, k)`` blocks, so the normal
    equations are batched matrix products and the k x k solves one batched ``solve``, on ``xp``
    (numpy, or cupy on a GPU).
    """
    k = item_factors.shape[1]
    out = np.zeros((n_users, k), np.float32)
    if n_users == 0 or len(users) == 0:
        return out
    yty = xp.asarray(gram(item_factors) if yty is None else yty, dtype=xp.float32)
    factors = xp.asarray(item_factors, dtype=xp.float32)
    users = np.asarray(users)
    order = np.argsort(users, kind="stable")
    users, items = users[order], np.asarray(items)[order]
    conf = (1.0 + alpha * np.asarray(weights, dtype=np.float32)[order]).astype(np.float32)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    by_len = np.argsort(counts, kind="stable")  # similar lengths share a block: little padding
    eye = xp.eye(k, dtype=xp.float32)
    g = 0
    while g < len(by_len):
        width = int(counts[by_len[min(len(by_len) - 1, g)]])
        n_block = max(1, chunk // max(width, 1))
        block = by_len[g:g + n_block]
        width = int(counts[block].max())
        # padded item rows and confidences (padding: item 0 with confidence 0 -> no effect)
        offsets = np.arange(width)[None, :]
        valid = offsets < counts[block][:, None]
        idx = np.where(valid, starts[block][:, None] + offsets, 0)
        item_rows = np.where(valid, items[idx], 0)
        c = np.where(valid, conf[idx], 0.0).astype(np.float32)
        y = factors[xp.asarray(item_rows)]  # (B, m, k)
        cx = xp.asarray(c)
        a = xp.matmul(xp.swapaxes(y * (cx - (cx > 0))[:, :, None], 1, 2), y)
        lam = reg * counts[block].astype(np.float32) if per_rating else np.full(len(block), reg, np.float32)
        a += yty[None] + xp.asarray(lam)[:, None, None] * eye
        b = xp.einsum("bmk,bm->bk", y, cx)
        x = xp.linalg.solve(a, b[:, :, None])[:, :, 0]
        out[users[starts[block]]] = x.get() if hasattr(x, "get") else x
        g += len(block)
    return out
