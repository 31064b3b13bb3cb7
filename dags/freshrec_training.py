"""
### freshrec training lane

After each batch run that updated the silver events (scheduled on the Asset
`freshrec.silver.events`, which the batch DAG's clean emits), or on demand with
**Trigger DAG w/ config**, e.g.
`{"models": ["two_tower"], "device": "cuda", "epochs": 5}`:

1. **two_tower**, **sasrec**: deep retrieval on the silver tables (pinned Delta version), temporal
   split as in the batch lane, early stopping on validation NDCG@10; gated into `freshrec-retrieval`
   on the run's validation users (promoted only over a champion whose own artifact it beats there,
   paired bootstrap p < `evaluation.significance`; test metrics are reported only); a promoted one
   emits the Asset `freshrec.contracts.registry.retrieval`, and the **freshrec_rollout** DAG loads it on
   every replica
2. **reinforce**, **bandit**: re-ranking policies learned in the simulator built from the synthetic
   generator's ground truth; off-policy estimates vs the logging policy; gated into `freshrec-policy`

Each task is one MLflow run in the `freshrec-training` experiment (params, per-epoch curves,
metrics, artifacts, data versions). A model left out of `models` in the run's config is skipped.
`device` is `auto` (the GPU where present), `cpu` or `cuda` (fails without a GPU). Parsing this file
imports no torch, pyspark or faiss and reads no settings. Each task is retried twice with an
exponential backoff, stopped at its `execution_timeout`, and a failure is written to the
notifier's file (`airflow.failure_log`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk import Param, dag, get_current_context, task

from freshrec.contracts.dag_support import EVENTS, PROMOTED, emit_promoted, task_defaults

DEFAULT_ARGS = task_defaults(retry_delay=timedelta(minutes=5), max_retry_delay=timedelta(hours=1),
                             execution_timeout=timedelta(hours=6))
ALL = ["two_tower", "sasrec", "reinforce", "bandit"]


def _train(model: str) -> dict:
    from freshrec.settings import load_settings
    from training import run as training

    ctx = get_current_context()
    params = ctx["params"]
    if model not in params["models"]:
        raise AirflowSkipException(f"{model} is not in this run's models {params['models']}")
    overrides = {"epochs": params["epochs"]} if params.get("epochs") else None
    out = training.run(load_settings(), model, params["device"], "embedded", overrides,
                       progress=False)
    if model in ("two_tower", "sasrec"):
        emit_promoted(ctx, out.get("gate") or {})
    return {k: v for k, v in out.items() if k in ("run_id", "model", "test", "truth", "gate")}


@dag(
    dag_id="freshrec_training",
    schedule=[EVENTS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["freshrec", "training"],
    doc_md=__doc__,
    params={"models": Param(ALL, type="array", description="models to train"),
            "device": Param("auto", enum=["auto", "cpu", "cuda"]),
            "epochs": Param(None, type=["null", "integer"], description="override training.epochs")},
)
def freshrec_training() -> None:
    @task(outlets=[PROMOTED])
    def two_tower() -> dict:
        return _train("two_tower")

    @task(trigger_rule="none_failed", outlets=[PROMOTED])
    def sasrec() -> dict:
        return _train("sasrec")

    @task(trigger_rule="none_failed")
    def reinforce() -> dict:
        return _train("reinforce")

    @task(trigger_rule="none_failed")
    def bandit() -> dict:
        return _train("bandit")

    # one GPU (or the CPU) at a time: deep models in sequence, then the policies; a model left
    # out by the run's config is skipped without skipping the ones after it
    two_tower() >> sasrec() >> reinforce() >> bandit()


freshrec_training()
