"""The closed loop for real: per-process write-ahead logs, nearline ingest into bronze/silver
(exactly once, crash-safe, the nightly clean's rows), impressions and the feedback join, and two
``freshrec serve`` processes on one data directory seeing each other's events after one round."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.data.importers import land_events, normalize_events
from freshrec.privacy.pseudonyms import pseudonymize
from serving import wal
from nearline import ingest
from tests.conftest import small_settings

ROOT = Path(__file__).resolve().parent.parent
DAY = "2026-11-28"


class Crash(Exception):
    pass


def _crash_at(point: str):
    def crash(name: str) -> None:
        if name == point:
            raise Crash(name)
    return crash


def _land(settings, rows: list[dict], file_id: str, day: str = DAY) -> None:
    cols = ("event_id", "user_id", "item_id", "event_type", "value", "ts", "context")
    table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in cols})
    land_events(settings, normalize_events(table, file_id), file_id, file_id.ljust(24, "0"),
                landed_at=datetime.fromisoformat(day + "T12:00:00+00:00"))


def _events(n: int, start: int = 0, **over) -> list[dict]:
    return [{"event_id": f"e{start + i}", "user_id": f"u{(start + i) % 7}", "item_id": f"i{i % 5}",
             "event_type": "click", "ts": f"{DAY}T10:{i % 60:02d}:00+00:00", **over}
            for i in range(n)]


def _silver(settings) -> pa.Table:
    return DeltaStore(settings).read_arrow("events").sort_by("event_id")


# ---- nearline ingest -------------------------------------------------------------------------
def test_ingest_takes_each_landed_file_once_with_the_clean_rules(settings):
    bad = [{"event_id": "bad1", "user_id": "u1", "item_id": "i1", "event_type": "teleport",
            "ts": f"{DAY}T10:00:00Z"},
           {"event_id": "bad2", "user_id": "u1", "item_id": "i1", "event_type": "click",
            "ts": "yesterday"}]
    dup = [{"event_id": "e3", "user_id": "u3", "item_id": "i3", "event_type": "click",
            "ts": f"{DAY}T10:03:00+00:00"}]
    _land(settings, _events(10) + bad + dup, "filea")
    store = DeltaStore(settings)
    first = ingest.ingest_landed(settings)
    assert first == {**first, "files": 1, "raw": 13, "clean": 10, "dead_letter": 2,
                     "duplicates": 1, "batches": [DAY]}
    silver = _silver(settings)
    assert silver.num_rows == 10 and set(silver.column("batch_date").to_pylist()) == {DAY}
    assert silver.column("weight").to_pylist() == [2.0] * 10  # click weight, no value
    dead = store.read_arrow("events_dead_letter").sort_by("raw_id")
    assert dead.column("reason").to_pylist() == ["unknown_event_type", "unparseable_ts"]
    assert store.count("events_raw") == 13
    versions = store.versions(["events", "events_raw", "events_dead_letter"])
    again = ingest.ingest_landed(settings)  # a re-run commits nothing
    assert again["files"] == 0
    assert store.versions(["events", "events_raw", "events_dead_letter"]) == versions
    # a second file repeating an event id of the first: a duplicate, not a second row
    _land(settings, _events(3, start=9), "fileb")
    second = ingest.ingest_landed(settings)
    assert second["clean"] == 2 and second["duplicates"] == 1
    assert _silver(settings).num_rows == 12


@pytest.mark.parametrize("point", ["ingest_after_dead_letter", "ingest_after_silver"])
def test_a_round_that_dies_between_steps_neither_loses_nor_doubles(settings, point):
    bad = [{"event_id": "bad", "user_id": "u1", "item_id": "i1", "event_type": "nope",
            "ts": f"{DAY}T10:00:00Z"}]
    _land(settings, _events(20) + bad, "crashy")
    with pytest.raises(Crash):
        ingest.ingest_landed(settings, crash=_crash_at(point))
    store = DeltaStore(settings)
    assert store.count("events_raw") == 0  # not taken yet
    ingest.ingest_landed(settings)
    assert store.count("events") == 20 and store.count("events_dead_letter") == 1
    assert store.count("events_raw") == 21
    assert len(set(_silver(settings).column("event_id").to_pylist())) == 20


def test_a_smaller_raw_id_of_the_same_batch_replaces_the_stored_row(settings):
    """What the nightly clean keeps per event_id within a batch: the row with the smallest raw_id,
    whatever order the files came in; another batch's id is never taken again."""
    row = {"event_id": "same", "user_id": "u1", "item_id": "i1", "event_type": "click",
           "ts": f"{DAY}T10:00:00Z"}
    _land(settings, [row], "zzzz")
    ingest.ingest_landed(settings)
    _land(settings, [{**row, "item_id": "i2"}], "aaaa")
    report = ingest.ingest_landed(settings)
    assert report["replaced"] == 1
    silver = _silver(settings)
    assert silver.column("raw_id").to_pylist() == ["aaaa".ljust(24, "0") + ":0"]
    assert silver.column("item_id").to_pylist() == ["i2"]
    _land(settings, [{**row, "item_id": "i3"}], "0000", day="2026-11-29")
    assert ingest.ingest_landed(settings)["duplicates"] == 1
    assert _silver(settings).column("item_id").to_pylist() == ["i2"]


@pytest.mark.integration
def test_the_nightly_jobs_find_the_files_taken_and_the_same_rows(tmp_path, spark):
    """Nearline-taken files are skipped by the nightly ingest, and the nightly clean's rewrite of
    the batch yields exactly the rows nearline wrote (so it commits nothing)."""
    from freshrec.interval import DataInterval
    from spark_jobs import clean
    from spark_jobs import ingest as nightly_ingest

    settings = small_settings(tmp_path / "data")
    no_id = [{"user_id": f"u{i}", "item_id": f"i{i}", "event_type": "rating", "value": str(i % 5),
              "ts": f"{DAY} 09:0{i}"} for i in range(8)]
    bad = [{"user_id": "", "item_id": "i1", "event_type": "click", "ts": f"{DAY}T10:00:00Z"},
           {"user_id": "u1", "item_id": "i1", "event_type": "rating", "value": "9",
            "ts": f"{DAY}T10:00:00Z"}]
    _land(settings, _events(30) + no_id + bad, "nightly1")
    _land(settings, _events(5, start=28) + no_id[:2], "nightly2")
    report = ingest.ingest_landed(settings)
    assert report["duplicates"] == 4 and report["dead_letter"] == 2
    store = DeltaStore(settings)
    before = store.versions(["events", "events_raw", "events_dead_letter"])
    interval = DataInterval.for_day(DAY)
    assert nightly_ingest.run(settings, interval) == {"files": 0, "rows": 0}
    counts = clean.run(settings, interval)
    assert counts["clean"] == 41 and counts["dead_letter"] == 2
    assert store.versions(["events", "events_raw", "events_dead_letter"]) == before


# ---- per-process write-ahead logs -------------------------------------------------------------
_APPENDER = """
import sys
from tests.conftest import small_settings
from serving.wal import EventLog
log = EventLog(small_settings(sys.argv[1]))
tag, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    log.append([{"event_id": f"{tag}-{i}", "user_id": "u", "item_id": f"i{i % 9}",
                 "event_type": "click", "value": None, "ts": "2026-11-28T10:00:00+00:00",
                 "context": None}])
print("acknowledged", n, flush=True)
if sys.argv[4] == "kill":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
log.close()
"""


def _landed_event_ids(settings) -> list[str]:
    import pyarrow.parquet as pq

    ids = []
    for f in (settings.landing_dir / "events").rglob("*.parquet"):
        ids += pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist()
    return ids


def test_two_processes_appending_while_a_round_seals_lose_nothing(settings):
    """Two writer processes on one data directory, one killed -9 after its last acknowledgement,
    while another process seals and lands every log over and over: every acknowledged event lands
    exactly once."""
    n = 400
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(settings.data_dir), tag,
                               str(n), mode], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for tag, mode in (("a", "close"), ("b", "kill"))]
    rounds = 0
    while any(p.poll() is None for p in procs):
        wal.land_all(settings)
        rounds += 1
    outs = [p.communicate()[0] for p in procs]
    assert all(f"acknowledged {n}" in o for o in outs), outs
    wal.land_all(settings)  # what the killed writer left: its open segment, sealed by us
    ids = _landed_event_ids(settings)
    assert rounds > 1 and len(ids) == 2 * n
    assert set(ids) == {f"{t}-{i}" for t in "ab" for i in range(n)}
    assert not any((settings.data_dir / "wal").iterdir())  # both writers gone: no directories left


def test_a_torn_last_line_is_not_landed_and_a_live_writer_keeps_its_directory(settings):
    log = wal.EventLog(settings)
    log.append([{"event_id": "x1", "user_id": "u", "item_id": "i", "event_type": "click",
                 "value": None, "ts": "2026-11-28T10:00:00+00:00", "context": None}])
    with open(log.dir / "open.jsonl", "ab") as f:
        f.write(b'{"event_id": "torn", "user_')  # a write the crash cut before its fsync
    assert wal.land_all(settings) == 1
    assert _landed_event_ids(settings) == ["x1"]
    assert log.dir.exists()  # its writer is alive
    log.append([{"event_id": "x2", "user_id": "u", "item_id": "i", "event_type": "click",
                 "value": None, "ts": "2026-11-28T10:00:01+00:00", "context": None}])
    log.close()
    assert wal.land_all(settings) == 1 and not log.dir.exists()
    assert sorted(_landed_event_ids(settings)) == ["x1", "x2"]


def test_segments_of_the_old_single_file_layout_are_landed(settings):
    root = settings.data_dir / "wal"
    root.mkdir(parents=True)
    line = {"event_id": "old", "user_id": "u", "item_id": "i", "event_type": "click",
            "value": None, "ts": "2026-11-28T10:00:00+00:00", "context": None}
    (root / "open.jsonl").write_text(json.dumps(line) + "\n")
    (root / "sealed-1.jsonl").write_text(json.dumps({**line, "event_id": "older"}) + "\n")
    assert wal.land_all(settings) == 2
    assert sorted(_landed_event_ids(settings)) == ["old", "older"]
    assert not any(root.iterdir())


# ---- impressions and feedback -----------------------------------------------------------------
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def _silver_events(settings, rows: list[tuple[str, str, str, datetime]]) -> None:
    n = len(rows)
    weights = settings.events.types
    DeltaStore(settings).write_arrow("events", pa.table({
        "event_id": [f"fb{i}" for i in range(n)], "user_id": [u for u, _, _, _ in rows],
        "item_id": [i for _, i, _, _ in rows], "event_type": [t for _, _, t, _ in rows],
        "value": pa.nulls(n, pa.float64()), "weight": [weights[t] for _, _, t, _ in rows],
        "ts": pa.array([ts for *_, ts in rows], pa.timestamp("us", tz="UTC")),
        "context": pa.nulls(n, pa.string()), "raw_id": [f"fb:{i}" for i in range(n)],
        "batch_date": [ts.strftime("%Y-%m-%d") for *_, ts in rows]}))


def _impression_line(rid: str, user: str, items: list[str], at: datetime, **over) -> bytes:
    rec = {"request_id": rid, "user_id": user, "model_version": "freshrec-retrieval/1 als",
           "arm": None, "items": items, "positions": list(range(len(items))),
           "scores": [1.0 - 0.1 * n for n in range(len(items))],
           "propensities": [1.0] * len(items), "ts": int(at.timestamp() * 1e6), "server": "t",
           **over}
    return json.dumps(rec).encode() + b"\n"


def test_impressions_are_taken_once_and_bad_ones_dead_lettered(settings):
    from nearline.impressions import take_impressions
    from freshrec.storage.segments import SegmentWriter

    writer = SegmentWriter(settings.data_dir / "impressions" / "log")
    good = [_impression_line(f"r{n}", "u1", ["a", "b"], T0) for n in range(3)]
    bad = [b"{not json\n",
           _impression_line("r0", "u1", ["a"], T0),  # repeats r0
           _impression_line("r9", "u1", ["a", "b"], T0, propensities=[1.0]),
           _impression_line("r8", "u1", ["a"], T0, propensities=[0.0]),
           _impression_line("r7", "", ["a"], T0),
           _impression_line("r6", "u1", ["a"], T0, ts="last tuesday")]
    writer.append(b"".join(good[:2] + bad[:3]))
    crashed = pytest.raises(Crash)
    with crashed:
        take_impressions(settings, crash=_crash_at("impressions_after_dead_letter"))
    writer.append(b"".join(good[2:] + bad[3:]))
    report = take_impressions(settings)
    store = DeltaStore(settings)
    assert store.read_arrow("impressions").column("request_id").to_pylist() == ["r0", "r1", "r2"]
    reasons = sorted(r.split(":")[0] for r in
                     store.read_arrow("impressions_dead_letter").column("reason").to_pylist())
    assert reasons == ["bad_propensity", "bad_ts", "duplicate_request_id", "length_mismatch",
                       "missing_field", "not_json"]
    assert report["impressions"] == 3
    # a later segment repeating a stored request id: dead-lettered, not a second row
    writer.append(good[0])
    assert take_impressions(settings) == {"segments": 1, "impressions": 0, "dead_letter": 1}
    assert take_impressions(settings)["segments"] == 0  # nothing left: commits nothing
    assert store.count("impressions") == 3


def test_record_lines_of_a_server_land_as_rows_and_corrupt_or_unsafe_ones_are_dead_lettered(
        settings):
    """The serving impression log writes pickled record lines: they land with every field, the
    writer's name as ``server``; a corrupt line and one naming a function (which an unrestricted
    unpickler would call) are dead-lettered, never run."""
    import binascii
    import pickle

    from freshrec.storage.segments import RECORD_PREFIX, read_record
    from nearline.impressions import take_impressions
    from serving.impressions import ImpressionLog

    log = ImpressionLog(settings)
    try:
        log.record("s1", "u1", "m/1 als", None, ["a", "b"], [0.9, 0.5], [1.0, 1.0])
        log.record("s2", "u2", "m/1 als", "challenger", ["c"], [0.7], [0.25], ["c", "d"],
                   [0.7, 0.6])
        log.flush()
        evil = RECORD_PREFIX + binascii.b2a_base64(pickle.dumps(os.system, protocol=5))
        with pytest.raises(ValueError, match="plain values"):
            read_record(evil[:-1])
        log.writer.append(evil + RECORD_PREFIX + b"bm90IGEgcGlja2xl\n"
                          + RECORD_PREFIX + binascii.b2a_base64(pickle.dumps(("s3", "u3"))))
    finally:
        log.close()
    report = take_impressions(settings)
    assert report == {"segments": 1, "impressions": 2, "dead_letter": 3}
    store = DeltaStore(settings)
    rows = sorted(store.read_arrow("impressions").to_pylist(), key=lambda r: r["request_id"])
    assert [(r["request_id"], r["user_id"], r["arm"], r["items"], r["positions"], r["scores"],
             r["propensities"], r["candidates"], r["server"]) for r in rows] == [
        ("s1", "u1", None, ["a", "b"], [0, 1], [0.9, 0.5], [1.0, 1.0], None, log.server),
        ("s2", "u2", "challenger", ["c"], [0], [0.7], [0.25], ["c", "d"], log.server)]
    dead = store.read_arrow("impressions_dead_letter").to_pylist()
    assert sorted(r["reason"].split(":")[0] for r in dead) == ["not_decodable"] * 3
    assert any("posix.system" in r["reason"] or "os.system" in r["reason"] for r in dead)
    # raw is readable text (an erasure searches it for the user id), not the base64 line
    raws = sorted(r["raw"] for r in dead)
    assert not any(r.startswith("p1:") for r in raws)
    assert "not a pickle" in raws
    assert any("u3" in r and "s3" in r for r in raws)


def test_feedback_labels_clicks_in_the_window_no_clicks_late_clicks_and_organic(settings):
    from nearline.feedback import run_feedback
    from nearline.impressions import take_impressions
    from freshrec.storage.segments import SegmentWriter

    writer = SegmentWriter(settings.data_dir / "impressions" / "log")
    writer.append(_impression_line("req1", "u1", ["a", "b", "c"], T0)
                  + _impression_line("req2", "u2", ["x"], T0 + timedelta(minutes=1)))
    take_impressions(settings)
    m = lambda k: T0 + timedelta(minutes=k)  # noqa: E731
    _silver_events(settings, [("u1", "a", "purchase", m(5)),   # clicks req1/a (reward 5)
                              ("u1", "a", "click", m(6)),      # later event: not the reward
                              ("u1", "b", "click", m(40)),     # after the window: organic
                              ("u1", "d", "view", m(2)),       # never shown: organic
                              ("u2", "a", "click", m(3)),      # a was shown to u1, not u2
                              ("u1", "a", "view", m(-5))])     # before the loop began
    report = run_feedback(settings, now=m(70))  # settles everything up to m(60)
    fb = {(r["request_id"], r["item_id"], r["event_id"]): r
          for r in DeltaStore(settings).read_arrow("feedback").to_pylist()}
    shown = {(k[0], k[1]): r for k, r in fb.items() if not r["organic"]}
    assert {k: (r["clicked"], r["reward"], r["event_id"]) for k, r in shown.items()} == {
        ("req1", "a"): (True, 5.0, "fb0"), ("req1", "b"): (False, 0.0, None),
        ("req1", "c"): (False, 0.0, None), ("req2", "x"): (False, 0.0, None)}
    assert shown[("req1", "b")]["position"] == 1 and shown[("req1", "a")]["propensity"] == 1.0
    organic = sorted((r["user_id"], r["item_id"], r["event_type"]) for r in fb.values()
                     if r["organic"])
    assert organic == [("u1", "b", "click"), ("u1", "d", "view"), ("u2", "a", "click")]
    assert report["rows"] == 7 and report["clicked"] == 1
    version = DeltaStore(settings).version("feedback")
    assert run_feedback(settings, now=m(70))["rows"] == 0  # a re-run commits nothing
    assert DeltaStore(settings).version("feedback") == version
    # the next run labels only what is new since the watermark
    writer.append(_impression_line("req3", "u1", ["b"], m(61)))
    take_impressions(settings)
    _silver_events_more = [("u1", "b", "click", m(62))]
    n0 = DeltaStore(settings).count("events")
    DeltaStore(settings).write_arrow("events", pa.table({
        "event_id": ["late1"], "user_id": ["u1"], "item_id": ["b"], "event_type": ["click"],
        "value": pa.nulls(1, pa.float64()), "weight": [2.0],
        "ts": pa.array([_silver_events_more[0][3]], pa.timestamp("us", tz="UTC")),
        "context": pa.nulls(1, pa.string()), "raw_id": ["fb:late1"], "batch_date": ["2026-11-28"]}))
    assert DeltaStore(settings).count("events") == n0 + 1
    second = run_feedback(settings, now=m(110))
    rows = DeltaStore(settings).read_arrow("feedback").to_pylist()
    assert second["rows"] == 1 and len(rows) == 8
    assert [(r["request_id"], r["clicked"], r["event_id"]) for r in rows
            if r["request_id"] == "req3"] == [("req3", True, "late1")]


# ---- two `freshrec serve` processes on one data directory ------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_env(data: Path, version: int, processes: int = 1) -> dict:
    return {**os.environ, "FRESHREC_DATA_DIR": str(data), "FRESHREC__SERVING__METRICS_PORT": "-1",
            "FRESHREC__SERVING__JSON_LOGS": "false", "FRESHREC__SERVING__MODEL": f'"{version}"',
            "FRESHREC__SERVING__WAL_FLUSH_SECONDS": "3600", "PYTHONPATH": str(ROOT),
            "FRESHREC__SERVING__PROCESSES": str(processes)}


def _wait_serving(addr: str, deadline: float = 90, processes: int = 1) -> None:
    """Until the server at ``addr`` says SERVING and, with several processes, its Status lists
    every one of them serving."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from freshrec.api.client import Client

    end = time.time() + deadline
    while time.time() < end:
        try:
            c = Client(addr, "dev-admin-token")
            stub = health_pb2_grpc.HealthStub(c.channel)
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                st = c.call_admin("Status", c.admin_pb2.StatusRequest(), timeout=5)
                if processes == 1 or sum(p.serving for p in st.processes) == processes:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"server at {addr} did not come up")


def _refresh_cli(data: Path, version: int, addrs: list[str], crash: str | None = None):
    from nearline import refresher

    cmd = [sys.executable, "-m", "freshrec.cli.main", "refresh", "--once"]
    for a in addrs:
        cmd += ["--replica", a]
    env = _serve_env(data, version)
    if crash:
        env[refresher.CRASH_ENV] = crash
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture
def two_servers(lane, tmp_path, request):
    """Two `freshrec serve` on one data directory; ``request.param`` (indirect): the serving
    processes each runs (default 1)."""
    import shutil

    from tests.conftest import register_fit

    data = tmp_path / "data"
    shutil.copytree(lane["settings"].data_dir, data)
    version = register_fit(small_settings(data), "als")
    from serving.state import resolve_snapshot

    resolve_snapshot(small_settings(data), version)  # built once, before two servers race for it
    processes = getattr(request, "param", 1)
    ports = [_free_port(), _free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "freshrec.cli.main", "serve", "--port",
                               str(p)], env=_serve_env(data, version, processes), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"serve-{p}.log", "w"))
             for p in ports]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    try:
        for a, p in zip(addrs, ports):
            try:
                _wait_serving(a, processes=processes)
            except AssertionError:
                raise AssertionError((tmp_path / f"serve-{p}.log").read_text()[-3000:]) from None
        yield {"data": data, "version": version, "addrs": addrs, "procs": procs,
               "settings": small_settings(data), "processes": processes}
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def _known_raw_user(settings) -> str:
    users = set(DeltaStore(settings).read_arrow("events", columns=["user_id"]).column("user_id")
                .to_pylist())
    return next(f"u{n}" for n in range(1000)
                if pseudonymize(f"u{n}", settings.privacy.hmac_key) in users)


@pytest.mark.integration
def test_an_event_taken_by_one_server_reaches_the_other_after_one_round(two_servers):
    from freshrec.api.client import Client

    s, (a_addr, b_addr) = two_servers["settings"], two_servers["addrs"]
    a, b = Client(a_addr, "dev-client-token"), Client(b_addr, "dev-client-token")
    admin_b = Client(b_addr, "dev-admin-token")
    raw = _known_raw_user(s)
    user = pseudonymize(raw, s.privacy.hmac_key)
    before_b = b.recommend(raw, 10, request_id="b-before")
    top = before_b.items[0].item_id
    assert before_b.request_id == "b-before"
    served_a = a.recommend(raw, 10)  # no request id: the server makes one
    assert served_a.request_id and served_a.request_id != "b-before"
    # acknowledged by A only (its log is open: A lands nothing on its own for an hour)
    assert a.record([{"user_id": raw, "item_id": top, "event_type": "purchase",
                      "event_id": "loop-1"}]).accepted == 1
    assert top in {i.item_id for i in b.recommend(raw, 10).items}  # B does not know yet
    store = DeltaStore(s)
    events_before = store.count("events")
    done = _refresh_cli(two_servers["data"], two_servers["version"], [a_addr, b_addr])
    assert done.returncode == 0, done.stderr[-3000:]
    silver = store.read_arrow("events", filter=pc.field("event_id") == "loop-1").to_pylist()
    assert [(r["user_id"], r["item_id"], r["event_type"]) for r in silver] == \
        [(user, top, "purchase")]
    after_b = b.recommend(raw, 10)
    assert top not in {i.item_id for i in after_b.items}  # now in B's history: seen, left out
    status = admin_b.call_admin("Status", admin_b.admin_pb2.StatusRequest())
    assert status.delta_versions["events"] == store.version("events")
    # both servers' slates are in the impressions table, each once, with its server
    imps = store.read_arrow("impressions").to_pylist()
    by_id = {r["request_id"]: r for r in imps}
    assert len(by_id) == len(imps)
    assert by_id["b-before"]["items"] == [i.item_id for i in before_b.items]
    assert by_id[served_a.request_id]["server"] != by_id["b-before"]["server"]
    assert by_id["b-before"]["propensities"] == [1.0] * 10
    # a second round takes nothing again
    versions = store.versions(["events", "events_raw", "events_dead_letter", "impressions"])
    again = _refresh_cli(two_servers["data"], two_servers["version"], [a_addr, b_addr])
    assert again.returncode == 0, again.stderr[-3000:]
    assert store.count("events") == events_before + 1
    assert store.versions(["events", "events_raw", "events_dead_letter"]) == \
        {k: v for k, v in versions.items() if k != "impressions"}
    # erasing the user on A: B drops the user's history and vector after the next round
    admin_a = Client(a_addr, "dev-admin-token")
    admin_a.call_admin("DeleteUser", admin_a.admin_pb2.DeleteUserRequest(user_id=raw))
    erased = _refresh_cli(two_servers["data"], two_servers["version"], [a_addr, b_addr])
    assert erased.returncode == 0, erased.stderr[-3000:]
    assert "'erased_users': 1" in erased.stdout
    gone = b.recommend(raw, 10)
    assert gone.cold_start
    assert store.read_arrow("events", filter=pc.field("user_id") == user).num_rows == 0


@pytest.mark.integration
@pytest.mark.parametrize("two_servers", [2], indirect=True, ids=["processes=2"])
@pytest.mark.parametrize("point", ["after_land", "ingest_after_dead_letter", "ingest_after_silver",
                                   "ingest_after_bronze", "impressions_after_dead_letter",
                                   "impressions_after_table", "mid_push"])
def test_sigkill_of_the_round_at_each_step_then_a_rerun_neither_loses_nor_doubles(
        two_servers, point):
    from freshrec.api.client import Client

    s, addrs = two_servers["settings"], two_servers["addrs"]
    store = DeltaStore(s)
    n_before = store.count("events")
    clients = [Client(addr, "dev-client-token") for addr in addrs]
    for n, c in enumerate(clients):
        c.recommend(f"crash-user-{n}", 5, request_id=f"crash-{n}")
        c.record([{"user_id": f"crash-user-{n}", "item_id": f"i{j}", "event_type": "click",
                   "event_id": f"crash-{n}-{j}"} for j in range(5)]
                 + [{"user_id": f"crash-user-{n}", "item_id": "i1", "event_type": "click",
                     "ts": "2999-01-01"}])  # refused by the server: never acknowledged
    killed = _refresh_cli(two_servers["data"], two_servers["version"], addrs, crash=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = _refresh_cli(two_servers["data"], two_servers["version"], addrs)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = store.read_arrow("events", columns=["event_id"]).column("event_id").to_pylist()
    assert len(ids) == n_before + 10 and len(set(ids)) == len(ids)
    assert {f"crash-{n}-{j}" for n in range(2) for j in range(5)} <= set(ids)
    imps = store.read_arrow("impressions", columns=["request_id"]).column("request_id").to_pylist()
    assert sorted(imps) == ["crash-0", "crash-1"]
    assert store.count("impressions_dead_letter") == 0
    b = Client(addrs[1], "dev-admin-token")
    st = b.call_admin("Status", b.admin_pb2.StatusRequest())
    assert st.delta_versions["events"] == store.version("events")
    # every process of the host, not only the one that answered
    assert [p.delta_versions["events"] for p in st.processes] == [store.version("events")] * 2


def test_a_landed_file_that_cannot_be_read_fails_the_ingest_and_keeps_the_others(settings):
    """A corrupt landed file stops the ingest with its name; nothing is half-taken, and once the
    file is moved away the next round takes the rest."""
    _land(settings, _events(4), "goodfile")
    bad = settings.landing_dir / "events" / f"landed_date={DAY}" / ("broken".ljust(24, "0")
                                                                     + ".parquet")
    bad.write_bytes(b"not parquet")
    with pytest.raises(Exception, match="broken"):
        ingest.ingest_landed(settings)
    assert DeltaStore(settings).count("events_raw") == 0
    bad.rename(bad.with_suffix(".quarantined"))
    assert ingest.ingest_landed(settings)["clean"] == 4


@pytest.mark.integration
@pytest.mark.parametrize("two_servers", [2], indirect=True, ids=["processes=2"])
def test_a_replica_down_during_a_round_catches_up_next_round_without_loss_or_doubles(two_servers):
    from freshrec.api.client import Client

    s, (a_addr, b_addr) = two_servers["settings"], two_servers["addrs"]
    raw = _known_raw_user(s)
    b_proc = two_servers["procs"][1]
    b_proc.send_signal(signal.SIGKILL)
    b_proc.wait(timeout=30)
    a = Client(a_addr, "dev-client-token")
    top = a.recommend(raw, 10).items[0].item_id
    assert a.record([{"user_id": raw, "item_id": top, "event_type": "purchase",
                      "event_id": "while-b-down"}]).accepted == 1
    store = DeltaStore(s)
    failed = _refresh_cli(two_servers["data"], two_servers["version"], [a_addr, b_addr])
    assert failed.returncode != 0 and b_addr in failed.stderr
    assert store.read_arrow("events", filter=pc.field("event_id") == "while-b-down").num_rows == 1
    port = b_addr.rsplit(":", 1)[1]
    two_servers["procs"][1] = subprocess.Popen(
        [sys.executable, "-m", "freshrec.cli.main", "serve", "--port", port],
        env=_serve_env(two_servers["data"], two_servers["version"], two_servers["processes"]),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_serving(b_addr, processes=two_servers["processes"])
    b = Client(b_addr, "dev-client-token")
    assert top in {i.item_id for i in b.recommend(raw, 10).items}  # restarted from the snapshot
    done = _refresh_cli(two_servers["data"], two_servers["version"], [a_addr, b_addr])
    assert done.returncode == 0, done.stderr[-3000:]
    assert top not in {i.item_id for i in b.recommend(raw, 10).items}
    assert store.read_arrow("events", filter=pc.field("event_id") == "while-b-down").num_rows == 1
