"""The training lane's use of the one deep training loop (:mod:`recmodels.deep_fit`): the loop on a
:class:`training.data.TrainData`, test metrics with the batch lane's harness, and the export of the
servable artifact (:mod:`recmodels.servable`, format ``freshrec-model/1``, scorer ``encoder``) that
``freshrec train`` logs to MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from freshrec.settings import TrainingSettings
from recmodels import servable
from recmodels.deep_fit import (DEEP_MODELS, Batcher, Encoders, NanLoss,  # noqa: F401
                                TrainResult, build_model, encoder_scorer, fit, save_encoders,
                                seed_everything, validation_ndcg)
from training.data import TrainData


def train(kind: str, data: TrainData, cfg: TrainingSettings, device: str,
          on_epoch=None, progress: bool = True, max_test_users: int = 0) -> TrainResult:
    """Fit ``kind`` on ``data`` (:func:`recmodels.deep_fit.fit`: early stopping on the validation
    users, ``on_epoch(epoch, metrics)`` after every epoch) and measure it on the test period.
    Raises :class:`NanLoss` when the loss stops being finite."""
    result = fit(kind, data, cfg, device, on_epoch=on_epoch, progress=progress)
    users, items = result.user_vectors, result.item_vectors
    result.test = data.evaluate(lambda rows: users[rows] @ items.T, max_users=max_test_users)
    return result


def export(result: TrainResult, data: TrainData, out: Path, max_len: int) -> Path:
    """The servable artifact (what :func:`recmodels.servable.load` reads): ``model.json``,
    ``arrays.npz`` (item ids and vectors), the TorchScript user encoder (CPU) and, for the
    two-tower, the item encoder; ``model.json`` also describes the encoders' inputs."""
    out = Path(out)
    servable.write(out, result.model, "embedding", result.params,
                   encoder_scorer(result.model, max_len),
                   {"item_ids": data.split.item_ids.astype(str),
                    "item_vectors": np.asarray(result.item_vectors, np.float32)})
    save_encoders(out, result.model, result.module, max_len, data.cat_ids, data.tok_ids)
    meta = json.loads((out / servable.MODEL_FILE).read_text())
    meta.update({
        "max_len": max_len,
        "input": "user_encoder.pt: int64 (batch, max_len) of 1-based indices into item_ids, "
                 "right-aligned, 0 = padding -> float32 (batch, dim); score = user . item_vectors",
        "best_epoch": result.best_epoch, "val_ndcg_at_10": result.best_val_ndcg})
    if result.model == "two_tower":
        meta["item_encoder"] = ("item_encoder.pt: (ids int64 (n,), categories int64 (n, "
                                f"{data.cat_ids.shape[1]}), hashed tokens int64 (n, "
                                f"{data.tok_ids.shape[1]})) -> float32 (n, dim); id 0 for items "
                                "unseen in training")
    (out / servable.MODEL_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
