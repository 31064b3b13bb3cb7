"""ALS fold-in: a user's vector from their interactions against fixed item vectors (closed form).

For implicit ALS (Hu, Koren, Volinsky) with confidence ``c = 1 + alpha * w`` and preference 1:

    x_u = (YᵀY + Σ_i (c_i - 1) y_i y_iᵀ + λ_u I)⁻¹ Σ_i c_i y_i,   λ_u = reg * n_u

(``λ_u`` scaled by the user's number of items, as Spark's ALS does). One user is a k x k solve;
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
            reg: float) -> np.ndarray:
    """One user's vector from the vectors of the items they touched and the summed weights."""
    k = yty.shape[0]
    if len(weights) == 0:
        return np.zeros(k, np.float32)
    y = np.asarray(item_vectors, dtype=np.float64)
    c = 1.0 + alpha * np.asarray(weights, dtype=np.float64)
    a = yty.astype(np.float64) + (y.T * (c - 1.0)) @ y + reg * len(c) * np.eye(k)
    return np.linalg.solve(a, y.T @ c).astype(np.float32)


def fold_in_batch(item_factors: np.ndarray, users: np.ndarray, items: np.ndarray,
                  weights: np.ndarray, n_users: int, alpha: float, reg: float,
                  yty: np.ndarray | None = None, xp: Any = np,
                  chunk: int = 4096) -> np.ndarray:
    """Vectors for ``n_users`` users from (user row, item row, weight) triples, batched.

    ``users`` index the output rows and ``items`` rows of ``item_factors``; each (user, item)
    pair should appear once (sum its weights first). Users without triples get zeros. The
    normal equations are gathered on the CPU in chunks; the k x k solves run batched on ``xp``
    (numpy, or cupy on a GPU).
    """
    k = item_factors.shape[1]
    out = np.zeros((n_users, k), np.float32)
    if n_users == 0 or len(users) == 0:
        return out
    yty = gram(item_factors) if yty is None else np.asarray(yty)
    order = np.argsort(users, kind="stable")
    users, items = np.asarray(users)[order], np.asarray(items)[order]
    c = 1.0 + alpha * np.asarray(weights, dtype=np.float32)[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    bounds = np.r_[starts, len(users)]
    eye = np.eye(k, dtype=np.float32)
    g = 0
    while g < len(starts):
        # a run of whole users with at most ~chunk triples
        h = int(np.searchsorted(bounds, bounds[g] + chunk, side="right")) - 1
        h = max(h, g + 1)
        lo, hi = bounds[g], bounds[h]
        y = item_factors[items[lo:hi]].astype(np.float32)
        cc = c[lo:hi]
        seg = starts[g:h] - lo
        a = np.add.reduceat(y[:, :, None] * (y * (cc - 1.0)[:, None])[:, None, :], seg, axis=0)
        b = np.add.reduceat(y * cc[:, None], seg, axis=0)
        n_items = np.diff(np.r_[seg, hi - lo]).astype(np.float32)
        a += yty[None] + (reg * n_items)[:, None, None] * eye[None]
        x = xp.linalg.solve(xp.asarray(a), xp.asarray(b)[:, :, None])[:, :, 0]
        out[users[starts[g:h]]] = x.get() if hasattr(x, "get") else x
        g = h
    return out
