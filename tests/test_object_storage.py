"""``paths.data_dir`` as ``s3://bucket/prefix`` against moto's S3 server on loopback, started here.

The batch jobs run with delta-spark on S3 (hadoop-aws's S3A, ``make jars``) and give the same tables
as a local delta-rs run; delta-rs (storage_options) and pyarrow (S3FileSystem) read them from the
bucket; what needs a local directory refuses a URI without ``paths.local_dir``, naming it.
Skipped without moto's server (``pip install "moto[server]"``), Java, or the jars.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.ops.jars import delta_jars, s3_jars
from freshrec.settings import SettingsError, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MOTO = Path(sys.executable).parent / "moto_server"
if not MOTO.exists():
    pytest.skip("moto's server is not installed: pip install 'moto[server]'",
                allow_module_level=True)

from conftest import DAY, SMALL  # noqa: E402

WORKER = Path(__file__).resolve().parent / "spark_worker.py"
TABLES = ["events_raw", "events", "events_dead_letter", "user_features", "item_features",
          "item_neighbors", "items"]
BUCKET = "freshrec-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    port = _free_port()
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
    opts = {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_ALLOW_HTTP": "true"}
    req = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
    urllib.request.urlopen(req, timeout=10).read()
    yield opts
    proc.terminate()
    proc.wait(timeout=30)


def s3_tree(opts: dict, local: Path, prefix: str, **more) -> dict:
    return {**SMALL, **more, "paths": {"data_dir": f"s3://{BUCKET}/{prefix}",
                                       "local_dir": str(local), "storage_options": opts}}


def s3_settings(opts: dict, local: Path, prefix: str, **more):
    return load_settings("local", env={}, **s3_tree(opts, local, prefix, **more))


def test_delta_rs_and_pyarrow_read_and_write_tables_in_the_bucket(s3, tmp_path):
    from freshrec.storage.objects import pyarrow_filesystem, pyarrow_path

    settings = s3_settings(s3, tmp_path / "local", "rs")
    assert settings.tables_uri == f"s3://{BUCKET}/rs/tables"
    store = DeltaStore(settings)
    items = pa.table({"item_id": ["i1", "i2", "i3"], "title": ["a", "b", "c"],
                      "active": [True, True, True]})
    spec = store.spec("items")
    full = pa.table({f.name: items.column(f.name) if f.name in items.column_names
                     else pa.nulls(3, f.type) for f in spec.schema})
    assert store.upsert_arrow("items", full) == {"inserted": 3, "updated": 0}
    again = full.set_column(1, "title", pa.array(["a", "B", "c"]))
    assert store.upsert_arrow("items", again) == {"inserted": 0, "updated": 1}
    assert sorted(store.read_arrow("items").column("title").to_pylist()) == ["B", "a", "c"]
    # nothing of it landed on the local disk
    assert not (tmp_path / "local" / "tables").exists()
    # pyarrow reaches the same objects: the table's live Parquet files hold its rows
    fs = pyarrow_filesystem(settings)
    files = store.table("items").file_uris()
    assert files and all(f.startswith(f"s3://{BUCKET}/rs/tables/items/") for f in files)
    rows = sum(pq.read_table(pyarrow_path(f), filesystem=fs).num_rows for f in files)
    assert rows == 3
    log = fs.get_file_info(pyarrow_path(store.path("items")) + "/_delta_log/00000000000000000000.json")
    assert log.size > 0


def test_batch_jobs_on_s3_with_delta_spark_match_a_local_run(s3, tmp_path):
    """ingest, clean, features with delta-spark writing through S3A, and the same jobs on a local
    directory with delta-rs: every table holds the same rows (read back with delta-rs)."""
    if shutil.which("java") is None or not delta_jars() or not s3_jars():
        pytest.skip("needs java, the Delta jars and hadoop-aws in .jars/: run `make jars`")
    from conftest import small_settings

    from freshrec.data import importers
    from freshrec.data.synth import write_synth

    local = small_settings(tmp_path / "local-run")
    remote = s3_settings(s3, tmp_path / "s3-local", "batch")
    end = datetime(2026, 11, 27, tzinfo=timezone.utc)
    synth = write_synth(local.synth, tmp_path / "raw", end=end)
    for settings in (local, remote):  # landing stays local; items go to the table (S3 for remote)
        importers.import_events_file(settings, synth.events_path, landed_at=end)
        importers.import_items_file(settings, synth.items_path)
    jobs = ["ingest", "clean", "features"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    outs = {}
    for name, tree in (("local", {**SMALL, "paths": {"data_dir": str(tmp_path / "local-run")},
                                  "delta": {"backend": "rs"}}),
                       ("s3", {**s3_tree(s3, tmp_path / "s3-local", "batch"),
                               "delta": {"backend": "spark"}})):
        proc = subprocess.run([sys.executable, str(WORKER),
                               json.dumps({"tree": tree, "day": DAY, "jobs": jobs})],
                              capture_output=True, text=True, timeout=900, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
        outs[name] = json.loads(lines[-1][len("RESULT "):])
    assert outs["s3"]["engine"] == "spark" and outs["local"]["engine"] == "rs"
    assert outs["s3"]["results"] == outs["local"]["results"]
    a_store, b_store = DeltaStore(local), DeltaStore(remote)
    for name in TABLES:
        a, b = a_store.read_arrow(name), b_store.read_arrow(name)
        if name == "items":  # imported twice, a moment apart
            a, b = a.drop_columns(["updated_at"]), b.drop_columns(["updated_at"])
        key = list(a_store.spec(name).key) or [a.schema.names[0]]
        order = [(k, "ascending") for k in key]
        assert a.num_rows == b.num_rows > 0, name
        assert a.sort_by(order).equals(b.sort_by(order)), f"{name}: the S3 run's rows differ"
    # delta-spark wrote these commits (delta-rs reads its log from the bucket)
    history = b_store.table("events").history(5)
    assert any("Apache-Spark" in str(h.get("engineInfo", "")) for h in history), history


def test_what_needs_a_local_directory_refuses_a_uri_without_local_dir(s3, tmp_path):
    from freshrec.data import importers
    from serving.wal import wal_root

    tree = s3_tree(s3, tmp_path, "refuse")
    tree["paths"] = {k: v for k, v in tree["paths"].items() if k != "local_dir"}
    settings = load_settings("local", env={}, **tree)
    for what in (lambda: settings.landing_dir, lambda: wal_root(settings),
                 lambda: settings.snapshots_dir):
        with pytest.raises(SettingsError, match=r"paths.local_dir \(FRESHREC__PATHS__LOCAL_DIR\)"):
            what()
    src = tmp_path / "events.csv"
    src.write_text("event_id,user_id,item_id,event_type,ts\ne1,u1,i1,view,2026-11-27T00:00:00Z\n")
    with pytest.raises(SettingsError, match="object-store URI s3://freshrec-test/refuse"):
        importers.import_events_file(settings, src)
    # the tables themselves are fine without it
    assert DeltaStore(settings).count("events") == 0


@pytest.mark.parametrize("uri, says", [
    ("gs://bucket/x", "the gs:// scheme is not supported"),
    ("s3a://bucket/x", "write the bucket as s3://bucket/x"),
    ("s3:///x", "names no bucket"),
])
def test_an_unsupported_uri_is_refused_at_load_naming_the_setting(uri, says):
    with pytest.raises(SettingsError, match="paths.data_dir") as e:
        load_settings("local", env={}, paths={"data_dir": uri})
    assert says in str(e.value)


def test_an_unreachable_object_store_is_a_one_line_error(s3, tmp_path):
    from freshrec.storage.objects import StorageUnreachable

    opts = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}
    store = DeltaStore(s3_settings(opts, tmp_path, "down"))
    with pytest.raises(StorageUnreachable) as e:
        store.count("events")
    msg = str(e.value)
    assert "\n" not in msg and "s3://freshrec-test/down/tables/events" in msg
    assert "AWS_ENDPOINT_URL" in msg and "paths.storage_options" in msg


def test_spark_submit_gets_s3a_and_keeps_the_credentials_off_the_command_line(s3, tmp_path):
    if not delta_jars() or not s3_jars():
        pytest.skip("needs the Delta jars and hadoop-aws in .jars/: run `make jars`")
    from freshrec.ops.submit import command

    settings = load_settings("local", env={}, **{**s3_tree(s3, tmp_path, "submit"),
                                                 "spark": {"submit": True}})
    cmd = command("clean", ["--start", "x"], settings)
    line = " ".join(cmd)
    assert "spark.hadoop.fs.s3.impl=org.apache.hadoop.fs.s3a.S3AFileSystem" in line
    assert f"spark.hadoop.fs.s3a.endpoint={s3['AWS_ENDPOINT_URL']}" in line
    assert "hadoop-aws-" in cmd[cmd.index("--jars") + 1]
    assert "secret.key" not in line and "access.key" not in line
    props = Path(cmd[cmd.index("--properties-file") + 1])
    assert props.stat().st_mode & 0o777 == 0o600
    assert "spark.hadoop.fs.s3a.secret.key test" in props.read_text().splitlines()
