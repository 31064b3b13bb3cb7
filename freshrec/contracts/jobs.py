"""The batch jobs: one table for the DAGs, the command line (`freshrec run`) and spark-submit.

Each :class:`Job` names its module (imported by name where it runs, so the layers stay apart:
the bottom floor never imports a lane) and whether it needs a Spark session (only those go to
spark-submit when ``spark.submit`` is on). ``tests/test_layers.py`` checks that every module
named here exists in a lane and that no other bottom-floor file names a lane module as a string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str  # as `freshrec run NAME` and the DAG's task id take it
    module: str  # has main(argv) -> dict
    uses_spark: bool


JOBS: tuple[Job, ...] = (
    Job("ingest", "spark_jobs.ingest", True),
    Job("clean", "spark_jobs.clean", True),
    Job("features", "spark_jobs.features", True),
    Job("evaluate", "spark_jobs.evaluate", True),
    Job("gate", "spark_jobs.gate", False),
    Job("build-index", "nearline.snapshots", False),
)
BY_NAME = {j.name: j for j in JOBS}
SPARK_JOBS = {j.name: j.module for j in JOBS if j.uses_spark}
