"""A Spark standalone cluster on loopback: one master and N workers from the installed pyspark.

``make cluster-up`` / ``make cluster-down`` call ``python -m freshrec.ops.cluster up|down``. The pip
pyspark has no ``sbin/start-master.sh``, but it ships ``sbin/spark-daemon.sh``, which starts the
master and worker classes the same way (SPARK_HOME = the pyspark package folder). Pids, logs and
the workers' scratch space live under ``.cluster/`` (ignored by git; ``FRESHREC_CLUSTER_DIR`` moves
it). Everything binds to 127.0.0.1. Workers get one core and modest memory each, so two workers are
a real cluster of two executors on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from freshrec.settings import PROJECT_ROOT

MASTER = "org.apache.spark.deploy.master.Master"
WORKER = "org.apache.spark.deploy.worker.Worker"


class ClusterError(RuntimeError):
    """The cluster did not start, or is not there."""


@dataclass(frozen=True)
class Cluster:
    port: int = 7077
    webui_port: int = 8080
    workers: int = 2
    worker_cores: int = 1
    worker_memory: str = "2g"
    home: Path | None = None  # .cluster/ unless given

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    @property
    def dir(self) -> Path:
        return Path(self.home or os.environ.get("FRESHREC_CLUSTER_DIR") or PROJECT_ROOT / ".cluster")


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _env(c: Cluster) -> dict[str, str]:
    d = c.dir
    return {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_PID_DIR": str(d / "pids"),
            "SPARK_LOG_DIR": str(d / "logs"), "SPARK_WORKER_DIR": str(d / "work"),
            "SPARK_LOCAL_DIRS": str(d / "tmp"), "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_MASTER_HOST": "127.0.0.1", "SPARK_IDENT_STRING": f"freshrec-{c.port}",
            "PYSPARK_PYTHON": sys.executable,
            # one task per worker core: a multi-threaded BLAS in each task would oversubscribe
            "OPENBLAS_NUM_THREADS": "1"}


def _daemon(c: Cluster, action: str, cls: str, instance: int, *args: str) -> None:
    script = spark_home() / "sbin" / "spark-daemon.sh"
    proc = subprocess.run(["bash", str(script), action, cls, str(instance), *args], env=_env(c),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"spark-daemon.sh {action} {cls.rsplit('.', 1)[-1]} {instance} failed: "
                           f"{(proc.stdout + proc.stderr).strip()[-2000:]}")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def master_state(c: Cluster) -> dict:
    """The master's own JSON status (its web UI's /json/), or ClusterError when it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.webui_port}/json/", timeout=10) as r:
            return json.loads(r.read())
    except OSError as e:
        raise ClusterError(f"no Spark master web UI on 127.0.0.1:{c.webui_port} ({e}): start the "
                           "cluster with `make cluster-up`") from e


def alive_workers(c: Cluster) -> int:
    return sum(1 for w in master_state(c).get("workers", []) if w.get("state") == "ALIVE")


def up(c: Cluster, wait_s: float = 90.0) -> str:
    """Start the master and the workers (those already running are left alone); wait until every
    worker has registered. Returns the master URL."""
    for sub in ("pids", "logs", "work", "tmp"):
        (c.dir / sub).mkdir(parents=True, exist_ok=True)
    if shutil_which("java") is None:
        raise ClusterError("java is not on the PATH: install a JRE (make system-deps) to run Spark")
    if not reachable("127.0.0.1", c.port):
        _daemon(c, "start", MASTER, 1, "--host", "127.0.0.1", "--port", str(c.port),
                "--webui-port", str(c.webui_port))
    _wait(lambda: reachable("127.0.0.1", c.port), wait_s, c, "the master to listen")
    _wait(lambda: _ui_up(c), wait_s, c, "the master's web UI")
    for i in range(1, c.workers + 1):
        if not _pid_alive(c, WORKER, i):
            _daemon(c, "start", WORKER, i, c.url, "--host", "127.0.0.1", "--cores",
                    str(c.worker_cores), "--memory", c.worker_memory, "--webui-port", "0",
                    "--work-dir", str(c.dir / "work" / str(i)))
    _wait(lambda: _alive_or_zero(c) >= c.workers, wait_s, c, f"{c.workers} workers to register")
    return c.url


def _alive_or_zero(c: Cluster) -> int:
    """Live workers, 0 while the master's UI does not answer in time (a busy machine)."""
    try:
        return alive_workers(c)
    except ClusterError:
        return 0


def down(c: Cluster) -> None:
    """Stop the workers and the master (spark-daemon.sh stop; a daemon not running is fine)."""
    errors = []
    for i in range(c.workers, 0, -1):
        try:
            _daemon(c, "stop", WORKER, i)
        except ClusterError as e:
            errors.append(str(e))
    try:
        _daemon(c, "stop", MASTER, 1)
    except ClusterError as e:
        errors.append(str(e))
    if errors:
        raise ClusterError("; ".join(errors))


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def _ui_up(c: Cluster) -> bool:
    try:
        master_state(c)
        return True
    except ClusterError:
        return False


def _pid_alive(c: Cluster, cls: str, instance: int) -> bool:
    pid_file = c.dir / "pids" / f"spark-freshrec-{c.port}-{cls}-{instance}.pid"
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def _wait(check, wait_s: float, c: Cluster, what: str) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    logs = sorted((c.dir / "logs").glob("*.out"))
    tail = ""
    if logs:
        tail = "\n".join(logs[-1].read_text(errors="replace").splitlines()[-15:])
    raise ClusterError(f"timed out after {wait_s:.0f} s waiting for {what} ({c.url}); logs in "
                       f"{c.dir / 'logs'}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Spark standalone cluster on loopback")
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--port", type=int, default=int(os.environ.get("SPARK_MASTER_PORT", 7077)))
    ap.add_argument("--webui-port", type=int,
                    default=int(os.environ.get("SPARK_MASTER_WEBUI_PORT", 8080)))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-memory", default=os.environ.get("SPARK_WORKER_MEMORY", "2g"))
    args = ap.parse_args(argv)
    c = Cluster(port=args.port, webui_port=args.webui_port, workers=args.workers,
                worker_memory=args.worker_memory)
    try:
        if args.action == "up":
            print(f"Spark master {up(c)} with {alive_workers(c)} workers "
                  f"(web UI http://127.0.0.1:{c.webui_port}, logs {c.dir / 'logs'})")
        elif args.action == "down":
            down(c)
            print(f"Spark cluster {c.url} stopped")
        else:
            print(f"Spark master {c.url}: {alive_workers(c)} workers alive")
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
