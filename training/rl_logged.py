"""Reinforcement learning from served logs: the ``feedback`` table (one row per shown item with the
logging policy's propensity, clicked, reward) joined with ``impressions`` (the candidate set each
slate was chosen from) -> a bandit, top-k REINFORCE or a slate Q-network, with IPS / SNIPS / DR of
the learned policy on held-out logs (the latest requests by serving time).

Features of a candidate (user, item) come from the tables, the way serving describes candidates
(:func:`recmodels.policies.candidate_features`): the user's share of recent items (silver
``events`` before the request, the last ``history``) that share a category (silver ``items``) with
the candidate, taken as the maximum over the candidate's categories; the item's standardized log
popularity (gold ``item_features``; items missing there get the lowest); the logged retrieval score
standardized within the request.

Why ``impressions.candidates``: a policy that picks k of N candidates can only be scored off-policy
if the N are known (its inclusion probability of a shown item depends on the others, and the doubly
robust estimate sums its reward model over all of them); the shown items alone do not say that.

:func:`simulator_logs_to_feedback` writes the simulator's logging-policy data through the same
tables (``items``, ``events``, ``item_features``, ``impressions``, ``feedback``), so training from
logs is tested end to end on what a production system fills.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from recmodels.policies import LinearPolicy, candidate_features
from recmodels.slateq import Transitions, fit_slateq

log = logging.getLogger(__name__)
FILLED_BY = ("it is filled from served impressions by the feedback job (serving.reranker on, then "
             "the nearline or batch DAG)")


class NoLoggedData(ValueError):
    """The logged tables hold nothing to learn from."""


@dataclass
class LoggedSlates:
    """Logged requests, padded to the largest candidate set and slate; masks mark real entries."""

    request_ids: np.ndarray  # (T,)
    users: np.ndarray  # (T,)
    ts: np.ndarray  # (T,) datetime64[us]
    x: np.ndarray  # (T, N, d) candidate features
    mask: np.ndarray  # (T, N) real candidates
    slates: np.ndarray  # (T, k) positions of the shown items in the candidates
    shown: np.ndarray  # (T, k) real slate entries
    rewards: np.ndarray  # (T, k)
    mu: np.ndarray  # (T, k) logging propensities of the shown items (1 where padded)

    def __len__(self) -> int:
        return len(self.request_ids)

    def take(self, rows: np.ndarray) -> "LoggedSlates":
        return LoggedSlates(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def split(self, test_fraction: float) -> tuple["LoggedSlates", "LoggedSlates"]:
        """Earlier requests for training, the latest ``test_fraction`` (by serving time) held out."""
        order = np.argsort(self.ts, kind="stable")
        cut = int(round(len(order) * (1 - test_fraction)))
        if cut < 1 or cut >= len(order):
            raise NoLoggedData(f"{len(order)} logged requests cannot be split into train and a "
                               f"held-out {test_fraction:.0%}; log more requests")
        return self.take(order[:cut]), self.take(order[cut:])

    def transitions(self) -> Transitions:
        """Each request followed by the same user's next request (by time) in this set."""
        nxt = np.full(len(self), -1, np.int64)
        order = np.lexsort((self.ts, self.users))
        same = self.users[order[1:]] == self.users[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
        return Transitions(self.x, self.mask, self.slates, self.shown, self.rewards, nxt)

    def k(self) -> int:
        return int(self.shown.sum(1).max())


def logged_features(affinity: np.ndarray, pop_z: np.ndarray, scores: np.ndarray,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """(T, N) affinity, standardized log popularity and raw retrieval scores -> (T, N, d); scores
    are standardized within each request over its real candidates."""
    mask = np.ones(scores.shape, bool) if mask is None else mask
    s = np.where(mask, scores, np.nan)
    mean = np.nanmean(s, 1, keepdims=True)
    std = np.nanstd(s, 1, keepdims=True)
    z = np.where(mask, (scores - mean) / np.where(std > 0, std, 1.0), 0.0)
    x = candidate_features(np.where(mask, affinity, 0.0), np.where(mask, pop_z, 0.0), z)
    return np.where(mask[..., None], x, 0.0)


# -- the simulator's logs through the tables ---------------------------------------------------------
def simulator_logs_to_feedback(sim, logged, store, start: datetime | None = None,
                               organic_every: int = 50) -> np.ndarray:
    """Write the simulator's logged slates as production fills the tables: the catalog (``items``
    with the cluster as category, ``item_features`` with the popularity), each logged user's fixed
    history as silver ``events`` (before the first request), one ``impressions`` row per request
    (with its candidates) and one ``feedback`` row per shown item (clicked, reward 1 or 0, the
    logging propensity), plus an organic click every ``organic_every`` requests. The simulator must
    have ``fixed_history`` and ``unique_candidates`` on. Returns the request ids (row order of
    ``logged``); request ``r<t>`` is served at ``start + t`` seconds."""
    import pyarrow as pa

    if not (sim.fixed_history and sim.unique_candidates):
        raise ValueError("simulator_logs_to_feedback needs Simulator(fixed_history=True, "
                         "unique_candidates=True): tables hold one history per user and each "
                         "candidate once per request")
    start = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
    day = start.strftime("%Y-%m-%d")
    b = logged.batch
    T, N = b.cands.shape
    n_items = len(sim.item_cluster)
    item_ids = np.char.add("i", np.arange(n_items).astype(str)).astype(object)
    store.write_arrow("items", pa.table({
        "item_id": item_ids, "title": [None] * n_items,
        "categories": [[f"c{c}"] for c in sim.item_cluster], "text": [None] * n_items,
        "attributes": [None] * n_items, "active": [True] * n_items,
        "updated_at": [start - timedelta(days=1)] * n_items}), mode="overwrite")
    store.write_arrow("item_features", pa.table({
        "item_id": item_ids, "n_events": [None] * n_items, "n_users": [None] * n_items,
        "popularity": sim.pop * n_items, "popularity_decayed": [None] * n_items,
        "last_ts": [None] * n_items, "as_of": [start] * n_items}), mode="overwrite")
    users = np.unique(b.users)
    hist = sim.history_items()[users]
    H = hist.shape[1]
    ev_users = np.repeat(users, H)
    ev_ts = [start - timedelta(minutes=H - h) for _ in users for h in range(H)]
    ev_ids = [f"h{u}-{h}" for u in users for h in range(H)]
    store.write_arrow("events", pa.table({
        "event_id": ev_ids, "user_id": np.char.add("u", ev_users.astype(str)).astype(object),
        "item_id": item_ids[hist.ravel()], "event_type": ["click"] * len(ev_ids),
        "value": [None] * len(ev_ids), "weight": np.ones(len(ev_ids)), "ts": ev_ts,
        "context": [None] * len(ev_ids), "raw_id": ev_ids, "batch_date": [day] * len(ev_ids)}),
        mode="overwrite")
    rid = np.char.add("r", np.arange(T).astype(str)).astype(object)
    uid = np.char.add("u", b.users.astype(str)).astype(object)
    ts = [start + timedelta(seconds=int(t)) for t in range(T)]
    mu_s = np.take_along_axis(logged.mu, logged.slates, axis=1)
    base_s = np.take_along_axis(b.base, logged.slates, axis=1)
    k = logged.slates.shape[1]
    store.write_arrow("impressions", pa.table({
        "request_id": rid, "user_id": uid, "model_version": ["simulator-logging"] * T,
        "arm": [None] * T, "items": [list(item_ids[b.cands[t, logged.slates[t]]]) for t in range(T)],
        "positions": [list(range(k))] * T, "scores": base_s.tolist(), "propensities": mu_s.tolist(),
        "ts": ts, "server": ["simulator"] * T, "source_file": [None] * T, "served_date": [day] * T,
        "candidates": [list(item_ids[c]) for c in b.cands], "candidate_scores": b.base.tolist()}),
        mode="overwrite")
    clicked = logged.rewards.astype(bool)
    rows_t = np.repeat(np.arange(T), k)
    pos = np.tile(np.arange(k), T)
    c = clicked.ravel()
    item_of = item_ids[np.take_along_axis(b.cands, logged.slates, axis=1).ravel()]
    organic = np.arange(0, T, organic_every) if organic_every else np.array([], np.int64)
    n_org = len(organic)
    event_ts = [ts[t] + timedelta(seconds=0.5) for t in rows_t]
    store.write_arrow("feedback", pa.table({
        "request_id": list(rid[rows_t]) + [None] * n_org,
        "user_id": list(uid[rows_t]) + list(uid[organic]),
        "model_version": ["simulator-logging"] * (T * k) + [None] * n_org,
        "arm": [None] * (T * k + n_org),
        "item_id": list(item_of) + list(item_ids[b.cands[organic, -1]]),
        "position": list(pos) + [None] * n_org,
        "score": list(base_s.ravel()) + [None] * n_org,
        "propensity": list(mu_s.ravel()) + [None] * n_org,
        "clicked": list(c) + [True] * n_org,
        "reward": list(c.astype(float)) + [1.0] * n_org,
        "impression_ts": [ts[t] for t in rows_t] + [None] * n_org,
        "event_id": [f"{rid[t]}-{p}" if cl else None for t, p, cl in zip(rows_t, pos, c)]
        + [f"org{t}" for t in organic],
        "event_type": ["click" if cl else None for cl in c] + ["click"] * n_org,
        "event_ts": [e if cl else None for e, cl in zip(event_ts, c)] + [ts[t] for t in organic],
        "organic": [False] * (T * k) + [True] * n_org,
        "batch_date": [day] * (T * k + n_org)}), mode="overwrite")
    return rid


# -- the tables -> logged slates -------------------------------------------------------------------
def _empty_error(store, why: str) -> NoLoggedData:
    return NoLoggedData(f"table feedback ({store.path('feedback')}) {why}: nothing to train on; "
                        f"{FILLED_BY}")


def load_logged(store, history: int = 50) -> LoggedSlates:
    """The served requests in ``feedback`` (organic rows skipped) with their candidates from
    ``impressions`` and features from ``events``, ``items`` and ``item_features``."""
    import pandas as pd

    fb = store.read_arrow("feedback", columns=["request_id", "user_id", "item_id", "position",
                                               "propensity", "reward", "organic"]).to_pandas()
    fb = fb[~fb["organic"] & fb["request_id"].notna()]
    if fb.empty:
        raise _empty_error(store, "has no served-item rows (only organic ones, or none)")
    ok = fb["propensity"].notna() & (fb["propensity"] > 0) & (fb["propensity"] <= 1)
    if not ok.any():
        raise _empty_error(store, f"has {len(fb)} served-item rows but no propensities in (0, 1] "
                                  "(the logging policy's chance of showing each item)")
    bad_requests = set(fb.loc[~ok, "request_id"])
    if bad_requests:
        log.warning("feedback: %d requests have an item without a usable propensity; skipped",
                    len(bad_requests))
        fb = fb[~fb["request_id"].isin(bad_requests)]
    imp = store.read_arrow("impressions", columns=["request_id", "user_id", "ts", "candidates",
                                                   "candidate_scores"]).to_pandas()
    imp = imp[imp["request_id"].isin(set(fb["request_id"]))]
    has = imp["candidates"].map(lambda c: c is not None and len(c) > 0) & \
        imp["candidate_scores"].map(lambda c: c is not None and len(c) > 0)
    if not has.any():
        raise NoLoggedData(f"table impressions ({store.path('impressions')}) holds no candidate "
                           f"sets (candidates, candidate_scores) for the {fb['request_id'].nunique()}"
                           " requests in feedback: off-policy learning needs the candidates each "
                           "slate was chosen from; serve with a re-ranker (serving.reranker) so "
                           "they are logged")
    imp = imp[has].drop_duplicates("request_id").sort_values("ts", kind="stable").reset_index(drop=True)
    fb = fb[fb["request_id"].isin(set(imp["request_id"]))]
    T = len(imp)
    N = int(imp["candidates"].map(len).max())
    k = int(fb.groupby("request_id").size().max())
    row_of = pd.Series(np.arange(T), index=imp["request_id"])
    cand = np.full((T, N), None, object)
    scores = np.zeros((T, N))
    mask = np.zeros((T, N), bool)
    for t, (c, s) in enumerate(zip(imp["candidates"], imp["candidate_scores"])):
        cand[t, :len(c)] = c
        scores[t, :len(s)] = s
        mask[t, :len(c)] = True
    # shown items -> positions in the candidate list
    fb = fb.sort_values(["request_id", "position"], kind="stable")
    t_of = row_of.loc[fb["request_id"]].to_numpy()
    slot = fb.groupby("request_id").cumcount().to_numpy()
    slates = np.zeros((T, k), np.int64)
    shown = np.zeros((T, k), bool)
    rewards = np.zeros((T, k))
    mu = np.ones((T, k))
    lookup = [{item: j for j, item in enumerate(cand[t, :mask[t].sum()])} for t in range(T)]
    pos = np.array([lookup[t].get(i, -1) for t, i in zip(t_of, fb["item_id"])])
    keep = pos >= 0
    if (~keep).any():
        log.warning("feedback: %d shown items are not among their request's candidates; skipped",
                    int((~keep).sum()))
    slates[t_of[keep], slot[keep]] = pos[keep]
    shown[t_of[keep], slot[keep]] = True
    rewards[t_of[keep], slot[keep]] = fb["reward"].to_numpy()[keep]
    mu[t_of[keep], slot[keep]] = fb["propensity"].to_numpy()[keep]
    # popularity from gold item_features
    feats = store.read_arrow("item_features", columns=["item_id", "popularity"]).to_pandas()
    feats = feats[feats["popularity"] > 0]
    lp = np.log(feats["popularity"].to_numpy()) if len(feats) else np.zeros(1)
    pz = pd.Series((lp - lp.mean()) / (lp.std() or 1.0), index=feats["item_id"]) if len(feats) \
        else pd.Series(dtype=float)
    low = float(pz.min()) if len(pz) else 0.0
    flat = cand[mask]
    pop_z = np.zeros((T, N))
    pop_z[mask] = pz.reindex(flat).fillna(low).to_numpy()
    affinity = _affinity(store, imp, cand, mask, history)
    x = logged_features(affinity, pop_z, scores, mask)
    users = imp["user_id"].to_numpy(object)
    ts = _micros(imp["ts"]).astype("datetime64[us]")
    return LoggedSlates(imp["request_id"].to_numpy(object), users, ts, x, mask, slates, shown,
                        rewards, mu)


def _affinity(store, imp, cand: np.ndarray, mask: np.ndarray, history: int) -> np.ndarray:
    """(T, N): the share of the user's last ``history`` events before the request whose item
    shares a category with the candidate (max over the candidate's categories)."""
    ev = store.read_arrow("events", columns=["user_id", "item_id", "ts"]).to_pandas()
    ev = ev[ev["user_id"].isin(set(imp["user_id"]))].sort_values(["user_id", "ts"], kind="stable")
    items = store.read_arrow("items", columns=["item_id", "categories"]).to_pandas()
    cats = {i: tuple(c) if c is not None else () for i, c in zip(items["item_id"], items["categories"])}
    ev["t"] = _micros(ev["ts"])
    by_user = {u: (g["t"].to_numpy(), g["item_id"].to_numpy()) for u, g in ev.groupby("user_id")}
    out = np.zeros(cand.shape)
    for t, (u, when) in enumerate(zip(imp["user_id"], _micros(imp["ts"]))):
        if u not in by_user:
            continue
        ts, its = by_user[u]
        end = np.searchsorted(ts, when, "left")
        recent = its[max(0, end - history):end]
        if not len(recent):
            continue
        share: dict[str, float] = {}
        for i in recent:
            for c in cats.get(i, ()):
                share[c] = share.get(c, 0.0) + 1.0
        n = float(len(recent))
        for j in range(int(mask[t].sum())):
            out[t, j] = max((share.get(c, 0.0) for c in cats.get(cand[t, j], ())), default=0.0) / n
    return out


def _micros(col) -> np.ndarray:
    import pandas as pd

    return pd.to_datetime(col, utc=True).dt.tz_localize(None).to_numpy().astype(
        "datetime64[us]").astype(np.int64)


def from_simulator(sim, logged) -> LoggedSlates:
    """The in-memory equivalent of writing ``logged`` through the tables and :func:`load_logged`."""
    b = logged.batch
    T, N = b.cands.shape
    x = logged_features(b.aff, sim.pop_z[b.cands], b.base)
    k = logged.slates.shape[1]
    return LoggedSlates(np.char.add("r", np.arange(T).astype(str)).astype(object),
                        np.char.add("u", b.users.astype(str)).astype(object),
                        np.datetime64("2026-01-01T00:00:00", "us") + np.arange(T).astype("timedelta64[s]"),
                        x, np.ones((T, N), bool), logged.slates.copy(), np.ones((T, k), bool),
                        logged.rewards.copy(), np.take_along_axis(logged.mu, logged.slates, axis=1))


# -- policies and their evaluation ------------------------------------------------------------------
def top_k_marginals(scores: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Inclusion marginals (T, N) of the deterministic top-k of ``scores`` over real candidates."""
    s = np.where(mask, scores, -np.inf)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    m = np.zeros(s.shape)
    np.put_along_axis(m, top, 1.0, axis=1)
    return m * mask


def fit_reward_model(data: LoggedSlates):
    from sklearn.linear_model import LogisticRegression

    x = data.x[np.arange(len(data))[:, None], data.slates][data.shown]
    y = data.rewards[data.shown] > 0
    if y.all() or not y.any():
        raise NoLoggedData(f"the {int(data.shown.sum())} logged items are all "
                           f"{'clicked' if y.all() else 'unclicked'}: no reward model can be fitted")
    return LogisticRegression(C=1.0, max_iter=500).fit(x[:, 1:], y)


def ope(data: LoggedSlates, pi: np.ndarray, reward_model, clip: float = 100.0) -> dict[str, float]:
    """IPS, SNIPS and DR (clicks per slate) of a policy with inclusion marginals ``pi`` (T, N),
    from the logged items' propensities (item-level estimators: rewards add up over the slate)."""
    rows = np.arange(len(data))[:, None]
    pi_s = pi[rows, data.slates]
    w = np.where(data.shown, np.minimum(pi_s / data.mu, clip), 0.0)
    ips = float((w * data.rewards).sum(1).mean())
    k_mean = float(data.shown.sum(1).mean())
    norm = float(w.sum(1).mean() / k_mean)
    snips = ips / norm if norm > 0 else float("nan")
    T, N, d = data.x.shape
    r_hat = reward_model.predict_proba(data.x.reshape(-1, d)[:, 1:])[:, 1].reshape(T, N) * data.mask
    r_hat_s = r_hat[rows, data.slates]
    dr = float(((pi * r_hat).sum(1) + (w * (data.rewards - r_hat_s)).sum(1)).mean())
    return {"ips": ips, "snips": snips, "dr": dr}


def logging_value(data: LoggedSlates) -> float:
    """The logging policy's own value on these requests: mean clicks per slate."""
    return float((data.rewards * data.shown).sum(1).mean())


@dataclass
class Learned:
    name: str
    scores: object  # (..., d) features -> (...) scores; the policy serves their top-k
    arrays: dict
    kind: str  # model.json kind: "reranker" (a LinearPolicy serving loads) or "slate_q"
    curve: list


def train_bandit(data: LoggedSlates, kind: str = "linucb", seed: int = 0, **_) -> Learned:
    """The bandit's state (A, b) from every logged shown item and its reward, as if it had
    observed them online; it serves the top-k of its mean estimate and keeps learning online."""
    b = LinearPolicy(kind=kind, seed=seed)
    x = data.x[np.arange(len(data))[:, None], data.slates][data.shown]
    b.update(x, data.rewards[data.shown])
    theta = b.theta
    return Learned(kind, lambda f: f @ theta, b.to_arrays(), "reranker", [])


def train_reinforce(data: LoggedSlates, steps: int = 400, lr: float = 0.05, clip: float = 20.0,
                    entropy: float = 1e-3, seed: int = 0, device: str = "cpu", **_) -> Learned:
    """Offline top-k REINFORCE with the top-K off-policy correction (Chen et al. 2019) on the
    logged propensities: maximize the mean over requests of sum over shown items of
    ``min(alpha(i) / mu(i), clip) * r`` with ``alpha = 1 - (1 - pi_theta(i))^k`` and ``pi_theta`` a
    softmax over the request's candidates."""
    import torch

    from training.trainer import NanLoss

    torch.manual_seed(seed)
    dev = torch.device(device)
    x = torch.as_tensor(data.x, dtype=torch.float32, device=dev)
    mask = torch.as_tensor(data.mask, device=dev)
    slates = torch.as_tensor(data.slates, device=dev)
    shown = torch.as_tensor(data.shown, dtype=torch.float32, device=dev)
    r = torch.as_tensor(data.rewards, dtype=torch.float32, device=dev) * shown
    mu = torch.as_tensor(data.mu, dtype=torch.float32, device=dev)
    k = shown.sum(1, keepdim=True)
    theta = torch.zeros(x.shape[-1], requires_grad=True, device=dev)
    opt = torch.optim.Adam([theta], lr=lr)
    curve = []
    for step in range(steps):
        logits = (x @ theta).masked_fill(~mask, float("-inf"))
        logp = torch.log_softmax(logits, dim=1)
        p = logp.exp()
        alpha = 1 - (1 - torch.gather(p, 1, slates)) ** k
        w = torch.clamp(alpha / mu, max=clip)
        ent = -(p * torch.where(mask, logp, torch.zeros_like(logp))).sum(1).mean()
        objective = (w * r).sum(1).mean() + entropy * ent
        if not torch.isfinite(objective):
            raise NanLoss(f"reinforce: objective is {objective.item()} at step {step}; lower lr")
        opt.zero_grad()
        (-objective).backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            curve.append({"step": step, "ips_objective": float(objective.detach())})
    th = theta.detach().cpu().numpy().astype(np.float64)
    return Learned("reinforce", lambda f: f @ th, {"theta": th}, "reranker", curve)


def train_dqn(data: LoggedSlates, gamma: float = 0.5, seed: int = 0, device: str = "cpu",
              kind: str | None = None, **kw) -> Learned:
    """The slate Q-network (:mod:`recmodels.slateq`) by fitted Q iteration on the logged
    transitions (each request -> the same user's next request)."""
    curve: list = []
    q = fit_slateq(data.transitions(), gamma=gamma, seed=seed, device=device,
                   on_iteration=lambda it, loss: curve.append({"step": it, "td_loss": loss}), **kw)
    return Learned("dqn", q.scores, q.to_arrays(), "slate_q", curve)


TRAINERS = {"bandit": train_bandit, "reinforce": train_reinforce, "dqn": train_dqn}


def evaluate_on_logs(learned: Learned, train: LoggedSlates, test: LoggedSlates) -> dict:
    """OPE of the learned policy on held-out logs, next to the logging policy's on-policy value
    there (and the estimators applied to the logging policy itself: IPS of mu is exact)."""
    rm = fit_reward_model(train)
    k = test.k()
    pi = top_k_marginals(learned.scores(test.x), test.mask, k)
    est = ope(test, pi, rm)
    return {"ope": est, "logging_value": logging_value(test),
            "n_train": len(train), "n_test": len(test), "k": k}


def true_value_in_simulator(sim, scores, requests) -> float:
    """Expected clicks per slate of serving the top-k of ``scores`` on simulator ``requests``,
    with features built as from the tables."""
    x = logged_features(requests.aff, sim.pop_z[requests.cands], requests.base)
    m = top_k_marginals(scores(x), np.ones(requests.cands.shape, bool), sim.k)
    return float((m * requests.p_click).sum(1).mean())
