"""The batch DAG under Airflow as it is deployed: a scheduler (LocalExecutor), a DAG processor and an
API server on a PostgreSQL metadata database (a database of the test's own, dropped at the end),
the run triggered through the REST API and followed until it succeeds. Skipped without PostgreSQL
(Debian's package), its Python drivers, or root (the test creates its role and database as the
``postgres`` superuser)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from importlib.util import find_spec

import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.settings import load_settings

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("pg_lsclusters") is None,
                       reason="PostgreSQL is not installed (apt-get install -y postgresql)"),
    pytest.mark.skipif(find_spec("psycopg2") is None or find_spec("asyncpg") is None,
                       reason="Airflow's PostgreSQL drivers are missing (pip install -e '.[airflow]')"),
    pytest.mark.skipif(os.geteuid() != 0, reason="creating the role and database needs root"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_triggered_through_the_rest_api_succeeds(tmp_path):
    from freshrec.ops.airflow_stack import Stack, api, down, drop_database, up

    data = tmp_path / "data"
    small = {"FRESHREC_DATA_DIR": str(data), "FRESHREC__ALS__RANK": "8",
             "FRESHREC__ALS__ITERATIONS": "4", "FRESHREC__SPARK__SHUFFLE_PARTITIONS": "2",
             "FRESHREC__SPARK__DRIVER_MEMORY": "1g", "FRESHREC__SYNTH__N_USERS": "400",
             "FRESHREC__SYNTH__N_ITEMS": "150", "FRESHREC__REFRESHER__REPLICAS": "[]",
             "FRESHREC__EVALUATION__MODELS": "[most_popular, item_knn]"}
    r = subprocess.run([sys.executable, "-m", "freshrec.cli.main", "data", "synth", "--events",
                        "6000", "--users", "400", "--items", "150"], env={**os.environ, **small},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # no cron runs: unpausing would otherwise schedule yesterday's interval, which has no data
    env = {**small, "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    stack = Stack(api_port=free_port(), database=f"airflow_test_{os.getpid()}",
                  home=tmp_path / "airflow", extra_env=tuple(env.items()))
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        up(stack)
        deadline = time.monotonic() + 120
        while "freshrec_batch" not in {d["dag_id"] for d in api(stack, "GET", "/dags")["dags"]}:
            assert time.monotonic() < deadline, "the DAG processor did not register freshrec_batch"
            time.sleep(3)
        api(stack, "PATCH", "/dags/freshrec_batch", {"is_paused": False})
        run = api(stack, "POST", "/dags/freshrec_batch/dagRuns", {
            # the synthetic data lands today: the interval [today, today + 1)
            "dag_run_id": "rest-test", "logical_date": today.isoformat(),
            "data_interval_start": today.isoformat(),
            "data_interval_end": (today + timedelta(days=1)).isoformat()})
        assert run["state"] in ("queued", "running")
        deadline = time.monotonic() + 900
        state = run["state"]
        while state not in ("success", "failed") and time.monotonic() < deadline:
            time.sleep(5)
            state = api(stack, "GET", "/dags/freshrec_batch/dagRuns/rest-test")["state"]
        tis = api(stack, "GET", "/dags/freshrec_batch/dagRuns/rest-test/taskInstances")
        states = {t["task_id"]: t["state"] for t in tis["task_instances"]}
        assert state == "success", (state, states, f"logs under {stack.dir / 'logs'}")
        assert set(states.values()) == {"success"}, states
        # the batch outputs are Assets: each event names its table's Delta version, and the gate's
        # promotion is the Asset the rollout DAG is scheduled on
        events = api(stack, "GET", "/assets/events?source_dag_id=freshrec_batch&limit=100")
        by_name = {e["name"]: e for e in events["asset_events"]}
        assert {"freshrec.bronze.events_raw", "freshrec.silver.events", "freshrec.gold.features",
                "freshrec.contracts.registry.retrieval"} <= set(by_name), sorted(by_name)
        assert isinstance(by_name["freshrec.silver.events"]["extra"]["version"], int)
        promoted = by_name["freshrec.contracts.registry.retrieval"]["extra"]["version"]
        # the scheduler is off here (no cron runs): start the rollout as it would, and follow it
        api(stack, "PATCH", "/dags/freshrec_rollout", {"is_paused": False})
        api(stack, "POST", "/dags/freshrec_rollout/dagRuns",
            {"dag_run_id": "rest-rollout", "logical_date": None})
        state = "queued"
        while state not in ("success", "failed") and time.monotonic() < deadline + 300:
            time.sleep(3)
            state = api(stack, "GET", "/dags/freshrec_rollout/dagRuns/rest-rollout")["state"]
        assert state == "success", (state, f"logs under {stack.dir / 'logs'}")
        xcom = api(stack, "GET", "/dags/freshrec_rollout/dagRuns/rest-rollout/taskInstances/"
                   "rollout/xcomEntries/return_value")
        assert f"freshrec-retrieval/{promoted} " in str(xcom["value"]), (promoted, xcom)
    finally:
        down(stack)
        drop_database(stack)
    store = DeltaStore(load_settings("local", env={"FRESHREC_DATA_DIR": str(data)}))
    assert store.count("events") > 0 and store.count("item_features") > 0
