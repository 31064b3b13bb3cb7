"""
### freshrec nearline round

Every `refresher.schedule_minutes` minutes (default 5), one round of
`nearline.refresher.refresh_once` (the same as `freshrec refresh --once`):

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
(each run takes everything new), one active run at a time. Parsing imports nothing heavy and
reads no settings: the DAG ticks every minute and a scheduled tick whose minute (since the epoch)
is not a multiple of `refresher.schedule_minutes` is skipped at once, when the task reads the
settings (a manual trigger always runs). Retries back off exponentially; each try is stopped at
its `execution_timeout`; a failure is written to the notifier's file (`airflow.failure_log`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from airflow.timetables.trigger import CronTriggerTimetable

from freshrec.contracts.dag_support import task_defaults

DEFAULT_ARGS = task_defaults(retry_delay=timedelta(seconds=30), max_retry_delay=timedelta(minutes=4),
                             execution_timeout=timedelta(minutes=20))


def due(logical_date, every_minutes: int, run_type: str) -> bool:
    """A scheduled tick runs a round when its minute since the epoch is a multiple of
    ``every_minutes``; a manual (or asset-triggered) run always does."""
    if "scheduled" not in str(run_type).lower() or logical_date is None:
        return True
    return int(logical_date.timestamp() // 60) % every_minutes == 0


@dag(
    dag_id="freshrec_nearline",
    schedule=CronTriggerTimetable("* * * * *", timezone="UTC"),
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
        from nearline import refresher

        settings = load_settings()
        ctx = get_current_context()
        every = settings.refresher.schedule_minutes
        if not due(ctx.get("logical_date"), every, ctx["dag_run"].run_type):
            raise AirflowSkipException(f"not a round: rounds run every {every} minutes "
                                       "(refresher.schedule_minutes)")
        return refresher.refresh_once(settings)

    refresh()


freshrec_nearline()
