"""Running the Spark jobs with ``spark-submit``: the submitter, not the job's code, decides the
master, the jars and the driver's memory.

With ``spark.submit: true`` (the ``cluster`` profile) ``freshrec run`` calls :func:`run_job`,
which runs ``spark-submit --master <spark.master>`` with the Delta jars
(``--jars``; see :mod:`freshrec.ops.jars`) and their conf, the project's packages as ``--py-files`` (a
zip the executors import ``freshrec``, ``spark_jobs`` and ``recmodels`` from) and
``spark_jobs/submit_driver.py`` as the driver, in client mode (the driver runs here and reads the
settings like any job). Otherwise :func:`run_job` runs the job in this process (``local[*]``).
The batch DAG's Spark tasks hand the same :func:`plan` to Airflow's ``SparkSubmitOperator``
(:mod:`freshrec.ops.spark_operator`), whose ``spark_default`` connection names the master.

An unreachable ``spark://`` master or missing jars fail before anything is submitted, with a one-line
error naming what is missing and how to start it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from freshrec.contracts.jobs import BY_NAME, SPARK_JOBS
from freshrec.settings import PROJECT_ROOT, Settings, load_settings

JOBS = SPARK_JOBS  # the jobs spark-submit runs (freshrec.contracts.jobs)
PACKAGES = ("freshrec", "spark_jobs", "recmodels")
RESULT = "FRESHREC_RESULT "


class SubmitError(RuntimeError):
    """A job could not be submitted (cluster down, jars missing) or its driver failed."""


def spark_submit() -> Path:
    from freshrec.ops.cluster import spark_home

    return spark_home() / "bin" / "spark-submit"


def check_master(master: str) -> None:
    """Fail with a one-line reason when a ``spark://`` master does not accept connections."""
    from freshrec.ops.cluster import reachable

    if not master.startswith("spark://"):
        return
    for hostport in master[len("spark://"):].split(","):
        u = urlparse(f"spark://{hostport}")
        if reachable(u.hostname or "127.0.0.1", u.port or 7077):
            return
    raise SubmitError(f"the Spark master {master} is not reachable: start the loopback cluster "
                      "with `make cluster-up` (or set spark.master / SPARK_MASTER to a running one)")


def source_zip(out_dir: Path | None = None) -> Path:
    """The project's Python packages as one zip for ``--py-files``; named by content hash."""
    files = sorted(p for pkg in PACKAGES for p in (PROJECT_ROOT / pkg).rglob("*.py")
                   if "__pycache__" not in p.parts and "gen" not in p.relative_to(PROJECT_ROOT).parts)
    h = hashlib.sha1()
    for p in files:
        h.update(str(p.relative_to(PROJECT_ROOT)).encode())
        h.update(p.read_bytes())
    out_dir = out_dir or PROJECT_ROOT / ".cluster" / "pyfiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"freshrec-src-{h.hexdigest()[:12]}.zip"
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in files:
                z.write(p, p.relative_to(PROJECT_ROOT))
        os.replace(tmp, target)
    return target


def _secret_properties(conf: dict[str, str], settings: Settings) -> Path:
    """Write ``conf`` to a properties file of mode 0600 under the local data directory."""
    d = settings.data_dir / "spark-tmp"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "s3-credentials.properties"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k} {v}\n" for k, v in conf.items())
    os.chmod(path, 0o600)
    return path


def plan(job: str, argv: list[str], settings: Settings) -> dict:
    """What spark-submit gets for ``job``: ``name``, ``driver_memory``, ``py_files``, ``jars``
    (paths), ``conf`` (pairs), ``properties_file`` (the S3 credentials, or None),
    ``application`` (the driver script) and ``application_args``. :func:`command` makes the
    command line of it; the batch DAG's :class:`freshrec.ops.spark_operator.SparkJobOperator` hands it
    to Airflow's ``SparkSubmitOperator``. The master is not in it: the submitter decides."""
    from freshrec.ops.jars import DELTA_CONF, delta_jars, require_delta_jars
    from freshrec.storage.spark import delta_tuning

    cfg = settings.spark
    backend = settings.delta.backend
    jars = require_delta_jars() if backend == "spark" else (delta_jars() if backend == "auto" else [])
    conf = {"spark.pyspark.python": sys.executable, "spark.pyspark.driver.python": sys.executable,
            "spark.executor.memory": cfg.executor_memory,
            "spark.executorEnv.OPENBLAS_NUM_THREADS": "1", "spark.log.level": "WARN"}
    if jars:
        conf.update({**DELTA_CONF, **delta_tuning(settings)})
    if settings.data_is_uri:  # s3:// tables: hadoop-aws and S3A's conf (freshrec/storage/objects.py)
        from freshrec.ops.jars import require_s3_jars
        from freshrec.storage.objects import spark_conf

        jars = [*jars, *require_s3_jars()]
        conf.update(spark_conf(settings))
    conf.update(cfg.extra_conf)
    # credentials go in a file only the user can read, not on the command line (ps shows it)
    secret = {k: conf.pop(k) for k in list(conf) if k.startswith("spark.hadoop.fs.s3a.")
              and k.rsplit(".", 1)[-1] in ("key", "token")}
    return {"name": f"{cfg.app_name}-{job}", "driver_memory": cfg.driver_memory,
            "py_files": str(source_zip()), "jars": [str(j) for j in jars], "conf": conf,
            "properties_file": str(_secret_properties(secret, settings)) if secret else None,
            "application": str(PROJECT_ROOT / "spark_jobs" / "submit_driver.py"),
            "application_args": [job, *argv]}


def command(job: str, argv: list[str], settings: Settings) -> list[str]:
    """The spark-submit command line for ``job`` with the job's own arguments ``argv``."""
    p = plan(job, argv, settings)
    cmd = [str(spark_submit()), "--master", settings.spark.master, "--deploy-mode", "client",
           "--name", p["name"], "--driver-memory", p["driver_memory"], "--py-files", p["py_files"]]
    if p["jars"]:
        cmd += ["--jars", ",".join(p["jars"])]
    for k, v in p["conf"].items():
        cmd += ["--conf", f"{k}={v}"]
    if p["properties_file"]:
        cmd += ["--properties-file", p["properties_file"]]
    return cmd + [p["application"], *p["application_args"]]


def submit(job: str, argv: list[str], settings: Settings, env: dict[str, str] | None = None,
           timeout: float | None = None) -> dict:
    """Run ``job`` under spark-submit and return its result; its log goes to stderr."""
    from freshrec.ops.jars import JarsMissing

    if job not in JOBS:
        raise SubmitError(f"{job!r} is not a Spark job; submit one of {sorted(JOBS)}")
    try:
        cmd = command(job, argv, settings)
    except JarsMissing as e:
        raise SubmitError(str(e)) from None
    check_master(settings.spark.master)
    run_env = {**os.environ, **(env or {}), "FRESHREC_PROJECT_ROOT": str(PROJECT_ROOT),
               "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run(cmd, env=run_env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    lines = proc.stdout.splitlines()
    results = [ln for ln in lines if ln.startswith(RESULT)]
    for ln in lines:
        if not ln.startswith(RESULT):
            print(ln, file=sys.stderr)
    if proc.returncode != 0 or not results:
        raise SubmitError(f"spark-submit {job} on {settings.spark.master} failed (exit "
                          f"{proc.returncode}); its driver log is above")
    return json.loads(results[-1][len(RESULT):])


def run_job(job: str, argv: list[str], submit_: bool | None = None) -> dict:
    """Run a batch job: under spark-submit when ``spark.submit`` is on (or ``submit_`` says so)
    and it is a Spark job, else in this process. ``argv`` are the job's arguments (``--date`` or
    ``--start/--end``, ``--profile``)."""
    from freshrec.interval import job_parser

    args, _ = job_parser(job).parse_known_args(argv)
    settings = load_settings(args.profile)
    if (settings.spark.submit if submit_ is None else submit_) and job in JOBS:
        return submit(job, argv, settings)
    module = BY_NAME[job].module
    return importlib.import_module(module).main(argv)
