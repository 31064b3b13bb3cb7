"""The one model contract: fit, score/recommend with exclusions and filters, similar items, explain,
and device-neutral export.

Every recommender of the method (popularity, trending, user- and item-based CF, content-based,
matrix factorization, EASE, the hybrid) implements :class:`Recommender`. Rows and columns are
indices into :class:`Interactions` (``user_ids`` / ``item_ids``); callers map ids. ``export`` writes
numpy arrays and JSON only, so serving can load a model without the training code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recmodels.evaluation import id_index, top_k


def standardize_rows(s: np.ndarray) -> np.ndarray:
    """Per-row z-scores (a constant row stays 0): puts different models' scores on one scale."""
    s = np.asarray(s, dtype=np.float32)
    sd = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def popularity_prior(matrix: sp.csr_matrix) -> np.ndarray:
    """Standardized log popularity per item: a prior that rating- or content-based scores add."""
    pop = np.log1p(np.asarray(matrix.sum(axis=0)).ravel())
    return ((pop - pop.mean()) / (pop.std() or 1.0)).astype(np.float32)


def decayed_weights(events: pd.DataFrame, as_of, half_life_days: float) -> np.ndarray:
    """Event weights halved every ``half_life_days`` before ``as_of`` (infinity: undecayed)."""
    as_of = pd.Timestamp(as_of)
    as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of
    days = np.maximum((as_of - pd.to_datetime(events["ts"], utc=True)).dt.total_seconds()
                      .to_numpy() / 86400.0, 0.0)
    w = events["weight"].to_numpy()
    return w * 0.5 ** (days / half_life_days) if np.isfinite(half_life_days) else w.astype(np.float64)


def weight_matrix(user_rows, item_rows, weights, shape) -> sp.csr_matrix:
    """users x items CSR of summed weights (repeated pairs add up)."""
    m = sp.csr_matrix((np.asarray(weights, dtype=np.float32), (user_rows, item_rows)), shape=shape)
    m.sum_duplicates()
    return m


@dataclass
class Interactions:
    """Training data: users x items summed event weights, plus what some methods need."""
    # events: user_row, item_row, weight, ts (UTC) and, where known, value (explicit ratings)

    user_ids: np.ndarray
    item_ids: np.ndarray
    matrix: sp.csr_matrix
    events: pd.DataFrame | None = None  # user_row, item_row, weight, ts (UTC) for time decay
    items: pd.DataFrame | None = None  # item_id, categories, text, aligned to item_ids
    as_of: datetime | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_events(cls, events: pd.DataFrame, items: pd.DataFrame | None = None,
                    as_of: datetime | None = None) -> "Interactions":
        """``events``: user_id, item_id, weight, ts. Items of ``items`` without events are kept
        in the catalog (content-based models can still recommend them)."""
        if events.empty:
            raise ValueError("no training events: import events and run the batch lane first")
        # id_index: sorted distinct ids and each row's position (on the codes when the ids are
        # categorical, as evaluate's worker reads them)
        user_ids, u = id_index(events["user_id"])
        user_ids = np.asarray(user_ids, dtype=object)
        met, rows = id_index(events["item_id"])
        catalog = pd.Index(met) if items is None else pd.Index(met).union(pd.Index(items["item_id"]))
        item_ids = np.asarray(sorted(catalog), dtype=object)
        i = np.searchsorted(item_ids, np.asarray(met, dtype=object))[rows]
        m = weight_matrix(u, i, events["weight"].to_numpy(), (len(user_ids), len(item_ids)))
        ev = pd.DataFrame({"user_row": u, "item_row": i, "weight": events["weight"].to_numpy(),
                           "ts": events["ts"].to_numpy()})
        if "value" in events:  # explicit ratings, for the models that fit them
            ev["value"] = events["value"].to_numpy(np.float64)
        aligned = None
        if items is not None:
            aligned = items.set_index("item_id").reindex(item_ids).reset_index() \
                .rename(columns={"index": "item_id"})
        return cls(user_ids, item_ids, m, ev, aligned, as_of or pd.Timestamp(ev["ts"].max()))

    @property
    def n_users(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.matrix.shape[1]


class Recommender(ABC):
    """A recommender under the contract. Subclasses implement ``fit`` and ``score``; the rest has
    working defaults that a method may sharpen (``similar_items``, ``explain``)."""

    name = "base"

    def __init__(self) -> None:
        self.data: Interactions | None = None

    @abstractmethod
    def fit(self, data: Interactions) -> "Recommender":
        """Learn from ``data``; returns self."""

    @abstractmethod
    def score(self, user_rows: np.ndarray) -> np.ndarray:
        """Dense scores, shape (len(user_rows), n_items); higher is better."""

    def refit(self, data: Interactions) -> "Recommender":
        """Fit again on ``data`` (e.g. all events, after model selection on a split), keeping
        what the earlier fit chose on its own validation data; by default a fresh ``fit``."""
        return self.fit(data)

    def _fitted(self) -> Interactions:
        if self.data is None:
            raise RuntimeError(f"model {self.name!r} is not fitted: call fit() first")
        return self.data

    def recommend(self, user_rows: np.ndarray, k: int, exclude_seen: bool = True,
                  allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item rows and scores per user. ``allowed`` (bool per item) is a business filter;
        seen items and disallowed items are removed before the cut, so k results come back
        whenever k items qualify (rows are padded with -1 otherwise)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        data = self._fitted()
        rows = np.asarray(user_rows)
        scores = np.asarray(self.score(rows), dtype=np.float64).copy()
        if exclude_seen:
            seen = data.matrix[rows]
            scores[np.repeat(np.arange(len(rows)), np.diff(seen.indptr)), seen.indices] = -np.inf
        if allowed is not None:
            scores[:, ~np.asarray(allowed, dtype=bool)] = -np.inf
        top = top_k(scores, k)
        top_scores = np.take_along_axis(scores, top, axis=1)
        top = np.where(np.isfinite(top_scores), top, -1)
        return top, np.where(np.isfinite(top_scores), top_scores, np.nan)

    def item_vectors(self) -> np.ndarray | None:
        """Item embeddings where the method has them (for similar items and explanations)."""
        return None

    def similar_items(self, item_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        vecs = self.item_vectors()
        if vecs is None:
            # co-occurrence fallback: items that share users with this one
            x = (self._fitted().matrix > 0).astype(np.float32).tocsc()
            sims = np.asarray((x.T @ x[:, item_row]).todense()).ravel()
            norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel()) + 1e-9
            sims = sims / (norms * norms[item_row])
        else:
            v = vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9)
            sims = v @ v[item_row]
        sims[item_row] = -np.inf
        top = np.argsort(-sims)[:k]
        return top, sims[top]

    def explain(self, user_row: int, item_row: int, n: int = 3) -> list[tuple[int, float]]:
        """The user's items that most resemble ``item_row`` (by the model's item similarity)."""
        data = self._fitted()
        history = data.matrix[user_row].indices
        if len(history) == 0:
            return []
        vecs = self.item_vectors()
        if vecs is not None:
            v = vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9)
            sims = v[history] @ v[item_row]
        else:
            x = (data.matrix > 0).astype(np.float32).tocsc()
            sims = np.asarray((x[:, history].T @ x[:, item_row]).todense()).ravel()
        order = np.argsort(-sims)[:n]
        return [(int(history[o]), float(sims[o])) for o in order]

    def servable(self) -> tuple[str, dict, dict[str, np.ndarray]]:
        """(kind, scorer settings, arrays) of the servable artifact; see :mod:`recmodels.servable`.
        Every model the registry may promote implements it."""
        from recmodels.servable import ArtifactError

        raise ArtifactError(f"model {self.name!r} has no servable artifact")

    def export(self, directory: Path) -> Path:
        """Write the servable artifact (``model.json`` + ``arrays.npz``) that :meth:`load` reads
        back with no training code, Spark or MLflow."""
        from recmodels import servable

        data = self._fitted()
        kind, scorer, arrays = self.servable()
        return servable.write(Path(directory), self.name, kind, self.params(), scorer,
                              {"item_ids": data.item_ids.astype(str), **arrays})

    @staticmethod
    def load(directory: Path, device: str = "cpu"):
        """The servable model of an exported artifact (:class:`recmodels.servable.Servable`)."""
        from recmodels import servable

        return servable.load(Path(directory), device)

    def params(self) -> dict:
        return {}


class FactorRecommender(Recommender):
    """A latent-factor model: ``fit`` sets ``users`` (n_users, r) and ``items`` (n_items, r);
    scores are their dot products, and the factors are the exported artifact."""

    users: np.ndarray
    items: np.ndarray

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return self.users[np.asarray(user_rows)] @ self.items.T

    def item_vectors(self) -> np.ndarray:
        return self.items

    user_side = "als"  # how serving gets a vector for a user with new events (see servable)

    def reg_per_rating(self) -> bool:
        """Whether the fit scaled each row's regularization by its number of ratings (the
        fold-in must do as the fit did)."""
        return True

    def servable(self):
        scorer = {"type": "factors", "user_side": self.user_side,
                  **{k: v for k, v in self.params().items() if k in ("alpha",)},
                  "reg": self.params().get("reg_param", 0.1),
                  "reg_per_rating": self.reg_per_rating()}
        return "embedding", scorer, {"user_ids": self._fitted().user_ids.astype(str),
                                     "user_factors": self.users, "item_factors": self.items}
