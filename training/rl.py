"""Reinforcement learning for re-ranking: a simulator, contextual bandits, an offline policy
learner and off-policy evaluation.

**Simulator.** Built from the synthetic generator's ground truth (:func:`freshrec.data.synth.
ground_truth`): each user has two taste clusters, each item a cluster and a Zipf popularity. A user's
chance of clicking item i when shown is ``sigmoid(w_a log(C P(cluster_i | u)) + w_p z(log pop_i) +
b)``, where ``P(cluster | u)`` is the generator's own session mix (65/35 between the two tastes, 20%
off-taste). Position does not change the chance (slate reward = clicks, additive over items), which
keeps the item-level off-policy estimators unbiased. A request brings a user, an estimate of their
taste (the cluster shares of 20 items drawn from their history) and 30 retrieval candidates (popular
items, items of their estimated favourite cluster, random items) with a popularity-driven
retrieval score. With ``fixed_history`` each user keeps one history (drawn once), so
the taste estimate is what the tables' events say; ``unique_candidates`` makes each candidate of a
request distinct, as a retrieval stage returns them (both for logs written through the tables,
:mod:`training.rl_logged`).

**Policies** choose a slate of ``k`` candidates: random; greedy (top-k retrieval score, what the
retrieval stage alone serves); the logging policy (Plackett-Luce sampling over retrieval scores,
stochastic so that it explores and has propensities); LinUCB and linear Thompson sampling over
candidate features (online, updated from clicks); and the offline learner: a softmax policy over
candidate features trained from the logging policy's data by maximizing a clipped, IPS-weighted
top-k objective (REINFORCE with the top-K off-policy correction of Chen et al. 2019).

**Off-policy evaluation** at the item level, with the logging policy's inclusion propensities
``mu(i in slate | x)``: IPS, self-normalized IPS and doubly robust (with a logistic reward model),
each next to the simulator's true value of the evaluated policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recmodels.policies import N_FEATURES, LinearPolicy, candidate_features

@dataclass
class Batch:
    users: np.ndarray  # (T,)
    cands: np.ndarray  # (T, N) item indices
    x: np.ndarray  # (T, N, d) features
    base: np.ndarray  # (T, N) retrieval scores
    p_click: np.ndarray  # (T, N) true click probabilities (simulator only)
    aff: np.ndarray | None = None  # (T, N) the user's estimated share of the candidate's cluster


class Simulator:
    def __init__(self, item_cluster: np.ndarray, popularity: np.ndarray, user_clusters: np.ndarray,
                 n_candidates: int = 30, k: int = 5, seed: int = 0, w_affinity: float = 1.0,
                 w_pop: float = 0.6, bias: float = -3.0, history: int = 20,
                 fixed_history: bool = False, unique_candidates: bool = False) -> None:
        self.item_cluster, self.user_clusters = item_cluster, user_clusters
        self.n_clusters = int(max(item_cluster.max(), user_clusters.max()) + 1)
        lp = np.log(popularity)
        self.pop_z = (lp - lp.mean()) / lp.std()
        self.pop = popularity / popularity.sum()
        self.n_candidates, self.k, self.history = n_candidates, k, history
        self.w_affinity, self.w_pop, self.bias = w_affinity, w_pop, bias
        self.rng = np.random.default_rng(seed)
        self.by_cluster = [np.flatnonzero(item_cluster == c) for c in range(self.n_clusters)]
        self.top_popular = np.argsort(-popularity)[:200]
        self.fixed_history, self.unique_candidates = fixed_history, unique_candidates
        self._history_items: np.ndarray | None = None

    def history_items(self) -> np.ndarray:
        """(n_users, history) item indices: each user's one fixed history (``fixed_history``), drawn
        from their session mix with items by popularity within a cluster, the same on every call."""
        if self._history_items is None:
            rng = np.random.default_rng(12345)
            U = len(self.user_clusters)
            probs = self.cluster_probs(np.arange(U))
            cum = probs.cumsum(1)
            slots = (rng.random((U, self.history, 1)) > cum[:, None, :]).sum(2)
            slots = np.minimum(slots, self.n_clusters - 1)
            items = np.empty_like(slots)
            for c in range(self.n_clusters):
                where = slots == c
                pool = self.by_cluster[c]
                if where.any():
                    items[where] = rng.choice(pool, int(where.sum()), p=self.pop[pool] / self.pop[pool].sum())
            self._history_items = items
        return self._history_items

    @classmethod
    def from_synth(cls, cfg, **kw) -> "Simulator":
        from freshrec.data.synth import ground_truth

        item_cluster, popularity, user_clusters = ground_truth(cfg)
        return cls(item_cluster, popularity, user_clusters, **kw)

    def cluster_probs(self, users: np.ndarray) -> np.ndarray:
        """P(cluster | user) of the generator: (len(users), C)."""
        C = self.n_clusters
        p = np.full((len(users), C), 0.2 / C)
        rows = np.arange(len(users))
        np.add.at(p, (rows, self.user_clusters[users, 0]), 0.8 * 0.65)
        np.add.at(p, (rows, self.user_clusters[users, 1]), 0.8 * 0.35)
        return p

    def requests(self, n: int) -> Batch:
        rng, C, N = self.rng, self.n_clusters, self.n_candidates
        users = rng.integers(0, len(self.user_clusters), n)
        probs = self.cluster_probs(users)
        # the system's view of a user's taste: cluster shares of a short history
        if self.fixed_history:
            hc = self.item_cluster[self.history_items()[users]]
            hist = np.stack([np.bincount(h, minlength=C) for h in hc]) / self.history
        else:
            hist = np.stack([rng.multinomial(self.history, p) for p in probs]) / self.history
        fav = hist.argmax(1)
        cands = np.empty((n, N), np.int64)
        for t in range(n):
            a = rng.choice(self.top_popular, N // 3, replace=False)
            pool = self.by_cluster[fav[t]]
            b = rng.choice(pool, N // 3, replace=len(pool) < N // 3,
                           p=self.pop[pool] / self.pop[pool].sum())
            c = rng.integers(0, len(self.item_cluster), N - 2 * (N // 3))
            cands[t] = np.concatenate([a, b, c])
            if self.unique_candidates:  # as a retrieval stage returns them: each item once
                _, first = np.unique(cands[t], return_index=True)
                dup = np.setdiff1d(np.arange(N), first)
                while len(dup):
                    cands[t, dup] = rng.integers(0, len(self.item_cluster), len(dup))
                    _, first = np.unique(cands[t], return_index=True)
                    dup = np.setdiff1d(np.arange(N), first)
        ic = self.item_cluster[cands]
        aff_est = np.take_along_axis(hist, ic, axis=1)
        aff_true = np.take_along_axis(probs, ic, axis=1)
        base = self.pop_z[cands] + 0.5 * rng.normal(size=(n, N))
        z = self.w_affinity * np.log(C * aff_true) + self.w_pop * self.pop_z[cands] + self.bias
        p_click = 1.0 / (1.0 + np.exp(-z))
        x = candidate_features(aff_est, self.pop_z[cands], base)
        return Batch(users, cands, x, base, p_click, aff_est)

    def clicks(self, batch: Batch, slates: np.ndarray) -> np.ndarray:
        """Bernoulli clicks of the served slate positions (T, k)."""
        p = np.take_along_axis(batch.p_click, slates, axis=1)
        return (self.rng.random(p.shape) < p).astype(np.float64)


# -- policies -------------------------------------------------------------------------------------
def gumbel_top_k(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Plackett-Luce samples without replacement: (T, N) logits -> (T, k) indices."""
    g = logits - np.log(-np.log(rng.random(logits.shape)))
    return np.argsort(-g, axis=1)[:, :k]


def inclusion_probs(logits: np.ndarray, k: int, rng: np.random.Generator, samples: int = 400) -> np.ndarray:
    """P(candidate in the Plackett-Luce top-k slate), by Monte Carlo: (T, N)."""
    T, N = logits.shape
    out = np.zeros((T, N))
    for s in range(0, T, 256):
        lg = logits[s:s + 256]
        g = lg[None] - np.log(-np.log(rng.random((samples, *lg.shape))))
        top = np.argsort(-g, axis=2)[:, :, :k]
        counts = np.zeros(lg.shape)
        for m in range(samples):
            np.add.at(counts, (np.arange(len(lg))[:, None], top[m]), 1.0)
        out[s:s + 256] = counts / samples
    return np.clip(out, 1.0 / samples, 1.0)


def top_k_slate(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1)[:, :k]


def slate_marginals(slates: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((len(slates), n))
    np.put_along_axis(m, slates, 1.0, axis=1)
    return m


def run_bandit(sim: Simulator, bandit: LinearPolicy, rounds: int, batch: int = 50) -> dict:
    """Online: serve, observe clicks, update. Returns the mean true value per slate overall and
    over the last quarter of rounds (after learning)."""
    values = []
    for _ in range(0, rounds, batch):
        b = sim.requests(batch)
        for t in range(batch):
            slate, _ = bandit.select(b.x[t], sim.k)
            p = b.p_click[t, slate]
            values.append(p.sum())
            r = (sim.rng.random(len(slate)) < p).astype(float)
            bandit.update(b.x[t, slate], r)
    v = np.array(values)
    return {"online_value": float(v.mean()), "final_value": float(v[-max(1, len(v) // 4):].mean())}


@dataclass
class Logged:
    batch: Batch
    slates: np.ndarray  # (T, k) positions into candidates
    rewards: np.ndarray  # (T, k)
    mu: np.ndarray  # (T, N) logging inclusion propensities
    logging_temperature: float


def log_data(sim: Simulator, n: int, temperature: float = 1.0) -> Logged:
    """The logging policy (Plackett-Luce over retrieval scores) serving ``n`` requests."""
    b = sim.requests(n)
    logits = b.base / temperature
    slates = gumbel_top_k(logits, sim.k, sim.rng)
    return Logged(b, slates, sim.clicks(b, slates), inclusion_probs(logits, sim.k, sim.rng),
                  temperature)


def true_value(batch: Batch, marginals: np.ndarray) -> float:
    """Expected clicks per slate of a policy with inclusion marginals (T, N)."""
    return float((marginals * batch.p_click).sum(1).mean())


def fit_reward_model(logged: Logged):
    from sklearn.linear_model import LogisticRegression

    x = np.take_along_axis(logged.batch.x, logged.slates[..., None], axis=1).reshape(-1, N_FEATURES)
    y = logged.rewards.reshape(-1)
    return LogisticRegression(C=1.0, max_iter=500).fit(x[:, 1:], y)


def ope(logged: Logged, pi: np.ndarray, reward_model=None, clip: float = 100.0) -> dict[str, float]:
    """IPS, SNIPS and DR estimates of the value (clicks per slate) of a policy with inclusion
    marginals ``pi`` (T, N), from the logged data."""
    k = logged.slates.shape[1]
    mu_s = np.take_along_axis(logged.mu, logged.slates, axis=1)
    pi_s = np.take_along_axis(pi, logged.slates, axis=1)
    w = np.minimum(pi_s / mu_s, clip)
    ips = float((w * logged.rewards).sum(1).mean())
    norm = float(w.sum(1).mean() / k)
    snips = ips / norm if norm > 0 else float("nan")
    rm = reward_model or fit_reward_model(logged)
    T, N, d = logged.batch.x.shape
    r_hat = rm.predict_proba(logged.batch.x.reshape(-1, d)[:, 1:])[:, 1].reshape(T, N)
    r_hat_s = np.take_along_axis(r_hat, logged.slates, axis=1)
    dr = float(((pi * r_hat).sum(1) + (w * (logged.rewards - r_hat_s)).sum(1)).mean())
    return {"ips": ips, "snips": snips, "dr": dr}


class SoftmaxPolicy:
    """A linear softmax policy over candidate features; serves the top-k of its scores."""

    def __init__(self, theta: np.ndarray) -> None:
        self.theta = np.asarray(theta, np.float64)

    def scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.theta

    def slate(self, x: np.ndarray, k: int) -> np.ndarray:
        return top_k_slate(self.scores(x), k)


def train_reinforce(logged: Logged, steps: int = 400, lr: float = 0.05, clip: float = 20.0,
                    entropy: float = 1e-3, seed: int = 0, on_step=None) -> tuple[SoftmaxPolicy, list]:
    """Offline top-k REINFORCE: maximize sum over logged served items of
    ``min(alpha_theta(i) / mu(i), clip) * r`` with ``alpha = 1 - (1 - pi_theta(i))^k``."""
    import torch

    torch.manual_seed(seed)
    x = torch.as_tensor(logged.batch.x, dtype=torch.float32)
    slates = torch.as_tensor(logged.slates)
    r = torch.as_tensor(logged.rewards, dtype=torch.float32)
    mu = torch.gather(torch.as_tensor(logged.mu, dtype=torch.float32), 1, slates)
    k = slates.shape[1]
    theta = torch.zeros(x.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    curve = []
    for step in range(steps):
        logp = torch.log_softmax(x @ theta, dim=1)
        p = logp.exp()
        alpha = 1 - (1 - torch.gather(p, 1, slates)) ** k
        w = torch.clamp(alpha / mu, max=clip)
        objective = (w * r).sum(1).mean() + entropy * -(p * logp).sum(1).mean()
        loss = -objective
        if not torch.isfinite(loss):
            from training.trainer import NanLoss

            raise NanLoss(f"reinforce: objective is {loss.item()} at step {step}; lower lr")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            curve.append({"step": step, "ips_objective": float(objective.detach())})
            if on_step:
                on_step(step, float(objective.detach()))
    return SoftmaxPolicy(theta.detach().numpy().astype(np.float64)), curve


def compare_policies(sim: Simulator, n_logged: int = 4000, n_eval: int = 3000, bandit_rounds: int = 4000,
                     seed: int = 0) -> dict:
    """Every policy's true value on the same fresh requests, the learned ones' OPE estimates next
    to the truth, and the learned artifacts."""
    logged = log_data(sim, n_logged)
    policy, curve = train_reinforce(logged, seed=seed)
    bandits = {}
    for kind in ("linucb", "thompson"):
        b = LinearPolicy(kind=kind, seed=seed)
        bandits[kind] = (b, run_bandit(sim, b, bandit_rounds))
    ev = sim.requests(n_eval)
    k, N = sim.k, sim.n_candidates
    rng = np.random.default_rng(seed + 1)
    margins = {
        "random": np.full((n_eval, N), k / N),
        "greedy": slate_marginals(top_k_slate(ev.base, k), N),
        "logging": inclusion_probs(ev.base / logged.logging_temperature, k, rng),
        "reinforce": slate_marginals(policy.slate(ev.x, k), N),
        "oracle": slate_marginals(top_k_slate(ev.p_click, k), N),
    }
    for kind, (b, _) in bandits.items():
        margins[kind] = slate_marginals(top_k_slate(ev.x @ b.theta, k), N)
    truth = {name: true_value(ev, m) for name, m in margins.items()}
    # OPE on the logged data, for the learned policies and the logging policy itself
    rm = fit_reward_model(logged)
    estimates = {}
    for name, pol in [("reinforce", lambda x: policy.slate(x, k))] + \
            [(kind, lambda x, b=b: top_k_slate(x @ b.theta, k)) for kind, (b, _) in bandits.items()]:
        pi = slate_marginals(pol(logged.batch.x), N)
        estimates[name] = {**ope(logged, pi, rm), "truth_on_logged_contexts": true_value(logged.batch, pi)}
    estimates["logging"] = {**ope(logged, logged.mu, rm),
                            "truth_on_logged_contexts": true_value(logged.batch, logged.mu)}
    return {"truth": truth, "ope": estimates, "policy": policy, "bandits": bandits,
            "reinforce_curve": curve, "online": {k_: v for k_, (_, v) in bandits.items()}}
