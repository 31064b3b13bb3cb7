"""What clients are served, measured from outside: NDCG@10 of `freshrec recommend --users` against
EASE fitted on the same split, through public commands only.

Protocol: each user's newest `evaluation.test_fraction` of events (the evaluation's temporal split)
is held out. Only the rest is imported (`freshrec import movielens DIR` for MovieLens 100K as a
ratings.csv/movies.csv folder; `freshrec import events/items` for the embedded default), then
`freshrec run all` (ingest, clean, features, ALS, evaluate every model of `evaluation.models`,
gate, snapshot of @champion) and `freshrec recommend --users FILE --k 10` (offline, as served).
The reference is EASE fitted in this script on the same imported events (seen items excluded).
Printed: NDCG@10 / Recall@10 of the served list and of EASE, the ratio (target >= 1.05x) and the
served registry version. Each dataset runs in a fresh data directory under --workdir.

    .venv/bin/python benchmarks/served_quality.py [--datasets ml-100k,embedded] [--workdir DIR]
        [--png-dir DIR]

Also writes ``served-quality-<dataset>.png``: the pipeline's evaluation per model (test split) next
to the served list and EASE, into --png-dir (default data/benchmarks).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freshrec.contracts.reports import latest_evaluation  # noqa: E402
from freshrec.data import datasets  # noqa: E402
from recmodels.evaluation import ranking_metrics, temporal_split  # noqa: E402
from freshrec.settings import load_settings  # noqa: E402


def cli(env: dict, *args: str) -> str:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "freshrec.cli.main", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"freshrec {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    print(f"  freshrec {' '.join(args[:2])}: {time.perf_counter() - t0:.0f} s", flush=True)
    return r.stdout


def ease_reference(train: pd.DataFrame, users: list[str], k: int, l2: float) -> dict[str, list[str]]:
    from recmodels.base import Interactions
    from recmodels.factorization import EASEModel

    data = Interactions.from_events(train[["user_id", "item_id", "weight", "ts"]])
    model = EASEModel(l2=l2, max_items=max(30_000, data.n_items),
                      serve_dense_max_items=0).fit(data)
    pos = {u: n for n, u in enumerate(data.user_ids)}
    rows = np.array([pos[u] for u in users if u in pos])
    out = {}
    for lo in range(0, len(rows), 2000):
        top, _ = model.recommend(rows[lo:lo + 2000], k)
        for r, t in zip(rows[lo:lo + 2000], top):
            out[str(data.user_ids[r])] = [str(data.item_ids[i]) for i in t if i >= 0]
    return out


def score(recs: dict[str, list[str]], truth: dict[str, set[str]], k: int) -> dict[str, float]:
    items = sorted({i for r in recs.values() for i in r} | {i for t in truth.values() for i in t})
    idx = {i: n for n, i in enumerate(items)}
    users = sorted(truth)
    mat = np.full((len(users), k), -1)
    for n, u in enumerate(users):
        r = [idx[i] for i in recs.get(u, [])][:k]
        mat[n, :len(r)] = r
    rel = [np.array([idx[i] for i in truth[u]]) for u in users]
    m = ranking_metrics(mat, rel, [k], len(items))
    return {"ndcg_at_10": m[f"ndcg_at_{k}"], "recall_at_10": m[f"recall_at_{k}"]}


def run(name: str, events: pd.DataFrame, items: pd.DataFrame | None, work: Path,
        test_fraction: float, seed: int, max_users: int) -> dict:
    print(f"== {name}: {len(events):,} events", flush=True)
    split = temporal_split(events, test_fraction, 0, seed)
    train = split.train_events
    test_rows = split.test_users
    truth_all = {str(split.user_ids[u]): {str(split.item_ids[i]) for i in items_}
                 for u, items_ in zip(test_rows, split.test_items) if len(items_)}
    rng = np.random.default_rng(seed)
    users = sorted(truth_all)
    if max_users and len(users) > max_users:
        users = sorted(rng.choice(users, max_users, replace=False).tolist())
    truth = {u: truth_all[u] for u in users}
    data_dir, src = work / name / "data", work / name / "input"
    src.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FRESHREC_DATA_DIR": str(data_dir), "PYSPARK_PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT)}
    if name == "ml-100k":  # as a ml-latest style folder: ratings.csv + movies.csv
        pd.DataFrame({"userId": train["user_id"].str[1:], "movieId": train["item_id"].str[1:],
                      "rating": train["value"], "timestamp": (train["ts"].astype("int64") // 10**9)}) \
            .to_csv(src / "ratings.csv", index=False)
        pd.DataFrame({"movieId": items["item_id"].str[1:], "title": items["title"],
                      "genres": ["|".join(c) for c in items["categories"]]}) \
            .to_csv(src / "movies.csv", index=False)
        cli(env, "import", "movielens", str(src))
        raw = {u: u[1:] for u in users}
    else:
        train.drop(columns=["weight"]).to_parquet(src / "events.parquet")
        cli(env, "import", "events", str(src / "events.parquet"))
        if items is not None:
            items.to_parquet(src / "items.parquet")
            cli(env, "import", "items", str(src / "items.parquet"))
        raw = {u: u for u in users}
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cli(env, "run", "all", "--date", day)
    (work / name / "users.txt").write_text("\n".join(raw[u] for u in users) + "\n")
    out = work / name / "recs.csv"
    said = cli(env, "recommend", "--users", str(work / name / "users.txt"), "--k", "10",
               "--output", str(out))
    back = {v: u for u, v in raw.items()}
    served: dict[str, list[str]] = {}
    prefix = "m" if name == "ml-100k" else ""
    for row in csv.DictReader(out.open()):
        served.setdefault(back[row["user_id"]], []).append(prefix + row["item_id"])
    version = said.split(" from ")[1].split(" (")[0] if " from " in said else "?"
    settings = load_settings("local", env={"FRESHREC_DATA_DIR": str(data_dir)})
    _, ev = latest_evaluation(data_dir / "reports", day)  # the run `run all` just made
    t0 = time.perf_counter()
    # EASE on the same imported events, with the weights the pipeline gives them
    weights = settings.events.types
    tr = train.copy()
    if "weight" not in tr:
        tr["weight"] = [weights.get(t, 1.0) for t in tr.get("event_type", ["view"] * len(tr))]
    ease = ease_reference(tr, users, 10, 200.0)
    ease_s = time.perf_counter() - t0
    a, b = score(served, truth, 10), score(ease, truth, 10)
    return {"dataset": name, "served_model": version, "served": a, "ease": b,
            "ratio_ndcg": a["ndcg_at_10"] / max(b["ndcg_at_10"], 1e-12), "test_users": len(users),
            "ease_fit_seconds": round(ease_s, 1),
            "gate_table": ev["table"], "evaluation": ev["results"]}


def plot_results(results: list[dict], png_dir: Path) -> None:
    from freshrec.plots import quality_bars, save

    for r in results:
        fig = quality_bars({f"{r['dataset']}: evaluate (test split)": r["evaluation"],
                            "as served vs EASE": {f"served ({r['served_model'].split()[-1]})":
                                                  r["served"], "EASE": r["ease"]}}, 10)
        name = r["dataset"]
        print(f"plot: {save(fig, png_dir / f'served-quality-{name}.png')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="ml-100k,embedded")
    p.add_argument("--workdir", help="where the data directories go (default: a temp dir)")
    p.add_argument("--max-users", type=int, default=5000, help="test users scored (0: all)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png-dir", type=Path, default=ROOT / "data" / "benchmarks")
    args = p.parse_args()
    settings = load_settings("local", env={})
    work = Path(args.workdir or tempfile.mkdtemp(prefix="served-quality-"))
    results = []
    for name in args.datasets.split(","):
        if name == "ml-100k":
            ds = datasets.movielens_100k(ROOT / "data" / "cache")
            events, items = ds.events.drop(columns=["raw_id"]), ds.items
            events["event_type"] = "rating"
        elif name == "embedded":
            from freshrec.data.synth import write_synth

            synth = write_synth(settings.synth, work / "synth-raw",
                                end=datetime.now(timezone.utc))
            events = pd.read_parquet(synth.events_path)
            items = pd.read_parquet(synth.items_path)
            events = events[events["user_id"].notna() & events["item_id"].notna()].copy()
            events["ts"] = pd.to_datetime(events["ts"], utc=True, errors="coerce")
            events = events[events["ts"].notna()]
            events["weight"] = events["event_type"].map(settings.events.types).fillna(0.0)
            events = events[events["weight"] > 0]
        else:
            raise SystemExit(f"unknown dataset {name!r}: ml-100k or embedded")
        results.append(run(name, events, items, work, settings.evaluation.test_fraction,
                           settings.evaluation.seed, args.max_users))
    print()
    print(f"{'dataset':<10}{'served model':<34}{'NDCG@10':>9}{'EASE':>9}{'ratio':>8}"
          f"{'Recall@10':>11}{'EASE':>9}")
    for r in results:
        print(f"{r['dataset']:<10}{r['served_model']:<34}{r['served']['ndcg_at_10']:>9.4f}"
              f"{r['ease']['ndcg_at_10']:>9.4f}{r['ratio_ndcg']:>7.2f}x"
              f"{r['served']['recall_at_10']:>11.4f}{r['ease']['recall_at_10']:>9.4f}")
    print("target: served >= 1.05x EASE on the same split")
    plot_results(results, args.png_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
