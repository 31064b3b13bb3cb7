"""``make run`` for a person: the embedded dataset, the batch DAG under Airflow, the report and one
live gRPC request, as a short progress view; Airflow's and Spark's output go to log files whose
paths are printed, and the end names the served champion and where the tables, the MLflow UI and
the logs are.

    python -m freshrec.cli.walkthrough --date 2026-11-27 --run-after 2026-11-28 [--logs DIR]

With ``FRESHREC_PROFILE=cluster`` (a profile whose ``spark.submit`` is on) it runs the same lane
as deployed (:func:`cluster_main`): the Spark jobs on the standalone cluster (``make cluster-up``)
through ``SparkSubmitOperator``, the batch DAG triggered through the REST API of the Airflow stack
of ``make airflow-up`` (scheduler, DAG processor, API server on PostgreSQL) and followed to its
end, the rollout DAG likewise, MLflow on the tracking server of ``make mlflow-up``; it starts
PostgreSQL, the MLflow server and the Airflow stack when they are not running.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from freshrec.settings import PROJECT_ROOT, load_settings

# Airflow 3's `dags test` logs "[DAG TEST] starting task_id=ingest map_index=-1" and "[DAG TEST] end
# task task_id=ingest map_index=-1" around each task (airflow/sdk/definitions/dag.py).
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=([\w.-]+)")
_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=([\w.-]+)")


def dag_tasks(dag_file: Path) -> list[str]:
    """The task names of a DAG file (its ``@task``-decorated functions and its
    ``SparkJobOperator(job=...)`` tasks), in file order."""
    text = dag_file.read_text()
    return [a or b for a, b in re.findall(
        r"@task[^\n]*\n\s*def (\w+)\(|SparkJobOperator\(job=\"(\w+)\"", text)]


def task_events(line: str) -> tuple[str, str] | None:
    """(task, "running" or "done") when an Airflow `dags test` line starts or ends a task."""
    m = _TASK_END.search(line)
    if m:
        return m.group(1), "done"
    m = _TASK_START.search(line)
    return (m.group(1), "running") if m else None


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _run_logged(cmd: list[str], log_file: Path, env: dict[str, str], on_line=None) -> int:
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=PROJECT_ROOT, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if on_line:
                on_line(line)
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--date", required=True, help="the batch day (YYYY-MM-DD)")
    p.add_argument("--run-after", required=True, help="Airflow's logical run date (the day after)")
    p.add_argument("--logs", help="folder for the log files (default: <data_dir>/logs/run-<time>)")
    p.add_argument("--smoke-user", default="u42")
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    if (os.environ.get("FRESHREC_PROFILE") or "local") != "local":
        return cluster_main(args)
    settings = load_settings()
    logs = Path(args.logs) if args.logs else (settings.data_dir / "logs" /
                                              f"run-{time.strftime('%Y%m%d-%H%M%S')}")
    logs.mkdir(parents=True, exist_ok=True)
    py, console = sys.executable, Console(stderr=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [py, "-m", "freshrec.cli.main"]
    console.print(f"freshrec walkthrough for {args.date}: logs in [bold]{logs}[/]", soft_wrap=True)
    tasks = dag_tasks(PROJECT_ROOT / "dags" / "freshrec_batch.py")
    steps = [("dataset", 1), ("airflow db", 1), ("batch DAG", len(tasks)), ("rollout DAG", 1),
             ("report", 1), ("live request", 1)]

    def fail(step: str, log_file: Path) -> int:
        tail = log_file.read_text().splitlines()[-15:] if log_file.exists() else []
        console.print(f"[red]{step} failed[/]; the last lines of {log_file}:")
        for ln in tail:
            console.print("  " + ln, markup=False, highlight=False)
        console.print(f"full log: {log_file}", soft_wrap=True)
        return 1

    with Progress(SpinnerColumn(), TextColumn("{task.description:<40}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        ids = {name: bar.add_task(name, total=total, start=False) for name, total in steps}

        def step(name: str, cmd: list[str], log_name: str, extra_env=None, on_line=None) -> int:
            bar.start_task(ids[name])
            rc = _run_logged(cmd, logs / log_name, {**env, **(extra_env or {})}, on_line)
            if rc == 0:
                bar.update(ids[name], completed=bar.tasks[ids[name]].total)
            return rc

        if step("dataset", [*cli, "data", "synth", "--if-missing"], "dataset.log"):
            bar.stop()
            return fail("making the dataset", logs / "dataset.log")
        if step("airflow db", [_bin("airflow"), "db", "migrate"], "airflow-db.log"):
            bar.stop()
            return fail("airflow db migrate", logs / "airflow-db.log")
        done: list[str] = []

        def dag_line(line: str) -> None:
            ev = task_events(line)
            if ev and ev[1] == "running":
                bar.update(ids["batch DAG"], description=f"batch DAG: {ev[0]}")
            elif ev and ev[0] not in done:
                done.append(ev[0])
                bar.update(ids["batch DAG"], completed=len(done))

        if step("batch DAG", [_bin("airflow"), "dags", "test", "freshrec_batch", args.run_after],
                "airflow-dag.log", {"FRESHREC__REFRESHER__REPLICAS": "[]"}, dag_line):
            bar.stop()
            return fail("the batch DAG", logs / "airflow-dag.log")
        # the rollout DAG is scheduled on the gate's promotion (an Asset); `dags test` does not
        # follow Assets, so it runs here after the batch DAG
        if step("rollout DAG", [_bin("airflow"), "dags", "test", "freshrec_rollout"],
                "airflow-rollout.log", {"FRESHREC__REFRESHER__REPLICAS": "[]"}):
            bar.stop()
            return fail("the rollout DAG", logs / "airflow-rollout.log")
        report_file = logs / "report.txt"
        if step("report", [*cli, "report", "--date", args.date], "report.txt"):
            bar.stop()
            return fail("the report", report_file)
        if step("live request", [*cli, "serve", "--smoke", args.smoke_user], "serve.log",
                {"FRESHREC__SERVING__PORT": "0", "FRESHREC__SERVING__METRICS_PORT": "-1"}):
            bar.stop()
            return fail("the live request", logs / "serve.log")

    report = report_file.read_text().split("\n", 2)[-1]  # drop the "$ command" header
    print(report.rstrip())
    print()
    smoke = [ln for ln in (logs / "serve.log").read_text().splitlines()
             if ln.startswith(("live request", "answered", "user ", "   ", "  "))]
    print("\n".join(smoke))
    print()
    print(summary(settings, logs))
    return 0


# --- the cluster profile: the lane as deployed ---------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
ATTEST = "FRESHREC__PRIVACY__VOLUME_ENCRYPTED_ATTESTED"


def loopback_secrets(folder: Path) -> tuple[dict[str, str], list[str]]:
    """The secrets of a loopback run in ``folder`` (mode 0700, files 0600), made once: the HMAC
    key, the admin token, the data key (``privacy.data_key``) and a client token (not a setting:
    ``serve --smoke`` sends it, the server knows its SHA-256). Returns the environment that makes
    the settings use them, and the names of the files made now (empty when all were there)."""
    import hashlib
    import secrets as _secrets

    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    made = []
    values = {"hmac_key": lambda: _secrets.token_urlsafe(32),
              "admin_token": lambda: _secrets.token_urlsafe(32),
              "data_key": lambda: _secrets.token_hex(32),
              "client_token": lambda: _secrets.token_urlsafe(32)}
    for name, make in values.items():
        f = folder / name
        if not f.exists():
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(make() + "\n")
            made.append(name)
    read = {name: (folder / name).read_text().strip() for name in values}

    def sha(t: str) -> str:
        return hashlib.sha256(t.encode()).hexdigest()

    tokens = (f"[{{name: loopback-client, role: client, sha256: {sha(read['client_token'])}}}, "
              f"{{name: loopback-admin, role: admin, sha256: {sha(read['admin_token'])}}}]")
    return {"FRESHREC_SECRETS_DIR": str(folder), "FRESHREC__SERVING__TOKENS": tokens,
            "FRESHREC_TOKEN": read["client_token"]}, made


def _env_digest(task_env: dict[str, str]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(task_env, sort_keys=True).encode()).hexdigest()


def stack_env_matches(env_file: Path, task_env: dict[str, str]) -> bool:
    """Whether the Airflow stack was started (by :func:`record_stack_env`) with ``task_env``."""
    try:
        return env_file.read_text().strip() == _env_digest(task_env)
    except FileNotFoundError:
        return False


def record_stack_env(env_file: Path, task_env: dict[str, str]) -> None:
    """Note which environment the Airflow stack was started with: only a SHA-256 of it (the
    environment holds FRESHREC_TOKEN and other secrets), in a file only the owner can read."""
    env_file.unlink(missing_ok=True)
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_env_digest(task_env) + "\n")


def _loopback(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url.split(",")[0]).hostname or "") in LOOPBACK_HOSTS


def cluster_main(args) -> int:
    """The cluster profile's walkthrough; one line on stderr and exit 1 when a service is missing."""
    import json
    from urllib.parse import urlparse

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    from freshrec.ops import airflow_stack as af
    from freshrec.settings import SettingsError, local_data_dir
    from freshrec.ops.submit import SubmitError, check_master

    console = Console(stderr=True)
    profile = os.environ["FRESHREC_PROFILE"]

    def error(msg: str) -> int:
        console.print(f"[red]error:[/] {msg}", soft_wrap=True, highlight=False)
        return 1

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FRESHREC__REFRESHER__REPLICAS": "[]"}
    notes = []
    if not os.environ.get("FRESHREC_SECRETS_DIR"):
        try:
            data_dir = local_data_dir(os.environ.get("FRESHREC_DATA_DIR") or "data")
        except SettingsError as e:
            return error(f"{e}; or set FRESHREC_SECRETS_DIR to a secrets folder of your own")
        secrets_env, made = loopback_secrets(data_dir / "secrets")
        env.update(secrets_env)
        notes.append(f"secrets for this loopback run: {data_dir / 'secrets'} (hmac_key, admin_token, "
                     f"data_key, client_token; {'made now' if made else 'made by an earlier run'}); "
                     "a real deployment brings its own (FRESHREC_SECRETS_DIR)")
    try:
        settings = load_settings(env=env)
    except SettingsError as e:
        return error(str(e))
    if not settings.spark.submit:
        return error(f"profile {profile!r} does not submit its Spark jobs (spark.submit is false): "
                     "the walkthrough runs the embedded default with FRESHREC_PROFILE unset")
    master = settings.spark.master
    if settings.privacy.volume_encryption == "required" and ATTEST not in os.environ \
            and not settings.privacy.volume_encrypted_attested and _loopback(master):
        from freshrec.privacy.volume import encrypted_volume

        if not encrypted_volume(settings.data_dir)[0]:
            env[ATTEST] = "true"
            notes.append(f"loopback cluster: the data dir {settings.data_dir} is not on an encrypted "
                         f"volume; this run attests it ({ATTEST}=true); set {ATTEST}=false to have "
                         "the jobs refuse instead, as a deployment on a real cluster does")
            settings = load_settings(env=env)
    try:
        check_master(master)
    except SubmitError as e:
        return error(str(e))

    logs = Path(args.logs) if args.logs else (settings.data_dir / "logs" /
                                              f"run-{time.strftime('%Y%m%d-%H%M%S')}")
    logs.mkdir(parents=True, exist_ok=True)
    for n in notes:
        console.print(n, soft_wrap=True, highlight=False)
    console.print(f"freshrec walkthrough ({profile} profile, Spark master {master}) for "
                  f"{args.date}: logs in [bold]{logs}[/]", soft_wrap=True)

    # what the Airflow tasks need: the same settings as this process, and no cron runs (the run
    # below is triggered for the interval of --date; a cron run would process yesterday's)
    task_env = {k: v for k, v in env.items() if k.startswith("FRESHREC")}
    task_env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    stack = af.Stack(api_port=int(os.environ.get("AIRFLOW_API_PORT", 8793)),
                     database=os.environ.get("FRESHREC_AIRFLOW_DB", "airflow"),
                     home=Path(os.environ["FRESHREC_AIRFLOW_HOME"])
                     if os.environ.get("FRESHREC_AIRFLOW_HOME") else None,
                     extra_env=tuple(sorted(task_env.items())))
    tasks = dag_tasks(PROJECT_ROOT / "dags" / "freshrec_batch.py")
    steps = [("services", 3), ("dataset", 1), ("batch DAG", len(tasks)), ("rollout DAG", 1),
             ("report", 1), ("live request", 1)]
    run_id = f"walkthrough-{args.date}-{time.strftime('%H%M%S')}"
    task_logs = stack.dir / "logs" / "dag_id=freshrec_batch" / f"run_id={run_id}"

    with Progress(SpinnerColumn(), TextColumn("{task.description:<40}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        ids = {name: bar.add_task(name, total=total, start=False) for name, total in steps}

        def failed(msg: str) -> int:
            bar.stop()
            return error(msg)

        # PostgreSQL, the MLflow server, the Airflow stack: started when they are not running
        bar.start_task(ids["services"])
        uri = settings.mlflow_tracking_uri
        try:
            if uri.startswith("http"):
                u = urlparse(uri)
                if not _http_ok(f"{uri.rstrip('/')}/health"):
                    if u.hostname not in LOOPBACK_HOSTS:
                        return failed(f"the MLflow server {uri} is not reachable: start it (on "
                                      "loopback: `make mlflow-up`)")
                    bar.update(ids["services"], description="services: starting MLflow")
                    af.mlflow_up(stack, port=u.port or 5000,
                                 database=os.environ.get("FRESHREC_MLFLOW_DB", "mlflow"),
                                 wait_s=300)  # a new database migrates first: minutes here
            bar.update(ids["services"], advance=1)
            env_file = stack.dir / "freshrec-env.json"
            if af.healthy(stack) and stack_env_matches(env_file, task_env):
                bar.update(ids["services"], advance=2)
            else:
                if af.healthy(stack):  # started with other settings: the tasks need these
                    bar.update(ids["services"], description="services: restarting Airflow")
                    af.down(stack)
                bar.update(ids["services"], description="services: starting Airflow", advance=1)
                af.up(stack, wait_s=300)
                record_stack_env(env_file, task_env)
                bar.update(ids["services"], advance=1)
        except af.StackError as e:
            return failed(f"{' '.join(str(e).split())[:400]} (`make airflow-up` / `make mlflow-up`)")
        bar.update(ids["services"], description="services")

        bar.start_task(ids["dataset"])
        cli = [sys.executable, "-m", "freshrec.cli.main"]
        if _run_logged([*cli, "data", "synth", "--if-missing"], logs / "dataset.log", env):
            return failed(f"making the dataset failed; see {logs / 'dataset.log'}")
        bar.update(ids["dataset"], completed=1)

        bar.start_task(ids["batch DAG"])
        try:
            state, states = _trigger_and_follow(stack, "freshrec_batch", run_id, args.date,
                                                lambda st: _show(bar, ids["batch DAG"], tasks, st))
        except af.StackError as e:
            return failed(" ".join(str(e).split())[:400])
        (logs / "airflow-dag.log").write_text(json.dumps({"run_id": run_id, "state": state,
                                                          "tasks": states}, indent=1) + "\n")
        if state != "success":
            bad = [t for t, s in states.items() if s not in ("success", "skipped")]
            return failed(f"the batch DAG run {run_id} ended {state} (tasks {bad}); task logs in "
                          f"{task_logs}")
        bar.start_task(ids["rollout DAG"])
        try:
            state, _ = _trigger_and_follow(stack, "freshrec_rollout", f"{run_id}-rollout", None,
                                           lambda st: None)
        except af.StackError as e:
            return failed(" ".join(str(e).split())[:400])
        if state != "success":
            return failed(f"the rollout DAG ended {state}; task logs in {stack.dir / 'logs'}")
        bar.update(ids["rollout DAG"], completed=1)

        report_file = logs / "report.txt"
        bar.start_task(ids["report"])
        if _run_logged([*cli, "report", "--date", args.date], report_file, env):
            return failed(f"the report failed; see {report_file}")
        bar.update(ids["report"], completed=1)
        bar.start_task(ids["live request"])
        if _run_logged([*cli, "serve", "--smoke", args.smoke_user], logs / "serve.log",
                       {**env, "FRESHREC__SERVING__PORT": "0",
                        "FRESHREC__SERVING__METRICS_PORT": "-1"}):
            return failed(f"the live request failed; see {logs / 'serve.log'}")
        bar.update(ids["live request"], completed=1)

    print(report_file.read_text().split("\n", 2)[-1].rstrip())
    print()
    print("\n".join(ln for ln in (logs / "serve.log").read_text().splitlines()
                    if ln.startswith(("live request", "answered", "user ", "   ", "  "))))
    print()
    print(summary(settings, logs, dag_logs=f"the DAG's task logs (Spark's output among them): "
                                           f"{task_logs}"))
    return 0


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _show(bar, bar_id, tasks: list[str], states: dict[str, str]) -> None:
    done = sum(1 for t in tasks if states.get(t) == "success")
    running = [t for t in tasks if states.get(t) in ("running", "queued", "up_for_retry")]
    bar.update(bar_id, completed=done, description=f"batch DAG: {running[0]}" if running
               else "batch DAG")


def api_patient(stack, method: str, path: str, body: dict | None = None,
                patience_s: float = 180.0) -> dict:
    """:func:`freshrec.ops.airflow_stack.api`, retried while the API server does not answer in time
    (a busy machine) for up to ``patience_s``; HTTP errors are not retried."""
    from freshrec.ops.airflow_stack import StackError, api

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return api(stack, method, path, body)
        except StackError as e:
            if "is not reachable" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def _trigger_and_follow(stack, dag_id: str, run_id: str, day: str | None, on_states,
                        timeout_s: float = 6 * 3600) -> tuple[str, dict[str, str]]:
    """Unpause ``dag_id``, trigger ``run_id`` through the REST API (for the interval [day,
    day + 1) when ``day`` is given) and poll it until it ends; (state, {task: state})."""
    from datetime import datetime, timedelta, timezone

    from freshrec.ops.airflow_stack import StackError

    deadline = time.monotonic() + 180
    while dag_id not in {d["dag_id"] for d in
                         api_patient(stack, "GET", "/dags?limit=100")["dags"]}:
        if time.monotonic() > deadline:
            raise StackError(f"the DAG processor has not registered {dag_id} after 180 s; see "
                             f"{stack.dir / 'logs' / 'dag-processor.log'}")
        time.sleep(3)
    api_patient(stack, "PATCH", f"/dags/{dag_id}", {"is_paused": False})
    body: dict = {"dag_run_id": run_id, "logical_date": None}
    if day:
        start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
        body = {"dag_run_id": run_id, "logical_date": start.isoformat(),
                "data_interval_start": start.isoformat(),
                "data_interval_end": (start + timedelta(days=1)).isoformat()}
    try:
        state = api_patient(stack, "POST", f"/dags/{dag_id}/dagRuns", body)["state"]
    except StackError as e:
        if "HTTP 409" not in str(e):  # 409: a retried POST whose first try got through
            raise
        state = api_patient(stack, "GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
    end = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while True:
        tis = api_patient(stack, "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        states = {t["task_id"]: t["state"] for t in tis["task_instances"]}
        on_states(states)
        if state in ("success", "failed") or time.monotonic() > end:
            return state, states
        time.sleep(3)
        state = api_patient(stack, "GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]


def summary(settings, logs: Path, dag_logs: str = "airflow-dag.log has the DAG's Airflow and "
            "Spark output") -> str:
    """Where everything is: the served champion, the tables, the MLflow UI, the logs."""
    champion = "none yet (the gate promoted nothing)"
    try:
        from freshrec.contracts import registry
        from freshrec.tracking import mlflow_for

        mlflow_for(settings)
        c = registry.resolve(registry.ALIAS)
        champion = f"{c.label} (gate: {c.tags.get('gate_reason', '') or 'no reason recorded'})"
    except Exception as e:  # noqa: BLE001 - the summary still says where things are
        champion = f"unknown ({' '.join(str(e).split())[:120]})"
    return "\n".join([
        f"Served champion:  freshrec-retrieval@champion = {champion}",
        f"Delta tables:     {settings.tables_dir}",
        f"MLflow:           {settings.mlflow_tracking_uri}  " + (
            "(UI: the tracking server itself)" if settings.mlflow_tracking_uri.startswith("http")
            else "(UI: `make mlflow-ui`, then http://127.0.0.1:5000)"),
        f"Logs:             {logs} ({dag_logs})",
        "Next:             `.venv/bin/freshrec serve` keeps the server up; `freshrec recommend "
        "--user u42` asks it; `freshrec --help` lists the rest",
    ])


if __name__ == "__main__":
    sys.exit(main())
