"""Re-ranking inside serving by a bandit or a learned policy, with the propensity of every served
item logged.

The retrieval's top ``candidates`` (after filters and seen-item exclusion) are described with the
features the training lane learns on (:mod:`recmodels.policies`, shared by both lanes): the user's
share of recent items in the candidate's category, the candidate's standardized log popularity and
its standardized retrieval score. The policy picks ``k``; with probability ``epsilon`` a uniformly
random slate is served instead, so every candidate has a known chance of being served (see
:mod:`recmodels.policies`). The server logs each served slate with these propensities through the
impression log (:mod:`serving.impressions`) into the ``impressions`` table, the logged data of
off-policy learning. Clicks reported through RecordEvents update a
bandit online; the unclicked rest of a slate counts as reward 0 when the user's next slate is served.
Each logged slate also carries the candidates and their retrieval scores, which off-policy
learning needs (``impressions.candidates``).

The online bandit's state (its ``A`` and ``b``) survives a restart: it is written to
``<data>/reranker/<name>-state.npz`` (temporary file, fsync, atomic rename, fsync of the directory)
every ``persist_every`` updates or ``persist_seconds``, whichever comes first, and on
:meth:`Reranker.save` at server stop; on start it is read back when it was learned from the same
exported policy (a fingerprint of its arrays), so a newly promoted policy starts from its own state.
Several processes sharing a data directory share the file: the last one to write wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from freshrec.durable import fsync_path
from recmodels.policies import LinearPolicy, candidate_features

log = logging.getLogger(__name__)
REWARDING = {"click", "purchase", "add_to_cart", "rating", "like"}


class Reranker:
    def __init__(self, model_dir: Path, candidates: int = 30, epsilon: float = 0.05,
                 seed: int = 0, state_dir: Path | None = None, persist_every: int = 100,
                 persist_seconds: float = 30.0) -> None:
        meta = json.loads((model_dir / "model.json").read_text())
        if meta.get("kind") != "reranker":
            raise ValueError(f"{model_dir}: not a re-ranking policy (model.json kind="
                             f"{meta.get('kind')!r}); train one with `freshrec train --model bandit`")
        self.policy = LinearPolicy.from_arrays(np.load(model_dir / "arrays.npz"), epsilon, seed)
        self.name, self.candidates = meta["name"], candidates
        self.lock = threading.Lock()
        self.pending: dict[str, dict[str, np.ndarray]] = {}  # user -> item -> features, unrewarded
        self._pop: tuple[int, dict[str, float]] | None = None
        self.fingerprint = hashlib.sha256((model_dir / "arrays.npz").read_bytes()).hexdigest()
        self.state_path = state_dir / f"{self.name}-state.npz" if state_dir is not None else None
        self.persist_every, self.persist_seconds = persist_every, persist_seconds
        self.updates = self._saved_updates = 0
        self._saved_at = time.monotonic()
        self.restored = self._restore()

    # -- the online state across restarts --------------------------------------------------------
    def _restore(self) -> bool:
        if self.state_path is None or self.policy.A is None or not self.state_path.exists():
            return False
        with np.load(self.state_path) as st:
            if str(st["fingerprint"]) != self.fingerprint:
                log.info("%s: learned from another exported policy; starting from this one",
                         self.state_path)
                return False
            self.policy.A, self.policy.b = np.array(st["A"]), np.array(st["b"])
            self.updates = self._saved_updates = int(st["updates"])
        log.info("re-ranker state restored from %s (%d online updates)", self.state_path, self.updates)
        return True

    def save(self) -> Path | None:
        """Write the bandit's state atomically (a no-op for a fixed policy or without a state
        directory); returns the file written."""
        if self.state_path is None or self.policy.A is None:
            return None
        with self.lock:
            A, b, n = self.policy.A.copy(), self.policy.b.copy(), self.updates
        d = self.state_path.parent
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{self.state_path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        with tmp.open("wb") as f:
            np.savez(f, A=A, b=b, updates=np.array(n), fingerprint=np.array(self.fingerprint))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        fsync_path(d)
        self._saved_updates, self._saved_at = n, time.monotonic()
        return self.state_path

    def _updated(self) -> None:
        """After an online update (outside the lock): persist when enough has changed."""
        if self.state_path is None:
            return
        if self.updates - self._saved_updates >= self.persist_every or \
                time.monotonic() - self._saved_at >= self.persist_seconds:
            self.save()

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
                self.updates += 1
            self.pending[user] = {scored[i].item_id: x[i] for i in slate}
        if old:
            self._updated()
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
            self.updates += 1
        self._updated()
        return True


def load_reranker(settings) -> Reranker | None:
    """From ``serving.reranker``: empty (off), a directory with an exported policy, or
    ``champion`` (the ``freshrec-policy@champion`` version in MLflow)."""
    where = settings.serving.reranker
    if not where:
        return None
    if where == "champion":
        from freshrec.contracts.registry import POLICY, champion_info
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
    r = Reranker(path, settings.serving.rerank_candidates, settings.serving.rerank_epsilon,
                 state_dir=settings.data_dir / "reranker")
    log.info("re-ranker %s loaded from %s in %.2fs", r.name, path, time.perf_counter() - started)
    return r
