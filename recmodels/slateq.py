"""A slate Q-network: SlateQ's per-item decomposition learned by fitted Q iteration.

SlateQ (Ie et al. 2019) writes the value of a slate ``A`` in state ``s`` as
``Q(s, A) = sum_{i in A} P(i | s, A) Qbar(s, i)``. Under the additive (independent-click) choice
model, where a shown item is clicked with a chance that does not depend on the rest of the slate,
the click probability folds into the item term, so ``Q(s, A) = sum_{i in A} q(s, i)`` and the best
slate is the top-k of ``q``. ``q(s, i)`` is one small MLP over the candidate's features (which
describe the pair: the user's taste for the item's category, its popularity, its retrieval score).

Training is fitted Q iteration over logged transitions: each shown item ``i`` of a request in state
``s`` with reward ``r_i``, followed by the same user's next request ``s'`` (or nothing: terminal).
The target spreads the next slate's value over the ``k`` shown items so that the slate sums obey
the Bellman equation ``Q(s, A) = R(s, A) + gamma max_A' Q(s', A')``:
``y_i = r_i + gamma / k * sum_{j in top-k q_target(s', .)} q_target(s', j)``.
Q-learning needs no propensities: ``q`` is fitted on the items that were shown, and the greedy
next slate is computed, not taken from the logs.

Weights export as numpy arrays; :meth:`SlateQ.scores` runs the MLP in numpy (no torch needed to
serve). Torch is imported only to fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Transitions:
    """Logged data for fitted Q iteration (padded; masks mark real entries).

    ``x`` (T, N, d) candidate features per request, ``mask`` (T, N) real candidates, ``slates``
    (T, k) positions of the shown items in the candidates, ``shown`` (T, k) real slate entries,
    ``rewards`` (T, k), ``next_row`` (T,) the row of the same user's next request or -1.
    """

    x: np.ndarray
    mask: np.ndarray
    slates: np.ndarray
    shown: np.ndarray
    rewards: np.ndarray
    next_row: np.ndarray


@dataclass
class SlateQ:
    weights: list[np.ndarray] = field(default_factory=list)  # W1, b1, W2, b2, W3, b3
    mean: np.ndarray | None = None  # feature standardization
    std: np.ndarray | None = None
    gamma: float = 0.0
    k: int = 5

    def scores(self, x: np.ndarray) -> np.ndarray:
        """q(s, i) for features (..., d) -> (...)."""
        h = (np.asarray(x, np.float64) - self.mean) / self.std
        w = self.weights
        for j in range(0, len(w) - 2, 2):
            h = np.maximum(h @ w[j] + w[j + 1], 0.0)
        return h @ w[-2][:, 0] + w[-1][0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"w{j}": a for j, a in enumerate(self.weights)}
        return {**out, "mean": self.mean, "std": self.std, "gamma": np.array(self.gamma),
                "k": np.array(self.k)}

    @classmethod
    def from_arrays(cls, arrays) -> "SlateQ":
        n = sum(1 for key in arrays if key.startswith("w") and key[1:].isdigit())
        return cls([np.asarray(arrays[f"w{j}"], np.float64) for j in range(n)],
                   np.asarray(arrays["mean"]), np.asarray(arrays["std"]), float(arrays["gamma"]),
                   int(arrays["k"]))


def fit_slateq(data: Transitions, gamma: float = 0.5, iterations: int = 4, epochs: int = 6,
               hidden: int = 32, lr: float = 3e-3, batch_size: int = 2048, l2: float = 1e-4,
               device: str = "cpu", seed: int = 0, on_iteration=None) -> SlateQ:
    """Fitted Q iteration: ``iterations`` rounds, each regressing ``q`` on targets computed with
    the previous round's network (the target network), ``epochs`` passes of Adam per round."""
    import torch

    torch.manual_seed(seed)
    T, N, d = data.x.shape
    k = data.slates.shape[1]
    real = data.x[data.mask]
    mean = real.mean(0)
    std = real.std(0)
    std[std < 1e-8] = 1.0
    mean[std == 1.0] = 0.0  # constant features (the bias) pass through as they are
    dev = torch.device(device)
    xs = torch.as_tensor((data.x - mean) / std, dtype=torch.float32, device=dev)
    mask = torch.as_tensor(data.mask, device=dev)
    rows, cols = np.nonzero(data.shown)
    pos = data.slates[rows, cols]
    item_x = xs[torch.as_tensor(rows, device=dev), torch.as_tensor(pos, device=dev)]
    r = torch.as_tensor(data.rewards[rows, cols], dtype=torch.float32, device=dev)
    nxt = torch.as_tensor(data.next_row[rows], device=dev)
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 1)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=l2)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(r)
    for it in range(iterations):
        with torch.no_grad():
            if gamma > 0 and it > 0:
                q_all = net(xs).squeeze(-1).masked_fill(~mask, float("-inf"))
                top = torch.topk(q_all, min(k, N), dim=1).values
                v = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).sum(1)  # (T,)
                v_next = torch.where(nxt >= 0, v[nxt.clamp(min=0)], torch.zeros_like(r))
                y = r + gamma / k * v_next
            else:
                y = r
        loss_sum = 0.0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                loss = torch.nn.functional.mse_loss(net(item_x[idx]).squeeze(-1), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
        if on_iteration:
            on_iteration(it, loss_sum / (epochs * n))
    weights = []
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            weights += [layer.weight.detach().cpu().numpy().T.astype(np.float64),
                        layer.bias.detach().cpu().numpy().astype(np.float64)]
    return SlateQ(weights, mean, std, gamma, k)
