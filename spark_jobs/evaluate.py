"""Evaluate: silver ``events`` -> every configured model fitted, scored and logged to MLflow.

Runs the fixed protocol of :mod:`recmodels.experiment` (the one ``freshrec experiment`` runs on a
file): each user's newest events are the test period, the newest events before it the validation
period; each model of ``evaluation.models`` (parameters from ``models.<name>``; Spark ALS from the
``als`` section) is fitted once on the events before both and scored on both (full ranking,
training items excluded). Validation metrics, the per-user paired bootstrap p-values between every
pair of models (``p_value.<a>.over.<b>`` on the parent run) and the test metrics are logged. Each
fit is its own MLflow run, nested under the evaluation run: parameters, test metrics per K
(``test_*``) and validation metrics (``val_*``), fit time, the data's Delta versions and the
exported model (``model/``). The parent run holds the comparison table and figure and every
model's metrics (``<model>.test_*``, ``<model>.val_*``);
``<data>/reports/evaluation-<batch_date>-<run id>.json`` (one file per run, never overwritten, listed
in ``reports/evaluations.jsonl``: :mod:`freshrec.contracts.reports`) holds the summary
(``results``: test, ``validation``, ``p_values``) with the run id of each model, which the promotion
gate (:mod:`spark_jobs.gate`) reads: it decides on the validation split only. With ``evaluation.refit``
(default on) the model the gate will pick is then fitted again on every event of the interval,
keeping what it chose on validation, and logged as its own run (``refit-<model>``): the gate
registers that one, so what is served has learnt from the newest events too.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from freshrec.contracts.registry import TEST, VALIDATION, split_metric
from freshrec.contracts.reports import evaluation_path, write_evaluation
from freshrec.storage.delta import DeltaStore
from freshrec.interval import DataInterval, run_job
from freshrec.progress import advance
from freshrec.settings import Settings
from freshrec.storage.spark import get_spark
from freshrec.tracking import mlflow_for
from recmodels import SPARK_MODELS, model_params
from recmodels.experiment import Protocol, expand_models, interactions_of, p_value_matrix
from spark_jobs.gate import eligible

log = logging.getLogger(__name__)


def load_events(store: DeltaStore, interval: DataInterval,
                version: int | None = None) -> tuple[pa.Table, int | None]:
    """The interval's silver events (the latest version unless ``version`` is given)."""
    version = store.version("events") if version is None else version
    table = store.read_arrow(
        "events", version=version, columns=["user_id", "item_id", "ts", "weight", "raw_id"],
        filter=(pc.field("batch_date") <= interval.batch_date)
        & (pc.field("ts") < pa.scalar(interval.end, pa.timestamp("us", tz="UTC"))))
    return table, version


def _sorted_codes(col: pa.ChunkedArray) -> pa.DictionaryArray:
    """``col`` as int32 codes over its distinct values in sorted order (byte order of UTF-8, which
    is Python's order of the strings), so sorting or searching the codes is sorting or searching
    the ids."""
    codes = pc.subtract(pc.rank(col, sort_keys="ascending", tiebreaker="dense"), 1)
    values = pc.unique(col)
    values = values.take(pc.sort_indices(values))
    return pa.DictionaryArray.from_arrays(codes.cast(pa.int32()), values)


def worker_events(store: DeltaStore, interval: DataInterval, version: int) -> pd.DataFrame:
    """The interval's events as the protocol needs them, compactly: ``user_id`` and ``item_id``
    categorical (int32 codes over the sorted ids: a split sorts and indexes integers, and no
    Python string object exists per row), ``raw_id`` replaced by its rank in string order (it
    only breaks ties in time), ``ts`` and ``weight`` as read."""
    table, _ = load_events(store, interval, version=version)
    cols = {"user_id": _sorted_codes(table.column("user_id")),
            "item_id": _sorted_codes(table.column("item_id")),
            "ts": table.column("ts"), "weight": table.column("weight"),
            "raw_id": pc.rank(table.column("raw_id"), sort_keys="ascending", tiebreaker="dense")}
    del table
    return pa.table(cols).to_pandas()


MAX_ARTIFACT_BYTES = 512 << 20


def split_metrics(test: dict[str, float], validation: dict[str, float] | None = None) -> dict[str, float]:
    """A fit's run metrics, each named for its split (``test_ndcg_at_10``, ``val_ndcg_at_10``);
    ``fit_seconds`` keeps its name."""
    out = {(k if k == "fit_seconds" else split_metric(TEST, k)): v for k, v in test.items()}
    out.update({split_metric(VALIDATION, k): v for k, v in (validation or {}).items()})
    return out


def format_table(results: dict[str, dict[str, float]], ks: list[int]) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "hr", "coverage")]
    lines = [f"{'model':<14}" + "".join(f"{c:>13}" for c in cols) + f"{'fit_s':>9}"]
    for model, r in results.items():
        vals = [r[f"{c.split('@')[0]}_at_{c.split('@')[1]}"] for c in cols]
        lines.append(f"{model:<14}" + "".join(f"{v:>13.4f}" for v in vals)
                     + f"{r.get('fit_seconds', 0.0):>9.1f}")
    return "\n".join(lines)


def comparison_figure(results: dict[str, dict[str, float]], k: int):
    """Grouped bars of Recall/NDCG/HR/coverage at ``k`` per model, for the MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["recall", "ndcg", "hr", "coverage"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(results)
    for n, (model, r) in enumerate(results.items()):
        xs = [m + n * width for m in range(len(metrics))]
        ax.bar(xs, [r[f"{m}_at_{k}"] for m in metrics], width, label=model)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))])
    ax.set_xticklabels([f"{m}@{k}" for m in metrics])
    ax.set_title("freshrec evaluation (temporal split, full ranking)")
    ax.legend()
    fig.tight_layout()
    return fig


class ContractScorer:
    """A model under the contract fitted once under the protocol (on the events before the
    validation and test periods), with what log_model_run needs."""

    def __init__(self, name: str, settings: Settings, protocol: Protocol) -> None:
        if name in SPARK_MODELS:
            get_spark(settings)  # the job's session (its settings), which the model then uses
        self.fitted = protocol.fit(name, model_params(name, settings))
        self.model = self.fitted.model
        self.params = self.model.params()
        self.fit_seconds = self.fitted.fit_seconds

    def export(self, directory: Path) -> None:
        self.model.export(directory)


def log_model_run(mlflow, name: str, model, metrics: dict[str, float], versions: dict,
                  interval: DataInterval, run_name: str | None = None,
                  tags: dict[str, str] | None = None,
                  parent_run_id: str | None = None) -> tuple[str, str | None, str | None]:
    """One nested MLflow run per fit: params, metrics per K, data versions and the model as an
    ``mlflow.pyfunc`` model (the servable artifact plus the histories it scores). Returns the run
    id, the logged model's URI (None when it is not servable) and why not."""
    from recmodels import pyfunc
    from recmodels.servable import ArtifactError

    with mlflow.start_run(run_name=run_name or f"fit-{name}-{interval.batch_date}",
                          nested=True, parent_run_id=parent_run_id) as run:
        mlflow.set_tags({"stage": "refit" if tags and "refit_of" in tags else "fit", "model": name,
                         "interval": interval.batch_date, **(tags or {})})
        params = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                  for k, v in getattr(model, "params", {}).items()}
        mlflow.log_params({**{k: str(v)[:500] for k, v in params.items()},
                           **{f"delta_version.{t}": v for t, v in versions.items()}})
        mlflow.log_metrics(metrics)
        uri, why = None, None
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model"
            try:
                model.export(out)
                size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                if size > MAX_ARTIFACT_BYTES:
                    raise ArtifactError(f"its artifact is {size / 1e6:.0f} MB, above the "
                                        f"{MAX_ARTIFACT_BYTES >> 20} MB limit")
                users = pyfunc.save_users_from(Path(tmp) / "users.npz", model.model.data)
                info = pyfunc.log(mlflow, out, users, [str(u) for u in model.model.data.user_ids[:3]])
                uri = info.model_uri
            except ArtifactError as e:
                why = f"not servable: {e}"
                mlflow.set_tag("servable", why)
                log.warning("evaluate: %s is %s; it will not be registered", name, why)
        return run.info.run_id, uri, why


class Refit:
    """A model fitted again on every event of the interval (after it won on the split), keeping
    what it chose on its own validation data (:meth:`recmodels.base.Recommender.refit`)."""

    def __init__(self, scorer: ContractScorer, events: pd.DataFrame, items: pd.DataFrame | None) -> None:
        data = interactions_of(events, items)
        t0 = time.perf_counter()
        self.model = scorer.model.refit(data)
        self.fit_seconds = getattr(self.model, "fit_seconds", time.perf_counter() - t0)
        self.params = {**scorer.params, "refit": "all events of the interval"}

    def export(self, directory: Path) -> None:
        self.model.export(directory)


def model_names(requested: list[str]) -> list[str]:
    """Model names, each once (``all``: every available model, so ALS is fitted once)."""
    return expand_models(requested)


def validation_table(validation: dict[str, dict[str, float]], p_values: dict, metric: str,
                     alpha: float) -> str:
    """The gate's view: each model's validation metric and the paired p-value of the best over it."""
    if not validation:
        return ""
    best = max(validation, key=lambda m: validation[m][metric])
    lines = [f"validation (the gate decides here; p: one-sided paired bootstrap, {best} better):",
             f"{'model':<14}{metric:>13}{'p':>9}"]
    for m in sorted(validation, key=lambda m: -validation[m][metric]):
        p = p_values.get(best, {}).get(m)
        mark = "" if p is None else f"{p:>9.4f}" + (" *" if p < alpha else "")
        lines.append(f"{m:<14}{validation[m][metric]:>13.4f}{mark}")
    return "\n".join(lines)


def release_spark() -> None:
    """Stop this process's Spark session and end its JVM, whose heap (up to
    ``spark.driver_memory``) it would otherwise keep for the process's life; ``get_spark`` starts
    both again when a later model needs them. For the evaluate worker only: the driver keeps its
    session."""
    try:
        from pyspark import SparkContext
        from pyspark.sql import SparkSession
    except ImportError:
        return
    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    gateway = SparkContext._gateway
    if gateway is None:
        return
    proc = getattr(gateway, "proc", None)
    gateway.shutdown()
    SparkContext._gateway, SparkContext._jvm = None, None
    if proc is not None:  # the JVM exits when its stdin closes (pyspark's launcher pipe)
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a JVM that will not end is killed
            proc.kill()
            proc.wait()
    log.info("evaluate: Spark's JVM ended (its memory is free for the next model)")


def fit_candidates(settings: Settings, interval: DataInterval, names: list[str],
                   versions: dict, parent_run_id: str, own_spark: bool = False) -> dict:
    """The heavy half of evaluate, run in a worker process by default (:func:`run`): reads the
    interval's events at ``versions['events']`` (delta-rs, the columns the protocol needs, ids as
    codes: :func:`worker_events`), builds
    the splits, fits and scores each model of ``names``, logs each fit (and the refit of the gate's
    candidate) as a run nested under ``parent_run_id`` tagged with this process's id
    (``fit_pid``), and returns what the driver's summary needs: sizes, metrics per split, the
    per-user validation metric of each model, run ids and model URIs. With ``own_spark`` (the
    worker: no other Spark work shares its JVM) the JVM is ended after the last Spark model that
    is still to come (:func:`release_spark`), so the models after it have its memory."""
    cfg = settings.evaluation
    store = DeltaStore(settings)
    events = worker_events(store, interval, versions["events"])
    items = store.read_arrow("items", version=versions["items"],
                             columns=["item_id", "title", "categories", "text"]).to_pandas() \
        if versions["items"] is not None else None
    protocol = Protocol(events, items, cfg.ks, cfg.test_fraction, cfg.validation_fraction,
                        cfg.max_users, cfg.seed, keep_split_events=False)
    sizes = protocol.describe()
    log.info("evaluate %s: %s", interval.batch_date, sizes)
    results: dict[str, dict[str, float]] = {}  # test split (reported)
    validation: dict[str, dict[str, float]] = {}  # validation split (the gate's)
    per_user: dict = {}
    skipped: dict[str, str] = {}
    runs: dict[str, str] = {}
    model_uris: dict[str, str] = {}
    skipped_registry: dict[str, str] = {}
    mlflow = mlflow_for(settings)
    metric = f"ndcg_at_{cfg.ks[0]}"
    pid = {"fit_pid": str(os.getpid())}
    leader: tuple[str, ContractScorer] | None = None
    for n, name in enumerate(names, 1):
        advance(log, "evaluate", n - 1, len(names), "evaluate %s: [%d/%d] fitting %s",
                interval.batch_date, n, len(names), name)
        try:
            model = ContractScorer(name, settings, protocol)
        except ValueError as e:  # e.g. EASE above its catalog size: say so, go on
            skipped[name] = str(e)
            log.warning("evaluate %s: %s skipped: %s", interval.batch_date, name, e)
            continue
        scores = protocol.score(model.fitted)
        results[name] = {**scores.test, "fit_seconds": model.fit_seconds}
        validation[name] = scores.validation
        per_user[name] = scores.per_user
        logged = split_metrics(results[name], scores.validation)
        runs[name], uri, why = log_model_run(mlflow, name, model, logged, versions, interval,
                                             tags=pid, parent_run_id=parent_run_id)
        if uri:
            model_uris[name] = uri
        else:
            skipped_registry[name] = why
        advance(log, "evaluate", n, len(names), "evaluate %s: %s validation %s=%.4f, test "
                "%.4f (%.1f s)", interval.batch_date, name, metric, validation[name][metric],
                results[name][metric], model.fit_seconds)
        # keep the fit the gate would pick so far (the best eligible one on validation)
        leaders = eligible(validation, model_uris, cfg.gate_models, metric)
        if leaders and max(leaders, key=leaders.get) == name:
            leader = (name, model)
        del model
        if own_spark and name in SPARK_MODELS and not set(names[n:]) & SPARK_MODELS:
            release_spark()
    refit: dict[str, dict] = {}
    if cfg.refit and leader is not None:
        name, scorer = leader
        log.info("evaluate %s: refitting the gate's candidate %s on all %d events of the "
                 "interval", interval.batch_date, name, len(events))
        try:
            model = Refit(scorer, events, items)
        except ValueError as e:  # the split's model stays the one registered
            log.warning("evaluate %s: refit of %s failed (%s); the split's fit is registered",
                        interval.batch_date, name, e)
        else:
            rid, uri, _ = log_model_run(mlflow, name, model,
                                        split_metrics(results[name], validation[name]), versions, interval,
                                        run_name=f"refit-{name}-{interval.batch_date}",
                                        tags={"refit_of": runs[name], **pid},
                                        parent_run_id=parent_run_id)
            if uri:
                refit[name] = {"run": rid, "model_uri": uri, "split_model_uri": model_uris[name],
                               "fit_seconds": model.fit_seconds, "n_events": len(events)}
                model_uris[name] = uri
            del model
    return {"sizes": sizes, "results": results, "validation": validation, "per_user": per_user,
            "skipped": skipped, "runs": runs, "model_uris": model_uris,
            "not_servable": skipped_registry, "refit": refit, "fit_pid": os.getpid()}


def fit_in_worker(settings: Settings, interval: DataInterval, names: list[str], versions: dict,
                  parent_run_id: str) -> dict:
    """:func:`fit_candidates` in a child process (``python -m spark_jobs.evaluate_worker``), so the
    events, splits and fitted models never enter the driver's memory: the job (settings included,
    secrets too) goes over the child's stdin as a pickle, the result comes back through a file in
    a private temporary folder. A Spark model in the child starts its own session on the master
    the driver's session uses (on a cluster the driver's session is stopped first, so the child's
    application gets the cores). The child's ValueError (bad input) comes back as a ValueError with
    its message, any other error as a RuntimeError; a child killed or dying without a result is a
    RuntimeError naming the signal or exit status. The worker dies with this process."""
    import pickle
    import subprocess
    import sys

    master = None
    try:
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        master = active.sparkContext.master if active is not None else None
        if master and not master.startswith("local") and set(names) & SPARK_MODELS:
            # a standalone master gives an application every free core: the child's Spark
            # application would wait for the driver's to finish. Stop it; the driver needs no
            # Spark until its next job (get_spark starts a session again).
            log.info("evaluate: stopping the driver's Spark session on %s so the worker's Spark "
                     "models get the cluster's cores", master)
            active.stop()
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET")}
    env["FRESHREC_EVALUATE_PARENT"] = str(os.getpid())  # the worker dies with this process
    with tempfile.TemporaryDirectory(prefix="freshrec-evaluate-") as tmp:
        out = Path(tmp) / "result.pickle"
        job = {"settings": settings, "interval": interval, "names": names, "versions": versions,
               "parent_run_id": parent_run_id, "spark_master": master, "out": str(out),
               "log_level": logging.getLogger().getEffectiveLevel()}
        proc = subprocess.run([sys.executable, "-m", "spark_jobs.evaluate_worker"],
                              input=pickle.dumps(job), env=env, check=False)
        result = {}
        if proc.returncode in (0, 1) and out.exists():  # written whole (renamed) or not at all
            result = pickle.loads(out.read_bytes())
        if proc.returncode == 0 and result and "error" not in result:
            return result
        if proc.returncode == 1 and "error" in result:
            msg = f"evaluate {interval.batch_date}: {result['error']}"
            raise (ValueError if result["bad_input"] else RuntimeError)(msg)
        how = (f"was killed by signal {-proc.returncode} (out of memory?)"
               if proc.returncode < 0 else f"exited with status {proc.returncode}")
        raise RuntimeError(f"evaluate {interval.batch_date}: the worker process fitting {names} "
                           f"{how}; its log is above (stderr)")


def run(settings: Settings, interval: DataInterval,
        models: list[str] | None = None) -> dict[str, object]:
    """Evaluate the interval. The driver reads only the tables' versions, opens the parent MLflow
    run, and (with ``evaluation.fit_in_worker``, the default) hands the fits to a worker process
    (:func:`fit_in_worker`); it then computes the p-values and writes the summary."""
    cfg = settings.evaluation
    names = model_names(models or cfg.models)
    store = DeltaStore(settings)
    ev_version = store.version("events")
    if ev_version is None:
        raise ValueError("no events to evaluate on: the silver 'events' table does not exist; "
                         "run ingest and clean first")
    versions = {"events": ev_version, "items": store.version("items") if store.exists("items") else None}
    mlflow = mlflow_for(settings)
    metric = f"ndcg_at_{cfg.ks[0]}"
    with mlflow.start_run(run_name=f"evaluate-{interval.batch_date}") as parent:
        mlflow.set_tags({"stage": "evaluate", "interval": interval.batch_date,
                         "driver_pid": str(os.getpid())})
        mlflow.log_params({"test_fraction": cfg.test_fraction, "max_users": cfg.max_users,
                           "validation_fraction": cfg.validation_fraction,
                           "significance": cfg.significance, "models": ",".join(names),
                           **{f"delta_version.{t}": v for t, v in versions.items()}})
        fit = fit_in_worker if cfg.fit_in_worker else fit_candidates
        out = fit(settings, interval, names, versions, parent.info.run_id)
        mlflow.set_tag("fit_pid", str(out["fit_pid"]))
        sizes, results, validation = out["sizes"], out["results"], out["validation"]
        p_values = p_value_matrix(out["per_user"], cfg.bootstrap_resamples, cfg.seed)
        skipped = out["skipped"]
        table_text = "test (held out, reported only):\n" + format_table(results, cfg.ks) + "".join(
            f"\n{name:<14}skipped: {why}" for name, why in skipped.items()) + "\n" + \
            validation_table(validation, p_values, metric, cfg.significance)
        summary = {"batch_date": interval.batch_date, "events_delta_version": ev_version,
                   "delta_versions": versions, "n_test_users": sizes["test_users"],
                   "n_validation_users": sizes["validation_users"],
                   "n_train_users": sizes["fit_users"], "n_items": sizes["fit_items"],
                   "metric": metric, "results": results, "validation": validation,
                   "p_values": p_values, "significance": cfg.significance,
                   "bootstrap_resamples": cfg.bootstrap_resamples, "skipped": skipped,
                   "runs": out["runs"], "model_uris": out["model_uris"],
                   "not_servable": out["not_servable"], "refit": out["refit"],
                   "evaluation_run": parent.info.run_id, "table": table_text,
                   "report": evaluation_path(settings.data_dir / "reports", interval.batch_date,
                                             parent.info.run_id).name}
        mlflow.log_metrics({f"{m}.{k}": v for m in results
                            for k, v in split_metrics(results[m], validation.get(m)).items()})
        mlflow.log_metrics({f"p_value.{a}.over.{b}": p for a, row in p_values.items()
                            for b, p in row.items()})
        mlflow.log_text(table_text, "evaluation_table.txt")
        if results:
            mlflow.log_figure(comparison_figure(results, cfg.ks[0]), "evaluation.png")
        mlflow.log_dict(summary, "evaluation.json")
    path = write_evaluation(settings.data_dir / "reports", summary)
    log.info("evaluate %s (report %s):\n%s", interval.batch_date, path, table_text)
    return summary


def main(argv: list[str] | None = None) -> dict[str, object]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
