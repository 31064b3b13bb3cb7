"""The ``freshrec`` command line: exit codes (0 ok, 1 runtime error, 2 usage, 130 interrupted), one
line per error (a traceback only with --debug), --json for scripts, global options anywhere,
--version, gRPC errors as one line with the status and the fix, and the progress view."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import pytest

from freshrec.cli.main import hoist_globals, main

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "freshrec.cli.main", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def test_version_prints_the_package_version():
    from importlib.metadata import version

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"freshrec {version('freshrec')}"


def test_a_bad_date_is_a_usage_error_naming_the_option_and_the_format():
    r = cli("report", "--date", "not-a-date")
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "--date" in line and "'not-a-date'" in line and "YYYY-MM-DD" in line


def test_usage_errors_exit_2_with_one_line(capsys):
    assert main(["run", "no-such-job"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "'no-such-job' is not one of" in line and "freshrec run --help" in line
    assert main(["import", "events", "x.csv", "--map", "user_id"]) == 2
    assert "write it as target=source" in one_line(capsys.readouterr().err)
    assert main(["recommend", "--k", "3"]) == 2  # neither --user nor --users
    assert "exactly one of --user U or --users FILE" in one_line(capsys.readouterr().err)
    assert main(["no-such-command"]) == 2
    one_line(capsys.readouterr().err)


def test_runtime_errors_exit_1_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    env = {"FRESHREC_HMAC_KEY": "", "FRESHREC_SECRETS_DIR": ""}
    r = cli("config", "--profile", "cluster", env={**env, "FRESHREC_DATA_DIR": str(tmp_path)})
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith("freshrec: error: privacy.hmac_key is not set (profile 'cluster')")
    assert "export FRESHREC_HMAC_KEY" in line
    r = cli("--debug", "config", "--profile", "cluster", env={**env, "FRESHREC_DATA_DIR": str(tmp_path)})
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == line


def test_s3_data_dir_without_a_local_dir_is_refused_with_the_fix(capsys, monkeypatch):
    monkeypatch.setenv("FRESHREC_DATA_DIR", "s3://bucket/freshrec")
    monkeypatch.delenv("FRESHREC__PATHS__LOCAL_DIR", raising=False)
    assert main(["erase", "--user", "u1", "--no-push"]) == 1  # the erasure log is local
    line = one_line(capsys.readouterr().err)
    assert "object-store URI s3://bucket/freshrec" in line and "set paths.local_dir" in line


def test_profile_and_json_work_after_the_subcommand(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "base.yaml").write_text((ROOT / "conf" / "base.yaml").read_text())
    (conf / "mine.yaml").write_text("mlflow:\n  experiment: mine-experiment\n")
    monkeypatch.setenv("FRESHREC_CONF_DIR", str(conf))
    monkeypatch.setenv("FRESHREC_HMAC_KEY", "a-real-key-of-32-characters-long!")
    monkeypatch.setenv("FRESHREC_ADMIN_TOKEN", "a-real-admin-token")
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path / "data"))
    assert main(["config", "--profile", "mine", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"] == "mine" and out["conf_dir"] == str(conf)
    assert out["conf_source"] == "FRESHREC_CONF_DIR" and out["data_dir"] == str(tmp_path / "data")
    assert out["settings"]["mlflow"]["experiment"] == "mine-experiment"
    assert out["settings"]["privacy"]["hmac_key"] == "**********"  # secrets stay masked
    assert "a-real-key-of-32" not in json.dumps(out)
    # the same with the global options first, and --profile=NAME
    assert main(["--json", "--profile=mine", "config"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "mine"


def test_hoisting_moves_global_options_only():
    assert hoist_globals(["run", "all", "--date", "2026-01-01", "--profile", "cluster", "-vv",
                          "--json"]) == ["--profile", "cluster", "-vv", "--json", "run", "all",
                                         "--date", "2026-01-01"]
    # a value that looks like an option after --, and non-global options, stay where they are
    assert hoist_globals(["import", "events", "--", "--json"]) == ["import", "events", "--", "--json"]
    assert hoist_globals(["train", "--model", "dqn", "-q"]) == ["-q", "train", "--model", "dqn"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_unavailable_is_one_line_with_the_status_and_what_to_do(capsys):
    port = _free_port()  # nothing listens there
    assert main(["recommend", "--user", "u1", "--server", f"127.0.0.1:{port}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"freshrec: error: gRPC UNAVAILABLE from 127.0.0.1:{port}")
    assert "start it with `freshrec serve`" in line


def test_grpc_unauthenticated_is_one_line_naming_the_token_fix(capsys):
    """A real gRPC server on loopback that refuses the token, as freshrec's server does."""
    import grpc

    from freshrec.api.proto import stubs

    pb = stubs()

    class Refusing(pb["recommender_pb2_grpc"].RecommenderServicer):
        def Recommend(self, request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb["recommender_pb2_grpc"].add_RecommenderServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert main(["recommend", "--user", "u1", "--server", f"127.0.0.1:{port}",
                     "--token", "wrong"]) == 1
    finally:
        server.stop(0)
    line = one_line(capsys.readouterr().err)
    assert f"gRPC UNAUTHENTICATED from 127.0.0.1:{port} (unknown bearer token)" in line
    assert "--token or FRESHREC_TOKEN" in line


def test_interrupt_exits_130_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FRESHREC_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "freshrec.cli.main", "data", "synth", "--events",
                             "3000000", "--users", "100000", "--items", "20000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # printed just before the long step starts
    assert first.startswith("making the embedded dataset")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    # the progress line of the step it was in, then one line
    assert err.strip().splitlines()[-1] == "freshrec: interrupted" and "Traceback" not in err


def test_progress_records_show_by_default_and_other_info_only_with_v(capsys):
    from freshrec.cli.console import view
    from freshrec.progress import advance

    log = logging.getLogger("spark_jobs.some_job")
    with view(verbosity=0, quiet=False):
        advance(log, "evaluate", 1, 3, "evaluate %s: fitted %s", "2026-11-27", "als")
        log.info("a detail")
        logging.getLogger("py4j.clientserver").info("library chatter")
        log.warning("something odd")
    err = capsys.readouterr().err
    assert err.splitlines() == ["[1/3] evaluate 2026-11-27: fitted als", "warning: something odd"]
    with view(verbosity=1, quiet=False):
        log.info("a detail")
        logging.getLogger("py4j.clientserver").info("library chatter")
    assert capsys.readouterr().err.splitlines() == ["a detail"]
    with view(verbosity=0, quiet=True):
        advance(log, "evaluate", 2, 3, "quiet")
        log.warning("quiet warning")
        log.error("an error")
    assert capsys.readouterr().err.splitlines() == ["error: an error"]


def test_walkthrough_follows_the_dag_tasks():
    from freshrec.cli.walkthrough import dag_tasks, task_events

    assert dag_tasks(ROOT / "dags" / "freshrec_batch.py") == ["ingest", "clean", "features",
                                                               "evaluate", "gate"]
    assert task_events("[2026-11-28T10:00:00] INFO - [DAG TEST] starting task_id=clean "
                       "map_index=-1") == ("clean", "running")
    assert task_events("INFO - [DAG TEST] end task task_id=clean map_index=-1") == ("clean", "done")
    assert task_events("INFO - Spark 4.2.0 session on local[2]") is None


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["model", "rollout", "--help"]])
def test_help_exits_0_and_shows_defaults_and_examples(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Usage: freshrec" in out
    if argv == ["run", "--help"]:
        assert "Example: freshrec run all --date" in out and "build-index" in out


@pytest.mark.integration
@pytest.mark.slow
def test_make_run_walkthrough_is_short_and_says_where_everything_is(tmp_path):
    """`make run`'s walkthrough on a small dataset: the terminal gets the report, the live answer and
    the summary (champion, tables, MLflow, logs), not Airflow's or Spark's log lines, which are in
    the log files it names."""
    from datetime import datetime, timedelta, timezone

    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}",
           "FRESHREC_DATA_DIR": str(tmp_path / "data"), "PYSPARK_PYTHON": sys.executable,
           "FRESHREC__SYNTH__N_EVENTS": "8000", "FRESHREC__SYNTH__N_USERS": "400",
           "FRESHREC__SYNTH__N_ITEMS": "150", "FRESHREC__ALS__RANK": "8",
           "FRESHREC__ALS__ITERATIONS": "4", "FRESHREC__SPARK__SHUFFLE_PARTITIONS": "2",
           "FRESHREC__SPARK__DRIVER_MEMORY": "1g"}
    today = datetime.now(timezone.utc).date()
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-m", "freshrec.cli.walkthrough", "--date", today.isoformat(),
                        "--run-after", (today + timedelta(days=1)).isoformat(), "--logs", str(logs)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "Served champion:  freshrec-retrieval@champion = freshrec-retrieval/" in out
    assert f"Delta tables:     {tmp_path / 'data' / 'tables'}" in out
    assert "make mlflow-ui" in out and f"Logs:             {logs}" in out
    assert "live request: Recommend(user_id='u42', k=10)" in out
    # Airflow's and Spark's output went to the log file, not to the terminal
    dag_log = (logs / "airflow-dag.log").read_text()
    assert "[DAG TEST] end task task_id=gate" in dag_log
    assert "[DAG TEST] end task task_id=rollout" in (logs / "airflow-rollout.log").read_text()
    for chatty in ("[DAG TEST]", "WARN NativeCodeLoader", "INFO - "):
        assert chatty not in out and chatty not in r.stderr
    assert str(logs) in r.stderr  # the logs' folder is named first


def test_an_unexpected_error_is_named_and_points_at_debug():
    from freshrec.cli.console import error_line

    assert error_line(ZeroDivisionError("division by zero")) == \
        "ZeroDivisionError: division by zero (unexpected: rerun with --debug for the traceback)"
    assert error_line(ValueError("give --date as YYYY-MM-DD")) == "give --date as YYYY-MM-DD"


def test_json_output_of_an_import_is_one_object_and_a_rerun_says_already_imported(tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path / "data"))
    f = tmp_path / "clicks.csv"
    f.write_text("userId,item_id,event_type,ts\nu1,i1,click,2026-11-27T10:00:00+00:00\n"
                 "u2,i2,view,2026-11-27T11:00:00+00:00\nu3,i3,teleport,2026-11-27T12:00:00+00:00\n")
    assert main(["import", "events", str(f), "--map", "user_id=userId", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)  # stdout is the JSON object alone
    assert first["rows"] == 3 and first["already_imported"] is False
    assert "unknown_event_type" in first["refused"]
    assert main(["--json", "import", "events", str(f), "--map", "user_id=userId"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["already_imported"] is True and again["file_id"] == first["file_id"]
    # without --json: the sentence for people
    assert main(["import", "events", str(f), "--map", "user_id=userId"]) == 0
    assert "already imported 3 event rows" in capsys.readouterr().out


def test_the_walkthrough_notes_the_airflow_env_as_an_owner_only_hash_without_secrets(tmp_path):
    """The note of which environment the Airflow stack runs with holds no token (only a hash),
    is readable by its owner only, and still tells a changed environment from the same one."""
    import stat

    from freshrec.cli.walkthrough import record_stack_env, stack_env_matches

    env = {"FRESHREC_TOKEN": "a-secret-client-token", "FRESHREC__PRIVACY__HMAC_KEY": "k" * 32}
    f = tmp_path / "freshrec-env.json"
    f.write_text('{"FRESHREC_TOKEN": "a-secret-client-token"}')  # an older run's plain copy
    f.chmod(0o644)
    assert not stack_env_matches(f, env)
    record_stack_env(f, env)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    text = f.read_text()
    assert "a-secret-client-token" not in text and "k" * 32 not in text
    assert stack_env_matches(f, env)
    assert not stack_env_matches(f, {**env, "FRESHREC_TOKEN": "another"})
    assert not stack_env_matches(tmp_path / "absent.json", env)


def test_the_program_leaves_with_the_commands_code_after_its_threads_and_exit_hooks(tmp_path):
    """`freshrec` skips the interpreter's final teardown (where Arrow's thread pools can abort a
    finished command with exit 134), but not what a normal exit does before it: a running
    non-daemon thread is joined, atexit hooks run, piped output is flushed, and the code is the
    command's (0 for --version, 2 for a usage error)."""
    marker = tmp_path / "thread-finished"
    prog = ("import atexit, sys, threading, time\n"
            f"def late(): time.sleep(0.5); open({str(marker)!r}, 'w').write('done')\n"
            "threading.Thread(target=late).start()\n"
            "atexit.register(lambda: print('exit hook ran'))\n"
            "sys.argv = ['freshrec', *sys.argv[1:]]\n"
            "from freshrec.cli.main import entry\n"
            "entry()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-c", prog, "--version"], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].startswith("freshrec ")
    assert ok.stdout.splitlines()[-1] == "exit hook ran"
    assert marker.read_text() == "done"
    bad = subprocess.run([sys.executable, "-c", prog, "no-such-command"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "usage error" in bad.stderr
