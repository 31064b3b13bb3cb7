"""The MLflow model registry and its promotion gate.

Every candidate that reaches the gate becomes a version of the registered model
(``freshrec-retrieval`` for recommenders, ``freshrec-policy`` for re-ranking policies), pointing at
its run's artifacts. It takes the alias ``champion`` only when its validation metric beats the
current champion's *on the same validation split*: the caller passes the champion's metric measured
on this split when it can (the champion's method refitted in the same run), otherwise the metric
recorded with the champion is used and the version says so. A losing version stays registered,
tagged ``gate=rejected`` with the reason, and its run keeps every metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

RETRIEVAL = "freshrec-retrieval"
POLICY = "freshrec-policy"
ALIAS = "champion"


@dataclass
class GateResult:
    registered_model: str
    version: str
    candidate: str
    metric_name: str
    candidate_metric: float
    champion: str | None
    champion_metric: float | None
    champion_metric_source: str
    promoted: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def current_champion(client, name: str):
    """The model version holding ``@champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def gate(mlflow, run_id: str, candidate: str, metric_name: str, metric: float,
         rescore_champion: Callable[[str], float | None] | None = None,
         name: str = RETRIEVAL, artifact_path: str = "model", min_gain: float = 0.0,
         tags: dict | None = None) -> GateResult:
    """Register ``run_id``'s ``artifact_path`` as a new version of ``name`` and promote it to
    ``@champion`` when ``metric`` beats the champion by more than ``min_gain``.

    ``rescore_champion(champion_model_name)`` returns the champion method's metric on this
    validation split (or None when it cannot be measured here)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="freshrec: the promoted model; the alias "
                                       "`champion` marks the version serving should load")
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
        tags={"model": candidate, metric_name: f"{metric:.6f}", **(tags or {})})
    champ = current_champion(client, name)
    champ_model, champ_metric, source = None, None, "none"
    if champ is not None:
        champ_model = champ.tags.get("model")
        if rescore_champion is not None and champ_model:
            champ_metric = rescore_champion(champ_model)
            source = "same split"
        if champ_metric is None and metric_name in champ.tags:
            champ_metric, source = float(champ.tags[metric_name]), "recorded at its promotion"
    if champ is None:
        promoted, reason = True, "no champion yet"
    elif champ_metric is None:
        promoted, reason = False, f"champion v{champ.version} has no {metric_name} to compare with"
    elif metric > champ_metric + min_gain:
        promoted = True
        reason = (f"{metric_name} {metric:.4f} beats champion v{champ.version} ({champ_model}) "
                  f"{champ_metric:.4f} ({source})")
    else:
        promoted = False
        reason = (f"{metric_name} {metric:.4f} does not beat champion v{champ.version} "
                  f"({champ_model}) {champ_metric:.4f} ({source})")
    if promoted:
        client.set_registered_model_alias(name, ALIAS, version.version)
    client.set_model_version_tag(name, version.version, "gate", "promoted" if promoted else "rejected")
    client.set_model_version_tag(name, version.version, "gate_reason", reason)
    result = GateResult(name, str(version.version), candidate, metric_name, float(metric), champ_model,
                        None if champ_metric is None else float(champ_metric), source, promoted, reason)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"gate": "promoted" if promoted else "rejected", "gate_reason": reason,
                         "registered_version": f"{name}/{version.version}"})
        mlflow.log_dict(result.as_dict(), "gate.json")
    return result


def champion_info(mlflow, name: str = RETRIEVAL) -> dict | None:
    """The champion's version, model and tags, for reports and serving."""
    from mlflow.tracking import MlflowClient

    champ = current_champion(MlflowClient(), name)
    if champ is None:
        return None
    return {"version": champ.version, "run_id": champ.run_id, "source": champ.source,
            "tags": dict(champ.tags)}
