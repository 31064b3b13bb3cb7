"""
### freshrec nearline round

Every few minutes (`refresher.schedule_minutes`, default 5), one round of
`serving.refresher.refresh_once` (the same as `freshrec refresh --once`):

1. **live data**: every server's write-ahead log sealed and landed; every landed event file not in
   bronze taken into bronze `events_raw` and silver `events` / `events_dead_letter` with the batch
   clean's rules, exactly once per file (delta-rs, no Spark session); every server's impression
   log taken into `impressions` / `impressions_dead_letter`; the feedback join appends the settled
   impressions and organic events to `feedback` (`feedback.in_nearline`);
2. **deltas**: the Change Data Feed of `events` and `items` since the versions each replica reports
   -> changed users' histories, erased users' removals, item vectors and removals, pushed to every
   replica (`Admin.ApplyDeltas`); the versions a replica reports are the checkpoint.

A failed round commits nothing half-way (each step is redone by the next round without doubles);
a replica that is down fails the task after retries and is caught up next round. No catch-up
(each run takes everything new), one active run at a time. Parsing imports nothing heavy.
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
