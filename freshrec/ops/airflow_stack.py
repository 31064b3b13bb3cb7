"""Airflow as it is deployed, on loopback: PostgreSQL (Debian's package) as the metadata database,
and a scheduler (LocalExecutor), a DAG processor and an API server as separate processes.

``make airflow-up`` / ``make airflow-down`` call ``python -m freshrec.ops.airflow_stack up|down``.
``up`` starts the Debian PostgreSQL cluster when it is down (``pg_ctlcluster``), creates the
``freshrec`` role and the ``airflow`` database once, migrates it, and starts the three Airflow
processes with ``AIRFLOW_HOME=.airflow/deployed`` (logs and pids there). The DAGs are this
project's ``dags/``; tasks import the project from its source tree (``PYTHONPATH``). The API server
listens on 127.0.0.1 only and uses the simple auth manager with every caller an admin: fine on
loopback, not on a shared host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from freshrec.settings import PROJECT_ROOT

PROCESSES = ("api-server", "scheduler", "dag-processor")


class StackError(RuntimeError):
    """A service of the stack is missing or did not start; the message says which and how."""


@dataclass(frozen=True)
class Stack:
    api_port: int = 8793
    pg_port: int = 5432
    user: str = "freshrec"
    password: str = "freshrec"
    database: str = "airflow"
    home: Path | None = None
    extra_env: tuple[tuple[str, str], ...] = ()  # e.g. FRESHREC_* for the tasks

    @property
    def dir(self) -> Path:
        return Path(self.home or PROJECT_ROOT / ".airflow" / "deployed")

    @property
    def sql_conn(self) -> str:
        return (f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.pg_port}/"
                f"{self.database}")

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


def airflow_env(s: Stack) -> dict[str, str]:
    """The environment of the Airflow processes: this one's, the stack's, ``extra_env``, and
    ``AIRFLOW_CONN_SPARK_DEFAULT`` (:func:`spark_connection`) when the settings submit."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "AIRFLOW_HOME": str(s.dir),
           "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__CORE__PARALLELISM": "4",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{s.api}/execution/",
           "AIRFLOW__API__HOST": "127.0.0.1",
           "AIRFLOW__API__PORT": str(s.api_port),
           "AIRFLOW__API__BASE_URL": s.api,
           "AIRFLOW__API_AUTH__JWT_SECRET": _secret(s),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": s.sql_conn,
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
           "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "30",
           "PYTHONPATH": str(PROJECT_ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""),
           "PYSPARK_PYTHON": sys.executable, **dict(s.extra_env)}
    conn = spark_connection(env)
    if conn:
        env["AIRFLOW_CONN_SPARK_DEFAULT"] = conn
    return env


def spark_connection(env: dict[str, str]) -> str | None:
    """The ``spark_default`` connection (Airflow's JSON form) for the batch DAG's
    ``SparkSubmitOperator``s when the settings ``env`` selects have ``spark.submit`` on: the
    master is ``spark.master``, client deploy mode, ``spark-submit`` from the PATH (the venv's).
    None when they do not submit, or cannot be loaded (the tasks then fail naming the reason)."""
    from freshrec.settings import SettingsError, load_settings

    try:
        settings = load_settings(env=env)
    except SettingsError:
        return None
    if not settings.spark.submit:
        return None
    return json.dumps({"conn_type": "spark", "host": settings.spark.master,
                       "extra": {"deploy-mode": "client", "spark-binary": "spark-submit"}})


def _secret(s: Stack) -> str:
    f = s.dir / "jwt_secret"
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(os.urandom(24).hex())
    return f.read_text().strip()


def _run(cmd: list[str], what: str, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise StackError(f"{what} failed ({' '.join(cmd)}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
    return proc.stdout


def postgres_up(s: Stack) -> None:
    """Start Debian's PostgreSQL cluster when it is down; create the role and database once."""
    if shutil.which("pg_lsclusters") is None:
        raise StackError("PostgreSQL is not installed: apt-get install -y postgresql "
                         "(make airflow-up does it where apt-get works)")
    clusters = [ln.split() for ln in _run(["pg_lsclusters", "--no-header"], "pg_lsclusters")
                .splitlines() if ln.strip()]
    mine = [c for c in clusters if c[2] == str(s.pg_port)]
    if not mine:
        raise StackError(f"no PostgreSQL cluster on port {s.pg_port} (pg_lsclusters lists "
                         f"{[c[:3] for c in clusters]}): create one with pg_createcluster")
    version, name, _, status = mine[0][:4]
    if status != "online":
        _run(["pg_ctlcluster", version, name, "start"], f"starting PostgreSQL {version}/{name}")

    if _psql(s, f"SELECT 1 FROM pg_roles WHERE rolname = '{s.user}'").strip() != "1":
        _psql(s, f"CREATE ROLE {s.user} LOGIN PASSWORD '{s.password}'")
    for db in (s.database, "mlflow"):
        ensure_database(s, db)


def _psql(s: Stack, sql: str) -> str:
    return _run(["runuser", "-u", "postgres", "--", "psql", "-p", str(s.pg_port), "-tAc", sql],
                "psql as postgres (PostgreSQL's superuser; run as root)")


def ensure_database(s: Stack, db: str) -> None:
    if _psql(s, f"SELECT 1 FROM pg_database WHERE datname = '{db}'").strip() != "1":
        _psql(s, f"CREATE DATABASE {db} OWNER {s.user}")


def drop_database(s: Stack, db: str | None = None) -> None:
    """Drop the stack's metadata database, or ``db`` (tests use databases of their own)."""
    _psql(s, f"DROP DATABASE IF EXISTS {db or s.database} WITH (FORCE)")


def mlflow_up(s: Stack, port: int = 5000, artifacts: Path | None = None,
              database: str = "mlflow", wait_s: float = 90.0) -> str:
    """Start an MLflow tracking server on 127.0.0.1:``port`` with its backend store in PostgreSQL
    (``database``) and proxied artifacts under ``artifacts`` (default ``<home>/mlflow-artifacts``);
    returns its URL. Clients need only the URL: artifacts go through the server."""
    postgres_up(s)
    ensure_database(s, database)
    artifacts = artifacts or s.dir / "mlflow-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (s.dir / "pids").mkdir(parents=True, exist_ok=True)
    (s.dir / "logs").mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    if not _alive(s, "mlflow"):
        backend = (f"postgresql+psycopg2://{s.user}:{s.password}@127.0.0.1:{s.pg_port}/"
                   f"{database}")
        log = open(s.dir / "logs" / "mlflow.log", "ab")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", backend, "--serve-artifacts",
             "--artifacts-destination", artifacts.as_uri(), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _pid_file(s, "mlflow").write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if not _alive(s, "mlflow"):
            raise StackError(f"mlflow server exited at start; see {s.dir / 'logs' / 'mlflow.log'}")
        time.sleep(1)
    raise StackError(f"MLflow server not up after {wait_s:.0f} s at {url}; see "
                     f"{s.dir / 'logs' / 'mlflow.log'}")


def mlflow_down(s: Stack) -> None:
    _stop(s, "mlflow")


def _pid_file(s: Stack, name: str) -> Path:
    return s.dir / "pids" / f"{name}.pid"


def _alive(s: Stack, name: str) -> int | None:
    try:
        pid = int(_pid_file(s, name).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def healthy(s: Stack) -> dict | None:
    try:
        with urllib.request.urlopen(f"{s.api}/api/v2/monitor/health", timeout=3) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def up(s: Stack, wait_s: float = 180.0) -> str:
    postgres_up(s)
    env = airflow_env(s)
    (s.dir / "pids").mkdir(parents=True, exist_ok=True)
    (s.dir / "logs").mkdir(parents=True, exist_ok=True)
    _run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], "airflow db migrate",
         env=env)
    for name in PROCESSES:
        if _alive(s, name):
            continue
        log = open(s.dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), name], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        _pid_file(s, name).write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        h = healthy(s)
        if h and h.get("scheduler", {}).get("status") == "healthy" \
                and h.get("dag_processor", {}).get("status") == "healthy":
            return s.api
        dead = [n for n in PROCESSES if not _alive(s, n)]
        if dead:
            raise StackError(f"airflow {dead[0]} exited at start; see {s.dir / 'logs' / dead[0]}.log")
        time.sleep(2)
    raise StackError(f"Airflow not healthy after {wait_s:.0f} s at {s.api} (last health: "
                     f"{healthy(s)}); logs in {s.dir / 'logs'}")


def down(s: Stack) -> None:
    """Stop the Airflow processes this module started (each by its own process group)."""
    for name in reversed(PROCESSES):
        _stop(s, name)


def _stop(s: Stack, name: str) -> None:
    pid = _alive(s, name)
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)  # the group this module started it in
        except OSError:
            pass
        for _ in range(60):
            if not _alive(s, name):
                break
            time.sleep(0.5)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    _pid_file(s, name).unlink(missing_ok=True)


def api(s: Stack, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{s.api}/api/v2{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise StackError(f"{method} {path}: HTTP {e.code} {e.read().decode()[:500]}") from e
    except OSError as e:
        raise StackError(f"the Airflow API server at {s.api} is not reachable ({e}): start it "
                         "with `make airflow-up`") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Airflow (scheduler, DAG processor, API server) on "
                                 "PostgreSQL, on loopback")
    ap.add_argument("action", choices=["up", "down", "status", "mlflow-up", "mlflow-down"])
    ap.add_argument("--api-port", type=int, default=int(os.environ.get("AIRFLOW_API_PORT", 8793)))
    ap.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    args = ap.parse_args(argv)
    s = Stack(api_port=args.api_port)
    try:
        if args.action == "mlflow-up":
            print(f"MLflow tracking server {mlflow_up(s, args.mlflow_port)} (backend PostgreSQL "
                  f"{s.pg_port}/mlflow, artifacts {s.dir / 'mlflow-artifacts'}, proxied)")
        elif args.action == "mlflow-down":
            mlflow_down(s)
            print("MLflow server stopped")
        elif args.action == "up":
            print(f"Airflow API server {up(s)} (scheduler, dag-processor; metadata on "
                  f"PostgreSQL 127.0.0.1:{s.pg_port}/{s.database}; logs {s.dir / 'logs'})")
        elif args.action == "down":
            down(s)
            print("Airflow processes stopped (PostgreSQL keeps running)")
        else:
            print(json.dumps(healthy(s)))
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
