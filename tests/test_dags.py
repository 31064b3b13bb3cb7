"""The DAG files parse cleanly, follow the house rules, and import nothing heavy when parsed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parent.parent / "dags"


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(bag):
    assert bag.import_errors == {}
    assert "freshrec_batch" in bag.dags


def test_house_rules(bag):
    for dag_id, dag in bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        assert not dag.catchup
        for t in dag.tasks:
            assert t.retries >= 2, f"{dag_id}.{t.task_id} retries {t.retries}"


def test_every_task_backs_off_times_out_and_notifies(bag):
    from datetime import timedelta

    from freshrec.contracts.dag_support import FileNotifier

    assert set(bag.dags) == {"freshrec_batch", "freshrec_training", "freshrec_nearline",
                             "freshrec_rollout"}
    for dag_id, dag in bag.dags.items():
        for t in dag.tasks:
            name = f"{dag_id}.{t.task_id}"
            assert t.retry_exponential_backoff >= 2, name
            assert t.retry_delay < t.max_retry_delay <= timedelta(hours=1), name
            assert timedelta(0) < t.execution_timeout <= timedelta(hours=6), name
            callbacks = t.on_failure_callback
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            assert any(isinstance(c, FileNotifier) for c in callbacks), name
    # the delay doubles each try and stops at max_retry_delay
    ingest = bag.dags["freshrec_batch"].get_task("ingest")
    assert ingest.execution_timeout == timedelta(hours=1)
    assert bag.dags["freshrec_batch"].get_task("evaluate").execution_timeout == timedelta(hours=4)


def test_batch_outputs_are_assets_that_schedule_training_and_rollout(bag):
    batch = bag.dags["freshrec_batch"]

    def outlets(task_id):
        return {getattr(o, "name", None) for o in batch.get_task(task_id).outlets}

    assert outlets("ingest") == {"freshrec.bronze.events_raw"}
    assert outlets("clean") == {"freshrec.silver.events", "freshrec.silver.events_dead_letter"}
    assert outlets("features") == {"freshrec.gold.features"}
    assert outlets("evaluate") == {"freshrec.reports.evaluation"}
    # the gate emits the promoted model through an alias, only when it promoted
    assert outlets("gate") == {"freshrec.promoted_retrieval"}
    training, rollout = bag.dags["freshrec_training"], bag.dags["freshrec_rollout"]
    assert {a.name for a in training.timetable.asset_condition.objects} == {
        "freshrec.silver.events"}
    assert {a.name for a in rollout.timetable.asset_condition.objects} == {
        "freshrec.contracts.registry.retrieval"}
    for t in ("two_tower", "sasrec"):
        assert {o.name for o in training.get_task(t).outlets} == {"freshrec.promoted_retrieval"}


def test_batch_dag_shape(bag):
    dag = bag.dags["freshrec_batch"]
    assert set(dag.task_ids) == {"ingest", "clean", "features", "evaluate", "gate"}
    assert dag.get_task("clean").upstream_task_ids == {"ingest"}
    assert dag.get_task("features").upstream_task_ids == {"clean"}
    assert dag.get_task("evaluate").upstream_task_ids == {"features"}
    assert dag.get_task("gate").upstream_task_ids == {"evaluate"}
    # what the gate promoted is served by the rollout DAG (scheduled on the gate's Asset)
    assert not dag.get_task("gate").downstream_task_ids
    assert bag.dags["freshrec_rollout"].task_ids == ["rollout"]


def test_training_dag_shape_schedule_and_params(bag):
    dag = bag.dags["freshrec_training"]
    assert set(dag.task_ids) == {"two_tower", "sasrec", "reinforce", "bandit"}
    assert dag.get_task("sasrec").upstream_task_ids == {"two_tower"}
    assert dag.get_task("bandit").upstream_task_ids == {"reinforce"}
    assert dag.max_active_runs == 1
    assert dag.params["device"] == "auto" and set(dag.params["models"]) == {
        "two_tower", "sasrec", "reinforce", "bandit"}


@pytest.mark.parametrize("name", ["freshrec_batch.py", "freshrec_training.py", "freshrec_nearline.py",
                                  "freshrec_rollout.py"])
def test_parsing_imports_nothing_heavy_and_reads_no_settings(name, tmp_path):
    """Parsed where the settings cannot load (a missing profile): a settings read would fail."""
    code = ("import importlib.util, sys\n"
            "import freshrec.settings as fs\n"
            "def refuse(*a, **k): raise SystemExit('settings read at parse time')\n"
            "fs.load_settings = refuse\n"
            f"spec = importlib.util.spec_from_file_location('d', r'{DAGS / name}')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(sorted(x for x in ('pyspark', 'torch', 'faiss', 'mlflow') if x in sys.modules))")
    env = {**os.environ, "FRESHREC_PROFILE": "no-such-profile",
           "AIRFLOW_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_nearline_dag_runs_every_few_minutes_one_at_a_time(bag):
    from datetime import timedelta

    from datetime import datetime, timezone

    dag = bag.dags["freshrec_nearline"]
    assert dag.max_active_runs == 1 and not dag.catchup
    assert dag.task_ids == ["refresh"]
    # ticks every minute; the task runs a round on every schedule_minutes-th minute
    assert dag.timetable.summary == "* * * * *"
    mod = _load("freshrec_nearline.py")
    at = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
    rounds = [m for m in range(30) if mod.due(at + timedelta(minutes=m), 5, "scheduled")]
    assert rounds == [0, 5, 10, 15, 20, 25]
    assert mod.due(at + timedelta(minutes=3), 5, "manual")
    assert all(mod.due(at + timedelta(minutes=m), 1, "scheduled") for m in range(7))


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name[:-3] + "_under_test", DAGS / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FAILING_DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from freshrec.contracts.dag_support import task_defaults


@dag(dag_id="failing", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     default_args=task_defaults(retry_delay=timedelta(seconds=1), max_retry_delay=timedelta(seconds=2),
                                execution_timeout=timedelta(minutes=2), retries=1))
def failing():
    @task
    def load():
        raise FileNotFoundError("no landed events for 2026-03-01")

    load()


failing()
"""


def test_a_task_that_fails_for_good_writes_the_notifier_file(tmp_path):
    """A DAG with the house defaults (one retry here) run for real (`airflow dags test`, SQLite):
    the failed first try is retried and not notified; the failed retry appends one line naming
    the DAG, the task, the try and the error."""
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "failing.py").write_text(FAILING_DAG)
    failures = tmp_path / "alerts" / "failures.jsonl"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
           "FRESHREC_DATA_DIR": str(tmp_path / "data"),
           "FRESHREC__AIRFLOW__FAILURE_LOG": str(failures),
           "PYTHONPATH": str(DAGS.parent)}
    airflow = str(Path(sys.executable).parent / "airflow")
    for cmd in ([airflow, "db", "migrate"], [airflow, "dags", "test", "failing"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                           cwd=DAGS.parent)
    assert r.returncode != 0 or "failed" in (r.stdout + r.stderr), r.stdout[-3000:]
    lines = [json.loads(x) for x in failures.read_text().splitlines()]
    assert len(lines) == 1, lines
    rec = lines[0]
    assert (rec["dag_id"], rec["task_id"], rec["try_number"]) == ("failing", "load", 2), rec
    assert rec["error"] == "FileNotFoundError: no landed events for 2026-03-01"
    assert rec["run_id"] and "failure_log_fallback" not in rec
