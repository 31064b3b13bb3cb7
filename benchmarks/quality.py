"""Recommendation quality of every method under the contract, on the embedded dataset and on
MovieLens 100K, with reference rows computed in the same run.

Protocol (recmodels.evaluation): per-user temporal split, each user's last 20% of events is the
test period; full ranking of the training catalog with training items excluded. Rows: every model
of the contract (Spark ALS implicit and explicit, Spark item- and user-kNN, most-popular, trending,
item-/user-kNN, content, PureSVD, EASE, the hybrid) plus the `implicit` library's ALS as an outside
reference. Printed per dataset: Recall@10, NDCG@10, HR@10, coverage@10, fit seconds, and NDCG@10
as a ratio to most-popular and to EASE. Targets: hybrid >= 1.05x EASE; every method >= most-popular.

The embedded dataset is read from the silver tables (run `make run` first). MovieLens 100K comes
from the recbole 1.2.1 wheel on PyPI, downloaded once into data/cache (never committed). Usage:

    .venv/bin/python benchmarks/quality.py [--datasets embedded,ml-100k] [--max-users 2000]
        [--models all|a,b] [--json out.json] [--png-dir DIR]

Also writes ``quality-<dataset>.png`` (NDCG@10 and Recall@10 per model) into --png-dir (default
data/benchmarks; the README's pictures come from ``--png-dir docs/img``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freshrec.data import datasets  # noqa: E402
from recmodels.evaluation import evaluate_scorer, temporal_split  # noqa: E402
from recmodels.base import Interactions  # noqa: E402
from freshrec.settings import load_settings  # noqa: E402
from recmodels import MODELS, make_model, model_params  # noqa: E402

ORDER = ["most_popular", "trending", "content", "item_knn", "spark_item_knn", "user_knn",
         "spark_user_knn", "pure_svd", "als", "als_explicit", "ease", "hybrid"]


def implicit_als(data: Interactions, rank: int, iterations: int, reg: float, alpha: float):
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=rank, regularization=reg, alpha=alpha,
                                    iterations=iterations, random_state=42,
                                    calculate_training_loss=False)
    model.fit(data.matrix.astype(np.float32), show_progress=False)
    users, items = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda rows: users[rows] @ items.T


def run_dataset(ds: datasets.Dataset, names: list[str], max_users: int, settings) -> dict:
    split = temporal_split(ds.events, settings.evaluation.test_fraction, max_users,
                           settings.evaluation.seed)
    cols = [c for c in ("user_id", "item_id", "weight", "ts", "value") if c in split.train_events]
    items = ds.items if len(ds.items) else None
    data = Interactions.from_events(split.train_events[cols], items)
    rows = np.searchsorted(data.user_ids, split.user_ids)
    cols_idx = np.searchsorted(data.item_ids, split.item_ids)
    print(f"\n== {ds.name}: {len(split.user_ids):,} users, {len(split.item_ids):,} items, "
          f"{len(split.train_events):,} training events, {len(split.test_users):,} test users "
          f"(data: {ds.versions})", flush=True)
    out: dict[str, dict] = {}
    als = settings.als
    for name in names:
        params = model_params(name, settings)  # what the batch lane's evaluate uses
        t0 = time.perf_counter()
        try:
            model = make_model(name, **params).fit(data)
        except ValueError as e:
            print(f"  {name:<16} skipped: {e}", flush=True)
            out[name] = {"skipped": str(e)}
            continue
        fit = time.perf_counter() - t0
        r = evaluate_scorer(split, lambda rr, m=model: m.score(rows[rr])[:, cols_idx], [10])
        out[name] = {**r, "fit_seconds": fit}
        if name == "hybrid":
            out[name]["hybrid"] = model.params()
        print(f"  {name:<16} NDCG@10 {r['ndcg_at_10']:.4f}  fit {fit:7.1f}s", flush=True)
        del model
    t0 = time.perf_counter()
    scorer = implicit_als(data, als.rank, als.iterations, als.reg_param, als.alpha)
    fit = time.perf_counter() - t0
    r = evaluate_scorer(split, lambda rr: scorer(rows[rr])[:, cols_idx], [10])
    out["implicit_als (ref)"] = {**r, "fit_seconds": fit}
    print(f"  {'implicit_als':<16} NDCG@10 {r['ndcg_at_10']:.4f}  fit {fit:7.1f}s", flush=True)
    return out


def table(name: str, res: dict) -> str:
    pop = res.get("most_popular", {}).get("ndcg_at_10")
    ease = res.get("ease", {}).get("ndcg_at_10")
    lines = [f"\n### {name}\n",
             "| model | Recall@10 | NDCG@10 | HR@10 | coverage@10 | fit s | NDCG / most-popular "
             "| NDCG / EASE |", "|---|---|---|---|---|---|---|---|"]
    for model, r in res.items():
        if "skipped" in r:
            lines.append(f"| {model} | skipped: {r['skipped'][:80]} |||||||")
            continue
        n = r["ndcg_at_10"]
        lines.append(f"| {model} | {r['recall_at_10']:.4f} | {n:.4f} | {r['hr_at_10']:.4f} | "
                     f"{r['coverage_at_10']:.4f} | {r['fit_seconds']:.1f} | "
                     f"{n / pop:.2f}x | {n / ease:.3f}x |" if pop and ease else
                     f"| {model} | {r['recall_at_10']:.4f} | {n:.4f} | {r['hr_at_10']:.4f} | "
                     f"{r['coverage_at_10']:.4f} | {r['fit_seconds']:.1f} | | |")
    checks = []
    if "hybrid" in res and ease and "ndcg_at_10" in res["hybrid"]:
        ratio = res["hybrid"]["ndcg_at_10"] / ease
        checks.append(f"hybrid / EASE = {ratio:.3f}x (target >= 1.05x: "
                      f"{'met' if ratio >= 1.05 else 'MISSED'})")
    if pop:
        below = [m for m, r in res.items() if "ndcg_at_10" in r and r["ndcg_at_10"] < pop]
        checks.append("every method >= most-popular: " + ("met" if not below else
                                                          f"MISSED by {below}"))
    return "\n".join(lines + [""] + checks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="embedded,ml-100k")
    ap.add_argument("--max-users", type=int, default=2000, help="embedded: test users sampled")
    ap.add_argument("--models", default="all")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png-dir", type=Path, default=ROOT / "data" / "benchmarks",
                    help="where quality-<dataset>.png go")
    args = ap.parse_args()
    settings = load_settings()
    names = [m for m in ORDER if m in MODELS] if args.models == "all" else args.models.split(",")
    print(f"freshrec quality benchmark: {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    results = {}
    for which in args.datasets.split(","):
        if which == "embedded":
            ds, max_users = datasets.silver(settings), args.max_users
        elif which == "ml-100k":
            ds, max_users = datasets.movielens_100k(settings.data_dir / "cache"), 0
        else:
            raise SystemExit(f"unknown dataset {which!r}: embedded or ml-100k")
        results[ds.name] = run_dataset(ds, names, max_users, settings)
    from freshrec.plots import quality_bars, save

    for name, res in results.items():
        print(table(name, res))
        scored = {m: r for m, r in res.items() if "ndcg_at_10" in r}
        if scored:
            fig = quality_bars({name: scored}, 10, title="temporal split, full ranking; "
                               "implicit_als: outside reference")
            print(f"plot: {save(fig, args.png_dir / f'quality-{name}.png')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
