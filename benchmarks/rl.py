"""RL from logs, in the simulator: the slate Q-network (DQN) and top-k REINFORCE (and the LinUCB
state) trained from the logging policy's logs written through the Delta tables (``impressions``,
``feedback``, ``events``, ``items``, ``item_features``) and read back as ``freshrec train --data
logged`` reads them.

For each learned policy: its true value (expected clicks per slate) on fresh simulator requests
next to the logging policy's (target: >= 1.1x), and its IPS / SNIPS / DR estimates on the held-out
logs (the latest ``--test-fraction`` of requests) next to its true value on those same requests
(target: within 10%). Prints a table and saves a PNG.

    .venv/bin/python benchmarks/rl.py [--n-logged 20000] [--seeds 0] [--png rl.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freshrec.storage.delta import DeltaStore  # noqa: E402
from freshrec.settings import load_settings  # noqa: E402
from training import rl  # noqa: E402
from training import rl_logged as rlg  # noqa: E402

POLICIES = ("dqn", "reinforce", "bandit")


def one_seed(settings, n_logged: int, n_fresh: int, test_fraction: float, seed: int) -> dict:
    sim = rl.Simulator.from_synth(settings.synth, seed=seed, fixed_history=True,
                                  unique_candidates=True)
    t0 = time.perf_counter()
    logged = rl.log_data(sim, n_logged)
    t_log = time.perf_counter() - t0
    store = DeltaStore(settings)
    t0 = time.perf_counter()
    rlg.simulator_logs_to_feedback(sim, logged, store)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = rlg.load_logged(store)
    t_read = time.perf_counter() - t0
    train, test = data.split(test_fraction)
    rows = np.array([int(r[1:]) for r in test.request_ids])
    b = logged.batch
    held_out = rl.Batch(b.users[rows], b.cands[rows], None, b.base[rows], b.p_click[rows], b.aff[rows])
    fresh = sim.requests(n_fresh)
    logging_fresh = rl.true_value(fresh, rl.inclusion_probs(fresh.base, sim.k,
                                                            np.random.default_rng(seed + 1)))
    logging_held = float(np.take_along_axis(b.p_click, logged.slates, axis=1)[rows].sum(1).mean())
    out = {"seed": seed, "n_logged": n_logged, "n_train": len(train), "n_test": len(test),
           "seconds": {"log": t_log, "write_tables": t_write, "read_tables": t_read},
           "logging": {"true_value": logging_fresh, "true_value_held_out": logging_held,
                       "on_policy_held_out": rlg.logging_value(test)}, "policies": {}}
    for name in POLICIES:
        t0 = time.perf_counter()
        learned = rlg.TRAINERS[name](train, seed=seed)
        fit = time.perf_counter() - t0
        ev = rlg.evaluate_on_logs(learned, train, test)
        truth_held = rlg.true_value_in_simulator(sim, learned.scores, held_out)
        truth = rlg.true_value_in_simulator(sim, learned.scores, fresh)
        out["policies"][name] = {
            "true_value": truth, "vs_logging": truth / logging_fresh, "true_value_held_out": truth_held,
            **ev["ope"], **{f"{e}_error": ev["ope"][e] / truth_held - 1 for e in ("ips", "snips", "dr")},
            "fit_seconds": fit}
    return out


def table(res: dict) -> str:
    head = (f"{'policy':<11}{'true value':>11}{'vs logging':>11}{'truth(held)':>12}{'IPS':>8}"
            f"{'SNIPS':>8}{'DR':>8}{'IPS err':>9}{'SNIPS err':>10}{'DR err':>8}{'fit s':>7}")
    lg = res["logging"]
    lines = [head, f"{'logging':<11}{lg['true_value']:>11.3f}{1.0:>11.2f}{lg['true_value_held_out']:>12.3f}"
             f"{'':>8}{'':>8}{'':>8}   (on-policy mean clicks on held-out logs: "
             f"{lg['on_policy_held_out']:.3f})"]
    for name, p in res["policies"].items():
        lines.append(f"{name:<11}{p['true_value']:>11.3f}{p['vs_logging']:>10.2f}x"
                     f"{p['true_value_held_out']:>12.3f}{p['ips']:>8.3f}{p['snips']:>8.3f}{p['dr']:>8.3f}"
                     f"{p['ips_error']:>+9.1%}{p['snips_error']:>+10.1%}{p['dr_error']:>+8.1%}"
                     f"{p['fit_seconds']:>7.1f}")
    return "\n".join(lines)


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results[0]
    names = list(res["policies"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    vals = [np.mean([r["logging"]["true_value"] for r in results])] + \
        [np.mean([r["policies"][n]["true_value"] for r in results]) for n in names]
    ax[0].bar(["logging"] + names, vals, color=["gray"] + ["tab:blue"] * len(names))
    ax[0].axhline(1.1 * vals[0], color="red", ls="--", lw=1, label="1.1x logging (target)")
    ax[0].set_ylabel("true clicks per slate (fresh requests)")
    ax[0].legend(fontsize=8)
    ax[0].set_title("trained from logs: true value in the simulator")
    w = 0.2
    for j, key in enumerate(("true_value_held_out", "ips", "snips", "dr")):
        ax[1].bar(np.arange(len(names)) + j * w,
                  [np.mean([r["policies"][n][key] for r in results]) for n in names], w,
                  label="truth" if key.startswith("true") else key.upper())
    ax[1].set_xticks(np.arange(len(names)) + 1.5 * w, names)
    ax[1].set_ylabel("clicks per slate (held-out requests)")
    ax[1].set_ylim(0, max(vals) * 1.35)
    ax[1].legend(fontsize=8, ncol=4, loc="upper center")
    ax[1].set_title("off-policy estimates vs truth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-logged", type=int, default=20000)
    ap.add_argument("--n-fresh", type=int, default=5000)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--seeds", default="0", help="comma-separated simulator seeds")
    ap.add_argument("--png", default="rl.png")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings("local", env={}, paths={"data_dir": tmp})
            t0 = time.perf_counter()
            res = one_seed(settings, args.n_logged, args.n_fresh, args.test_fraction, seed)
            res["seconds"]["total"] = time.perf_counter() - t0
        results.append(res)
        s = res["seconds"]
        print(f"seed {seed}: {res['n_logged']} logged requests ({res['n_train']} train, {res['n_test']} "
              f"held out); log {s['log']:.1f}s, write tables {s['write_tables']:.1f}s, read "
              f"{s['read_tables']:.1f}s, total {s['total']:.1f}s")
        print(table(res))
    ok_value = all(p["vs_logging"] >= 1.1 for r in results for p in r["policies"].values())
    ok_ope = all(abs(p[f"{e}_error"]) <= 0.1 for r in results for p in r["policies"].values()
                 for e in ("snips", "dr"))
    ok_ips = all(abs(p["ips_error"]) <= 0.1 for r in results for p in r["policies"].values())
    print(f"targets: learned >= 1.1x logging: {'met' if ok_value else 'MISSED'}; SNIPS and DR "
          f"within 10% of the truth: {'met' if ok_ope else 'MISSED'}; IPS within 10%: "
          f"{'met' if ok_ips else 'MISSED'}")
    figure(results, Path(args.png))
    print(f"figure: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok_value and ok_ope else 1


if __name__ == "__main__":
    sys.exit(main())
