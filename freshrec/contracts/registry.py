"""The MLflow model registry and its promotion gate.

Every candidate that reaches the gate becomes a version of the registered model
(``freshrec-retrieval`` for recommenders, ``freshrec-policy`` for re-ranking policies), pointing at
its run's artifacts. It takes the alias ``champion`` only when its validation metric beats the
current champion's *on the same validation split*: the caller passes the champion's metric measured
on this split when it can (the champion's method refitted in the same run, or the champion's own
artifact scored on the run's validation users), otherwise the metric recorded with the champion
under the same name is used and the version says so. A losing version stays registered, tagged
``gate=rejected`` with the reason, and its run keeps every metric.

One metric definition: models are chosen on **validation** and reported on **test**, and the two
are never compared. A version's tags name the split: ``val_ndcg_at_10`` (what the retrieval gate
decides on) and ``test_ndcg_at_10`` (reported). The retrieval gate refuses a metric that is not a
validation one. Versions registered before this carry a bare ``ndcg_at_10`` tag of unknown split:
it is never read, so it is never compared with anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

RETRIEVAL = "freshrec-retrieval"
POLICY = "freshrec-policy"
ALIAS = "champion"
VALIDATION, TEST = "val", "test"  # the split prefixes of metric names and version tags
# a paired bootstrap over fewer validation users than this is overconfident: the champion stays
MIN_PAIRED_USERS = 30


def split_metric(split: str, metric: str) -> str:
    """``metric`` (e.g. ``ndcg_at_10``) named for its split: ``val_ndcg_at_10``, ``test_ndcg_at_10``."""
    if split not in (VALIDATION, TEST):
        raise ValueError(f"split {split!r}: a metric is measured on {VALIDATION!r} or {TEST!r}")
    return f"{split}_{metric}"


def too_few_users(n_users: int, fix: str) -> str | None:
    """Why a paired test over ``n_users`` validation users cannot be trusted (``fix``: how to get
    more), or None when there are enough."""
    if n_users >= MIN_PAIRED_USERS:
        return None
    return (f"only {n_users} validation users, too few for a paired test (at least "
            f"{MIN_PAIRED_USERS}); {fix}")


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
    p_value: float | None = None  # paired p-value of "candidate beats the champion's method"
    significance: float | None = None  # the level it had to be under (None: no test asked)

    def as_dict(self) -> dict:
        return asdict(self)


def current_champion(client, name: str):
    """The model version holding ``@champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def find_version(client, name: str, identity: dict):
    """The version of ``name`` whose tags hold every ``identity`` pair (a re-run), or None."""
    from mlflow.exceptions import MlflowException

    if not identity:
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version)):
        if all(v.tags.get(k) == str(val) for k, val in identity.items()):
            return v
    return None


def gate(mlflow, run_id: str, candidate: str, metric_name: str, metric: float,
         rescore_champion: Callable[[str], float | None] | None = None,
         name: str = RETRIEVAL, artifact_path: str = "model", min_gain: float = 0.0,
         tags: dict | None = None, model_uri: str | None = None,
         rivals: dict[str, float] | None = None, identity: dict | None = None,
         alias: str = ALIAS, p_value: Callable[[str], float | None] | None = None,
         significance: float = 0.05, untestable: str | None = None) -> GateResult:
    """Register the candidate (``model_uri``, else ``run_id``'s ``artifact_path``) as a new version
    of ``name`` and promote it to ``@champion`` when ``metric`` beats the champion by more than
    ``min_gain`` and no model of ``rivals`` (metrics measured on the same split) beats it.

    ``rescore_champion(champion_model_name)`` returns the champion method's metric on this
    validation split (or None when it cannot be measured here). ``p_value(champion_model)``, when
    given, is the one-sided paired p-value of "the candidate beats that method" on the same
    validation users (None when it cannot be measured): then a promotion over a champion also
    needs ``p < significance``, and a champion that cannot be tested on this split is not
    replaced; ``untestable`` (why no test can be trusted here, e.g. too few users) keeps the
    champion too. ``identity``: tags that make a
    version the same candidate (interval, data versions, model); a re-run that finds one registers
    nothing and returns that version's recorded outcome.

    ``alias`` other than ``champion`` (``registry.require_online_win``): a winner takes that alias
    (e.g. ``challenger``) instead, to be served as an A/B arm; ``@champion`` moves only by the
    online gate (:func:`freshrec.contracts.online.promote_online`).

    For ``freshrec-retrieval`` ``metric_name`` must be a validation metric (``val_*``): the gate
    never decides on the test split. Test metrics go in ``tags`` (``test_*``), reported only."""
    from mlflow.tracking import MlflowClient

    if name == RETRIEVAL and not metric_name.startswith(f"{VALIDATION}_"):
        raise ValueError(f"gate metric {metric_name!r}: {RETRIEVAL} is gated on a validation "
                         f"metric ({split_metric(VALIDATION, 'ndcg_at_10')}); test metrics are "
                         "reported, never compared")
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="freshrec: the promoted model; the alias "
                                       "`champion` marks the version serving loads")
    same = find_version(client, name, identity or {})
    if same is not None:
        t = same.tags
        return GateResult(name, str(same.version), candidate, metric_name, float(metric),
                          t.get("gate_champion"), None, "recorded", t.get("gate") == "promoted",
                          f"already registered as version {same.version} for this interval and "
                          f"data: {t.get('gate_reason', '')}",
                          float(t["gate_p_value"]) if "gate_p_value" in t else None,
                          significance if p_value is not None else None)
    source = model_uri or f"runs:/{run_id}/{artifact_path}"
    kwargs = {"model_id": model_uri.split("/")[-1]} if model_uri and model_uri.startswith("models:/m-") \
        else {}
    version = client.create_model_version(
        name, source=source, run_id=run_id,
        tags={"model": candidate, metric_name: f"{metric:.6f}", **(tags or {}),
              **{k: str(v) for k, v in (identity or {}).items()}}, **kwargs)
    champ = current_champion(client, name)
    champ_model, champ_metric, source = None, None, "none"
    if champ is not None:
        champ_model = champ.tags.get("model")
        if rescore_champion is not None and champ_model:
            champ_metric = rescore_champion(champ_model)
            source = "same split"
        # only a metric of the same name (so of the same split) is comparable: an older
        # version's bare ``ndcg_at_10`` (unknown split) is never read
        if champ_metric is None and metric_name in champ.tags:
            champ_metric, source = float(champ.tags[metric_name]), "recorded at its promotion"
    better = {m: v for m, v in (rivals or {}).items() if m != candidate and v > metric}
    p = p_value(champ_model) if p_value is not None and champ_model else None
    if better:
        best = max(better, key=better.get)
        promoted = False
        reason = (f"{metric_name} {metric:.4f} loses to {best} ({better[best]:.4f}) evaluated on "
                  "the same split of the same data")
    elif champ is None:
        promoted, reason = True, "no champion yet"
    elif champ_metric is None:
        promoted = False
        reason = f"champion v{champ.version} has no {metric_name} to compare with" + (
            f": {untestable}" if untestable else "")
    elif metric <= champ_metric + min_gain:
        promoted = False
        reason = (f"{metric_name} {metric:.4f} does not beat champion v{champ.version} "
                  f"({champ_model}) {champ_metric:.4f} ({source})")
    elif p_value is not None and untestable:
        promoted = False
        reason = (f"{metric_name} {metric:.4f} vs champion v{champ.version} ({champ_model}) "
                  f"{champ_metric:.4f} ({source}): {untestable}")
    elif p_value is not None and p is None:
        promoted = False
        reason = (f"{metric_name} {metric:.4f} vs champion v{champ.version} ({champ_model}) "
                  f"{champ_metric:.4f} ({source}): no paired test is possible, as {champ_model} "
                  "was not evaluated on this validation split; add it to evaluation.models")
    elif p is not None and p >= significance:
        promoted = False
        reason = (f"{metric_name} {metric:.4f} vs champion v{champ.version} ({champ_model}) "
                  f"{champ_metric:.4f} ({source}): gain not significant (paired p = {p:.4f}, "
                  f"needs < {significance:g})")
    else:
        promoted = True
        reason = (f"{metric_name} {metric:.4f} beats champion v{champ.version} ({champ_model}) "
                  f"{champ_metric:.4f} ({source})" + (f", paired p = {p:.4f} < {significance:g}"
                                                      if p is not None else ""))
    outcome = "promoted" if promoted else "rejected"
    if promoted and alias != ALIAS and champ is not None:
        outcome = alias  # an offline winner that must still win online
        reason += f"; set as @{alias}: @champion moves only on an online win " \
                  "(registry.require_online_win, `freshrec model promote-online`)"
        client.set_registered_model_alias(name, alias, version.version)
        promoted = False
    elif promoted:
        if champ is not None:  # what `freshrec model rollback` goes back to
            client.set_model_version_tag(name, version.version, "previous_champion", champ.version)
        client.set_registered_model_alias(name, ALIAS, version.version)
    client.set_model_version_tag(name, version.version, "gate", outcome)
    client.set_model_version_tag(name, version.version, "gate_reason", reason)
    if champ_model:
        client.set_model_version_tag(name, version.version, "gate_champion", champ_model)
    if p is not None:
        client.set_model_version_tag(name, version.version, "gate_p_value", f"{p:.6f}")
    result = GateResult(name, str(version.version), candidate, metric_name, float(metric), champ_model,
                        None if champ_metric is None else float(champ_metric), source, promoted, reason,
                        p, significance if p_value is not None else None)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"gate": outcome, "gate_reason": reason,
                         "registered_version": f"{name}/{version.version}"})
        if p is not None:
            mlflow.log_metric("gate_p_value", p)
        mlflow.log_dict(result.as_dict(), "gate.json")
    return result


@dataclass(frozen=True)
class ModelRef:
    """One registered version: what serving loads and names."""

    registered_model: str
    version: int
    model: str  # the model's short name, e.g. item_knn
    source: str  # the logged pyfunc model's URI
    run_id: str | None
    tags: dict

    @property
    def label(self) -> str:
        """How responses and Status name it: ``freshrec-retrieval/3 two_tower``."""
        return f"{self.registered_model}/{self.version} {self.model}"


def resolve(spec: str | int = ALIAS, name: str = RETRIEVAL) -> ModelRef:
    """A version of ``name`` by alias (``champion``) or number; LookupError names what is missing.
    Needs mlflow pointed at the tracking store (:func:`freshrec.tracking.mlflow_for`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    spec = str(spec).strip()
    try:
        if spec.isdigit():
            mv = client.get_model_version(name, spec)
        else:
            mv = client.get_model_version_by_alias(name, spec)
    except MlflowException as e:
        what = f"version {spec}" if spec.isdigit() else f"alias @{spec}"
        known = ""
        try:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            known = f" (registered versions: {versions or 'none'})"
        except MlflowException:
            pass
        raise LookupError(f"model {name} has no {what}{known}: run the batch DAG (make run) or "
                          f"`freshrec train`, or name an existing version ({type(e).__name__})") \
            from None
    return ModelRef(name, int(mv.version), mv.tags.get("model", "?"), mv.source, mv.run_id,
                    dict(mv.tags))


def download(ref: ModelRef, dest) -> tuple:
    """The version's freshrec artifact directory and users file, downloaded under ``dest``."""
    import os
    from pathlib import Path

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(dest)))
    model, users = root / "artifacts" / "model", root / "artifacts" / "users.npz"
    if not (model / "model.json").exists():
        raise FileNotFoundError(f"{ref.label}: {ref.source} holds no freshrec model artifact "
                                f"(artifacts/model/model.json); it cannot be served")
    return model, users


def set_alias(version: int, name: str = RETRIEVAL, alias: str = ALIAS) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, str(version))


def champion_info(mlflow, name: str = RETRIEVAL) -> dict | None:
    """The champion's version, model and tags, for reports and serving."""
    from mlflow.tracking import MlflowClient

    champ = current_champion(MlflowClient(), name)
    if champ is None:
        return None
    return {"version": champ.version, "run_id": champ.run_id, "source": champ.source,
            "tags": dict(champ.tags)}
