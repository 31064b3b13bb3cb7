"""
### freshrec batch lane

Daily, per data interval `[data_interval_start, data_interval_end)`:

1. **ingest**: landed event files -> bronze `events_raw`
2. **clean**: validate, type, dedupe -> silver `events`, bad rows -> `events_dead_letter`
3. **features**: gold `user_features`, `item_features`, `item_neighbors`
4. **evaluate**: temporal split; every model of `evaluation.models` (Spark ALS among them) fitted
   and scored, one MLflow run each; the gate's candidate refitted on all of the interval's events
5. **gate**: the best servable model becomes a `freshrec-retrieval` version, `@champion` only if it
   beats the champion and every model evaluated on the same split
   and, when it promoted, emits the Asset `freshrec.contracts.registry.retrieval`: the **freshrec_rollout**
   DAG, scheduled on it, loads the new model on every replica

Outputs are Airflow Assets (`freshrec/contracts/dag_support.py`): ingest `freshrec.bronze.events_raw`,
clean `freshrec.silver.events` and `freshrec.silver.events_dead_letter`, features
`freshrec.gold.features`, evaluate `freshrec.reports.evaluation`; each event carries the table's
Delta version. The training DAG is scheduled on `freshrec.silver.events`.

Every task works on its interval only and is safe to re-run; it is retried twice with an
exponential backoff, stopped at its `execution_timeout`, and a task that fails for good is written
to the failure notifier's file (`airflow.failure_log`). No settings are read when this file is
parsed. Parsing this file imports no
pyspark, torch or faiss: each task imports its lane's entry point when it runs. The Spark tasks
(ingest, clean, features, evaluate) are `SparkJobOperator`s (`freshrec/ops/spark_operator.py`, a
`SparkSubmitOperator`): when `spark.submit` is on (the cluster profile) they run spark-submit
against the `spark_default` connection (the master; `freshrec/ops/airflow_stack.py` sets it from
`spark.master`), on the embedded default they run the job in the worker's process (`local[*]`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable

from freshrec.contracts.dag_support import (DEAD_LETTER, EVALUATION, EVENTS, FEATURES, PROMOTED, RAW_EVENTS,
                                  emit_promoted, task_defaults)
from freshrec.ops.spark_operator import SparkJobOperator

DEFAULT_ARGS = task_defaults(retry_delay=timedelta(minutes=2), max_retry_delay=timedelta(minutes=30),
                             execution_timeout=timedelta(hours=2))


def _interval_args() -> list[str]:
    ctx = get_current_context()
    return ["--start", ctx["data_interval_start"].isoformat(),
            "--end", ctx["data_interval_end"].isoformat()]


@dag(
    dag_id="freshrec_batch",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["freshrec", "batch"],
    doc_md=__doc__,
)
def freshrec_batch() -> None:
    ingested = SparkJobOperator(job="ingest", tables=[(RAW_EVENTS, "events_raw")],
                                execution_timeout=timedelta(hours=1))
    cleaned = SparkJobOperator(job="clean", tables=[(EVENTS, "events"),
                                                    (DEAD_LETTER, "events_dead_letter")],
                               execution_timeout=timedelta(hours=1))
    featured = SparkJobOperator(job="features", tables=[(FEATURES, "item_features")],
                                execution_timeout=timedelta(hours=2))
    evaluated = SparkJobOperator(job="evaluate", outlets=[EVALUATION],
                                 execution_timeout=timedelta(hours=4))

    @task(outlets=[PROMOTED], execution_timeout=timedelta(minutes=30))
    def gate() -> dict:
        from spark_jobs import gate

        out = gate.main(_interval_args())
        emit_promoted(get_current_context(), out)
        return out

    ingested >> cleaned >> featured >> evaluated >> gate()


freshrec_batch()
