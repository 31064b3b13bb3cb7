"""Training-lane benchmark: deep retrieval quality against ALS and EASE from the same run, training
throughput on the CPU (and the GPU where present), and RL policy values in the simulator.

1. Quality (``--quality``): for each dataset (the embedded one from the silver tables, MovieLens
   100K from the recbole 1.2.1 wheel), the evaluation's temporal split; two-tower and SASRec trained
   with early stopping; Spark ALS and EASE fitted on the same training part; Recall/NDCG/HR/
   coverage@10. Target: the best deep model at least matches ALS.
2. Throughput (``--throughput``): training samples/s of each deep model for ``--epochs-tp`` epochs on
   the CPU and on CUDA when present (same data, same batch size), and the ratio. Target: GPU >= 10x
   the CPU figure.
3. Policies (``--rl``): true value (clicks per slate) of random, greedy, the logging policy, LinUCB,
   Thompson sampling, offline REINFORCE and the oracle in the simulator built from the synthetic
   generator's ground truth, and the learned policies' IPS/SNIPS/DR estimates next to the truth.
   Target: learned >= 1.1x the logging policy.

    .venv/bin/python benchmarks/training.py [--quality] [--throughput] [--rl]
        [--datasets embedded,ml-100k] [--max-users 2000] [--json out.json]

With none of --quality/--throughput/--rl, all three run. ``--synthetic-throughput`` measures
throughput on a generated dataset (no Delta tables needed, e.g. on a GPU machine).
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

from freshrec.settings import load_settings  # noqa: E402


def _dataset(settings, name: str):
    from freshrec.data import datasets

    if name == "embedded":
        return datasets.silver(settings)
    if name == "ml-100k":
        return datasets.movielens_100k(settings.data_dir / "cache")
    if name == "synthetic":
        return datasets.synthetic(settings.synth)
    raise SystemExit(f"unknown dataset {name!r}")


def quality(settings, names: list[str], max_users: int, device: str) -> dict:
    from recmodels.base import Interactions
    from recmodels import model_params
    from recmodels import make_model
    from training import data as td
    from training import trainer

    out = {}
    for name in names:
        ds = _dataset(settings, name)
        data = td.build(ds, settings.evaluation.test_fraction, max_users if name == "embedded" else 0,
                        settings.evaluation.seed, settings.training.val_users)
        split = data.split
        print(f"\n== {name}: {data.n_users:,} users, {data.n_items:,} items, "
              f"{len(split.train_events):,} training events, {len(split.test_users):,} test users",
              flush=True)
        rows = {}
        cols = [c for c in ("user_id", "item_id", "weight", "ts", "value") if c in split.train_events]
        inter = Interactions.from_events(split.train_events[cols], None)
        r_idx = np.searchsorted(inter.user_ids, split.user_ids)
        c_idx = np.searchsorted(inter.item_ids, split.item_ids)
        for ref in ("als", "ease"):
            t0 = time.perf_counter()
            m = make_model(ref, **model_params(ref, settings)).fit(inter)
            fit = time.perf_counter() - t0
            rows[ref] = {**data.evaluate(lambda rr, m=m, r_=r_idx, c_=c_idx: m.score(r_[rr])[:, c_], (10,)),
                         "fit_seconds": fit}
            print(f"  {ref:<10} NDCG@10 {rows[ref]['ndcg_at_10']:.4f}  fit {fit:7.1f}s", flush=True)
            del m
        for kind in ("two_tower", "sasrec"):
            r = trainer.train(kind, data, settings.training, device)
            rows[kind] = {**r.test, "fit_seconds": r.train_seconds, "best_epoch": r.best_epoch,
                          "samples_per_second": r.samples_per_second, "device": r.device}
            print(f"  {kind:<10} NDCG@10 {r.test['ndcg_at_10']:.4f}  fit {r.train_seconds:7.1f}s "
                  f"(best epoch {r.best_epoch}, {r.device})", flush=True)
        out[name] = rows
    return out


def throughput(settings, name: str, epochs: int, max_users: int, gpu_batch: int = 0) -> dict:
    import torch

    from training import data as td
    from training import trainer

    ds = _dataset(settings, name)
    data = td.build(ds, settings.evaluation.test_fraction, max_users, settings.evaluation.seed,
                    min(settings.training.val_users, 500))
    cfg = settings.training.model_copy(update={"epochs": epochs, "patience": epochs + 1})
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {"dataset": name, "cpu_threads": torch.get_num_threads(), "batch_size": cfg.batch_size,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for kind in ("two_tower", "sasrec"):
        for dev in devices:
            r = trainer.train(kind, data, cfg, dev, progress=False)
            sps = float(np.median([h["samples_per_second"] for h in r.history]))
            out[f"{kind}.{dev}"] = sps
            print(f"  {kind:<10} {dev:<5} {sps:>12,.0f} samples/s (median of {len(r.history)} epochs)",
                  flush=True)
        if "cuda" in devices:
            out[f"{kind}.gpu_over_cpu"] = out[f"{kind}.cuda"] / out[f"{kind}.cpu"]
            if gpu_batch:  # a GPU wants larger batches than a CPU: measured separately
                big = cfg.model_copy(update={"batch_size": gpu_batch})
                r = trainer.train(kind, data, big, "cuda", progress=False)
                sps = float(np.median([h["samples_per_second"] for h in r.history]))
                out[f"{kind}.cuda_batch{gpu_batch}"] = sps
                out[f"{kind}.gpu_big_over_cpu"] = sps / out[f"{kind}.cpu"]
                print(f"  {kind:<10} cuda  {sps:>12,.0f} samples/s at batch {gpu_batch}", flush=True)
    return out


def policies(settings, seed: int = 0) -> dict:
    from training import rl

    sim = rl.Simulator.from_synth(settings.synth, seed=seed)
    t0 = time.perf_counter()
    res = rl.compare_policies(sim, n_logged=5000, n_eval=3000, bandit_rounds=5000, seed=seed)
    return {"truth": res["truth"], "ope": res["ope"], "online": res["online"],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--rl", action="store_true")
    ap.add_argument("--datasets", default="embedded,ml-100k")
    ap.add_argument("--max-users", type=int, default=2000)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--epochs-tp", type=int, default=2, help="epochs timed per throughput run")
    ap.add_argument("--throughput-dataset", default="embedded")
    ap.add_argument("--gpu-batch", type=int, default=8192, help="also time the GPU at this batch")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (args.quality or args.throughput or args.rl):
        args.quality = args.throughput = args.rl = True
    settings = load_settings()
    from freshrec.device import resolve_device

    device = resolve_device(args.device, need=("torch",)).torch_device
    print(f"freshrec training benchmark: {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, device {device}")
    results: dict = {}
    if args.quality:
        results["quality"] = quality(settings, args.datasets.split(","), args.max_users, device)
    if args.throughput:
        print(f"\n== throughput on {args.throughput_dataset}", flush=True)
        results["throughput"] = throughput(settings, args.throughput_dataset, args.epochs_tp,
                                           args.max_users, args.gpu_batch)
    if args.rl:
        print("\n== policies in the simulator", flush=True)
        results["policies"] = policies(settings)

    if "quality" in results:
        for name, rows in results["quality"].items():
            print(f"\n### {name}\n\n| model | Recall@10 | NDCG@10 | HR@10 | coverage@10 | fit s "
                  "| NDCG / ALS |")
            print("|---|---|---|---|---|---|---|")
            for m, r in rows.items():
                print(f"| {m} | {r['recall_at_10']:.4f} | {r['ndcg_at_10']:.4f} | {r['hr_at_10']:.4f} | "
                      f"{r['coverage_at_10']:.4f} | {r['fit_seconds']:.1f} | "
                      f"{r['ndcg_at_10'] / rows['als']['ndcg_at_10']:.3f}x |")
            best = max(rows["two_tower"]["ndcg_at_10"], rows["sasrec"]["ndcg_at_10"])
            print(f"\nbest deep / ALS = {best / rows['als']['ndcg_at_10']:.3f}x (target >= 1.0x: "
                  f"{'met' if best >= rows['als']['ndcg_at_10'] else 'MISSED'})")
    if "throughput" in results:
        tp = results["throughput"]
        print(f"\n### training throughput ({tp['dataset']}, batch {tp['batch_size']}, "
              f"{tp['cpu_threads']} CPU threads, GPU: {tp['gpu']})\n")
        for kind in ("two_tower", "sasrec"):
            line = f"{kind}: CPU {tp[f'{kind}.cpu']:,.0f} samples/s"
            if f"{kind}.cuda" in tp:
                r = tp[f"{kind}.gpu_over_cpu"]
                line += (f", GPU {tp[f'{kind}.cuda']:,.0f} samples/s = {r:.1f}x "
                         f"(target >= 10x: {'met' if r >= 10 else 'MISSED'})")
                if f"{kind}.gpu_big_over_cpu" in tp:
                    rb = tp[f"{kind}.gpu_big_over_cpu"]
                    big = tp[f"{kind}.cuda_batch{args.gpu_batch}"]
                    line += (f"; GPU at batch {args.gpu_batch}: {big:,.0f}"
                             f" samples/s = {rb:.1f}x ({'met' if rb >= 10 else 'MISSED'})")
            else:
                line += " (no GPU here: the GPU figure needs a CUDA machine)"
            print(line)
    if "policies" in results:
        p = results["policies"]
        t = p["truth"]
        print("\n### policies (true clicks per slate of 5 from 30 candidates)\n")
        print("| policy | true value | / logging |\n|---|---|---|")
        for name, v in t.items():
            print(f"| {name} | {v:.3f} | {v / t['logging']:.2f}x |")
        print("\n| learned policy | IPS | SNIPS | DR | truth (logged contexts) |\n|---|---|---|---|---|")
        for name, e in p["ope"].items():
            print(f"| {name} | {e['ips']:.3f} | {e['snips']:.3f} | {e['dr']:.3f} | "
                  f"{e['truth_on_logged_contexts']:.3f} |")
        best = max(t["reinforce"], t["linucb"], t["thompson"])
        print(f"\nbest learned / logging = {best / t['logging']:.2f}x (target >= 1.1x: "
              f"{'met' if best >= 1.1 * t['logging'] else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
