"""Gate: the interval's evaluation -> a new ``freshrec-retrieval`` version, ``@champion`` if it wins.

Reads the interval's newest evaluation report (``<data>/reports/evaluation-<batch_date>-<run
id>.json``, found through the reports index: :mod:`freshrec.contracts.reports`; written by
:mod:`spark_jobs.evaluate`), takes
the servable model with the best metric (NDCG at the first K) on the *validation* split (never the
test split) among ``evaluation.gate_models`` (empty: every evaluated model), registers its logged
pyfunc model (tags ``val_ndcg_at_10``, what it is gated on, and ``test_ndcg_at_10``, reported), and
moves ``@champion`` to it only when no model evaluated on the same split beats it
and it beats the current champion's method on this validation split with a one-sided paired
per-user bootstrap p-value below ``evaluation.significance`` (0.05). A champion whose method was not
evaluated in the same run cannot be tested and is kept (the reason says so), and so is the
champion when fewer than ``registry.MIN_PAIRED_USERS`` (30) users were validated (a bootstrap
over a handful of users is overconfident); the first model is promoted when there is no champion. A re-run of
the interval finds the version registered for the same interval, model and data versions and
registers nothing.
With ``registry.require_online_win`` a winner becomes ``@challenger`` (served as an A/B arm)
and ``@champion`` moves only when ``freshrec model promote-online`` finds it wins online.
The outcome goes to ``<data>/reports/gate-<batch_date>.json`` (with the evaluation report it read).
"""

from __future__ import annotations

import json
import logging

from freshrec.contracts.registry import (RETRIEVAL, TEST, VALIDATION, gate, split_metric,
                                         too_few_users)
from freshrec.contracts.reports import INDEX, latest_evaluation
from freshrec.interval import DataInterval, run_job
from freshrec.settings import Settings
from freshrec.tracking import mlflow_for

log = logging.getLogger(__name__)


def eligible(results: dict[str, dict[str, float]], uris: dict[str, str], gate_models: list[str],
             metric: str) -> dict[str, float]:
    """The models the gate may register: servable (a logged model) and among ``gate_models``
    (empty: any), with their metric."""
    allowed = gate_models or list(results)
    return {m: float(r[metric]) for m, r in results.items() if m in allowed and m in uris}


def run(settings: Settings, interval: DataInterval) -> dict[str, object]:
    reports = settings.data_dir / "reports"
    found = latest_evaluation(reports, interval.batch_date)
    if found is None:
        raise FileNotFoundError(f"{reports / INDEX}: no evaluation for {interval.batch_date}; run "
                                "the evaluate job (or task) for this interval first")
    path, summary = found
    if "validation" not in summary or "p_values" not in summary:
        raise ValueError(f"{path}: has no validation split or p-values (written by an older "
                         f"evaluate); re-run the evaluate job for {interval.batch_date}")
    metric = summary.get("metric", f"ndcg_at_{settings.evaluation.ks[0]}")
    validation = summary["validation"]
    allowed = settings.evaluation.gate_models or list(validation)
    uris = summary.get("model_uris", {})
    candidates = eligible(validation, uris, settings.evaluation.gate_models, metric)
    if not candidates:
        raise ValueError(f"{path}: none of the gate's models {allowed} was evaluated and servable "
                         f"(evaluated: {sorted(summary['results'])}; not servable: "
                         f"{summary.get('not_servable', {})})")
    best = max(candidates, key=candidates.get)
    # the registered model is the refit on all of the interval's events when evaluate made one
    run_id = summary.get("refit", {}).get(best, {}).get("run") or summary["runs"][best]
    mlflow = mlflow_for(settings)
    out = reports / f"gate-{interval.batch_date}.json"

    def rescore(champion_model: str) -> float | None:
        r = validation.get(champion_model)
        return None if r is None else float(r[metric])

    def p_value(champion_model: str) -> float | None:
        """One-sided paired p of "best beats the champion's method" on the validation users."""
        return summary["p_values"].get(best, {}).get(champion_model)

    n_users = int(summary.get("n_validation_users", 0))
    untestable = too_few_users(n_users, "evaluate on more users")
    # every model evaluated on this split is a rival: the gate never promotes a loser
    rivals = {m: float(r[metric]) for m, r in validation.items()}
    identity = {"interval": interval.batch_date, "model": best,
                **{f"delta_version.{t}": str(v) for t, v in summary.get("delta_versions", {}).items()}}
    test = summary["results"].get(best, {}).get(metric)
    result = gate(mlflow, run_id, best, split_metric(VALIDATION, metric), candidates[best], rescore,
                  name=RETRIEVAL, model_uri=uris[best], rivals=rivals, identity=identity,
                  tags={} if test is None else {split_metric(TEST, metric): f"{float(test):.6f}"},
                  alias=settings.registry.challenger_alias if settings.registry.require_online_win
                  else "champion", p_value=p_value, significance=settings.evaluation.significance,
                  untestable=untestable)
    log.info("gate %s: %s v%s %s: %s", interval.batch_date, best, result.version,
             "PROMOTED to @champion" if result.promoted else "not promoted", result.reason)
    payload = {**result.as_dict(), "candidates": candidates, "run_id": run_id,
               "p_values": summary["p_values"].get(best, {}), "evaluation_report": path.name,
               "evaluation_run": summary.get("evaluation_run")}
    out.write_text(json.dumps(payload, indent=2))
    return payload


def main(argv: list[str] | None = None) -> dict[str, object]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
