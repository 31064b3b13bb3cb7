"""Recommendations for scripts: top-K per user from the latest model, written as CSV.

Reads ``user_factors`` / ``item_factors`` (latest versions), the users' seen items from silver
``events``, inactive items from ``items`` and popularity from ``item_features``. Users are given by
their raw ids and pseudonymized with the same HMAC as ingest; a user the model does not know gets the
most popular items they have not seen (reported in the summary, never silently).
Output columns: ``user_id, rank, item_id, score``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from freshrec.delta import DeltaStore
from freshrec.evaluation import top_k
from freshrec.privacy import pseudonymize
from freshrec.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class OfflineRecommender:
    user_index: dict[str, int]
    user_factors: np.ndarray
    item_ids: np.ndarray
    item_factors: np.ndarray
    popularity: np.ndarray
    seen: dict[str, set[int]]
    model_version: str

    @classmethod
    def load(cls, settings: Settings, users: list[str] | None = None) -> "OfflineRecommender":
        store = DeltaStore(settings)
        items = store.read_arrow("item_factors")
        if items.num_rows == 0:
            raise ValueError("no model: item_factors is empty. Run the batch DAG (make run) or "
                             "`freshrec run als --date D` first")
        inactive = set(store.read_arrow("items", columns=["item_id"],
                                        filter=pc.field("active") == False)  # noqa: E712
                       .column("item_id").to_pylist())
        keep = [i for i, x in enumerate(items.column("item_id").to_pylist()) if x not in inactive]
        items = items.take(keep)
        item_ids = np.asarray(items.column("item_id").to_pylist(), dtype=object)
        item_pos = {x: i for i, x in enumerate(item_ids)}
        filt = pc.is_in(pc.field("user_id"), value_set=pa.array(users, pa.string())) \
            if users is not None else None
        uf = store.read_arrow("user_factors", filter=filt)
        feats = store.read_arrow("item_features", columns=["item_id", "popularity_decayed"])
        popularity = np.zeros(len(item_ids), np.float32)
        for iid, p in zip(feats.column("item_id").to_pylist(),
                          feats.column("popularity_decayed").to_pylist()):
            if iid in item_pos:
                popularity[item_pos[iid]] = p
        ev = store.read_arrow("events", columns=["user_id", "item_id"], filter=filt)
        seen: dict[str, set[int]] = {}
        for u, i in zip(ev.column("user_id").to_pylist(), ev.column("item_id").to_pylist()):
            if i in item_pos:
                seen.setdefault(u, set()).add(item_pos[i])
        return cls(
            user_index={u: n for n, u in enumerate(uf.column("user_id").to_pylist())},
            user_factors=np.stack(uf.column("factors").to_numpy(zero_copy_only=False))
            .astype(np.float32) if uf.num_rows else np.zeros((0, 1), np.float32),
            item_ids=item_ids,
            item_factors=np.stack(items.column("factors").to_numpy(zero_copy_only=False))
            .astype(np.float32),
            popularity=popularity, seen=seen,
            model_version=items.column("model_version")[0].as_py())

    def recommend(self, pseudonyms: list[str], k: int) -> tuple[list[list[tuple[str, float]]], int]:
        """Top-k (item id, score) per user, seen items excluded; returns also the fallback count."""
        out, fallbacks = [], 0
        for u in pseudonyms:
            row = self.user_index.get(u)
            if row is None:
                fallbacks += 1
                scores = self.popularity.copy()
            else:
                scores = self.item_factors @ self.user_factors[row]
            seen = list(self.seen.get(u, ()))
            scores[seen] = -np.inf
            best = top_k(scores[None, :], k)[0]
            out.append([(str(self.item_ids[i]), float(scores[i])) for i in best
                        if np.isfinite(scores[i])])
        return out, fallbacks


def read_user_file(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: users file does not exist; give a file with one user id "
                                "per line (or a CSV with a user_id column)")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and "," in lines[0]:
        header = [h.strip() for h in lines[0].split(",")]
        if "user_id" not in header:
            raise ValueError(f"{path}: CSV without a user_id column (columns: {header})")
        col = header.index("user_id")
        lines = [ln.split(",")[col].strip() for ln in lines[1:]]
    if not lines:
        raise ValueError(f"{path}: no user ids in the file")
    return lines


def recommend_to_csv(settings: Settings, users_file: Path, k: int, output: Path) -> dict[str, int]:
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    raw_ids = read_user_file(users_file)
    key = settings.privacy.hmac_key
    pseudonyms = [pseudonymize(u, key) if settings.privacy.pseudonymize_users else u
                  for u in raw_ids]
    rec = OfflineRecommender.load(settings, pseudonyms)
    results, fallbacks = rec.recommend(pseudonyms, k)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "rank", "item_id", "score"])
        for raw, recs in zip(raw_ids, results):
            for rank, (item, score) in enumerate(recs, start=1):
                w.writerow([raw, rank, item, f"{score:.6f}"])
    summary = {"users": len(raw_ids), "cold_start_fallbacks": fallbacks, "rows":
               sum(len(r) for r in results)}
    log.info("recommend: %s (model %s) -> %s", summary, rec.model_version, output)
    return summary
