"""The second stage of the two-stage hybrid: features of merged candidates, and the ranker.

One function, :func:`candidate_features`, describes each (user, candidate) pair; the hybrid's fit
(on its validation users) and serving (every Recommend) call it with the same inputs, so a
feature is computed by the same code in training and serving. The columns (:func:`feature_names`):

* per source: its score standardized over the user's merged candidates, its log rank among
  them, and whether the source proposed the candidate from its index (a candidate proposed by another
  source is scored by this one on the candidate alone);
* per item (:func:`item_feature_arrays`, from the training interactions, carried in the model's
  artifact): popularity overall and over the last 7 and 30 days as log(1 + events / the mean
  item's) (the popularity feature, one definition; scale-free, so a ranker trained on a
  validation split reads the refitted model's the same way), log age in days since the item's
  first event, the same share for its categories;
* per user, from the request's history (the stored one plus the request's own newest events):
  log history length, the share of the history in the candidate's categories (category
  affinity).

A value a source cannot give (a new item outside a source's index) is 0 with the in-list flag 0:
documented defaults, never an error.

The ranker is LightGBM's lambdarank (``objective="lambdarank"``, NDCG), trained on the validation
users' candidates labelled by the held-out events; saved as LightGBM's text model
(``ranker.txt``), which loads without pickle. Where LightGBM cannot train (too few positives) the
ranker is the linear sum of the standardized source scores (``ranker.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ITEM_FEATURES = ("log_pop", "log_pop_7d", "log_pop_30d", "log_age_days", "log_category_pop")
USER_FEATURES = ("log_history", "category_affinity")
RANKER_TEXT = "ranker.txt"
RANKER_JSON = "ranker.json"


def feature_names(sources: list[str]) -> list[str]:
    per_source = [f"{s}_{what}" for s in sources for what in ("z", "log_rank", "proposed")]
    return per_source + list(ITEM_FEATURES) + list(USER_FEATURES)


def item_feature_arrays(item_rows: np.ndarray, ts_seconds: np.ndarray, n_items: int,
                        item_categories: sp.csr_matrix | None) -> dict[str, np.ndarray]:
    """Item features from the events (catalog rows, epoch seconds): popularity windows end at the
    newest event. ``item_categories``: (n_items, n_categories) binary, or None."""
    item_rows = np.asarray(item_rows, np.int64)
    ts = np.asarray(ts_seconds, np.int64)
    newest = int(ts.max()) if len(ts) else 0
    out = {"log_pop": _log_share(np.bincount(item_rows, minlength=n_items))}
    for days in (7, 30):
        recent = item_rows[ts > newest - days * 86400]
        out[f"log_pop_{days}d"] = _log_share(np.bincount(recent, minlength=n_items))
    first = np.full(n_items, newest, dtype=np.int64)
    if len(item_rows):
        np.minimum.at(first, item_rows, ts)
    out["log_age_days"] = np.log1p((newest - first) / 86400.0).astype(np.float32)
    if item_categories is not None and item_categories.shape[1]:
        counts = np.bincount(item_rows, minlength=n_items).astype(np.float32)
        cat_pop = item_categories.T @ counts  # events per category
        per_item = item_categories.multiply(cat_pop[None, :]).max(axis=1)
        out["log_category_pop"] = _log_share(np.asarray(per_item.todense()).ravel())
    else:
        out["log_category_pop"] = np.zeros(n_items, np.float32)
    return out


def _log_share(counts: np.ndarray) -> np.ndarray:
    """log(1 + count / mean count): a popularity that keeps its scale when the same model is
    refitted on more data (the ranker is trained on a validation split, then serves sources
    refitted on every event)."""
    counts = np.asarray(counts, np.float64)
    mean = counts.mean() if len(counts) and counts.mean() > 0 else 1.0
    return np.log1p(counts / mean).astype(np.float32)


def _standardize(v: np.ndarray) -> np.ndarray:
    if len(v) < 2:
        return np.zeros_like(v)
    sd = v.std()
    return (v - v.mean()) / sd if sd > 1e-12 else np.zeros_like(v)


def candidate_features(cands: np.ndarray, source_scores: list[np.ndarray],
                       proposed: list[np.ndarray], item_feats: dict[str, np.ndarray],
                       history: np.ndarray, item_categories: sp.csr_matrix | None) -> np.ndarray:
    """(len(cands), n_features) for one user: ``source_scores[j]`` is source j's score of each
    candidate (0 where it has none), ``proposed[j]`` whether source j proposed it; ``history`` the
    user's catalog positions (their stored history and the request's events)."""
    n = len(cands)
    cols = []
    for sc, prop in zip(source_scores, proposed):
        sc = np.asarray(sc, np.float64)
        cols.append(_standardize(sc))
        cols.append(np.log1p(np.argsort(np.argsort(-sc, kind="stable"), kind="stable")))
        cols.append(np.asarray(prop, np.float64))
    for name in ITEM_FEATURES:
        cols.append(item_feats[name][cands].astype(np.float64))
    cols.append(np.full(n, np.log1p(len(history))))
    if item_categories is not None and item_categories.shape[1] and len(history):
        cols.append(_affinity(item_categories, history, cands))
    else:
        cols.append(np.zeros(n))
    return np.column_stack(cols).astype(np.float32) if n else np.zeros((0, len(cols)), np.float32)


def _rows(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The column indices of CSR rows ``rows``, and which of ``rows`` each belongs to."""
    lo, hi = m.indptr[rows], m.indptr[rows + 1]
    lens = hi - lo
    owner = np.repeat(np.arange(len(rows)), lens)
    at = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo, lens)
    return m.indices[at], owner


def _affinity(cats: sp.csr_matrix, history: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """Per candidate: the share of the history's items in each of its categories, summed."""
    hist_cats, _ = _rows(cats, history)
    profile = np.bincount(hist_cats, minlength=cats.shape[1]) / len(history)
    cand_cats, owner = _rows(cats, cands)
    return np.bincount(owner, weights=profile[cand_cats], minlength=len(cands))


class Ranker:
    """Orders candidates by their features: LightGBM lambdarank, or the linear blend of the
    sources' standardized scores (``weights``, one per source) where no booster was trained."""

    def __init__(self, names: list[str], booster=None, weights: dict[str, float] | None = None):
        self.names, self.booster = list(names), booster
        self.weights = weights or {}
        self.kind = "lightgbm" if booster is not None else "linear"

    @classmethod
    def linear(cls, sources: list[str]) -> "Ranker":
        """The equal-weight sum of the sources' standardized scores."""
        return cls(feature_names(sources), weights={s: 1.0 for s in sources})

    def predict(self, x: np.ndarray, sources: list[str]) -> np.ndarray:
        if not len(x):
            return np.zeros(0)
        if self.booster is not None:
            threads = 1 if len(x) < 20_000 else 2  # one request: no thread start-up
            return np.asarray(self.booster.predict(x, num_threads=threads), np.float64)
        w = np.array([self.weights.get(s, 1.0) for s in sources], np.float64)
        return x[:, 0:3 * len(sources):3].astype(np.float64) @ w  # the standardized scores

    def save(self, directory: Path) -> str:
        directory = Path(directory)
        if self.booster is not None:
            self.booster.save_model(str(directory / RANKER_TEXT))
            return RANKER_TEXT
        (directory / RANKER_JSON).write_text(json.dumps({"features": self.names,
                                                         "weights": self.weights}))
        return RANKER_JSON

    @classmethod
    def load(cls, directory: Path, file: str, names: list[str]) -> "Ranker":
        """Raises ``ValueError`` naming the file when it is missing, unreadable or was trained
        on other features."""
        path = Path(directory) / file
        if not path.exists():
            raise ValueError(f"{path} is missing: the hybrid's ranker is incomplete")
        if file == RANKER_JSON:
            meta = json.loads(path.read_text())
            if meta.get("features") != names:
                raise ValueError(f"{path}: ranker features {meta.get('features')} are not the "
                                 f"model's {names}")
            return cls(names, weights=meta.get("weights", {}))
        import lightgbm as lgb  # heavy: only where a ranker is loaded

        try:
            booster = lgb.Booster(model_file=str(path))
        except Exception as e:  # noqa: BLE001 - LightGBM raises its own error type
            raise ValueError(f"{path}: not a LightGBM text model ({e})") from None
        if booster.feature_name() != [_lgb_name(n) for n in names]:
            raise ValueError(f"{path}: ranker features {booster.feature_name()} are not the "
                             f"model's {names}")
        return cls(names, booster=booster)


def _lgb_name(name: str) -> str:
    return name.replace(" ", "_")


def train_ranker(x: np.ndarray, y: np.ndarray, groups: list[int], names: list[str],
                 seed: int = 0, rounds: int = 200) -> Ranker:
    """LightGBM lambdarank on candidates grouped per user (``groups``: candidates per user)."""
    import lightgbm as lgb  # heavy: only where a ranker is trained

    params = {"objective": "lambdarank", "metric": "ndcg", "eval_at": [10],
              "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 20,
              "feature_fraction": 0.9, "bagging_fraction": 0.9, "bagging_freq": 1,
              "lambdarank_truncation_level": 20, "seed": seed, "deterministic": True,
              "num_threads": 1, "max_bin": 63, "verbose": -1}
    ds = lgb.Dataset(x, label=y, group=groups, feature_name=[_lgb_name(n) for n in names],
                     free_raw_data=True)
    booster = lgb.train(params, ds, num_boost_round=rounds)
    return Ranker(names, booster=booster)
