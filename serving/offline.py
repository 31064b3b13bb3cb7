"""Recommendations for scripts: top-K per user from the served model, written as CSV.

Loads the snapshot of ``serving.model`` (default ``@champion``) through the same loader as
``freshrec serve`` (:func:`serving.state.load_state`) and answers each user with the same request
logic (:func:`serving.logic.recommend`), so the file holds what a client would be served. Users are
given by their raw ids and pseudonymized with the same HMAC as ingest; a user the model does not
know gets the most popular items they have not seen (counted in the summary, never silently).
Output columns: ``user_id, rank, item_id, score``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from freshrec.privacy.pseudonyms import pseudonymizer
from freshrec.settings import Settings

log = logging.getLogger(__name__)


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


def recommend_to_csv(settings: Settings, users_file: Path, k: int, output: Path,
                     model: str | int | None = None, build=None) -> dict[str, object]:
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    raw_ids = read_user_file(users_file)
    pseudonym = pseudonymizer(settings)
    pseudonyms = [pseudonym(u) for u in raw_ids]
    from serving.logic import Filters, recommend
    from serving.state import load_state

    state = load_state(settings, model=model, build=build)
    results, fallbacks = [], 0
    for p in pseudonyms:
        r = recommend(state, p, k, Filters(), {}, [], settings.serving.overfetch)
        fallbacks += r.cold_start
        results.append([(s.item_id, s.score) for s in r.items])
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "rank", "item_id", "score"])
        for raw, recs in zip(raw_ids, results):
            for rank, (item, score) in enumerate(recs, start=1):
                w.writerow([raw, rank, item, f"{score:.6f}"])
    summary = {"users": len(raw_ids), "cold_start_fallbacks": fallbacks,
               "rows": sum(len(r) for r in results), "model_version": state.model_version}
    log.info("recommend: %s -> %s", summary, output)
    return summary
