"""Re-ranking inside serving by a bandit or a learned policy, with the propensity of every served
item logged.

The retrieval's top ``candidates`` (after filters and seen-item exclusion) are described with the
features the training lane learns on (:mod:`freshrec.policies`, shared by both lanes): the user's
share of recent items in the candidate's category, the candidate's standardized log popularity and
its standardized retrieval score. The policy picks ``k``; with probability ``epsilon`` a uniformly
random slate is served instead, so every candidate has a known chance of being served (see
:mod:`freshrec.policies`). The server logs each served slate with these propensities through the
impression log (:mod:`serving.impressions`) into the ``impressions`` table, the logged data of
off-policy learning. Clicks reported through RecordEvents update a
bandit online; the unclicked rest of a slate counts as reward 0 when the user's next slate is served.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from freshrec.policies import LinearPolicy, candidate_features

log = logging.getLogger(__name__)
REWARDING = {"click", "purchase", "add_to_cart", "rating", "like"}


class Reranker:
    def __init__(self, model_dir: Path, candidates: int = 30, epsilon: float = 0.05,
                 seed: int = 0) -> None:
        meta = json.loads((model_dir / "model.json").read_text())
        if meta.get("kind") != "reranker":
            raise ValueError(f"{model_dir}: not a re-ranking policy (model.json kind="
                             f"{meta.get('kind')!r}); train one with `freshrec train --model bandit`")
        self.policy = LinearPolicy.from_arrays(np.load(model_dir / "arrays.npz"), epsilon, seed)
        self.name, self.candidates = meta["name"], candidates
        self.lock = threading.Lock()
        self.pending: dict[str, dict[str, np.ndarray]] = {}  # user -> item -> features, unrewarded
        self._pop: tuple[int, dict[str, float]] | None = None

    def _pop_z(self, state) -> dict[str, float]:
        if self._pop is None or self._pop[0] != id(state):
            n = len(state.popular)
            lp = -np.log1p(np.arange(n, dtype=np.float64))  # log popularity from its rank
            z = (lp - lp.mean()) / (lp.std() or 1.0)
            self._pop = (id(state), dict(zip(state.popular, z)))
        return self._pop[1]

    def rerank(self, state, user: str, history: list[str], scored: list, k: int) -> list[tuple]:
        """``scored``: retrieval candidates best first -> [(Scored, propensity)] of length k."""
        if not scored:
            return []
        cats = [state.categories.get(h, frozenset()) for h in history[:50]]
        aff = np.array([np.mean([bool(c & state.categories.get(s.item_id, frozenset()))
                                 for c in cats]) if cats else 0.0 for s in scored])
        pz = self._pop_z(state)
        pop = np.array([pz.get(s.item_id, -2.0) for s in scored])
        sc = np.array([s.score for s in scored], np.float64)
        sz = (sc - sc.mean()) / (sc.std() or 1.0)
        x = candidate_features(aff, pop, sz)
        with self.lock:
            slate, prop = self.policy.select(x, k)
            old = self.pending.pop(user, None)
            if old:  # the unclicked rest of the previous slate: reward 0
                self.policy.update(np.stack(list(old.values())), np.zeros(len(old)))
            self.pending[user] = {scored[i].item_id: x[i] for i in slate}
        return [(scored[i], float(p)) for i, p in zip(slate, prop)]

    def feedback(self, user: str, item: str, event_type: str) -> bool:
        """A reported event on an item of the user's last slate: reward 1 (online update)."""
        if event_type not in REWARDING:
            return False
        with self.lock:
            x = self.pending.get(user, {}).pop(item, None)
            if x is None:
                return False
            self.policy.update(x[None], np.ones(1))
        return True


def load_reranker(settings) -> Reranker | None:
    """From ``serving.reranker``: empty (off), a directory with an exported policy, or
    ``champion`` (the ``freshrec-policy@champion`` version in MLflow)."""
    where = settings.serving.reranker
    if not where:
        return None
    if where == "champion":
        from freshrec.registry import POLICY, champion_info
        from freshrec.tracking import mlflow_for

        mlflow = mlflow_for(settings, settings.training.experiment)
        info = champion_info(mlflow, POLICY)
        if info is None:
            raise ValueError("serving.reranker is 'champion' but freshrec-policy has no @champion; "
                             "run `freshrec train --model bandit` (or reinforce) first")
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=info["source"]))
    else:
        path = Path(where)
        if not (path / "model.json").exists():
            raise FileNotFoundError(f"serving.reranker={where}: no model.json there; point it at an "
                                    "exported policy directory or use 'champion'")
    started = time.perf_counter()
    r = Reranker(path, settings.serving.rerank_candidates, settings.serving.rerank_epsilon)
    log.info("re-ranker %s loaded from %s in %.2fs", r.name, path, time.perf_counter() - started)
    return r
