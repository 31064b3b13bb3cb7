"""Most-popular and trending (time-decayed popularity): the cold-start fallbacks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from freshrec.baselines import MostPopular
from freshrec.models.base import Interactions, Recommender


class MostPopularModel(Recommender):
    name = "most_popular"

    def fit(self, data: Interactions) -> "MostPopularModel":
        self.data = data
        self.popularity = MostPopular(data.matrix).popularity
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity, (len(user_rows), len(self.popularity))).copy()

    def export_arrays(self) -> dict[str, np.ndarray]:
        return {"popularity": self.popularity}


class TrendingModel(MostPopularModel):
    """Popularity with exponential time decay: an event ``half_life_days`` old counts half."""

    name = "trending"

    def __init__(self, half_life_days: float = 7.0) -> None:
        super().__init__()
        if half_life_days <= 0:
            raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
        self.half_life_days = half_life_days

    def fit(self, data: Interactions) -> "TrendingModel":
        if data.events is None:
            raise ValueError("trending needs event timestamps (Interactions.events)")
        self.data = data
        as_of = pd.Timestamp(data.as_of)
        as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of
        ts = pd.to_datetime(data.events["ts"], utc=True)
        days = np.maximum((as_of - ts).dt.total_seconds().to_numpy() / 86400.0, 0.0)
        decayed = data.events["weight"].to_numpy() * 0.5 ** (days / self.half_life_days)
        self.popularity = np.bincount(data.events["item_row"].to_numpy(), weights=decayed,
                                      minlength=data.n_items).astype(np.float32)
        return self

    def params(self) -> dict:
        return {"half_life_days": self.half_life_days}
