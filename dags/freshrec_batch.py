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
   and, when it promoted, emits the Asset `freshrec.registry.retrieval`: the **freshrec_rollout**
   DAG, scheduled on it, loads the new model on every replica

Outputs are Airflow Assets (`freshrec/dag_support.py`): ingest `freshrec.bronze.events_raw`,
clean `freshrec.silver.events` and `freshrec.silver.events_dead_letter`, features
`freshrec.gold.features`, evaluate `freshrec.reports.evaluation`; each event carries the table's
Delta version. The training DAG is scheduled on `freshrec.silver.events`.

Every task works on its interval only and is safe to re-run; it is retried twice with an
exponential backoff, stopped at its `execution_timeout`, and a task that fails for good is written
to the failure notifier's file (`airflow.failure_log`). No settings are read when this file is
parsed. Parsing this file imports no
pyspark, torch or faiss: each task imports its lane's entry point when it runs. The Spark tasks
(ingest, clean, features, evaluate) run in the worker's process on the embedded default and under
`spark-submit` on `spark.master` when `spark.submit` is on (the cluster profile): see
`freshrec/submit.py`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable

from freshrec.dag_support import (DEAD_LETTER, EVALUATION, EVENTS, FEATURES, PROMOTED, RAW_EVENTS,
                                  emit_promoted, emit_table, task_defaults)

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
    @task(outlets=[RAW_EVENTS], execution_timeout=timedelta(hours=1))
    def ingest() -> dict:
        from freshrec.submit import run_job

        out = run_job("ingest", _interval_args())
        emit_table(get_current_context(), RAW_EVENTS, "events_raw")
        return out

    @task(outlets=[EVENTS, DEAD_LETTER], execution_timeout=timedelta(hours=1))
    def clean() -> dict:
        from freshrec.submit import run_job

        out = run_job("clean", _interval_args())
        ctx = get_current_context()
        emit_table(ctx, EVENTS, "events")
        emit_table(ctx, DEAD_LETTER, "events_dead_letter")
        return out

    @task(outlets=[FEATURES], execution_timeout=timedelta(hours=2))
    def features() -> dict:
        from freshrec.submit import run_job

        out = run_job("features", _interval_args())
        emit_table(get_current_context(), FEATURES, "item_features")
        return out

    @task(outlets=[EVALUATION], execution_timeout=timedelta(hours=4))
    def evaluate() -> dict:
        from freshrec.submit import run_job

        return run_job("evaluate", _interval_args())

    @task(outlets=[PROMOTED], execution_timeout=timedelta(minutes=30))
    def gate() -> dict:
        from spark_jobs import gate

        out = gate.main(_interval_args())
        emit_promoted(get_current_context(), out)
        return out

    ingested = ingest()
    cleaned = clean()
    ingested >> cleaned
    cleaned >> features() >> evaluate() >> gate()


freshrec_batch()
