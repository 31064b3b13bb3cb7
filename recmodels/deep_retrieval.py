"""Deep retrieval under the contract: the two-tower model and SASRec (:mod:`recmodels.deep`) as
:class:`Recommender` s, fitted by the one training loop (:mod:`recmodels.deep_fit`).

``fit(Interactions)`` orders each user's events by time (``Interactions.events``; ties keep the
events' order), reads the items' categories, titles and text (``Interactions.items``, where present)
for the two-tower item tower, and trains on the CPU by default (``device``: ``auto``, ``cpu`` or
``cuda``). The user vector of a training user is the exported TorchScript encoder over their
``max_len`` most recent training items, so ``score`` equals what the servable artifact computes
for that user (``export`` writes ``model.json``, ``arrays.npz`` with the item vectors and
``user_encoder.pt``; the two-tower also ``item_encoder.pt`` for items met after training).

With ``val_users`` > 0, that many users with 3+ events validate on their last item and training
stops early on validation NDCG@10 (``patience`` epochs); with 0 (the default) every epoch runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recmodels.base import Interactions, Recommender


class DeepRetrievalModel(Recommender):
    """The shared part of :class:`TwoTowerModel` and :class:`SASRecModel`."""

    name = "deep"

    def __init__(self, epochs: int = 20, dim: int = 32, max_len: int = 20, batch_size: int = 256,
                 lr: float = 3e-3, weight_decay: float = 0.0, samples_per_epoch: int = 100_000,
                 val_users: int = 0, patience: int = 3, seed: int = 1234, device: str = "cpu",
                 **model_params) -> None:
        from freshrec.settings import TrainingSettings

        super().__init__()
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        if val_users < 0:
            raise ValueError(f"val_users must be >= 0, got {val_users}")
        self.device, self.val_users = device, val_users
        self._params = {"epochs": epochs, "dim": dim, "max_len": max_len, "batch_size": batch_size,
                        "lr": lr, "weight_decay": weight_decay,
                        "samples_per_epoch": samples_per_epoch, "patience": patience, "seed": seed,
                        **model_params}
        try:
            self.cfg = TrainingSettings(**self._settings(self._params))
        except ValueError as e:
            raise ValueError(f"{self.name}: bad parameters: {e}") from None
        self.max_len = max_len
        self.result = None

    @staticmethod
    def _settings(params: dict) -> dict:
        return params

    def _sequences(self, data: Interactions):
        from recmodels.sequences import sequence_data

        ev = data.events
        if ev is None or ev.empty:
            raise ValueError(f"{self.name} needs the events in time order (Interactions.events)")
        users = ev["user_row"].to_numpy(np.int64)
        ts = pd.to_datetime(ev["ts"], utc=True).dt.tz_localize(None).to_numpy()
        order = np.lexsort((np.arange(len(ev)), ts, users))  # per user by time, ties in event order
        return sequence_data(self.name, users[order], ev["item_row"].to_numpy(np.int64)[order],
                             data.n_users, data.item_ids, data.items, self.val_users,
                             self._params["seed"])

    def fit(self, data: Interactions) -> "DeepRetrievalModel":
        import torch

        from freshrec.device import resolve_device
        from recmodels import deep_fit
        from recmodels.sequences import pad_histories

        seq = self._sequences(data)
        device = resolve_device(self.device, need=("torch",)).torch_device
        result = deep_fit.fit(self.name, seq, self.cfg, device, progress=False)
        self.seq, self.result, self.module = seq, result, result.module
        self.items = np.ascontiguousarray(result.item_vectors, np.float32)
        # the user side is the exported encoder itself: score == the servable's user vector
        self.encoder = deep_fit.trace_user_encoder(self.name, self.module, self.max_len, seq.n_items)
        out = []
        with torch.no_grad():
            for s in range(0, data.n_users, 4096):
                h = pad_histories(seq.sequences, np.arange(s, min(s + 4096, data.n_users)), None,
                                  self.max_len)
                out.append(self.encoder(torch.as_tensor(h)).float().numpy())
        self.users = np.concatenate(out) if out else np.zeros((0, self.items.shape[1]), np.float32)
        self.data = data
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        self._fitted()
        return self.users[np.asarray(user_rows)] @ self.items.T

    def item_vectors(self) -> np.ndarray:
        self._fitted()
        return self.items

    def servable(self):
        from recmodels.deep_fit import encoder_scorer

        self._fitted()
        return "embedding", encoder_scorer(self.name, self.max_len), {"item_vectors": self.items}

    def export(self, directory: Path) -> Path:
        from recmodels.deep_fit import save_encoders

        out = super().export(directory)
        save_encoders(out, self.name, self.module, self.max_len, self.seq.cat_ids,
                      self.seq.tok_ids, scripted=self.encoder)
        return out

    def params(self) -> dict:
        out = {**self._params, "val_users": self.val_users, "device": self.device}
        if self.result is not None:
            out.update(device_used=self.result.device, epochs_run=self.result.epochs_run,
                       best_epoch=self.result.best_epoch)
        return out


class TwoTowerModel(DeepRetrievalModel):
    """Two towers (:class:`recmodels.deep.TwoTower`): a user tower over the recent items and an item
    tower over id, categories and title/text tokens, in-batch softmax with logQ correction."""

    name = "two_tower"

    def __init__(self, temperature: float = 0.05, **params) -> None:
        super().__init__(temperature=temperature, **params)


class SASRecModel(DeepRetrievalModel):
    """SASRec (:class:`recmodels.deep.SASRec`): causal self-attention over the recent items."""

    name = "sasrec"

    def __init__(self, blocks: int = 2, heads: int = 2, dropout: float = 0.2,
                 negatives: int = 128, **params) -> None:
        super().__init__(blocks=blocks, heads=heads, dropout=dropout, negatives=negatives, **params)

    @staticmethod
    def _settings(params: dict) -> dict:
        p = dict(params)
        p["sasrec_blocks"], p["sasrec_heads"] = p.pop("blocks"), p.pop("heads")
        return p
