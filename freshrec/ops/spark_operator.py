"""The batch DAG's Spark tasks: Airflow's ``SparkSubmitOperator`` (apache-airflow-providers-apache-
spark) when ``spark.submit`` is on, the job in the worker's process otherwise.

:class:`SparkJobOperator` decides when it runs, not when the DAG file is parsed (no settings are
read then): with ``spark.submit: true`` (the cluster profile) it fills the operator's fields from
:func:`freshrec.ops.submit.plan` (the Delta jars, the source zip for the executors, the conf, the
driver script and the interval's arguments) and lets ``SparkSubmitOperator.execute`` run
spark-submit against the ``spark_default`` connection: the connection's host is the master
(:func:`freshrec.ops.airflow_stack.airflow_env` sets it from ``spark.master`` as
``AIRFLOW_CONN_SPARK_DEFAULT``); a task whose connection is missing (the hook would fall back to
``yarn``) or names another master than ``spark.master`` fails with one line saying so
(:func:`check_connection`). The driver writes the job's result to a file the operator reads
and returns (XCom). On the embedded default (``local[*]``) it runs the job in this process, as
before. Either way it then attaches each output table's Delta version to its Asset event.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset


def check_connection(master: str | None, wanted: str) -> None:
    """Fail with one line (a :class:`freshrec.ops.submit.SubmitError`) unless the ``spark_default``
    connection's master is ``spark.master``: without the connection the provider's hook falls
    back to ``yarn``, which would otherwise end in a Java trace from spark-submit."""
    from freshrec.ops.submit import SubmitError

    if master and master != "yarn" and master == wanted:
        return
    got = ("missing or yarn (the provider's default when there is no spark_default connection)"
           if not master or master == "yarn" else repr(master))
    raise SubmitError(f"the spark_default connection's master is {got}, not spark.master "
                      f"{wanted!r}: set AIRFLOW_CONN_SPARK_DEFAULT (`make airflow-up` sets it from "
                      "the settings it starts with; restart it after changing the profile or "
                      "spark.master)")


class SparkJobOperator(SparkSubmitOperator):
    """Run the freshrec Spark job ``job`` (ingest, clean, features, evaluate) for the run's data
    interval; ``tables`` pairs each outlet Asset with the table whose version its event carries."""

    template_fields = ()  # every field is set in execute, from the settings of the worker

    def __init__(self, *, job: str, tables: list[tuple[Asset, str]] = (), **kwargs) -> None:
        kwargs.setdefault("task_id", job)
        kwargs.setdefault("outlets", list(dict.fromkeys(a for a, _ in tables)))
        super().__init__(conn_id="spark_default", deploy_mode="client", **kwargs)
        self.job = job
        self.tables = list(tables)

    def execute(self, context) -> dict:
        from freshrec.settings import load_settings
        from freshrec.ops.submit import SubmitError, check_master, plan, run_job

        argv = ["--start", context["data_interval_start"].isoformat(),
                "--end", context["data_interval_end"].isoformat()]
        settings = load_settings()
        if not settings.spark.submit:
            out = run_job(self.job, argv, submit_=False)
        else:
            from freshrec.ops.jars import JarsMissing

            self._hook = None
            master = self._get_hook()._connection["master"]
            check_connection(master, settings.spark.master)
            try:
                p = plan(self.job, argv, settings)
            except JarsMissing as e:
                raise SubmitError(str(e)) from None
            self._hook = None
            self.application, self.application_args = p["application"], p["application_args"]
            self.name, self.py_files, self.conf = p["name"], p["py_files"], p["conf"]
            self.jars = ",".join(p["jars"]) or None
            self._driver_memory, self.properties_file = p["driver_memory"], p["properties_file"]
            check_master(master)  # one line naming `make cluster-up` instead of a Java trace
            fd, result = tempfile.mkstemp(prefix=f"freshrec-{self.job}-", suffix=".json")
            os.close(fd)
            self.env_vars = {"FRESHREC_RESULT_FILE": result,
                             "FRESHREC_PROJECT_ROOT": str(Path(p["application"]).parents[1])}
            try:
                super().execute(context)
                text = Path(result).read_text()
                if not text:
                    raise SubmitError(f"spark-submit {self.job} on {master} wrote no result; its "
                                      "driver log is above")
                out = json.loads(text)
            finally:
                Path(result).unlink(missing_ok=True)
        if self.tables:
            from freshrec.contracts.dag_support import emit_table

            for asset, table in self.tables:
                emit_table(context, asset, table)
        return out
