"""A shared MLflow: a tracking server on loopback with its store in PostgreSQL (a database of the
test's own, dropped at the end) and proxied artifacts. freshrec's MLflow set-up pins no ``file://``
artifact location then: runs, artifacts and the registry go through the server. Skipped without
PostgreSQL, its Python driver, or root."""

from __future__ import annotations

import os
import shutil
import socket
from importlib.util import find_spec

import pytest

from freshrec.settings import load_settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("pg_lsclusters") is None,
                       reason="PostgreSQL is not installed (apt-get install -y postgresql)"),
    pytest.mark.skipif(find_spec("psycopg2") is None,
                       reason="psycopg2 is missing (pip install -e '.[airflow]')"),
    pytest.mark.skipif(os.geteuid() != 0, reason="creating the role and database needs root"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runs_artifacts_and_aliases_go_through_the_server(tmp_path, monkeypatch):
    from freshrec.ops.airflow_stack import Stack, drop_database, mlflow_down, mlflow_up
    from freshrec.tracking import mlflow_for

    stack = Stack(home=tmp_path / "stack")
    db = f"mlflow_test_{os.getpid()}"
    artifacts = tmp_path / "served-artifacts"
    try:
        url = mlflow_up(stack, port=free_port(), artifacts=artifacts, database=db)
        settings = load_settings("local", env={}, paths={"data_dir": str(tmp_path / "data")},
                                 mlflow={"tracking_uri": url})
        monkeypatch.chdir(tmp_path)  # nothing may depend on the client's working directory
        mlflow = mlflow_for(settings, "freshrec-server-test")
        exp = mlflow.get_experiment_by_name("freshrec-server-test")
        assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
        with mlflow.start_run() as run:
            mlflow.log_param("rank", 8)
            mlflow.log_metric("ndcg_at_10", 0.25)
            mlflow.log_text("hello from the client", "notes/hello.txt")
        stored = list(artifacts.rglob("hello.txt"))
        assert len(stored) == 1 and stored[0].read_text() == "hello from the client"
        assert not (tmp_path / "data" / "mlflow").exists()  # no local store or artifacts

        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        got = client.get_run(run.info.run_id)
        assert got.data.params == {"rank": "8"} and got.data.metrics == {"ndcg_at_10": 0.25}
        client.create_registered_model("freshrec-server-test")
        v = client.create_model_version("freshrec-server-test",
                                        source=f"{run.info.artifact_uri}/notes",
                                        run_id=run.info.run_id)
        client.set_registered_model_alias("freshrec-server-test", "champion", v.version)
        assert client.get_model_version_by_alias("freshrec-server-test",
                                                 "champion").version == v.version
    finally:
        mlflow_down(stack)
        drop_database(stack, db)
