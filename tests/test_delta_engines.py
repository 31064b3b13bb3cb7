"""delta-spark and delta-rs on the same tables: the batch jobs give the same tables with either
engine, a re-run with delta-spark commits nothing, and each engine reads what the other wrote
(including the Change Data Feed the refresher reads with delta-rs).

Each engine's Spark runs in an interpreter of its own (tests/spark_worker.py): the suite's shared
session has no Delta jars. Skipped without Java or without the jars (``make jars``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from freshrec.storage.delta import DeltaStore
from freshrec.ops.jars import delta_jars

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if shutil.which("java") is None:
    pytest.skip("no java on the PATH: Spark cannot start", allow_module_level=True)
if not delta_jars():
    pytest.skip("the Delta jars are not in .jars/: run `make jars` (needs Maven)",
                allow_module_level=True)

from conftest import DAY, SMALL, small_settings  # noqa: E402

WORKER = Path(__file__).resolve().parent / "spark_worker.py"
TABLES = ["events_raw", "events", "events_dead_letter", "user_features", "item_features",
          "item_neighbors"]


def run_worker(spec: dict, timeout: int = 600) -> dict:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def tree(data_dir: Path, backend: str) -> dict:
    return {**SMALL, "paths": {"data_dir": str(data_dir)}, "delta": {"backend": backend}}


def sorted_rows(store: DeltaStore, name: str) -> pa.Table:
    table = store.read_arrow(name)
    key = list(store.spec(name).key) or [table.schema.names[0]]
    return table.sort_by([(k, "ascending") for k in key])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from freshrec.data import importers
    from freshrec.data.synth import write_synth

    root = tmp_path_factory.mktemp("engines")
    rs_dir, spark_dir = root / "rs" / "data", root / "spark" / "data"
    settings = small_settings(rs_dir)
    end = datetime(2026, 11, 27, tzinfo=timezone.utc)
    synth = write_synth(settings.synth, root / "raw", end=end)
    importers.import_events_file(settings, synth.events_path, landed_at=end)
    importers.import_items_file(settings, synth.items_path)
    shutil.copytree(rs_dir, spark_dir)  # the same landed files and items for both engines
    jobs = ["ingest", "clean", "features"]
    rs = run_worker({"tree": tree(rs_dir, "rs"), "day": DAY, "jobs": jobs})
    sp = run_worker({"tree": tree(spark_dir, "spark"), "day": DAY, "jobs": jobs, "rerun": jobs})
    return {"rs": (rs, small_settings(rs_dir)), "spark": (sp, small_settings(spark_dir)),
            "spark_dir": spark_dir}


def test_each_engine_ran_as_asked(engines):
    assert engines["rs"][0]["engine"] == "rs"
    assert engines["spark"][0]["engine"] == "spark"


def test_delta_spark_writes_the_same_tables_as_delta_rs(engines):
    (rs_out, rs_settings), (sp_out, sp_settings) = engines["rs"], engines["spark"]
    assert rs_out["results"] == sp_out["results"]
    rs_store, sp_store = DeltaStore(rs_settings), DeltaStore(sp_settings)
    for name in TABLES:
        a, b = sorted_rows(rs_store, name), sorted_rows(sp_store, name)  # delta-rs reads both
        assert a.num_rows == b.num_rows > 0, name
        assert a.equals(b), f"{name}: delta-spark's rows differ from delta-rs's"


def test_a_delta_spark_rerun_commits_nothing(engines):
    sp_out = engines["spark"][0]
    assert sp_out["rerun"]["ingest"] == {"files": 0, "rows": 0}
    assert sp_out["rerun"]["clean"] == sp_out["results"]["clean"]
    assert sp_out["versions_after_rerun"] == sp_out["versions_before_rerun"]


def test_delta_spark_tables_stay_readable_and_writable_by_delta_rs(engines):
    store = DeltaStore(engines["spark"][1])
    for name in TABLES:
        protocol = DeltaTable(store.path(name)).protocol()
        features = set(protocol.reader_features or []) | set(protocol.writer_features or [])
        assert not features & {"deletionVectors", "columnMapping", "timestampNtz"}, (name, features)


def test_delta_rs_reads_the_change_data_feed_delta_spark_wrote(engines):
    from freshrec.storage.changes import read_changes

    store = DeltaStore(engines["spark"][1])
    path = store.path("events")
    version = DeltaTable(path).version()
    changes = read_changes(path, 0, version)  # what the refresher does, versions 1..latest
    kinds = changes.group_by("_change_type").aggregate([("_change_type", "count")])
    counts = dict(zip(kinds.column("_change_type").to_pylist(),
                      kinds.column("_change_type_count").to_pylist()))
    assert counts == {"insert": store.count("events")}
    assert changes.schema.field("ts").type == pa.timestamp("us", tz="UTC")


def test_delta_spark_reads_what_delta_rs_wrote_after_it(engines):
    from freshrec.privacy.erasure import erase_user

    settings = engines["spark"][1]
    store = DeltaStore(settings)
    user = store.read_arrow("events", columns=["user_id"]).column("user_id")[0].as_py()
    n_user = sum(1 for u in store.read_arrow("events", columns=["user_id"]).column("user_id")
                 .to_pylist() if u == user)
    items = store.read_arrow("items").slice(0, 3)
    changed = items.set_column(items.schema.get_field_index("title"), "title",
                               pa.array(["renamed"] * 3))
    assert store.upsert_arrow("items", changed) == {"inserted": 0, "updated": 3}  # delta-rs MERGE
    # delta-rs DELETE on the delta-spark tables; a retention that keeps the CDF readable
    keep_cdf = settings.model_copy(update={"privacy": settings.privacy.model_copy(
        update={"vacuum_retention_hours": 168})})
    removed = erase_user(keep_cdf, user)
    assert removed["tables"]["events"] == n_user > 0
    out = run_worker({"tree": tree(engines["spark_dir"], "spark"), "day": DAY,
                      "read": ["events", "items"]})
    assert out["engine"] == "spark"
    assert out["read"]["events"]["fingerprint"][0] == store.count("events")
    assert out["read"]["events"]["cdf"]["delete"] == n_user
    assert out["read"]["events"]["cdf_deleted_users"] == [user]
    assert out["read"]["items"]["cdf"]["update_postimage"] == 3
