"""The batch DAG end to end under real Airflow (`airflow dags test`, SQLite, project-local style
AIRFLOW_HOME in a temp dir) on a small synthetic dataset, as `make run` does it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from freshrec.contracts.reports import latest_evaluation_path
from freshrec.storage.delta import DeltaStore
from freshrec.settings import load_settings
from freshrec.contracts.snapshot import latest_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_airflow_dags_test_runs_the_whole_batch_lane(tmp_path):
    """The DAG's last step rolls the promoted champion out to a running server, which started
    with nothing to serve."""
    port = _free_port()
    env = {**os.environ,
           "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}",
           "FRESHREC_DATA_DIR": str(tmp_path / "data"),
           "FRESHREC__ALS__RANK": "8", "FRESHREC__ALS__ITERATIONS": "4",
           "FRESHREC__SPARK__SHUFFLE_PARTITIONS": "2", "FRESHREC__SPARK__DRIVER_MEMORY": "1g",
           "FRESHREC__SYNTH__N_USERS": "400", "FRESHREC__SYNTH__N_ITEMS": "150",
           "FRESHREC__TRAINING__SAMPLES_PER_EPOCH": "3000", "FRESHREC__TRAINING__VAL_USERS": "50",
           "FRESHREC__TRAINING__BATCH_SIZE": "256", "FRESHREC__TRAINING__DIM": "16",
           "FRESHREC__REFRESHER__REPLICAS": f"['127.0.0.1:{port}']",
           "FRESHREC__SERVING__METRICS_PORT": "-1", "FRESHREC__SERVING__JSON_LOGS": "false",
           "PYSPARK_PYTHON": sys.executable}
    # The synthetic data lands today, so the run processes today's interval [today, today+1).
    today = datetime.now(timezone.utc).date()
    day, run_after = today.isoformat(), (today + timedelta(days=1)).isoformat()

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        return r

    sh(sys.executable, "-m", "freshrec.cli.main", "data", "synth", "--events", "8000",
       "--users", "400", "--items", "150")
    (tmp_path / "airflow").mkdir()
    sh(str(BIN / "airflow"), "db", "migrate")
    server = subprocess.Popen([sys.executable, "-m", "freshrec.cli.main", "serve", "--port", str(port)],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # a manual run at day+1 covers the interval [day, day+1)
        sh(str(BIN / "airflow"), "dags", "test", "freshrec_batch", run_after)
        # a scheduler starts the rollout DAG on the gate's Asset; `dags test` does not
        sh(str(BIN / "airflow"), "dags", "test", "freshrec_rollout")
        from freshrec.api.client import Client

        admin = Client(f"127.0.0.1:{port}", "dev-admin-token")
        served = admin.call_admin("Status", admin.admin_pb2.StatusRequest()).model_version
        reply = Client(f"127.0.0.1:{port}", "dev-client-token").recommend("u1", 5)
    finally:
        server.kill()
        server.wait(timeout=30)
    settings = load_settings("local", env={"FRESHREC_DATA_DIR": str(tmp_path / "data")})
    store = DeltaStore(settings)
    counts = {t: store.count(t) for t in ("events_raw", "events", "events_dead_letter",
                                          "item_features", "item_neighbors", "user_features")}
    assert all(counts.values()), counts
    assert counts["events_raw"] >= counts["events"] + counts["events_dead_letter"]
    assert latest_snapshot(settings.snapshots_dir) is not None
    assert latest_evaluation_path(settings.data_dir / "reports", day) is not None
    report = sh(sys.executable, "-m", "freshrec.cli.main", "report", "--date", day).stdout
    assert "Dead-letter rows by reason" in report and "als" in report and "Top-10" in report
    gate = json.loads((settings.data_dir / "reports" / f"gate-{day}.json").read_text())
    assert gate["promoted"] and gate["registered_model"] == "freshrec-retrieval"
    label = f"freshrec-retrieval/{gate['version']} {gate['candidate']}"
    assert served == label and reply.model_version == label and len(reply.items) == 5
    assert f"as served (model {label})" in report

    # the training DAG on demand, with a run config: two models, one epoch
    conf = json.dumps({"models": ["two_tower", "reinforce"], "epochs": 1, "device": "auto"})
    sh(str(BIN / "airflow"), "dags", "test", "freshrec_training", run_after, "-c", conf)
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    runs = mlflow.search_runs(experiment_names=["freshrec-training"], output_format="list")
    assert {r.data.tags["model"] for r in runs if r.info.status == "FINISHED"} == \
        {"two_tower", "reinforce"}  # sasrec and bandit were skipped by the config
    from mlflow.tracking import MlflowClient

    champ = MlflowClient().get_model_version_by_alias("freshrec-policy", "champion")
    assert champ.tags["model"] == "reinforce"
