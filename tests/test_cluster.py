"""The cluster path: ingest, clean and features of one interval submitted with spark-submit to a
standalone Spark cluster on loopback (a master and two one-core workers, started and stopped here)
with delta-spark, against the embedded default's local run of the same interval: the same rows in
every table. Skipped without Java or the Delta jars (``make jars``).
"""

from __future__ import annotations

import shutil
import socket
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.ops.jars import delta_jars
from freshrec.settings import load_settings
from freshrec.ops.submit import SubmitError, submit

pytestmark = pytest.mark.integration
no_java = pytest.mark.skipif(shutil.which("java") is None,
                             reason="no java on the PATH: Spark cannot start")
no_jars = pytest.mark.skipif(not delta_jars(),
                             reason="the Delta jars are not in .jars/: run `make jars` (needs Maven)")
TABLES = ["events_raw", "events", "events_dead_letter", "user_features", "item_features",
          "item_neighbors"]
JOBS = ["ingest", "clean", "features"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checksum(table: pa.Table, key: list[str]) -> tuple[int, int]:
    """(rows, hash of the rows in key order): the content, whatever order the files hold it in."""
    rows = table.sort_by([(k, "ascending") for k in key]).to_pylist()
    return len(rows), hash(repr(rows))


# the cluster profile refuses the development secrets: a real key (the same for the local run,
# so both sides hold the same pseudonyms) and an admin token
KEY = "a-real-key-of-32-characters-xyz0"
SECRETS = {"FRESHREC_HMAC_KEY": KEY, "FRESHREC_ADMIN_TOKEN": "a-real-admin-token"}


@no_jars
def test_an_unreachable_master_is_a_one_line_error_before_anything_runs(tmp_path):
    port = free_port()  # nothing listens there
    settings = load_settings("cluster", env={"SPARK_MASTER": f"spark://127.0.0.1:{port}",
                                             "FRESHREC_DATA_DIR": str(tmp_path), **SECRETS})
    with pytest.raises(SubmitError, match=rf"spark://127.0.0.1:{port} is not reachable: start .*"
                                          r"`make cluster-up`"):
        submit("ingest", ["--date", "2026-11-27"], settings)
    assert not (tmp_path / "tables").exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from freshrec.ops.cluster import Cluster, down, up

    c = Cluster(port=free_port(), webui_port=free_port(), workers=2, worker_cores=1,
                worker_memory="1g", home=tmp_path_factory.mktemp("cluster"))
    try:
        up(c)
        yield c
    finally:
        down(c)


@pytest.mark.slow
@no_java
@no_jars
def test_a_submitted_interval_on_the_cluster_equals_the_local_run(cluster, tmp_path):
    from conftest import DAY, small_settings
    from freshrec.data import importers
    from freshrec.ops.cluster import master_state
    from freshrec.interval import DataInterval
    from freshrec.data.synth import write_synth
    from spark_jobs import clean, features, ingest

    local_dir, cluster_dir = tmp_path / "local" / "data", tmp_path / "cluster" / "data"
    local = small_settings(local_dir, privacy={"hmac_key": KEY})
    end = datetime(2026, 11, 27, tzinfo=timezone.utc)
    synth = write_synth(local.synth, tmp_path / "raw", end=end)
    importers.import_events_file(local, synth.events_path, landed_at=end)
    importers.import_items_file(local, synth.items_path)
    shutil.copytree(local_dir, cluster_dir)

    # the cluster run: spark-submit, the cluster profile, delta-spark on the executors
    env = {"FRESHREC_DATA_DIR": str(cluster_dir), "SPARK_MASTER": cluster.url,
           "FRESHREC__SPARK__SHUFFLE_PARTITIONS": "2", "FRESHREC__SPARK__EXECUTOR_MEMORY": "768m",
           "FRESHREC__SPARK__DRIVER_MEMORY": "1g", "FRESHREC__FEATURES__NEIGHBORS_TOP_K": "10",
           "FRESHREC__SYNTH__N_EVENTS": str(local.synth.n_events),
           # this test machine has no encrypted volume (see freshrec/privacy/volume.py)
           "FRESHREC__PRIVACY__VOLUME_ENCRYPTED_ATTESTED": "true", **SECRETS}
    on_cluster = load_settings("cluster", env=env)
    assert on_cluster.spark.master == cluster.url and on_cluster.delta.backend == "spark"
    remote = {job: submit(job, ["--date", DAY, "--profile", "cluster"], on_cluster, env=env,
                          timeout=600) for job in JOBS}

    # the local run: the embedded default in this process (local Spark, delta-rs)
    interval = DataInterval.for_day(DAY)
    here = {"ingest": ingest.run(local, interval), "clean": clean.run(local, interval),
            "features": features.run(local, interval)}
    assert remote == here

    apps = [a["name"] for a in master_state(cluster).get("completedapps", [])]
    assert sorted(apps) == sorted(f"freshrec-{job}" for job in JOBS), apps
    a, b = DeltaStore(local), DeltaStore(on_cluster)
    for name in TABLES:
        key = list(a.spec(name).key)
        ca, cb = checksum(a.read_arrow(name), key), checksum(b.read_arrow(name), key)
        assert ca[0] > 0 and ca == cb, f"{name}: local {ca} != cluster {cb}"


CG_ON_THE_CLUSTER = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from freshrec.settings import load_settings
from freshrec.storage.spark import get_spark
from recmodels.spark_als import fit_als_indexed
from tests.test_spark_als_cg import _frame, _implicit_fit, _pairs
settings = load_settings("local", env={}, paths={"data_dir": sys.argv[3]},
                         spark={"master": sys.argv[1], "submit": False, "driver_memory": "1g",
                                "executor_memory": "768m", "app_name": "freshrec-als-cg"})
spark = get_spark(settings)
u, i, s = _pairs()
cfg = settings.als.model_copy(update={"rank": 8, "iterations": 4, "alpha": 2.0, "num_blocks": 2,
                                      "seed": 3})
uid, uf, iid, itf, _ = fit_als_indexed(_frame(spark, u, i, s), cfg)
ref_u, ref_i = _implicit_fit(u, i, s, cfg)
diff = max(np.abs(uf - ref_u[uid]).max(), np.abs(itf - ref_i[iid]).max())
print(json.dumps({"users": len(uid), "items": len(iid), "max_diff": float(diff)}))
spark.stop()
"""


@pytest.mark.slow
@no_java
def test_als_cg_runs_on_the_clusters_executors_and_gives_implicits_factors(cluster, tmp_path):
    """The cg solver's blocks, broadcasts and implicit's kernel on a standalone cluster's
    executors (their own Python workers), against implicit's fit in one process. Runs after the
    interval test, which counts the master's applications."""
    import json
    import subprocess
    import sys

    from freshrec.ops.cluster import master_state
    from freshrec.settings import PROJECT_ROOT

    r = subprocess.run([sys.executable, "-c", CG_ON_THE_CLUSTER, cluster.url, str(PROJECT_ROOT),
                        str(tmp_path / "data")], capture_output=True, text=True, timeout=600,
                       cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["users"], got["items"]) == (300, 120)
    assert got["max_diff"] < 2e-4, got
    apps = master_state(cluster).get("completedapps", [])
    assert "freshrec-als-cg" in [a["name"] for a in apps]  # it ran as the master's application
