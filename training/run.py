"""``freshrec train``: one experiment, tracked in MLflow, gated into the registry.

Deep retrieval (``two_tower``, ``sasrec``): the dataset at a pinned Delta version (recorded in the
run) -> the evaluation's temporal split (same test fraction, sample and seed as the batch lane, so
the test metrics sit in one table with ALS and the hybrid) -> training with per-epoch curves ->
test metrics (``test_*``, reported only), the exported model (``model/``: item vectors, TorchScript
user encoder), a curve figure and the comparison table -> the ``freshrec-retrieval`` gate, which
decides on the run's **validation** users only, like the batch gate: the exported model and the
current ``@champion``'s own artifact are both scored on them (NDCG@10 per user, the same history in,
:meth:`training.data.TrainData.validation_per_user`), and the new version takes ``@champion`` only
when its mean (``val_ndcg_at_10``) is higher with a one-sided paired per-user bootstrap p-value
(:func:`recmodels.evaluation.paired_bootstrap`, ``evaluation.bootstrap_resamples``) below
``evaluation.significance``. Otherwise it is registered without the alias, and the one-line reason
is printed and kept in the version's ``gate_reason`` tag.

Policies (``bandit``, ``reinforce``): the simulator built from the synthetic generator's ground
truth; the logging policy's data; the learned policy's true value next to random, greedy and the
logging policy, and its off-policy estimates (IPS, SNIPS, DR) -> the ``freshrec-policy`` gate on
the SNIPS estimate. A NaN loss stops the run, which is marked FAILED in MLflow with the reason.

Policies from logs (``data="logged"``; ``bandit``, ``reinforce``, ``dqn``): the served requests of
the Delta ``feedback`` table with their ``impressions`` candidates (:mod:`training.rl_logged`),
split by serving time; the learned policy's IPS / SNIPS / DR on the held-out requests next to the
logging policy's own value there, an ``ope.png`` figure -> the ``freshrec-policy`` gate on SNIPS
(``dqn`` is recorded, not registered: the serving re-ranker runs linear policies only). ``dqn`` on
the simulator trains the same way from the simulated logging policy's data, without tables.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from freshrec.contracts import registry
from freshrec.contracts.registry import (POLICY, RETRIEVAL, TEST, VALIDATION, gate, split_metric,
                                         too_few_users)
from freshrec.contracts.reports import evaluations
from freshrec.device import resolve_device
from freshrec.settings import Settings
from freshrec.tracking import mlflow_for
from recmodels import pyfunc, servable
from recmodels.evaluation import paired_bootstrap

log = logging.getLogger(__name__)
TRAIN_MODELS = ("two_tower", "sasrec", "bandit", "reinforce", "dqn")
POLICY_DATA = ("simulator", "logged")


def load_dataset(settings: Settings, dataset, version: int | None = None):
    from freshrec.data import datasets

    if isinstance(dataset, datasets.Dataset):  # already loaded (experiments, tests)
        return dataset
    if dataset == "embedded":
        return datasets.silver(settings, version)
    if dataset == "ml-100k":
        return datasets.movielens_100k(settings.data_dir / "cache")
    raise ValueError(f"unknown dataset {dataset!r}: embedded (the silver tables) or ml-100k")


def _curve_figure(history: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ep = [h["epoch"] for h in history]
    ax[0].plot(ep, [h["train_loss"] for h in history], marker="o")
    ax[0].set_title("training loss")
    ax[1].plot(ep, [h["val_ndcg_at_10"] for h in history], marker="o", color="tab:green")
    ax[1].set_title("validation NDCG@10")
    for a in ax:
        a.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def comparison_table(settings: Settings, name: str, test: dict, events_version) -> tuple[str, dict]:
    """This run's test metrics next to the batch lane's newest evaluation of the same data version
    (its test split: the same users and periods). Reported only: the gate never reads it."""
    rows = {name: test}
    for _, summary in evaluations(settings.data_dir / "reports"):
        if summary.get("events_delta_version") == events_version:
            rows = {**summary["results"], **rows}
            break
    head = f"{'model':<16}{'recall@10':>11}{'ndcg@10':>10}{'hr@10':>9}{'coverage@10':>13}"
    lines = ["test split (reported; the gate decides on validation):", head] + [
        f"{m:<16}{r['recall_at_10']:>11.4f}{r['ndcg_at_10']:>10.4f}{r['hr_at_10']:>9.4f}"
        f"{r['coverage_at_10']:>13.4f}" for m, r in rows.items()]
    return "\n".join(lines), rows


def _save_users(split, path: Path) -> Path:
    """The training histories the logged model scores (see :mod:`recmodels.pyfunc`)."""
    from types import SimpleNamespace

    import pandas as pd

    ev = split.train_events
    events = pd.DataFrame({"user_row": np.searchsorted(split.user_ids, ev["user_id"].to_numpy()),
                           "item_row": np.searchsorted(split.item_ids, ev["item_id"].to_numpy()),
                           "ts": ev["ts"].to_numpy()})
    data = SimpleNamespace(matrix=split.train, events=events, user_ids=split.user_ids)
    return pyfunc.save_users_from(path, data)


def train_deep(settings: Settings, model: str, device: str, dataset="embedded",
               overrides: dict | None = None, register: bool = True, progress: bool = True,
               data_version: int | None = None) -> dict:
    from training import data as td
    from training import trainer

    choice = resolve_device(device, need=("torch",))
    cfg = settings.training.model_copy(update=overrides or {})
    ds = load_dataset(settings, dataset, data_version)
    dataset = ds.name
    ev = settings.evaluation
    data = td.build(ds, ev.test_fraction, ev.max_users if dataset == "embedded" else 0, ev.seed,
                    cfg.val_users)
    mlflow = mlflow_for(settings, cfg.experiment)
    with mlflow.start_run(run_name=f"{model}-{dataset}") as run:
        mlflow.set_tags({"stage": "train", "model": model, "dataset": dataset,
                         "device": choice.torch_device})
        mlflow.log_params({**cfg.model_dump(), "model": model, "dataset": dataset,
                           "device_requested": device, "device": choice.torch_device,
                           "n_users": data.n_users, "n_items": data.n_items,
                           "n_train_events": len(data.split.train_events),
                           **{f"delta_version.{k}": v for k, v in ds.versions.items()}})
        try:
            result = trainer.train(model, data, cfg, choice.torch_device, progress=progress,
                                   on_epoch=lambda e, row: mlflow.log_metrics(
                                       {k: v for k, v in row.items() if k != "epoch"}, step=e))
        except trainer.NanLoss as e:
            mlflow.set_tags({"failure_reason": str(e)})
            mlflow.end_run(status="FAILED")
            raise
        mlflow.log_metrics({**{split_metric(TEST, k): v for k, v in result.test.items()},
                            "best_epoch": result.best_epoch, "best_val_ndcg_at_10": result.best_val_ndcg,
                            "train_samples_per_second": result.samples_per_second,
                            "train_seconds": result.train_seconds})
        mlflow.log_figure(_curve_figure(result.history, f"{model} on {dataset}"), "curves.png")
        table, _ = comparison_table(settings, model, result.test, ds.versions.get("events"))
        mlflow.log_text(table, "comparison_table.txt")
        with tempfile.TemporaryDirectory() as tmp:
            trainer.export(result, data, Path(tmp) / "model", cfg.max_len)
            # what is registered, scored on the validation users: what the gate compares
            per_user = data.validation_per_user(servable.load(Path(tmp) / "model"), GATE_K)
            if len(per_user):
                mlflow.log_metric(split_metric(VALIDATION, GATE_METRIC), float(per_user.mean()))
            users = _save_users(data.split, Path(tmp) / "users.npz")
            info = pyfunc.log(mlflow, Path(tmp) / "model", users,
                              [str(u) for u in data.split.user_ids[:3]])
        run_id = run.info.run_id
    out = {"run_id": run_id, "model": model, "dataset": dataset, "device": choice.torch_device,
           "test": result.test, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
           "samples_per_second": result.samples_per_second, "table": table,
           "data_versions": ds.versions}
    if register and dataset != "embedded":
        out["gate_skipped"] = (f"not registered: {dataset} is an experiment dataset, the registry "
                               "holds models of the served (embedded/imported) data")
    elif register:
        out["gate"] = gate_deep(settings, mlflow, run_id, model, info.model_uri, data, per_user,
                                result.test, {"dataset": dataset, **{
                                    f"delta_version.{k}": str(v) for k, v in ds.versions.items()}})
    return out


GATE_K = 10
GATE_METRIC = f"ndcg_at_{GATE_K}"


def champion_on_split(data, k: int = GATE_K) -> tuple[object | None, np.ndarray | None, str | None]:
    """The current ``freshrec-retrieval@champion`` scored on ``data``'s validation users: its own
    artifact downloaded from the registry (:meth:`training.data.TrainData.validation_per_user`).
    Returns (the champion's model version or None, its per-user NDCG@k or None, why it could not
    be scored or None). Needs mlflow pointed at the tracking store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    champ = registry.current_champion(MlflowClient(), RETRIEVAL)
    if champ is None:
        return None, None, None
    label = f"champion v{champ.version} ({champ.tags.get('model', '?')})"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, _ = registry.download(registry.resolve(champ.version), tmp)
            return champ, data.validation_per_user(servable.load(model_dir), k), None
    except (servable.ArtifactError, FileNotFoundError, LookupError, MlflowException, OSError) as e:
        why = " ".join(str(e).split())  # one line
        return champ, None, (f"{label} could not be scored on this run's validation users "
                             f"({why}); no paired test is possible: fix or re-register the "
                             "champion's artifact, or move @champion (`freshrec model rollback`)")


def gate_deep(settings: Settings, mlflow, run_id: str, model: str, model_uri: str, data,
              per_user: np.ndarray, test: dict, tags: dict) -> dict:
    """The ``freshrec-retrieval`` gate of a trained deep model (see the module doc): ``per_user``
    is the model's NDCG@10 per validation user; ``test`` its test metrics (tagged, not compared)."""
    ev = settings.evaluation
    _, champion, why = champion_on_split(data)
    n = len(per_user)

    def rescore(champion_model: str) -> float | None:
        return None if champion is None else float(champion.mean())

    def p_value(champion_model: str) -> float | None:
        """One-sided paired p of "the trained model beats the champion" on the same users."""
        if champion is None or n == 0:
            return None
        return paired_bootstrap(per_user, champion, ev.bootstrap_resamples, ev.seed).p_value

    untestable = why or too_few_users(n, "train with more validation users (training.val_users)")
    metric = float(per_user.mean()) if n else float("nan")
    return gate(mlflow, run_id, model, split_metric(VALIDATION, GATE_METRIC), metric, rescore,
                name=RETRIEVAL, model_uri=model_uri,
                tags={split_metric(TEST, GATE_METRIC): f"{float(test[GATE_METRIC]):.6f}",
                      "gate_validation_users": str(n), **tags},
                alias=settings.registry.challenger_alias if settings.registry.require_online_win
                else "champion", p_value=p_value, significance=ev.significance,
                untestable=untestable).as_dict()


def train_policy(settings: Settings, model: str, kind: str = "linucb", n_logged: int = 4000,
                 rounds: int = 4000, register: bool = True, seed: int = 0) -> dict:
    from training import rl

    sim = rl.Simulator.from_synth(settings.synth, seed=seed)
    mlflow = mlflow_for(settings, settings.training.experiment)
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=f"{model}-simulator") as run:
        mlflow.set_tags({"stage": "train", "model": model, "dataset": "simulator"})
        mlflow.log_params({"model": model, "bandit_kind": kind, "n_logged": n_logged,
                           "bandit_rounds": rounds, "slate_k": sim.k, "candidates": sim.n_candidates,
                           "synth_seed": settings.synth.seed, "seed": seed})
        try:
            res = rl.compare_policies(sim, n_logged=n_logged, bandit_rounds=rounds, seed=seed)
        except FloatingPointError as e:
            mlflow.set_tags({"failure_reason": str(e)})
            mlflow.end_run(status="FAILED")
            raise
        learned = "reinforce" if model == "reinforce" else kind
        truth, est = res["truth"], res["ope"][learned]
        for row in res["reinforce_curve"]:
            mlflow.log_metric("ips_objective", row["ips_objective"], step=row["step"])
        mlflow.log_metrics({**{f"true_value.{p}": v for p, v in truth.items()},
                            **{f"ope.{e}": v for e, v in est.items()},
                            "value_vs_logging": truth[learned] / truth["logging"],
                            "fit_seconds": time.perf_counter() - t0})
        mlflow.log_dict({"truth": truth, "ope": res["ope"], "online": res["online"]}, "policies.json")
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "model"
            d.mkdir()
            if model == "reinforce":
                np.savez(d / "arrays.npz", theta=res["policy"].theta)
            else:
                np.savez(d / "arrays.npz", **res["bandits"][kind][0].to_arrays())
            (d / "model.json").write_text(json.dumps({
                "name": learned, "kind": "reranker", "features": "recmodels.policies.candidate_features",
                "n_features": rl.N_FEATURES}))
            mlflow.log_artifacts(str(d), "model")
        run_id = run.info.run_id
    out = {"run_id": run_id, "model": learned, "truth": truth, "ope": res["ope"],
           "online": res["online"]}
    if register:
        out["gate"] = gate(mlflow, run_id, learned, "ope_snips", est["snips"], name=POLICY).as_dict()
    return out


def _ope_figure(rows: dict[str, dict[str, float]], logging: float, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(rows)
    keys = list(next(iter(rows.values())))
    w = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.bar(np.arange(len(names)) + j * w, [rows[n][key] for n in names], w, label=key)
    ax.axhline(logging, color="black", ls="--", lw=1, label="logging policy (on-policy)")
    ax.set_xticks(np.arange(len(names)) + w * (len(keys) - 1) / 2, names)
    ax.set_ylabel("clicks per slate")
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _policy_artifact(d: Path, learned) -> None:
    from recmodels.policies import N_FEATURES

    d.mkdir()
    np.savez(d / "arrays.npz", **learned.arrays)
    (d / "model.json").write_text(json.dumps({
        "name": learned.name, "kind": learned.kind, "features": "recmodels.policies.candidate_features",
        "n_features": N_FEATURES}))


def train_policy_logged(settings: Settings, model: str, kind: str = "linucb", register: bool = True,
                        seed: int = 0, test_fraction: float = 0.3, device: str = "cpu",
                        source: str = "logged", n_logged: int = 6000) -> dict:
    """Train ``model`` from logged slates and evaluate it off-policy on held-out logs.
    ``source``: ``logged`` (the Delta tables) or ``simulator`` (the simulated logging policy's
    data, ``n_logged`` requests, also scored by the simulator's true value)."""
    from freshrec.storage.delta import DeltaStore
    from training import rl_logged
    from training.trainer import NanLoss

    t0 = time.perf_counter()
    truth = {}
    if source == "logged":
        store = DeltaStore(settings)
        versions = store.versions(["feedback", "impressions", "events", "items", "item_features"])
        data = rl_logged.load_logged(store)
    else:
        from training import rl

        sim = rl.Simulator.from_synth(settings.synth, seed=seed, fixed_history=True,
                                      unique_candidates=True)
        versions = {}
        logged = rl.log_data(sim, n_logged)
        data = rl_logged.from_simulator(sim, logged)
    train, test = data.split(test_fraction)
    mlflow = mlflow_for(settings, settings.training.experiment)
    name = kind if model == "bandit" else model
    with mlflow.start_run(run_name=f"{name}-{source}") as run:
        mlflow.set_tags({"stage": "train", "model": name, "dataset": source, "device": device})
        mlflow.log_params({"model": model, "bandit_kind": kind, "data": source, "seed": seed,
                           "test_fraction": test_fraction, "n_requests": len(data),
                           "n_train_requests": len(train), "n_test_requests": len(test),
                           "candidates": data.mask.shape[1], "slate_k": test.k(),
                           **{f"delta_version.{t}": v for t, v in versions.items()}})
        try:
            learned = rl_logged.TRAINERS[model](train, kind=kind, seed=seed, device=device)
        except (FloatingPointError, NanLoss) as e:
            mlflow.set_tags({"failure_reason": str(e)})
            mlflow.end_run(status="FAILED")
            raise
        for row in learned.curve:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        ev = rl_logged.evaluate_on_logs(learned, train, test)
        est, base = ev["ope"], ev["logging_value"]
        metrics = {**{f"ope.{e}": v for e, v in est.items()}, "logging_value": base,
                   "snips_vs_logging": est["snips"] / base if base else float("nan"),
                   "dr_vs_logging": est["dr"] / base if base else float("nan"),
                   "fit_seconds": time.perf_counter() - t0}
        if source == "simulator":
            fresh = sim.requests(3000)
            truth = {name: rl_logged.true_value_in_simulator(sim, learned.scores, fresh),
                     "logging": rl.true_value(fresh, rl.inclusion_probs(
                         fresh.base, sim.k, np.random.default_rng(seed + 1)))}
            metrics.update({f"true_value.{p}": v for p, v in truth.items()})
            metrics["value_vs_logging"] = truth[name] / truth["logging"]
        mlflow.log_metrics(metrics)
        mlflow.log_dict({"ope": est, "logging_value": base, "truth": truth, **{
            k: v for k, v in ev.items() if k not in ("ope", "logging_value")}}, "policies.json")
        mlflow.log_figure(_ope_figure({name: est}, base, f"{name} from {source} logs: off-policy "
                                      "estimates on held-out requests"), "ope.png")
        with tempfile.TemporaryDirectory() as tmp:
            _policy_artifact(Path(tmp) / "model", learned)
            mlflow.log_artifacts(str(Path(tmp) / "model"), "model")
        run_id = run.info.run_id
    out = {"run_id": run_id, "model": name, "data": source, "ope": {name: est},
           "logging_value": base, "truth": truth, "n_train": len(train), "n_test": len(test)}
    if register and learned.kind != "reranker":
        out["gate_skipped"] = (f"not registered: {name} is a slate Q-network, and the serving "
                               "re-ranker runs linear policies (bandit, reinforce) only")
    elif register:
        out["gate"] = gate(mlflow, run_id, name, "ope_snips", est["snips"], name=POLICY,
                           tags={"data": source, **{f"delta_version.{t}": str(v)
                                                    for t, v in versions.items()}}).as_dict()
    return out


def run(settings: Settings, model: str, device: str = "auto", dataset="embedded",
        overrides: dict | None = None, register: bool = True, progress: bool = True, **kw) -> dict:
    if model not in TRAIN_MODELS:
        raise ValueError(f"unknown model {model!r} for training; known: {list(TRAIN_MODELS)}")
    if model in ("two_tower", "sasrec"):
        return train_deep(settings, model, device, dataset, overrides, register, progress,
                          kw.get("data_version"))
    choice = resolve_device(device, need=("torch",))  # a requested GPU that is missing fails loudly
    data = kw.pop("data", "simulator")
    if data not in POLICY_DATA:
        raise ValueError(f"unknown policy data {data!r}: simulator or logged")
    if data == "logged" or model == "dqn":
        return train_policy_logged(settings, model, register=register, source=data,
                                   device=choice.torch_device, **kw)
    return train_policy(settings, model, register=register, **kw)
