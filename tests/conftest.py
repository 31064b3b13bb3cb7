"""Shared fixtures: small settings in a temp data dir, one Spark session per test run, and the
whole batch lane run once on a small synthetic dataset for the integration tests."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from freshrec.settings import Settings, load_settings

SMALL = {
    "synth": {"n_events": 20000, "n_users": 800, "n_items": 300, "n_clusters": 6, "days": 20,
              "malformed_fraction": 0.01, "duplicate_fraction": 0.01},
    "als": {"rank": 16, "iterations": 6, "num_blocks": 2},
    "models": {"pure_svd": {"rank": 16}},  # 300 items: a small rank, like ALS
    "features": {"neighbors_top_k": 10},
    "spark": {"shuffle_partitions": 2, "driver_memory": "2g"},
    # every model kind the registry can serve: popularity, history (kNN, EASE, content),
    # embedding (ALS) and the hybrid
    "evaluation": {"ks": [10, 20], "models": ["most_popular", "trending", "item_knn", "user_knn",
                                              "ease", "content", "als", "hybrid"]},
}
DAY = "2026-11-27"


def small_settings(data_dir: Path, **more) -> Settings:
    tree = {**SMALL, **more, "paths": {"data_dir": str(data_dir)}}
    return load_settings("local", env={}, **tree)


def register_fit(settings: Settings, model: str, batch_date: str = DAY, build: bool = True) -> int:
    """Register the lane evaluation's fit of ``model`` as a new freshrec-retrieval version (no
    alias) in ``settings``' MLflow and (``build``) build its snapshot, as the gate and the
    rollout do before any server is asked to load it (servers only load snapshots); returns the
    version number."""
    from freshrec.contracts.registry import RETRIEVAL
    from freshrec.contracts.reports import latest_evaluation
    from freshrec.tracking import mlflow_for

    _, summary = latest_evaluation(settings.data_dir / "reports", batch_date)
    uri = summary["model_uris"][model]
    mlflow_for(settings)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{RETRIEVAL}'"):
        client.create_registered_model(RETRIEVAL)
    v = client.create_model_version(RETRIEVAL, source=uri, run_id=summary["runs"][model],
                                    model_id=uri.split("/")[-1], tags={"model": model})
    if build:
        from nearline.snapshots import build_for_serving

        build_for_serving(settings, int(v.version))
    return int(v.version)


# `freshrec serve` started by a test runs one process unless the test asks for more: the suite
# shares 2 cores between the servers, Spark and Airflow. tests/test_serving_processes.py and the
# feedback loop's kill -9 tests (tests/test_feedback_loop.py, `two_servers` with processes=2)
# run multi-process hosts.
os.environ.setdefault("FRESHREC__SERVING__PROCESSES", "1")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return small_settings(tmp_path / "data")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from freshrec.storage.spark import get_spark

    s = get_spark(small_settings(tmp_path_factory.mktemp("spark")))
    yield s
    s.stop()
    logging.getLogger("py4j").setLevel(logging.WARNING)  # its __del__ logs after pytest closes streams


@pytest.fixture(scope="session")
def lane(tmp_path_factory, spark):
    """The batch lane run once, job by job, on the small dataset (for read-only checks)."""
    from datetime import datetime, timezone

    from freshrec.data import importers
    from freshrec.interval import DataInterval
    from freshrec.data.synth import write_synth
    from nearline import snapshots as index_snapshot
    from spark_jobs import clean, evaluate, features, gate, ingest

    root = tmp_path_factory.mktemp("lane")
    settings = small_settings(root / "data")
    end = datetime(2026, 11, 27, tzinfo=timezone.utc)
    synth = write_synth(settings.synth, root / "raw", end=end)
    importers.import_events_file(settings, synth.events_path, landed_at=end)
    importers.import_items_file(settings, synth.items_path)
    interval = DataInterval.for_day(DAY)
    results = {
        "ingest": ingest.run(settings, interval),
        "clean": clean.run(settings, interval),
        "features": features.run(settings, interval),
        "evaluate": evaluate.run(settings, interval),
        "gate": gate.run(settings, interval),
        "build_index": index_snapshot.run(settings, interval),
    }
    return {"settings": settings, "interval": interval, "synth": synth, "results": results,
            "raw_dir": root / "raw"}
