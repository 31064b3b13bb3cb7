"""The cluster profile's whole batch lane as ``FRESHREC_PROFILE=cluster make run`` runs it: the
walkthrough (``freshrec.cli.walkthrough``) against a standalone Spark cluster on loopback (a master
and two one-core workers, started here), with the Airflow stack (scheduler, DAG processor, API
server on PostgreSQL) and the MLflow tracking server (PostgreSQL store, proxied artifacts) that it
starts itself, on a small dataset. The batch DAG is triggered through the REST API; its Spark tasks
run spark-submit through ``SparkSubmitOperator`` and write Delta with delta-spark on the executors.

Asserted: the run succeeded, every Spark-written table's commits come from delta-spark (the Delta
log's ``engineInfo``), the gate registered a version in the server's registry and the report names
it. Each service gets free ports, a home and databases of the test's own, stopped and dropped at
the end. Skipped without Java, the Delta jars (``make jars``), PostgreSQL, its drivers, the Spark
provider, or root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from importlib.util import find_spec
from pathlib import Path

import pytest

from freshrec.ops.jars import delta_jars
from freshrec.settings import PROJECT_ROOT

deployed = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="no java on the PATH"),
    pytest.mark.skipif(not delta_jars(), reason="no Delta jars in .jars/: run `make jars`"),
    pytest.mark.skipif(shutil.which("pg_lsclusters") is None,
                       reason="PostgreSQL is not installed (apt-get install -y postgresql)"),
    pytest.mark.skipif(find_spec("psycopg2") is None or find_spec("asyncpg") is None
                       or find_spec("airflow.providers.apache.spark") is None,
                       reason="the airflow extra is not installed (pip install -e '.[airflow]')"),
    pytest.mark.skipif(os.geteuid() != 0, reason="creating the roles and databases needs root"),
]

# the jobs the DAG submits, and the tables each writes with delta-spark
SPARK_TABLES = ["events_raw", "events", "events_dead_letter", "user_features", "item_features",
                "item_neighbors"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_commit_engines(table_dir: Path) -> set[str]:
    """The engineInfo of every commit in a Delta table's log that adds data files (the empty
    tables are created by delta-rs, with no files, before any job runs)."""
    found = set()
    for f in sorted((table_dir / "_delta_log").glob("*.json")):
        actions = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if any("add" in a for a in actions):
            found |= {str(a["commitInfo"].get("engineInfo", "")) for a in actions
                      if "commitInfo" in a}
    return found


def _mark(marks):
    def wrap(f):
        for m in reversed(marks):
            f = m(f)
        return f
    return wrap


def test_loopback_secrets_are_private_made_once_and_pass_the_cluster_profile(tmp_path):
    import hashlib
    import stat

    from freshrec.cli.walkthrough import loopback_secrets
    from freshrec.settings import SettingsError, load_settings

    folder = tmp_path / "data" / "secrets"
    env, made = loopback_secrets(folder)
    assert sorted(made) == ["admin_token", "client_token", "data_key", "hmac_key"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {0o600}
    again, made_again = loopback_secrets(folder)
    assert made_again == [] and again == env  # kept: pseudonyms stay the same across runs

    base = {"FRESHREC_DATA_DIR": str(tmp_path / "data"),
            "FRESHREC__PRIVACY__VOLUME_ENCRYPTED_ATTESTED": "true"}
    with pytest.raises(SettingsError, match="hmac_key"):
        load_settings("cluster", env=base)  # why the walkthrough makes them
    s = load_settings("cluster", env={**base, **env})
    client = (folder / "client_token").read_text().strip()
    assert s.privacy.hmac_key.get_secret_value() == (folder / "hmac_key").read_text().strip()
    assert s.refresher.token.get_secret_value() == (folder / "admin_token").read_text().strip()
    assert len(bytes.fromhex(s.privacy.data_key.get_secret_value())) == 32
    assert env["FRESHREC_TOKEN"] == client
    assert {(t.role, t.sha256) for t in s.serving.tokens} == {
        ("client", hashlib.sha256(client.encode()).hexdigest()),
        ("admin", hashlib.sha256(s.refresher.token.get_secret_value().encode()).hexdigest())}


@pytest.mark.skipif(find_spec("airflow.providers.apache.spark") is None,
                    reason="the Spark provider is not installed (pip install -e '.[airflow]')")
def test_spark_default_is_the_profiles_master_as_the_provider_reads_it(tmp_path, monkeypatch):
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    from freshrec.ops.airflow_stack import spark_connection
    from freshrec.cli.walkthrough import loopback_secrets

    secrets, _ = loopback_secrets(tmp_path / "secrets")
    env = {**secrets, "FRESHREC_PROFILE": "cluster", "SPARK_MASTER": "spark://127.0.0.1:17123",
           "FRESHREC_DATA_DIR": str(tmp_path), "FRESHREC__PRIVACY__VOLUME_ENCRYPTED_ATTESTED": "true"}
    conn = spark_connection(env)
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", conn)
    hook = SparkSubmitHook(conn_id="spark_default")
    assert hook._connection["master"] == "spark://127.0.0.1:17123"
    assert hook._connection["deploy_mode"] == "client"
    # the embedded default does not submit: no connection, the tasks run Spark in-process
    assert spark_connection({"FRESHREC_PROFILE": "local", "FRESHREC_DATA_DIR": str(tmp_path)}) is None


def test_the_cluster_walkthrough_without_a_cluster_is_one_line_naming_make_cluster_up(tmp_path):
    port = free_port()  # nothing listens there
    env = {**os.environ, "FRESHREC_PROFILE": "cluster", "SPARK_MASTER": f"spark://127.0.0.1:{port}",
           "FRESHREC_DATA_DIR": str(tmp_path / "data"), "AIRFLOW_API_PORT": str(free_port()),
           "FRESHREC_AIRFLOW_HOME": str(tmp_path / "airflow"),
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "COLUMNS": "300"}
    env.pop("FRESHREC_SECRETS_DIR", None)
    r = subprocess.run([sys.executable, "-m", "freshrec.cli.walkthrough", "--date", "2026-11-27",
                        "--run-after", "2026-11-28"], env=env, cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"spark://127.0.0.1:{port} is not reachable" in errors[0] \
        and "make cluster-up" in errors[0], r.stderr
    assert not (tmp_path / "airflow").exists()  # nothing was started
    assert not (tmp_path / "data" / "tables").exists()


@_mark(deployed)
def test_the_cluster_profile_runs_the_batch_lane_through_the_deployed_airflow(tmp_path):
    from freshrec.ops.airflow_stack import Stack, down, drop_database, mlflow_down
    from freshrec.cli.walkthrough import api_patient
    from freshrec.ops.cluster import Cluster
    from freshrec.ops.cluster import down as cluster_down
    from freshrec.ops.cluster import up as cluster_up

    cluster = Cluster(port=free_port(), webui_port=free_port(), workers=2, worker_cores=1,
                      worker_memory="1g", home=tmp_path / "cluster")
    data, home = tmp_path / "data", tmp_path / "airflow"
    api_port, mlflow_port = free_port(), free_port()
    tag = os.getpid()
    env = {**os.environ, "FRESHREC_PROFILE": "cluster", "SPARK_MASTER": cluster.url,
           "FRESHREC_DATA_DIR": str(data), "FRESHREC_AIRFLOW_HOME": str(home),
           "AIRFLOW_API_PORT": str(api_port), "FRESHREC_AIRFLOW_DB": f"airflow_lane_{tag}",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
           "FRESHREC_MLFLOW_DB": f"mlflow_lane_{tag}",
           "FRESHREC__SYNTH__N_EVENTS": "6000", "FRESHREC__SYNTH__N_USERS": "400",
           "FRESHREC__SYNTH__N_ITEMS": "150", "FRESHREC__ALS__RANK": "8",
           "FRESHREC__ALS__ITERATIONS": "4", "FRESHREC__SPARK__SHUFFLE_PARTITIONS": "2",
           "FRESHREC__SPARK__DRIVER_MEMORY": "1g", "FRESHREC__SPARK__EXECUTOR_MEMORY": "768m",
           "FRESHREC__FEATURES__NEIGHBORS_TOP_K": "10",
           "FRESHREC__EVALUATION__MODELS": "[most_popular, item_knn]"}
    for k in ("FRESHREC_SECRETS_DIR", "FRESHREC__PRIVACY__VOLUME_ENCRYPTED_ATTESTED"):
        env.pop(k, None)
    stack = Stack(api_port=api_port, database=f"airflow_lane_{tag}", home=home)
    day = datetime.now(timezone.utc).date()
    try:
        cluster_up(cluster)
        r = subprocess.run([sys.executable, "-m", "freshrec.cli.walkthrough", "--date",
                            day.isoformat(), "--run-after", (day + timedelta(days=1)).isoformat()],
                           env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        # what the walkthrough says it did, one line each
        assert f"secrets for this loopback run: {data / 'secrets'}" in r.stderr
        assert "FRESHREC__PRIVACY__VOLUME_ENCRYPTED_ATTESTED=true" in r.stderr

        runs = api_patient(stack, "GET", "/dags/freshrec_batch/dagRuns")["dag_runs"]
        assert [x["state"] for x in runs] == ["success"], runs
        tis = api_patient(stack, "GET", f"/dags/freshrec_batch/dagRuns/{runs[0]['dag_run_id']}/"
                  "taskInstances")["task_instances"]
        assert {t["task_id"]: t["state"] for t in tis} == {
            t: "success" for t in ("ingest", "clean", "features", "evaluate", "gate")}
        # the Spark tasks ran spark-submit through SparkSubmitOperator against the cluster (the
        # spark_default connection); those that start a session (evaluate without ALS does not)
        # are applications of the master
        for task in ("ingest", "clean", "features", "evaluate"):
            log = next((home / "logs" / "dag_id=freshrec_batch").glob(f"*/task_id={task}/*.log"))
            assert f"Spark-Submit cmd: spark-submit --master {cluster.url} " in log.read_text()
        from freshrec.ops.cluster import master_state

        apps = sorted(a["name"] for a in master_state(cluster).get("completedapps", []))
        assert apps == ["freshrec-clean", "freshrec-features", "freshrec-ingest"], apps

        # delta-spark wrote the tables (on the executors): every commit with data is Apache Spark's
        for name in SPARK_TABLES:
            found = data_commit_engines(data / "tables" / name)
            assert found and all(e.startswith("Apache-Spark") for e in found), (name, found)

        # the gate registered a version in the server's registry, and the report names it
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        versions = client.search_model_versions("name = 'freshrec-retrieval'")
        assert len(versions) == 1, versions
        v = versions[0].version
        assert client.get_model_version_by_alias("freshrec-retrieval", "champion").version == v
        assert f"-> freshrec-retrieval/{v}" in r.stdout, r.stdout[-3000:]
        assert f"freshrec-retrieval@champion = freshrec-retrieval/{v} " in r.stdout
        assert not (data / "mlflow").exists()  # runs and artifacts went to the server
    finally:
        down(stack)
        mlflow_down(stack)
        cluster_down(cluster)
        drop_database(stack)
        drop_database(stack, f"mlflow_lane_{tag}")
