"""Erasure with a shared MLflow (a tracking server on loopback, PostgreSQL store, proxied
artifacts): the user leaves every artifact the server hands out, run artifacts and logged models
alike. Skipped without PostgreSQL, its Python driver, or root (as tests/test_mlflow_server.py)."""

from __future__ import annotations

import io
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from tests.test_mlflow_server import free_port, pytestmark as server_marks
from tests.conftest import DAY, small_settings

pytestmark = server_marks

GONE = "user-0007"


def _events() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = [(f"user-{u:04d}", f"item-{(u % 3) + 3 * int(rng.integers(0, 8)):03d}",
             t0 + timedelta(hours=int(rng.integers(0, 600)))) for u in range(40) for _ in range(12)]
    return pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "ts": [r[2] for r in rows], "weight": 1.0})


def _holding(root: Path, needle: str) -> list[str]:
    """Files under ``root`` that hold ``needle``: raw bytes, or a string array of an .npz."""
    out = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                if any(z[k].dtype.kind == "U" and (z[k] == needle).any() for k in z.files):
                    out.append(str(f))
        elif needle.encode() in data:
            out.append(str(f))
    return out


def _download_everything(tmp: Path) -> Path:
    """Every run's and logged model's artifacts, as the server hands them out."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    from freshrec.privacy.erasure import _remote_artifact_roots

    tmp.mkdir()
    for kind, ident, uri in _remote_artifact_roots(MlflowClient()):
        repo = get_artifact_repository(uri)
        if repo.list_artifacts(""):
            (tmp / f"{kind}-{ident}").mkdir()
            repo.download_artifacts("", dst_path=str(tmp / f"{kind}-{ident}"))
    return tmp


def test_erasure_rewrites_the_servers_artifacts_through_the_api(tmp_path, monkeypatch):
    from freshrec.ops.airflow_stack import Stack, drop_database, mlflow_down, mlflow_up
    from freshrec.privacy.erasure import erase_user
    from freshrec.interval import DataInterval
    from freshrec.tracking import mlflow_for
    from recmodels.experiment import Protocol
    from spark_jobs.evaluate import ContractScorer, log_model_run

    stack = Stack(home=tmp_path / "stack")
    db = f"mlflow_erasure_{os.getpid()}"
    served = tmp_path / "served-artifacts"
    try:
        url = mlflow_up(stack, port=free_port(), artifacts=served, database=db)
        settings = small_settings(tmp_path / "data", mlflow={"tracking_uri": url})
        monkeypatch.chdir(tmp_path)
        mlflow = mlflow_for(settings)
        protocol = Protocol(_events(), None, [10], 0.2, 0.1)
        model = ContractScorer("item_knn", settings, protocol)
        interval = DataInterval.for_day(DAY)
        with mlflow.start_run(run_name="evaluate") as parent:
            mlflow.log_text(f"users: {GONE}, user-0008\n", "notes/users.txt")
            _, uri, why = log_model_run(mlflow, "item_knn", model, {"ndcg_at_10": 0.5},
                                        {"events": 1}, interval)
        assert uri and why is None
        before = _holding(_download_everything(tmp_path / "before"), GONE)
        # the user is in the run's text artifact, the model's users.npz and its input example
        assert any("notes/users.txt" in f for f in before), before
        assert any(f.endswith("users.npz") for f in before), before
        assert _holding(served, GONE)

        report = erase_user(settings, GONE)

        assert report["mlflow_files"] >= 2 and report["mlflow_tagged"] >= 2
        assert report["unscrubbed"] == []
        after = _download_everything(tmp_path / "after")
        assert _holding(after, GONE) == []
        assert _holding(served, GONE) == []  # the server's own copy too
        # the other users are still there, and the model still loads and ranks for them
        assert _holding(after, "user-0008")
        from mlflow.tracking import MlflowClient

        run = MlflowClient().get_run(parent.info.run_id)
        assert "erasure" in run.data.tags["freshrec.privacy.erasure"]
        import mlflow.pyfunc

        loaded = mlflow.pyfunc.load_model(uri)
        recs = loaded.predict(pd.DataFrame({"user_id": ["user-0008"]}))
        assert (recs["user_id"] == "user-0008").sum() == 10
    finally:
        mlflow_down(stack)
        drop_database(stack, db)
