"""
### freshrec training lane

Weekly (Mondays 03:00 UTC), or on demand with **Trigger DAG w/ config**, e.g.
`{"models": ["two_tower"], "device": "cuda", "epochs": 5}`:

1. **two_tower**, **sasrec**: deep retrieval on the silver tables (pinned Delta version), temporal
   split as in the batch lane, early stopping on validation NDCG@10; gated into `freshrec-retrieval`
   (never promoted over a model the batch lane evaluated higher on the same split); **rollout**
   loads a promoted one on every replica
2. **reinforce**, **bandit**: re-ranking policies learned in the simulator built from the synthetic
   generator's ground truth; off-policy estimates vs the logging policy; gated into `freshrec-policy`

Each task is one MLflow run in the `freshrec-training` experiment (params, per-epoch curves,
metrics, artifacts, data versions). A model left out of `models` in the run's config is skipped.
`device` is `auto` (the GPU where present), `cpu` or `cuda` (fails without a GPU). Parsing this file
imports no torch, pyspark or faiss.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk import Param, dag, get_current_context, task
from airflow.timetables.trigger import CronTriggerTimetable

DEFAULT_ARGS = {"owner": "freshrec", "retries": 2, "retry_delay": timedelta(minutes=5)}
ALL = ["two_tower", "sasrec", "reinforce", "bandit"]


def _train(model: str) -> dict:
    from freshrec.settings import load_settings
    from training import run as training

    params = get_current_context()["params"]
    if model not in params["models"]:
        raise AirflowSkipException(f"{model} is not in this run's models {params['models']}")
    overrides = {"epochs": params["epochs"]} if params.get("epochs") else None
    out = training.run(load_settings(), model, params["device"], "embedded", overrides,
                       progress=False)
    return {k: v for k, v in out.items() if k in ("run_id", "model", "test", "truth", "gate")}


@dag(
    dag_id="freshrec_training",
    schedule=CronTriggerTimetable("0 3 * * 1", timezone="UTC"),
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
    @task
    def two_tower() -> dict:
        return _train("two_tower")

    @task(trigger_rule="none_failed")
    def sasrec() -> dict:
        return _train("sasrec")

    @task(trigger_rule="none_failed")
    def reinforce() -> dict:
        return _train("reinforce")

    @task(trigger_rule="none_failed")
    def bandit() -> dict:
        return _train("bandit")

    @task(trigger_rule="none_failed")
    def rollout(*results) -> dict:
        """A retrieval model promoted above goes to every replica (refresher.replicas)."""
        promoted = [r["gate"] for r in results if r and r.get("gate", {}).get("promoted")
                    and r["gate"]["registered_model"] == "freshrec-retrieval"]
        if not promoted:
            raise AirflowSkipException("no retrieval model was promoted: nothing to roll out")
        from serving import rollout as ro

        from freshrec.settings import load_settings

        return ro.rollout(load_settings(), int(promoted[-1]["version"]))

    # one GPU (or the CPU) at a time: deep models in sequence, then the policies; a model left
    # out by the run's config is skipped without skipping the ones after it
    tt, sr = two_tower(), sasrec()
    tt >> sr >> reinforce() >> bandit()
    rollout(tt, sr)


freshrec_training()
