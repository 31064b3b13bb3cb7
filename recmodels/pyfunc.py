"""The MLflow face of a servable model: a ``mlflow.pyfunc`` flavor over the exported artifact.

``log(mlflow, artifact_dir, users)`` logs the artifact (``artifacts/model``) and the users'
histories it was fitted on (``artifacts/users.npz``: what a history model scores over) with a
signature and an input example, so that in a fresh interpreter

    mlflow.pyfunc.load_model("models:/freshrec-retrieval@champion").predict(
        pd.DataFrame({"user_id": ["u1", "u2"]}), params={"k": 10})

returns the top-k items per user (columns ``user_id, rank, item_id, score``; user ids are the
pseudonyms the tables hold). Users the model does not know get its ranking for an empty history.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:  # the class must exist for MLflow to unpickle it; mlflow is only needed to log or load
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - serving without mlflow never touches this module
    PythonModel = object

ARTIFACT_KEY = "model"
USERS_KEY = "users"


def save_users_from(path: Path, data, max_recent: int = 50) -> Path:
    """:func:`save_users_from` for the users of an ``Interactions`` (its matrix rows and event order),
    plus the items' popularity (the ranking for users the model does not know)."""
    m = data.matrix.tocsr()
    ev = data.events.sort_values(["user_row", "ts"], kind="stable")
    ev = ev.groupby("user_row", sort=True).tail(max_recent)
    counts = np.bincount(ev["user_row"].to_numpy(), minlength=m.shape[0])
    np.savez(path, user_ids=np.asarray(data.user_ids).astype(str), indptr=m.indptr.astype(np.int64),
             items=m.indices.astype(np.int64), weights=m.data.astype(np.float32),
             recent_indptr=np.r_[0, np.cumsum(counts)].astype(np.int64),
             recent=ev["item_row"].to_numpy(np.int64),
             popularity=np.asarray(m.sum(axis=0)).ravel().astype(np.float32))
    return path


class UserHistories:
    """Read side of :func:`save_users_from`."""

    def __init__(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            self.user_ids = z["user_ids"]
            self.indptr, self.items, self.weights = z["indptr"], z["items"], z["weights"]
            self.recent_indptr, self.recent = z["recent_indptr"], z["recent"]
            self.popularity = z["popularity"] if "popularity" in z.files else None
        self.row = {u: n for n, u in enumerate(self.user_ids.tolist())}

    def user_input(self, user_id: str):
        from recmodels.servable import UserInput

        r = self.row.get(user_id)
        if r is None:
            return UserInput(user_id)
        lo, hi = self.indptr[r], self.indptr[r + 1]
        rlo, rhi = self.recent_indptr[r], self.recent_indptr[r + 1]
        return UserInput(user_id, self.items[lo:hi], self.weights[lo:hi], self.recent[rlo:rhi])


class FreshrecPyfunc(PythonModel):
    """Top-k per user id from a freshrec artifact; see the module doc."""

    def load_context(self, context) -> None:
        from recmodels.servable import load

        self.model = load(Path(context.artifacts[ARTIFACT_KEY]))
        self.users = UserHistories(Path(context.artifacts[USERS_KEY]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        k = int((params or {}).get("k", 10))
        if isinstance(model_input, pd.DataFrame):
            ids = model_input["user_id"].astype(str).tolist()
        else:
            ids = [str(u) for u in model_input]
        rows = []
        for start in range(0, len(ids), 256):
            chunk = ids[start:start + 256]
            inputs = [self.users.user_input(u) for u in chunk]
            top, scores = self.model.recommend(inputs, k)
            pop = self.users.popularity
            for n, u in enumerate(inputs):  # unknown users: the most popular items
                if not len(u.items) and pop is not None and len(pop) == self.model.n_items:
                    top[n] = np.argsort(-pop, kind="stable")[:top.shape[1]]
                    scores[n] = pop[top[n]]
            for u, t, s in zip(chunk, top, scores):
                for rank, (i, v) in enumerate(zip(t, s), start=1):
                    if i >= 0:
                        rows.append((u, rank, str(self.model.item_ids[i]), float(v)))
        return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score"])


def log(mlflow, artifact_dir: Path, users_file: Path, example_users: list[str],
        name: str = "model"):
    """Log the pyfunc model in the active run; returns MLflow's ModelInfo (``model_uri``)."""
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"user_id": [str(u) for u in example_users[:3]] or ["u1"]})
    model = FreshrecPyfunc()
    model.model = __import__("recmodels.servable", fromlist=["load"]).load(artifact_dir)
    model.users = UserHistories(users_file)
    output = model.predict(None, example, {"k": 3})
    signature = infer_signature(example, output, params={"k": 10})
    reqs = ["numpy", "scipy", "pandas", "scikit-learn"]
    if any(Path(artifact_dir).rglob("*.pt")):  # a TorchScript encoder: the pinned torch
        import torch

        reqs.append(f"torch=={torch.__version__.split('+')[0]}")
    return mlflow.pyfunc.log_model(
        name=name, python_model=FreshrecPyfunc(),
        artifacts={ARTIFACT_KEY: str(artifact_dir), USERS_KEY: str(users_file)},
        signature=signature, input_example=example,
        pip_requirements=reqs)
