"""The DAG files parse cleanly, follow the house rules, and import nothing heavy when parsed."""

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


def test_batch_dag_shape(bag):
    dag = bag.dags["freshrec_batch"]
    assert set(dag.task_ids) == {"ingest", "clean", "features", "evaluate", "gate", "rollout"}
    assert dag.get_task("clean").upstream_task_ids == {"ingest"}
    assert dag.get_task("features").upstream_task_ids == {"clean"}
    assert dag.get_task("evaluate").upstream_task_ids == {"features"}
    assert dag.get_task("gate").upstream_task_ids == {"evaluate"}
    # the last step serves what the gate promoted
    assert dag.get_task("rollout").upstream_task_ids == {"gate"}
    assert not dag.get_task("rollout").downstream_task_ids


def test_training_dag_shape_schedule_and_params(bag):
    dag = bag.dags["freshrec_training"]
    assert set(dag.task_ids) == {"two_tower", "sasrec", "reinforce", "bandit", "rollout"}
    assert dag.get_task("sasrec").upstream_task_ids == {"two_tower"}
    assert dag.get_task("rollout").upstream_task_ids == {"two_tower", "sasrec"}
    assert dag.get_task("bandit").upstream_task_ids == {"reinforce"}
    assert dag.max_active_runs == 1 and dag.timetable.summary == "0 3 * * 1"
    assert dag.params["device"] == "auto" and set(dag.params["models"]) == {
        "two_tower", "sasrec", "reinforce", "bandit"}


@pytest.mark.parametrize("name", ["freshrec_batch.py", "freshrec_training.py", "freshrec_nearline.py"])
def test_parsing_imports_no_pyspark_torch_or_faiss(name):
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('d', r'{DAGS / name}')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(sorted(x for x in ('pyspark', 'torch', 'faiss', 'mlflow') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_nearline_dag_runs_every_few_minutes_one_at_a_time(bag):
    from datetime import timedelta

    dag = bag.dags["freshrec_nearline"]
    assert dag.max_active_runs == 1 and not dag.catchup
    assert dag.task_ids == ["refresh"]
    assert dag.timetable.delta == timedelta(minutes=5)
