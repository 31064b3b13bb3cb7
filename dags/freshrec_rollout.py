"""
### freshrec rollout

Runs whenever a gate promotes a `freshrec-retrieval` version: scheduled on the Asset
`freshrec.contracts.registry.retrieval`, which the batch DAG's **gate** and the training DAG's **two_tower** /
**sasrec** tasks emit only when they promoted (through the alias `freshrec.promoted_retrieval`).
Can also be triggered by hand.

1. **rollout**: the snapshot of `serving.model` (`@champion`: model artifact, catalog, users'
   histories, FAISS index for embedding models), loaded on every replica of `refresher.replicas`
   one at a time and health-checked; a replica that fails fails the task, naming it, and the
   replicas after it keep their model.

Retried twice with an exponential backoff, stopped at its `execution_timeout`; a failure is written
to the notifier's file (`airflow.failure_log`). No settings are read when this file is parsed.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from freshrec.contracts.dag_support import RETRIEVAL_CHAMPION, task_defaults

DEFAULT_ARGS = task_defaults(retry_delay=timedelta(minutes=1), max_retry_delay=timedelta(minutes=15),
                             execution_timeout=timedelta(minutes=45))


@dag(
    dag_id="freshrec_rollout",
    schedule=[RETRIEVAL_CHAMPION],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["freshrec", "rollout"],
    doc_md=__doc__,
)
def freshrec_rollout() -> None:
    @task
    def rollout() -> dict:
        from nearline import rollout

        from freshrec.settings import load_settings

        return rollout.rollout(load_settings())

    rollout()


freshrec_rollout()
