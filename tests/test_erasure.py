"""Erasure that erases, start-up on an older snapshot, files at rest.

The first tests build a small data directory by hand (real Delta tables with the Change Data Feed,
real landing and log files, real snapshots with a factor model, real gRPC servers on loopback):
no Spark. The end-to-end test runs on a copy of the batch lane's data (``make run``'s layout:
MLflow runs and artifacts, snapshots, Delta tables), with two replicas and the refresher."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.storage.tables import EVENTS, EVENTS_RAW, IMPRESSIONS, USER_FEATURES
from freshrec.api.client import Client
from tests.conftest import small_settings

ROOT = Path(__file__).resolve().parent.parent
CLIENT, ADMIN = "dev-client-token", "dev-admin-token"
N_ITEMS, DIM, N_USERS = 60, 8, 12
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def _umask():
    before = os.umask(0o022)  # what a server or CLI run in this process changes is put back
    os.umask(before)
    yield
    os.umask(before)


# ---- scanning a data directory for a user ----------------------------------------------------
def _texts(path: Path) -> str | None:
    """What a file holds, as text a needle can be searched in: Parquet values, .npz string
    arrays, SQLite rows; None for other files (searched as bytes)."""
    data = path.read_bytes()
    if data[:4] == b"PAR1":
        return json.dumps(pq.read_table(path).to_pylist(), default=str)
    if path.suffix == ".npz" and data[:2] == b"PK":
        with np.load(path, allow_pickle=False) as z:
            return " ".join(" ".join(z[k].astype(str).ravel().tolist()) for k in z.files
                            if z[k].dtype.kind in "US")
    if path.suffix == ".jsonl" and b"\np1:" in b"\n" + data:  # record lines (impression log)
        from freshrec.storage.segments import line_text

        return "\n".join(line_text(line).decode("utf-8", "replace")
                         for line in data.split(b"\n"))
    if data[:16] == b"SQLite format 3\x00":
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return "\n".join(con.iterdump())
        finally:
            con.close()
    return None


def occurrences(root: Path, pseudonym: str, raw: str | None = None,
                skip: tuple[str, ...] = ("privacy/erasures.jsonl",)) -> list[str]:
    """Every file under ``root`` that holds ``pseudonym`` (anywhere) or ``raw`` (as a whole
    value), but the erasure log."""
    exact = re.compile(rf"(?<![\w]){re.escape(raw)}(?![\w])") if raw else None
    hits = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or str(p.relative_to(root)) in skip:
            continue
        text = _texts(p)
        blob = text if text is not None else p.read_bytes().decode("utf-8", "replace")
        if pseudonym in blob or (exact is not None and exact.search(blob)):
            hits.append(str(p.relative_to(root)))
    return hits


def readable_versions(path: str) -> dict[int, pa.Table]:
    """Every version of a Delta table that can still be read, with its rows."""
    from deltalake import DeltaTable

    out = {}
    for v in range(DeltaTable(path).version() + 1):
        try:
            out[v] = DeltaTable(path, version=v).to_pyarrow_table()
        except Exception:  # noqa: BLE001 - the log entries or files of v are gone
            continue
    return out


# ---- a hand-made data directory --------------------------------------------------------------
def make_snapshot(settings, name: str, seed: int = 0, users: list[str] | None = None) -> Path:
    """A complete snapshot of a factor model (user factors in the model artifact, user vectors
    and histories in users.npz), published as LATEST."""
    import faiss

    from freshrec.contracts.snapshot import Manifest, publish
    from recmodels import servable
    from recmodels.index import ItemIndex

    rng = np.random.default_rng(seed)
    root = settings.snapshots_dir
    d = root / name
    (d / "model").mkdir(parents=True)
    items = [f"i{i}" for i in range(N_ITEMS)]
    vecs = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    users = users or []
    ufac = rng.normal(size=(len(users), DIM)).astype(np.float32)
    servable.write(d / "model", "als", "embedding", {},
                   {"type": "factors", "user_side": "als", "reg": 0.1},
                   {"item_ids": np.asarray(items), "user_ids": np.asarray(users, dtype=str),
                    "user_factors": ufac, "item_factors": vecs})
    faiss.write_index(ItemIndex.build([str(i) for i in range(N_ITEMS)], vecs, "flat").index,
                      str(d / "index.faiss"))
    per = 4
    indptr = np.arange(0, len(users) * per + 1, per, dtype=np.int64)
    hist = rng.integers(0, N_ITEMS, len(users) * per).astype(np.int64)
    np.savez(d / "users.npz", user_ids=np.asarray(users, dtype=str), indptr=indptr, items=hist,
             weights=np.ones(len(hist), np.float32), recent_indptr=indptr.copy(),
             recent=hist.copy(), user_vectors=ufac)
    (d / "item_ids.json").write_text(json.dumps(items))
    (d / "items.json").write_text(json.dumps({"inactive": [], "categories": {},
                                              "popular": items, "newest_event_ts": None}))
    Manifest(model_version=f"freshrec-retrieval/1 als {name}", index_type="flat",
             metric="inner_product", dim=DIM, n_items=N_ITEMS, registry_version=1,
             model_name="als", kind="embedding", delta_versions={"events": 0}).write(d)
    publish(root, name)
    return d


def _events(users: list[str], n: int, start: int = 0, ts: datetime = T0) -> pa.Table:
    rows = [{"event_id": f"e{u}-{k}", "user_id": u, "item_id": f"i{(k + start) % N_ITEMS}",
             "event_type": "view", "value": None, "weight": 1.0,
             "ts": ts + timedelta(minutes=k), "context": None, "raw_id": f"f:{u}:{k}",
             "batch_date": "2026-11-01"} for u in users for k in range(start, start + n)]
    return pa.Table.from_pylist(rows, schema=EVENTS.schema)


def _raw(table: pa.Table) -> pa.Table:
    return pa.table({"event_id": table["event_id"], "user_id": table["user_id"],
                     "item_id": table["item_id"], "event_type": table["event_type"],
                     "value": pa.nulls(table.num_rows, pa.string()),
                     "ts": pc.cast(table["ts"], pa.string()),
                     "context": pa.nulls(table.num_rows, pa.string()), "raw_id": table["raw_id"],
                     "source_file": pa.array(["synth"] * table.num_rows),
                     "batch_date": table["batch_date"],
                     "ingested_at": pa.array([T0] * table.num_rows, EVENTS_RAW.schema
                                             .field("ingested_at").type)})


def populate(settings, users: list[str]) -> DeltaStore:
    """Several commits per table (the user in every one), a landing file, raw input."""
    from freshrec.data.importers import land_events

    store = DeltaStore(settings)
    for part in range(3):
        ev = _events(users, 3, start=3 * part)
        store.write_arrow("events", ev)
        store.write_arrow("events_raw", _raw(ev))
    store.write_arrow("user_features", pa.Table.from_pylist(
        [{"user_id": u, "n_events": 9, "n_items": 9, "first_ts": T0, "last_ts": T0,
          "recency_days": 1.0, "category_affinities": [], "as_of": T0} for u in users],
        schema=USER_FEATURES.schema))
    store.write_arrow("impressions", pa.Table.from_pylist(
        [{"request_id": f"r{u}", "user_id": u, "model_version": "m", "arm": None,
          "items": ["i1"], "positions": [0], "scores": [1.0], "propensities": [1.0], "ts": T0,
          "server": "s", "source_file": "x", "served_date": "2026-11-01", "candidates": None,
          "candidate_scores": None} for u in users], schema=IMPRESSIONS.schema))
    store.write_arrow("impressions_dead_letter", pa.table({
        "raw": [json.dumps({"user_id": users[0], "items": 3})], "reason": ["bad_items"],
        "source_file": ["x"], "served_date": ["2026-11-01"]}))
    land_events(settings, pa.table({
        "event_id": [f"land-{u}" for u in users], "user_id": users,
        "item_id": ["i1"] * len(users), "event_type": ["view"] * len(users),
        "value": pa.nulls(len(users), pa.string()), "ts": [T0.isoformat()] * len(users),
        "context": pa.nulls(len(users), pa.string())}), "test", "landtest", pseudonymized=True)
    return store


def start_server(settings, load: bool = True):
    from serving.server import FreshrecServer

    server = FreshrecServer(settings, use_gpu=False)
    port = server.start(load=load)
    return server, f"127.0.0.1:{port}"


def _settings(tmp_path: Path, **more):
    serving = {"port": 0, "metrics_port": -1, "wal_flush_seconds": 3600,
               **more.pop("serving", {})}
    return small_settings(tmp_path / "data", serving=serving, **more)


# ---- erasure on a hand-made data directory ---------------------------------------------------
def test_erasure_removes_the_users_dead_lettered_record_lines(tmp_path):
    """The impression log's record lines (``p1:`` + base64) that the round dead-letters (a
    repeated request id, a record of the wrong shape) are stored so that erasing their user finds
    them: after the erasure no dead-letter row holds the user, another user's row stays."""
    import binascii
    import pickle

    from freshrec.privacy.erasure import erase_user
    from freshrec.storage.segments import RECORD_PREFIX
    from nearline.impressions import take_impressions
    from serving.impressions import ImpressionLog

    settings = _settings(tmp_path)
    gone, kept = "user-erase-7f3a", "user-keep-19c2"
    log = ImpressionLog(settings)
    try:
        log.record("s1", gone, "m/1", None, ["a"], [0.9], [1.0])
        log.record("s1", gone, "m/1", None, ["b"], [0.8], [1.0])  # repeated request id
        log.record("s2", kept, "m/1", None, ["c"], [0.7], [1.0])
        log.record("s2", kept, "m/1", None, ["c"], [0.7], [1.0])
        log.flush()
        log.writer.append(RECORD_PREFIX + binascii.b2a_base64(pickle.dumps(("s9", gone))))
    finally:
        log.close()
    assert take_impressions(settings)["dead_letter"] == 3
    store = DeltaStore(settings)
    before = store.read_arrow("impressions_dead_letter").column("raw").to_pylist()
    assert sum(gone in r for r in before) == 2
    report = erase_user(settings, gone)
    assert report["tables"]["impressions_dead_letter"] == 2
    after = store.read_arrow("impressions_dead_letter").column("raw").to_pylist()
    assert not any(gone in r for r in after)
    assert len(after) == 1 and kept in after[0]


def test_artifact_scrubbing_reports_unreachable_and_failing_runs_and_scrubs_the_others(tmp_path):
    """Through MLflow's artifact API (here on a SQLite store): a run whose artifact location this
    machine does not have and one whose artifact store fails are reported under what could not
    be scrubbed, with their reason; a run after them is still scrubbed."""
    from mlflow.tracking import MlflowClient

    from freshrec.privacy.erasure import scrub_remote_artifacts
    from freshrec.tracking import mlflow_for

    settings = _settings(tmp_path)
    needle = "user-art-5e1d"
    mlflow = mlflow_for(settings)
    client = MlflowClient()
    gone = client.create_experiment("elsewhere", artifact_location=(
        tmp_path / "other-machine" / "srv" / "mlflow" / "root").as_uri())
    broken = client.create_experiment("broken", artifact_location="ftp://127.0.0.1:1/mlflow")
    unreachable = client.create_run(gone).info
    failing = client.create_run(broken).info
    note = tmp_path / "users.txt"
    note.write_text(f"top users: {needle}, user-other\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(note))
    rewritten, _, stuck = scrub_remote_artifacts(settings, needle, "2026-11-28T00:00:00+00:00")
    assert rewritten == 1
    text = Path(client.download_artifacts(run.info.run_id, "users.txt", str(tmp_path))).read_text()
    assert needle not in text and "user-other" in text
    assert len(stuck) == 2, stuck
    (where_gone,) = [s for s in stuck if unreachable.run_id in s]
    assert where_gone.startswith(unreachable.artifact_uri) and "does not have" in where_gone
    (where_broken,) = [s for s in stuck if failing.run_id in s]
    assert where_broken.startswith("ftp://") and "could not be scrubbed" in where_broken


def test_an_erasure_with_the_tracking_server_down_still_erases_and_reports(tmp_path,
                                                                          monkeypatch):
    """The tables' rows go first; a tracking server that does not answer then leaves its
    artifacts under what could not be scrubbed, and the erasure's report is written."""
    from freshrec.privacy.erasure import erase_user, privacy_dir

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = _settings(tmp_path, mlflow={"tracking_uri": "http://127.0.0.1:1"})
    store = populate(settings, ["user-a", "user-b"])
    report = erase_user(settings, "user-a")
    assert report["tables"]["events"] == 9
    assert [r for r in store.read_arrow("events").column("user_id").to_pylist()
            if r == "user-a"] == []
    (why,) = report["unscrubbed"]
    assert why.startswith("http://127.0.0.1:1 ") and "tracking server failed" in why
    lines = (privacy_dir(settings) / "erasure-reports.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["unscrubbed"] == 1


def test_erase_leaves_no_copy_in_any_version_change_data_landing_log_or_snapshot(tmp_path):
    from freshrec.privacy.erasure import erase_user, read_log
    from freshrec.privacy.pseudonyms import pseudonymizer

    settings = _settings(tmp_path)
    p = pseudonymizer(settings)
    raw = "alice"
    user, other = p(raw), p("bob")
    store = populate(settings, [user, other])
    make_snapshot(settings, "snap", users=[user, other])
    # the user's events still in a server's write-ahead log and impression log (not landed)
    server, addr = start_server(settings)
    client = Client(addr, CLIENT)
    try:
        client.record([{"user_id": raw, "item_id": "i3", "event_type": "view"}])
        assert client.recommend(raw, 5).items
        server.impressions.flush()
        # raw input as `freshrec data synth` leaves it
        (settings.data_dir / "raw" / "synth").mkdir(parents=True)
        pq.write_table(pa.table({"user_id": [raw, "bob"], "item_id": ["i1", "i2"]}),
                       settings.data_dir / "raw" / "synth" / "events.parquet")
        before = readable_versions(store.path("events"))
        assert all(user in t.column("user_id").to_pylist() for v, t in before.items() if v)
        assert occurrences(settings.data_dir, user, raw)  # it is everywhere now

        admin = Client(addr, ADMIN)
        reply = admin.call_admin("DeleteUser", admin.admin_pb2.DeleteUserRequest(user_id=raw))
        assert reply.vector_removed and reply.rows_deleted >= 9 + 9 + 1 + 1 + 1
        assert not server.state.knows(user) and not server.recent_events(user)
    finally:
        server.stop(grace=0)

    for name in ("events", "events_raw", "user_features", "impressions"):
        versions = readable_versions(store.path(name))
        assert versions, name
        for v, t in versions.items():  # no readable version holds the user; others stay
            assert user not in t.column("user_id").to_pylist(), (name, v)
        assert other in store.read_arrow(name).column("user_id").to_pylist()
    assert not list(Path(store.path("events"), "_change_data").glob("*.parquet"))
    assert occurrences(settings.data_dir, user, raw) == []
    assert [u for u, _ in read_log(settings).entries] == [user]
    line = json.loads((settings.data_dir / "privacy" / "erasures.jsonl").read_text())
    assert set(line) == {"user_id", "erased_at"}
    # idempotent: erasing again finds nothing and fails nothing
    again = erase_user(settings, user, raw)
    assert sum(again["tables"].values()) == 0 and again["landing_rows"] == again["log_lines"] \
        == again["snapshot_files"] == 0
    # a restart serves the rewritten snapshot: the user is unknown, the other user is not (a
    # request after the erasure is new data: it is logged again)
    server, addr = start_server(settings)
    try:
        assert user not in server.state.user_vectors and other in server.state.user_vectors
        assert Client(addr, CLIENT).recommend(raw, 5).cold_start
        assert not Client(addr, CLIENT).recommend("bob", 5).cold_start
    finally:
        server.stop(grace=0)


def test_a_batch_that_read_before_the_erasure_and_commits_after_cannot_bring_rows_back(tmp_path):
    """Both interleavings, for real: (1) the batch reads, the erasure runs, the batch commits
    (its write leaves the rows out); (2) the batch holds the writer lock across its commit while
    the erasure waits for it, then deletes what it committed."""
    from freshrec.privacy.erasure import erase_user, guarded

    settings = _settings(tmp_path)
    store = DeltaStore(settings)
    users = ["p_a", "p_b", "p_c"]
    store.write_arrow("events", _events(users, 4))
    # (1) read -> erase -> commit (a replace of the batch's rows, as clean does)
    snapshot = store.read_arrow("events")
    erase_user(settings, "p_a")
    store.write_if_changed("events", snapshot, "batch_date = '2026-11-01'",
                           pc.field("batch_date") == "2026-11-01")
    left = store.read_arrow("events").column("user_id").to_pylist()
    assert "p_a" not in left and left.count("p_b") == 4
    # the user comes back later with new events: those are kept
    store.write_arrow("events", _events(["p_a"], 2, start=10, ts=datetime.now(timezone.utc)
                                        + timedelta(seconds=5)))
    assert store.read_arrow("events").column("user_id").to_pylist().count("p_a") == 2
    # (2) the batch is mid-commit (holds the lock, read the log before) when the erasure starts
    done = threading.Event()
    with guarded(settings) as erased:
        assert "p_b" not in erased.by_user
        eraser = threading.Thread(target=lambda: (erase_user(settings, "p_b"), done.set()))
        eraser.start()
        time.sleep(0.5)
        assert not done.is_set()  # the erasure waits for the commit
        from deltalake import write_deltalake

        write_deltalake(store.path("events"), _events(["p_b"], 2, start=20), mode="append")
    eraser.join(60)
    assert done.is_set()
    assert "p_b" not in store.read_arrow("events").column("user_id").to_pylist()
    for t in readable_versions(store.path("events")).values():
        assert "p_b" not in t.column("user_id").to_pylist()


def test_two_concurrent_cli_erasures_of_one_user_both_succeed(tmp_path):
    """`freshrec erase --user U` twice at once: both succeed, the data is gone, and the running
    replica named was told to forget the user."""
    settings = _settings(tmp_path)
    from freshrec.privacy.pseudonyms import pseudonymizer

    user = pseudonymizer(settings)("carol")
    store = populate(settings, [user, "p_other"])
    make_snapshot(settings, "snap", users=[user, "p_other"])
    server, addr = start_server(settings)
    try:
        assert server.state.knows(user)
        env = {**os.environ, "FRESHREC_DATA_DIR": str(settings.data_dir),
               "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, "-m", "freshrec.cli.main", "erase", "--user",
                                   "carol", "--replica", addr], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
        assert sum("erased the user" in o[0] for o in outs) == 2
        assert sum(f"replica {addr}: forgot the user" in o[0] for o in outs) == 2
        assert not server.state.knows(user) and server.state.knows("p_other")
    finally:
        server.stop(grace=0)
    for name in ("events", "events_raw", "impressions"):
        assert user not in store.read_arrow(name).column("user_id").to_pylist()
    assert occurrences(settings.data_dir, user) == []


def test_the_refresher_pushes_an_erasure_to_every_replica(tmp_path):
    """Replica A takes the DeleteUser; replica B drops the user at the next round, although the
    VACUUM took the Change Data Feed away (a full refresh does not see the delete)."""
    from freshrec.privacy.pseudonyms import pseudonymizer
    from nearline import refresher

    settings = _settings(tmp_path)
    p = pseudonymizer(settings)
    user = p("dave")
    populate(settings, [user, p("erin")])
    make_snapshot(settings, "snap", users=[user, p("erin")])
    a, a_addr = start_server(settings)
    b, b_addr = start_server(settings)
    try:
        assert not Client(b_addr, CLIENT).recommend("dave", 5).cold_start
        admin = Client(a_addr, ADMIN)
        admin.call_admin("DeleteUser", admin.admin_pb2.DeleteUserRequest(user_id="dave"))
        assert Client(a_addr, CLIENT).recommend("dave", 5).cold_start
        assert not Client(b_addr, CLIENT).recommend("dave", 5).cold_start  # not yet
        rs = settings.model_copy(update={"refresher": settings.refresher.model_copy(
            update={"replicas": [a_addr, b_addr]})})
        report = refresher.refresh_once(rs)
        assert report["erased_users"] == 1
        assert Client(b_addr, CLIENT).recommend("dave", 5).cold_start
        assert not Client(b_addr, CLIENT).recommend("erin", 5).cold_start
        st = Client(b_addr, ADMIN)
        assert st.call_admin("Status", st.admin_pb2.StatusRequest()).delta_versions["erasures"] == 1
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


# ---- start-up on an older snapshot -----------------------------------------------------------
def test_start_up_skips_a_snapshot_with_an_empty_index_for_the_previous_one(tmp_path, caplog):
    settings = _settings(tmp_path)
    old = make_snapshot(settings, "old", seed=1, users=["p_x"])
    os.utime(old, (time.time() - 60, time.time() - 60))
    new = make_snapshot(settings, "new", seed=2, users=["p_x"])
    (new / "index.faiss").write_bytes(b"")  # a crash mid-copy, a full disk
    with caplog.at_level("WARNING"):
        server, addr = start_server(settings)
    try:
        assert server.state is not None and server.state.path == old
        assert server.state.model_version.endswith(" old")
        assert server.metrics.snapshots_skipped._value.get() == 1
        assert any("fell back to an older snapshot" in r.message and "new" in r.message
                   for r in caplog.records)
        assert Client(addr, CLIENT).recommend("anyone", 3).items
    finally:
        server.stop(grace=0)


def test_start_up_with_no_usable_snapshot_says_why_and_stays_not_serving(tmp_path, caplog):
    settings = _settings(tmp_path)
    only = make_snapshot(settings, "only")
    (only / "users.npz").write_bytes(b"not a zip")
    with caplog.at_level("WARNING"):
        server, addr = start_server(settings)
    try:
        assert server.state is None
        assert any("no usable snapshot" in r.getMessage() and "only" in r.getMessage()
                   for r in caplog.records)
    finally:
        server.stop(grace=0)


def test_start_up_survives_torn_and_damaged_log_lines(tmp_path):
    from serving.wal import wal_root

    settings = _settings(tmp_path)
    make_snapshot(settings, "snap")
    good = json.dumps({"event_id": "e1", "user_id": "p_z", "item_id": "i1", "event_type": "view",
                       "value": None, "ts": T0.isoformat(), "context": None})
    crashed = wal_root(settings) / "host-1-1"  # a server killed mid-append
    crashed.mkdir(parents=True)
    (crashed / "open.jsonl").write_text(good + "\n{\"event_id\": \"e2\", \"tor")
    damaged = wal_root(settings) / "host-2-2"  # a segment damaged on disk
    damaged.mkdir(parents=True)
    bad = damaged / "sealed-00000000000000000001.jsonl"
    bad.write_text(good.replace("e1", "e3") + "\n{\"user_id\": \"p_\n")
    server, addr = start_server(settings)
    try:
        assert Client(addr, CLIENT).recommend("u", 3).items  # serving
    finally:
        server.stop(grace=0)
    landed = pa.concat_tables([pq.read_table(f) for f in
                               settings.landing_dir.glob("events/*/*.parquet")])
    # the torn last line (never acknowledged) left out; the damaged line dead-lettered with its
    # reason and text, the rest of its segment landed
    assert sorted(landed.column("event_id").to_pylist()) == ["e1", "e3"]
    assert not bad.exists()
    dead = DeltaStore(settings).read_arrow("events_dead_letter").to_pylist()
    assert [(d["reason"].split(":")[0], d["context"]) for d in dead] == \
        [("wal_not_json", '{"user_id": "p_')]


def test_load_snapshot_with_an_unusable_path_is_invalid_argument(tmp_path):
    settings = _settings(tmp_path)
    make_snapshot(settings, "snap")
    (settings.snapshots_dir / "loop-a").symlink_to(settings.snapshots_dir / "loop-b")
    (settings.snapshots_dir / "loop-b").symlink_to(settings.snapshots_dir / "loop-a")
    server, addr = start_server(settings)
    admin = Client(addr, ADMIN)
    try:
        for path in ("loop-a", "x" * 300 + "/snap", "snap/" + "y" * 300):
            with pytest.raises(grpc.RpcError) as e:
                admin.call_admin("LoadSnapshot", admin.admin_pb2.LoadSnapshotRequest(path=path))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert "not a usable path" in e.value.details() or "no snapshot" in \
                e.value.details(), e.value.details()
    finally:
        server.stop(grace=0)


# ---- at rest ---------------------------------------------------------------------------------
def test_files_freshrec_writes_are_the_owners_only(tmp_path):
    settings = _settings(tmp_path)
    make_snapshot(settings, "snap", users=["p_q"])
    server, addr = start_server(settings)
    try:
        Client(addr, CLIENT).record([{"user_id": "u1", "item_id": "i2",
                                             "event_type": "view"}])
        Client(addr, CLIENT).recommend("u1", 3)
        server.wal.land()
        server.impressions.flush()
        admin = Client(addr, ADMIN)
        admin.call_admin("DeleteUser", admin.admin_pb2.DeleteUserRequest(user_id="u9"))
    finally:
        server.stop(grace=0)
    created = [p for p in settings.data_dir.rglob("*")
               if p.stat().st_mtime >= server.started_at - 1 and not p.is_symlink()
               and "snapshots" not in p.parts]
    assert len(created) > 10
    open_to_others = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in created
                      if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)]
    assert open_to_others == []


def test_encrypted_logs_and_snapshot_users_hold_no_plaintext_and_still_serve(tmp_path):
    from freshrec.storage.crypto import DecryptError, load_npz, save_npz
    from freshrec.privacy.erasure import erase_user
    from freshrec.privacy.pseudonyms import pseudonymizer

    key = "ab" * 32
    settings = _settings(tmp_path, privacy={"encrypt_at_rest": True, "data_key": key})
    user = pseudonymizer(settings)("frank")
    snap = make_snapshot(settings, "snap", users=[user, "p_other"])
    from freshrec.storage.crypto import cipher_for

    save_npz(snap / "users.npz", dict(np.load(snap / "users.npz")), cipher_for(settings))
    assert user.encode() not in (snap / "users.npz").read_bytes()
    server, addr = start_server(settings)
    try:
        assert user in server.state.user_vectors  # read through the key
        Client(addr, CLIENT).record([{"user_id": "frank", "item_id": "i7",
                                             "event_type": "click"}])
        assert not Client(addr, CLIENT).recommend("frank", 3).cold_start
        server.impressions.flush()
        logs = [f for d in ("wal", "impressions") for f in (settings.data_dir / d).rglob("*.jsonl")]
        assert logs
        for f in logs:
            data = f.read_bytes()
            # every line sealed; the plaintext would carry the id in quotes, which base64 never
            # has (a bare b"i7" turns up by chance in about one sealed line in twenty)
            assert all(line.startswith(b"enc1:") for line in data.splitlines() if line)
            assert user.encode() not in data and b'"i7"' not in data
        server.wal.land()  # the lander opens the sealed lines
        from freshrec.storage.crypto import is_sealed, read_parquet

        files = list(settings.landing_dir.glob("events/*/*.parquet"))
        assert files and all(is_sealed(f) and user.encode() not in f.read_bytes() for f in files)
        landed = pa.concat_tables([read_parquet(f, cipher_for(settings)) for f in files])
        assert landed.column("item_id").to_pylist() == ["i7"]
        report = erase_user(settings, user)  # erasure rewrites the sealed users.npz too
        assert report["snapshot_files"] >= 1
        assert user not in load_npz(snap / "users.npz", cipher_for(settings))["user_ids"]
    finally:
        server.stop(grace=0)
    wrong = _settings(tmp_path, privacy={"encrypt_at_rest": True, "data_key": "cd" * 32})
    with pytest.raises(DecryptError, match="sealed with data key"):
        load_npz(snap / "users.npz", cipher_for(wrong))


# ---- end to end on the batch lane's data -----------------------------------------------------
def relocate_mlflow(data: Path, old: Path) -> None:
    """A copied data directory's tracking store names the copy's artifacts (not the original's)."""
    con = sqlite3.connect(data / "mlflow" / "mlflow.db")
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            for _, col, typ, *_ in con.execute(f'PRAGMA table_info("{t}")').fetchall():
                if "CHAR" in typ.upper() or "TEXT" in typ.upper():
                    con.execute(f'UPDATE "{t}" SET "{col}" = REPLACE("{col}", ?, ?) '
                                f'WHERE "{col}" LIKE ?', (str(old), str(data), f"%{old}%"))
        con.commit()
    finally:
        con.close()


@pytest.mark.integration
def test_erasure_end_to_end_on_the_batch_lanes_data(lane, tmp_path):
    """A copy of the batch lane's data (MLflow runs with user factors, snapshots, every table),
    two replicas, the refresher: after DeleteUser and one round the user is in no file of the
    data directory (Parquet values, npz arrays, JSON, text, the tracking DB), in no readable
    Delta version and in neither replica's answers; the runs whose artifacts were rewritten say
    so."""
    import shutil

    from mlflow.tracking import MlflowClient

    from freshrec.privacy.pseudonyms import pseudonymize
    from nearline import refresher
    from tests.conftest import register_fit

    data = tmp_path / "data"
    shutil.copytree(lane["settings"].data_dir, data)
    relocate_mlflow(data, lane["settings"].data_dir)
    shutil.copytree(lane["raw_dir"], data / "raw" / "synth")  # where `freshrec data synth` puts it
    version = register_fit(small_settings(data), "als")
    settings = small_settings(data, serving={"port": 0, "metrics_port": -1,
                                             "wal_flush_seconds": 3600, "model": str(version)})
    store = DeltaStore(settings)
    counts = pc.value_counts(store.read_arrow("events", columns=["user_id"])
                             .column("user_id")).to_pylist()
    busiest = max(counts, key=lambda c: c["counts"])["values"]
    raw = next(f"u{n}" for n in range(5000)
               if pseudonymize(f"u{n}", settings.privacy.hmac_key) == busiest)
    user = busiest
    a, a_addr = start_server(settings)
    b, b_addr = start_server(settings)
    try:
        assert not Client(a_addr, CLIENT).recommend(raw, 10).cold_start
        assert not Client(b_addr, CLIENT).recommend(raw, 10).cold_start
        Client(b_addr, CLIENT).record([{"user_id": raw, "item_id": "i1", "event_type": "view"}])
        held = occurrences(data, user, raw)
        assert any(h.startswith("mlflow/artifacts") and h.endswith(".npz") for h in held), held
        assert any(h.startswith("snapshots") for h in held) and \
            any(h.startswith("raw/") for h in held) and any(h.startswith("tables/events/")
                                                            for h in held)
        admin = Client(a_addr, ADMIN)
        reply = admin.call_admin("DeleteUser", admin.admin_pb2.DeleteUserRequest(user_id=raw))
        assert reply.vector_removed and reply.rows_deleted > 0
        rs = settings.model_copy(update={"refresher": settings.refresher.model_copy(
            update={"replicas": [a_addr, b_addr]})})
        assert refresher.refresh_once(rs)["erased_users"] >= 1
        assert not a.state.knows(user) and not b.state.knows(user)
        assert not b.recent_events(user)
        left = occurrences(data, user, raw)
    finally:
        a.stop(grace=0)
        b.stop(grace=0)
    assert left == []
    from freshrec.privacy.erasure import user_tables

    for name in user_tables():
        if name == "impressions_dead_letter" or not store.exists(name):
            continue
        for v, t in readable_versions(store.path(name)).items():
            assert user not in t.column("user_id").to_pylist(), (name, v)
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    tagged = [r.info.run_id for r in client.search_runs(exps) if "freshrec.privacy.erasure" in r.data.tags]
    tagged += [m.model_id for m in client.search_logged_models(exps)
               if "freshrec.privacy.erasure" in (m.tags or {})]
    assert tagged
    c, c_addr = start_server(settings)  # a restart: the user stays gone
    try:
        assert not c.state.knows(user)
        assert Client(c_addr, CLIENT).recommend(raw, 10).cold_start
    finally:
        c.stop(grace=0)


def test_serve_smoke_uses_the_client_token_from_the_environment(tmp_path):
    """`freshrec serve --smoke` asks with FRESHREC_TOKEN (a wrong one is refused), not a token
    written into the code."""
    settings = _settings(tmp_path)
    make_snapshot(settings, "snap")
    env = {**os.environ, "FRESHREC_DATA_DIR": str(settings.data_dir), "PYTHONPATH": str(ROOT),
           "FRESHREC__SERVING__METRICS_PORT": "-1", "FRESHREC__SERVING__JSON_LOGS": "false"}
    cmd = [sys.executable, "-m", "freshrec.cli.main", "serve", "--port", "0", "--smoke", "u1"]
    wrong = subprocess.run(cmd, env={**env, "FRESHREC_TOKEN": "not-a-token"}, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "UNAUTHENTICATED" in wrong.stderr
    right = subprocess.run(cmd, env={**env, "FRESHREC_TOKEN": CLIENT}, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert right.returncode == 0, right.stderr[-2000:]
    assert "answered in" in right.stdout


@pytest.mark.integration
def test_the_delta_spark_writers_filter_matches_the_arrow_one(spark, tmp_path):
    """drop_erased_spark (the delta-spark write path) keeps and drops the same rows as
    drop_erased: an erased user's rows at or before the erasure go, later ones and other users
    stay, a text ts is read as a time."""
    from freshrec.privacy.erasure import Erasures, drop_erased, drop_erased_spark

    when = datetime(2026, 11, 10, tzinfo=timezone.utc)
    erased = Erasures([("p_a", when.timestamp())])
    rows = pa.table({"user_id": ["p_a", "p_a", "p_b", "p_a"],
                     "ts": pa.array([when - timedelta(days=1), when + timedelta(hours=1),
                                     when - timedelta(days=1), when], pa.timestamp("us", "UTC")),
                     "n": [1, 2, 3, 4]})
    want = drop_erased("events", rows, erased).column("n").to_pylist()
    assert want == [2, 3]
    got = drop_erased_spark("events", spark.createDataFrame(rows.to_pandas()), erased)
    assert sorted(r["n"] for r in got.collect()) == want
    text = rows.set_column(1, "ts", pc.strftime(rows.column("ts"), "%Y-%m-%dT%H:%M:%S+00:00"))
    assert drop_erased("events_raw", text, erased).column("n").to_pylist() == want
    got = drop_erased_spark("events_raw", spark.createDataFrame(text.to_pandas()), erased)
    assert sorted(r["n"] for r in got.collect()) == want


def test_the_writers_filter_takes_a_rows_first_known_time():
    """feedback rows of events nobody was shown have no impression time: their event time
    decides; a row with no time at all counts as old; other users are never touched."""
    from freshrec.privacy.erasure import Erasures, drop_erased

    when = datetime(2026, 11, 10, tzinfo=timezone.utc)
    ts = pa.timestamp("us", "UTC")
    rows = pa.table({"user_id": ["p_a", "p_a", "p_a", "p_b"],
                     "impression_ts": pa.array([None, when - timedelta(1), None, None], ts),
                     "event_ts": pa.array([when + timedelta(1), when + timedelta(2), None, None],
                                          ts),
                     "n": [1, 2, 3, 4]})
    kept = drop_erased("feedback", rows, Erasures([("p_a", when.timestamp())]))
    assert kept.column("n").to_pylist() == [1, 4]
    assert drop_erased("feedback", rows, Erasures()).num_rows == 4
