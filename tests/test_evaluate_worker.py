"""evaluate fits its models in a worker process: the driver never holds the events, the splits or
the models, and what it reports is what the in-process path reports."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from freshrec.contracts.reports import latest_evaluation_path
from tests.conftest import DAY, small_settings

pytestmark = pytest.mark.integration

MODELS = ["most_popular", "trending", "item_knn"]


def _silver_events(settings, n_users=300, n_items=120, n_clusters=4, per_user=24, seed=3):
    """A silver ``events`` table written with delta-rs: each user draws items from one cluster."""
    from freshrec.storage.delta import DeltaStore

    rng = np.random.default_rng(seed)
    end = datetime.fromisoformat(DAY).replace(tzinfo=timezone.utc) + timedelta(days=1)
    rows = []
    for u in range(n_users):
        c = u % n_clusters
        items = rng.choice(np.arange(c, n_items, n_clusters), per_user)
        for j, i in enumerate(items):
            ts = end - timedelta(days=10) + timedelta(minutes=int(rng.integers(0, 14000)))
            rows.append((f"e{u}-{j}", f"u{u}", f"i{i}", ts))
    store = DeltaStore(settings)
    store.write_arrow("events", pa.table({
        "event_id": [r[0] for r in rows], "user_id": [r[1] for r in rows],
        "item_id": [r[2] for r in rows], "event_type": ["click"] * len(rows),
        "value": pa.array([None] * len(rows), pa.float64()), "weight": [1.0] * len(rows),
        "ts": pa.array([r[3] for r in rows], pa.timestamp("us", tz="UTC")),
        "context": pa.array([None] * len(rows), pa.string()),
        "raw_id": [r[0] for r in rows], "batch_date": [DAY] * len(rows)},
        schema=store.spec("events").schema))
    return len(rows)


def _fit_runs(mlflow, parent: str):
    return mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                              search_all_experiments=True, output_format="list")


def test_fits_run_outside_the_driver_with_the_in_process_results(tmp_path):
    from freshrec.interval import DataInterval
    from freshrec.tracking import mlflow_for
    from spark_jobs import evaluate

    evaluation = {"ks": [10, 20], "models": MODELS, "bootstrap_resamples": 200}
    worker = small_settings(tmp_path / "data", evaluation=evaluation)
    inline = small_settings(tmp_path / "data", evaluation={**evaluation, "fit_in_worker": False})
    assert worker.evaluation.fit_in_worker and not inline.evaluation.fit_in_worker
    _silver_events(worker)
    interval = DataInterval.for_day(DAY)

    a = evaluate.run(worker, interval)
    b = evaluate.run(inline, interval)

    # the same metrics on both splits, the same p-values, the same refit candidate
    assert sorted(a["results"]) == sorted(MODELS)
    for key in ("validation", "p_values", "skipped", "not_servable", "n_test_users",
                "n_validation_users", "n_train_users", "n_items"):
        assert a[key] == b[key], key
    for m in MODELS:
        assert {k: v for k, v in a["results"][m].items() if k != "fit_seconds"} == \
            {k: v for k, v in b["results"][m].items() if k != "fit_seconds"}
    assert a["results"]["item_knn"]["ndcg_at_10"] > a["results"]["most_popular"]["ndcg_at_10"]
    assert list(a["refit"]) == list(b["refit"]) == ["item_knn"]
    assert a["model_uris"]["item_knn"] == a["refit"]["item_knn"]["model_uri"]

    # where each fit ran, from the runs' tags: the worker's pid is not the driver's
    mlflow = mlflow_for(worker)
    parent = mlflow.get_run(a["evaluation_run"])
    assert parent.data.tags["driver_pid"] == str(os.getpid())
    fits = _fit_runs(mlflow, a["evaluation_run"])
    assert sorted(r.info.run_name for r in fits) == sorted(
        [f"fit-{m}-{DAY}" for m in MODELS] + [f"refit-item_knn-{DAY}"])
    pids = {r.data.tags["fit_pid"] for r in fits}
    assert len(pids) == 1 and pids != {str(os.getpid())}
    assert parent.data.tags["fit_pid"] in pids
    # the in-process path fits in the driver, which the same tag shows
    assert {r.data.tags["fit_pid"] for r in _fit_runs(mlflow, b["evaluation_run"])} == \
        {str(os.getpid())}


def test_bad_input_in_the_worker_fails_the_run_with_its_message(tmp_path, capfd):
    from freshrec.interval import DataInterval
    from freshrec.tracking import mlflow_for
    from spark_jobs import evaluate

    settings = small_settings(tmp_path / "data", evaluation={"models": ["most_popular"],
                                                             "max_users": 0})
    _silver_events(settings, n_users=20, per_user=2)  # nobody has a validation split
    with pytest.raises(ValueError, match="ValueError: no user has enough events for a validation"):
        evaluate.run(settings, DataInterval.for_day(DAY))
    err = capfd.readouterr().err  # the worker's log: bad input is one line, no traceback
    assert "ERROR spark_jobs.evaluate: evaluate worker: no user has enough events" in err
    assert "Traceback" not in err
    mlflow = mlflow_for(settings)
    runs = mlflow.search_runs(filter_string="tags.stage = 'evaluate'", search_all_experiments=True,
                              output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert latest_evaluation_path(settings.data_dir / "reports", DAY) is None


def _children(pid: int) -> list[int]:
    from pathlib import Path

    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:  # a zombie (killed, not yet reaped by init) counts as gone
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except FileNotFoundError:
        return False


def test_the_worker_dies_with_its_driver(tmp_path):
    """A driver killed (SIGKILL: no cleanup runs) while its worker is busy takes the worker with
    it: the worker here hangs on an MLflow server that never answers, and is gone at once."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # connections are accepted by the kernel, never answered
    uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
    data = tmp_path / "data"
    from freshrec.storage.delta import DeltaStore

    settings = small_settings(data)
    _silver_events(settings)
    version = DeltaStore(settings).version("events")
    script = (
        "from tests.conftest import DAY, small_settings\n"
        "from freshrec.interval import DataInterval\n"
        "from spark_jobs.evaluate import fit_in_worker\n"
        f"s = small_settings({str(data)!r}, mlflow={{'tracking_uri': {uri!r}}},\n"
        "                   evaluation={'models': ['most_popular']})\n"
        "fit_in_worker(s, DataInterval.for_day(DAY), ['most_popular'],\n"
        f"              {{'events': {version}, 'items': None}}, 'no-parent-run')\n")
    root = Path(__file__).resolve().parent.parent
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=root,
                              stderr=open(tmp_path / "driver.log", "wb"))
    worker = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and driver.poll() is None:
            kids = _children(driver.pid)
            if kids and b"evaluate_worker" in Path(f"/proc/{kids[0]}/cmdline").read_bytes():
                worker = kids[0]
                break
            time.sleep(0.05)
        assert worker is not None, f"no worker started (driver exit {driver.poll()})"
        time.sleep(3)  # the worker is past its start, waiting on MLflow
        assert _alive(worker)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its driver"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
        hung.close()
