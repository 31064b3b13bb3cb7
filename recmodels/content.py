"""Content-based: TF-IDF item vectors from categories, title and text; a user's profile is the
time-decayed, weighted mean of their items' vectors. Recommends items without any events too.

Content similarity alone ignores quality: among items that look alike, the ones people choose are
the popular ones. Scores are therefore the per-user standardized similarity plus
``popularity_weight`` times the standardized log popularity (a prior; 0 turns it off). Items
without metadata have an empty vector and rank on the prior alone."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from recmodels.servable import csr_arrays

from recmodels.base import (Interactions, Recommender, decayed_weights, popularity_prior,
                                  standardize_rows)


class ContentModel(Recommender):
    name = "content"

    def __init__(self, half_life_days: float = 30.0, max_features: int = 50_000,
                 popularity_weight: float = 2.0) -> None:
        super().__init__()
        self.half_life_days, self.max_features = half_life_days, max_features
        self.popularity_weight = popularity_weight

    def fit(self, data: Interactions) -> "ContentModel":
        if data.items is None:
            raise ValueError("content-based needs item metadata (Interactions.items); import "
                             "items with `freshrec import items FILE`")
        self.data = data
        docs = []
        for row in data.items.itertuples(index=False):
            cats = getattr(row, "categories", None)
            cats = list(cats) if cats is not None and not isinstance(cats, float) else []
            words = [f"cat_{c}".replace(" ", "_") for c in cats] * 2  # categories weigh double
            for col in ("title", "text"):
                v = getattr(row, col, None)
                if isinstance(v, str):
                    words.append(v)
            docs.append(" ".join(words))
        if not any(docs):
            raise ValueError("no item has categories, title or text: content-based has nothing "
                             "to learn from")
        tfidf = TfidfVectorizer(max_features=self.max_features, token_pattern=r"(?u)\b\w+\b")
        self.item_matrix = normalize(tfidf.fit_transform(docs).astype(np.float32))
        ev = data.events
        w = decayed_weights(ev, data.as_of, self.half_life_days)
        decayed = sp.csr_matrix((w, (ev["user_row"], ev["item_row"])), shape=data.matrix.shape)
        self.profiles = normalize(decayed @ self.item_matrix)
        self.prior = popularity_prior(data.matrix)
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        sim = (self.profiles[np.asarray(user_rows)] @ self.item_matrix.T).toarray()
        return standardize_rows(sim) + self.popularity_weight * self.prior

    def servable(self):
        return "history", {"type": "content", "n_features": int(self.item_matrix.shape[1]),
                           "popularity_weight": self.popularity_weight}, \
            {"user_ids": self._fitted().user_ids.astype(str), "popularity_prior": self.prior,
             **csr_arrays(self.item_matrix, "tfidf"), **csr_arrays(self.profiles, "profiles")}

    def item_vectors(self) -> np.ndarray:
        return self.item_matrix.toarray()

    def params(self) -> dict:
        return {"half_life_days": self.half_life_days, "max_features": self.max_features,
                "popularity_weight": self.popularity_weight}
