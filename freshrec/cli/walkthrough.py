"""``make run`` for a person: the embedded dataset, the batch DAG under Airflow, the report and one
live gRPC request, as a short progress view; Airflow's and Spark's output go to log files whose
paths are printed, and the end names the served champion and where the tables, the MLflow UI and
the logs are.

    python -m freshrec.cli.walkthrough --date 2026-11-27 --run-after 2026-11-28 [--logs DIR]
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
    """The task names of a TaskFlow DAG file (its ``@task``-decorated functions), in file order."""
    text = dag_file.read_text()
    return re.findall(r"@task[^\n]*\n\s*def (\w+)\(", text)


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


def summary(settings, logs: Path) -> str:
    """Where everything is: the served champion, the tables, the MLflow UI, the logs."""
    champion = "none yet (the gate promoted nothing)"
    try:
        from freshrec import registry
        from freshrec.tracking import mlflow_for

        mlflow_for(settings)
        c = registry.resolve(registry.ALIAS)
        champion = f"{c.label} (gate: {c.tags.get('gate_reason', '') or 'no reason recorded'})"
    except Exception as e:  # noqa: BLE001 - the summary still says where things are
        champion = f"unknown ({' '.join(str(e).split())[:120]})"
    return "\n".join([
        f"Served champion:  freshrec-retrieval@champion = {champion}",
        f"Delta tables:     {settings.tables_dir}",
        f"MLflow:           {settings.mlflow_tracking_uri}  (UI: `make mlflow-ui`, then "
        "http://127.0.0.1:5000)",
        f"Logs:             {logs} (airflow-dag.log has the DAG's Airflow and Spark output)",
        "Next:             `.venv/bin/freshrec serve` keeps the server up; `freshrec recommend "
        "--user u42` asks it; `freshrec --help` lists the rest",
    ])


if __name__ == "__main__":
    sys.exit(main())
