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
6. **rollout**: the snapshot of `serving.model` (`@champion`: model artifact, catalog, users'
   histories, FAISS index for embedding models), loaded on every replica of `refresher.replicas`
   one at a time and health-checked; a replica that fails fails the task, naming it

Every task works on its interval only and is safe to re-run. Parsing this file imports no
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

DEFAULT_ARGS = {"owner": "freshrec", "retries": 2, "retry_delay": timedelta(minutes=2)}


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
    @task
    def ingest() -> dict:
        from freshrec.submit import run_job

        return run_job("ingest", _interval_args())

    @task
    def clean() -> dict:
        from freshrec.submit import run_job

        return run_job("clean", _interval_args())

    @task
    def features() -> dict:
        from freshrec.submit import run_job

        return run_job("features", _interval_args())

    @task
    def evaluate() -> dict:
        from freshrec.submit import run_job

        return run_job("evaluate", _interval_args())

    @task
    def gate() -> dict:
        from spark_jobs import gate

        return gate.main(_interval_args())

    @task
    def rollout() -> dict:
        from serving import rollout

        from freshrec.settings import load_settings

        return rollout.rollout(load_settings())

    ingested = ingest()
    cleaned = clean()
    ingested >> cleaned
    cleaned >> features() >> evaluate() >> gate() >> rollout()


freshrec_batch()
