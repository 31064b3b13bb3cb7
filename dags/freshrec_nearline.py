"""
### freshrec nearline refresh

Every few minutes (`refresher.schedule_minutes`, default 5): read the Change Data Feed of silver
`events` and `items` since the versions each serving replica reflects, fold new events into user
vectors, make vectors for new items and removals for deactivated ones, push them to every replica
(`Admin.ApplyDeltas`), then commit the checkpoint. No catch-up (each run takes everything new), one
active run at a time. Parsing imports nothing heavy.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from freshrec.settings import load_settings

DEFAULT_ARGS = {"owner": "freshrec", "retries": 2, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="freshrec_nearline",
    schedule=timedelta(minutes=load_settings().refresher.schedule_minutes),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["freshrec", "nearline"],
    doc_md=__doc__,
)
def freshrec_nearline() -> None:
    @task
    def refresh() -> dict:
        from freshrec.settings import load_settings
        from serving import refresher

        return refresher.refresh_once(load_settings())

    refresh()


freshrec_nearline()
