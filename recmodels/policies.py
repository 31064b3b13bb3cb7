"""Linear re-ranking policies over retrieval candidates, shared by the training lane (which learns
them in the simulator) and serving (which runs them on live requests): one feature function, one
policy class, one artifact format (``arrays.npz``).

Features of a candidate: bias, the user's share of recent items in the candidate's category, the
candidate's standardized log popularity, their product, log affinity, and the standardized
retrieval score. Policies pick slates by top-k of a linear score: LinUCB (``linucb``: mean plus an
exploration bonus), linear Thompson sampling (``thompson``: a posterior sample), or a fixed weight
vector learned offline (``fixed``). ``epsilon`` mixes in a uniformly random slate, so every
candidate keeps a known chance of being served: ``propensity = (1 - eps) * 1[in the policy's
slate] + eps * k / N``, with a Monte Carlo estimate of the first term for Thompson sampling.
"""

from __future__ import annotations

import numpy as np

N_FEATURES = 6
KINDS = ("linucb", "thompson")


def candidate_features(affinity: np.ndarray, pop_z: np.ndarray, score_z: np.ndarray) -> np.ndarray:
    """Features of candidates (any leading shape) -> (..., N_FEATURES)."""
    a = np.asarray(affinity, np.float64)
    p = np.asarray(pop_z, np.float64)
    return np.stack([np.ones_like(a), a, p, a * p, np.log(a + 0.02), np.asarray(score_z, np.float64)],
                    axis=-1)


class LinearPolicy:
    def __init__(self, d: int = N_FEATURES, kind: str = "linucb", alpha: float = 0.5,
                 l2: float = 1.0, epsilon: float = 0.05, seed: int = 0,
                 theta: np.ndarray | None = None) -> None:
        if theta is not None:
            kind, self._theta = "fixed", np.asarray(theta, np.float64)
            self.A = self.b = None
        elif kind not in KINDS:
            raise ValueError(f"bandit kind must be linucb or thompson, got {kind!r}")
        else:
            self.A, self.b = np.eye(d) * l2, np.zeros(d)
        self.kind, self.alpha, self.epsilon = kind, alpha, epsilon
        self.rng = np.random.default_rng(seed)

    @property
    def theta(self) -> np.ndarray:
        return self._theta if self.A is None else np.linalg.solve(self.A, self.b)

    def _scores(self, x: np.ndarray, draw: bool = True) -> np.ndarray:
        if self.A is None:
            return x @ self._theta
        a_inv = np.linalg.inv(self.A)
        theta = a_inv @ self.b
        if self.kind == "linucb":
            return x @ theta + self.alpha * np.sqrt(np.einsum("...i,ij,...j->...", x, a_inv, x))
        return x @ (self.rng.multivariate_normal(theta, self.alpha ** 2 * a_inv) if draw else theta)

    def select(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x (N, d) for one request -> (slate of k candidate positions, their propensities)."""
        n = len(x)
        k = min(k, n)
        if self.rng.random() < self.epsilon:
            slate = self.rng.choice(n, k, replace=False)
        else:
            slate = np.argsort(-self._scores(x))[:k]
        if self.kind == "thompson":
            counts = np.zeros(n)
            for _ in range(32):
                counts[np.argsort(-self._scores(x))[:k]] += 1
            chosen = counts / 32
        else:
            chosen = np.zeros(n)
            chosen[np.argsort(-self._scores(x, draw=False))[:k]] = 1.0
        prop = (1 - self.epsilon) * chosen + self.epsilon * k / n
        return slate, np.clip(prop[slate], 1e-6, 1.0)

    def update(self, x: np.ndarray, rewards: np.ndarray) -> None:
        """x (m, d) of served candidates and their rewards (clicks); a fixed policy stays fixed."""
        if self.A is not None:
            self.A += x.T @ x
            self.b += x.T @ rewards

    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.A is None:
            return {"theta": self._theta}
        return {"A": self.A, "b": self.b, "alpha": np.array(self.alpha),
                "epsilon": np.array(self.epsilon), "kind": np.array(self.kind)}

    @classmethod
    def from_arrays(cls, arrays, epsilon: float | None = None, seed: int = 0) -> "LinearPolicy":
        """Load an exported policy; ``epsilon`` overrides the exported exploration rate."""
        if "theta" in arrays:
            return cls(d=len(arrays["theta"]), epsilon=0.0 if epsilon is None else epsilon,
                       seed=seed, theta=arrays["theta"])
        m = cls(d=len(arrays["b"]), kind=str(arrays["kind"]), alpha=float(arrays["alpha"]),
                epsilon=float(arrays["epsilon"]) if epsilon is None else epsilon, seed=seed)
        m.A, m.b = np.array(arrays["A"], np.float64), np.array(arrays["b"], np.float64)
        return m
