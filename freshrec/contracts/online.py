"""Online metrics per A/B arm from the ``feedback`` table, and the online promotion gate.

Rows counted: shown items (``organic`` false, a ``request_id``) whose ``impression_ts`` lies in the
last ``online.days`` days. Per (arm, served model version):

* CTR = clicked shown items / shown items, with a Wilson score interval (items of one slate are
  treated as independent draws: with strong within-slate correlation the interval is too narrow;
  hit-rate, one draw per slate, does not have that problem);
* hit-rate@k = share of slates (request ids) with at least one click at a 0-based position < k,
  Wilson interval over slates;
* coverage = distinct items shown / active items in the ``items`` table (the whole table when no
  item is active), with a bootstrap interval over slates (``online.bootstrap`` resamples): the
  resamples' quantiles minus their mean, around the estimate (a resampled distinct count is
  biased low, so the plain percentile interval would lie below the estimate; this keeps the
  spread and drops the bias);

and for every other arm against the control (the experiment's first arm, else the arm with the most
impressions) a two-proportion z-test on CTR (pooled), one-sided (arm > control) and two-sided.

:func:`promote_online` is the online gate: it moves ``@champion`` to the challenger arm's version
only when that arm's CTR beats the control's with one-sided p < ``online.alpha`` and each arm has
at least ``online.min_impressions`` impressions; otherwise it says why not and changes nothing.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from freshrec.settings import Settings


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def two_proportion(x1: int, n1: int, x2: int, n2: int) -> dict[str, float]:
    """Pooled two-proportion z-test of p2 vs p1: z, one-sided p (p2 > p1), two-sided p."""
    if n1 == 0 or n2 == 0:
        return {"z": 0.0, "p_one_sided": 1.0, "p_two_sided": 1.0}
    pool = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    diff = x2 / n2 - x1 / n1
    if se == 0:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    else:
        z = diff / se
    nd = NormalDist()
    return {"z": z, "p_one_sided": 1 - nd.cdf(z), "p_two_sided": 2 * (1 - nd.cdf(abs(z)))}


def _coverage_ci(slate_of_row: np.ndarray, item_of_row: np.ndarray, n_slates: int, n_items: int,
                 catalog: int, reps: int, confidence: float, seed: int = 0):
    if reps <= 0 or n_slates == 0 or catalog <= 0:
        return None
    rng = np.random.default_rng(seed)
    est = n_items / catalog
    draws = np.empty(reps)
    for r in range(reps):
        w = rng.multinomial(n_slates, np.full(n_slates, 1.0 / n_slates))[slate_of_row]
        draws[r] = np.count_nonzero(np.bincount(item_of_row, weights=w, minlength=n_items)) / catalog
    lo_q, hi_q = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2]) - draws.mean()
    return max(0.0, est + lo_q), min(1.0, est + hi_q)


def catalog_size(settings: Settings) -> int:
    from freshrec.storage.delta import DeltaStore

    store = DeltaStore(settings)
    if not store.exists("items"):
        return 0
    active = store.read_arrow("items", columns=["active"]).column("active")
    n = int(pc.sum(active.cast(pa.int64())).as_py() or 0)
    return n or len(active)


def read_feedback(settings: Settings, since: datetime | None = None) -> pa.Table:
    from freshrec.storage.delta import DeltaStore

    store = DeltaStore(settings)
    cols = ["request_id", "arm", "model_version", "item_id", "position", "clicked", "organic",
            "impression_ts"]
    if since is None:
        since = datetime.now(timezone.utc) - timedelta(days=settings.online.days)
    t = store.read_arrow("feedback", columns=cols)
    keep = pc.and_(pc.invert(t.column("organic")), pc.is_valid(t.column("request_id")))
    keep = pc.and_(keep, pc.greater_equal(t.column("impression_ts"),
                                          pa.scalar(since, pa.timestamp("us", tz="UTC"))))
    return t.filter(pc.fill_null(keep, False))


def compute(settings: Settings, feedback: pa.Table | None = None, catalog: int | None = None,
            since: datetime | None = None) -> dict:
    """The per-arm table (see the module doc) as a dict; ``feedback`` default: the table."""
    cfg = settings.online
    t = read_feedback(settings, since) if feedback is None else feedback
    catalog = catalog_size(settings) if catalog is None else catalog
    k = cfg.hit_rate_k
    arm = pc.fill_null(t.column("arm"), "").to_numpy(zero_copy_only=False).astype(str)
    ver = pc.fill_null(t.column("model_version"), "").to_numpy(zero_copy_only=False).astype(str)
    req = t.column("request_id").to_numpy(zero_copy_only=False).astype(str)
    item = t.column("item_id").to_numpy(zero_copy_only=False).astype(str)
    pos = pc.fill_null(t.column("position"), 1 << 30).to_numpy(zero_copy_only=False)
    clicked = t.column("clicked").to_numpy(zero_copy_only=False).astype(bool)
    rows = []
    for a, v in sorted(set(zip(arm.tolist(), ver.tolist()))):
        m = (arm == a) & (ver == v)
        n, x = int(m.sum()), int(clicked[m].sum())
        slates, slate_of_row = np.unique(req[m], return_inverse=True)
        hit = np.zeros(len(slates), bool)
        np.logical_or.at(hit, slate_of_row, clicked[m] & (pos[m] < k))
        items, item_of_row = np.unique(item[m], return_inverse=True)
        h = int(hit.sum())
        rows.append({
            "arm": a, "model_version": v, "impressions": n, "clicks": x,
            "ctr": x / n if n else 0.0, "ctr_ci": list(wilson(x, n, cfg.confidence)),
            "slates": len(slates), "hit_slates": h, "hit_rate": h / len(slates) if len(slates) else 0.0,
            "hit_rate_ci": list(wilson(h, len(slates), cfg.confidence)),
            "items_served": len(items), "catalog": catalog,
            "coverage": len(items) / catalog if catalog else 0.0,
            "coverage_ci": _coverage_ci(slate_of_row, item_of_row, len(slates), len(items), catalog,
                                        cfg.bootstrap, cfg.confidence),
        })
    exp = settings.serving.experiment
    by_arm: dict[str, dict] = {}
    for r in rows:  # an arm that served several versions: its newest rows decide its totals
        by_arm.setdefault(r["arm"], {"impressions": 0, "clicks": 0})
        by_arm[r["arm"]]["impressions"] += r["impressions"]
        by_arm[r["arm"]]["clicks"] += r["clicks"]
    if exp.arms and exp.arms[0].name in by_arm:
        control = exp.arms[0].name
    else:
        control = max(by_arm, key=lambda a: by_arm[a]["impressions"]) if by_arm else None
    tests = []
    for a, tot in sorted(by_arm.items()):
        if a == control:
            continue
        c = by_arm[control]
        test = two_proportion(c["clicks"], c["impressions"], tot["clicks"], tot["impressions"])
        tests.append({"arm": a, "control": control, **test,
                      "ctr_diff": (tot["clicks"] / tot["impressions"] if tot["impressions"] else 0)
                      - (c["clicks"] / c["impressions"] if c["impressions"] else 0)})
    return {"experiment": exp.name, "control": control, "confidence": cfg.confidence,
            "hit_rate_k": k, "arms": rows, "tests": tests, "computed_at": time.time(),
            "since": (since.isoformat() if since else None)}


def render(result: dict) -> str:
    conf = int(round(result["confidence"] * 100))
    k = result["hit_rate_k"]
    head = (f"{'arm':<12}{'model version':<34}{'impr.':>8}{'clicks':>7}  "
            f"{'CTR [' + str(conf) + '% CI]':<26}{f'hit@{k}':>6} {'[CI]':<18}{'coverage [CI]':<24}")
    out = [f"Online metrics per arm (experiment {result['experiment'] or '(none)'}, control "
           f"{result['control'] or '-'}), from the feedback table:", head]
    for r in result["arms"]:
        cov = r["coverage_ci"]
        out.append(
            f"{r['arm'] or '-':<12}{r['model_version']:<34}{r['impressions']:>8,}{r['clicks']:>7,}  "
            f"{r['ctr']:.4f} [{r['ctr_ci'][0]:.4f}, {r['ctr_ci'][1]:.4f}]    "
            f"{r['hit_rate']:>6.3f} [{r['hit_rate_ci'][0]:.3f}, {r['hit_rate_ci'][1]:.3f}]  "
            f"{r['coverage']:.3f}" + (f" [{cov[0]:.3f}, {cov[1]:.3f}]" if cov else " (no CI)"))
    if not result["arms"]:
        out.append("  (no impressions in the feedback table for the period)")
    for t in result["tests"]:
        out.append(f"{t['arm']} vs {t['control']}: CTR diff {t['ctr_diff']:+.4f}, z {t['z']:.3f}, "
                   f"p one-sided {t['p_one_sided']:.4g}, two-sided {t['p_two_sided']:.4g}")
    return "\n".join(out)


def write_latest(settings: Settings, result: dict) -> Path:
    """``<data>/reports/online-latest.json``: what the server exports as CTR gauges."""
    path = settings.data_dir / "reports" / "online-latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return path


def plot(result: dict, path: Path) -> Path:
    """PNG: CTR per (arm, version) with its confidence interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["arms"]
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(rows) + 2), 3.5))
    x = np.arange(len(rows))
    ctr = np.array([r["ctr"] for r in rows])
    lo = ctr - np.array([r["ctr_ci"][0] for r in rows])
    hi = np.array([r["ctr_ci"][1] for r in rows]) - ctr
    ax.errorbar(x, ctr, yerr=[lo, hi], fmt="o", capsize=6)
    ax.set_xticks(x, [f"{r['arm'] or '-'}\n{r['model_version'].split(' ')[0]}" for r in rows])
    ax.set_ylabel(f"CTR ({int(round(result['confidence'] * 100))}% Wilson CI)")
    ax.set_title(f"experiment {result['experiment'] or '(none)'}")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_run(settings: Settings, result: dict) -> str:
    """An MLflow run in ``online.experiment``: metrics per arm, the table and the CTR plot."""
    import tempfile

    from freshrec.tracking import mlflow_for

    mlflow = mlflow_for(settings, settings.online.experiment)
    with mlflow.start_run(run_name=f"online {result['experiment'] or 'serving'}") as run:
        mlflow.set_tags({"experiment": result["experiment"], "control": result["control"] or ""})
        for r in result["arms"]:
            a = r["arm"] or "none"
            mlflow.log_metrics({f"{a}.ctr": r["ctr"], f"{a}.ctr_lower": r["ctr_ci"][0],
                                f"{a}.ctr_upper": r["ctr_ci"][1], f"{a}.impressions": r["impressions"],
                                f"{a}.hit_rate": r["hit_rate"], f"{a}.coverage": r["coverage"]})
        for t in result["tests"]:
            mlflow.log_metrics({f"{t['arm']}.z": t["z"], f"{t['arm']}.p_one_sided": t["p_one_sided"]})
        mlflow.log_dict(result, "online.json")
        mlflow.log_text(render(result), "online.txt")
        if result["arms"]:
            with tempfile.TemporaryDirectory() as d:
                mlflow.log_artifact(str(plot(result, Path(d) / "ctr_by_arm.png")))
        return run.info.run_id


def promote_online(settings: Settings, result: dict | None = None, arm: str | None = None) -> dict:
    """The online gate (module doc). ``arm``: the challenger arm (default: the arm whose model is
    ``registry.challenger_alias``, else the only non-control arm)."""
    from mlflow.tracking import MlflowClient

    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for

    exp = settings.serving.experiment
    cfg = settings.online
    if len(exp.arms) < 2:
        raise ValueError("promote-online needs serving.experiment with a control and a challenger "
                         "arm (see README, Running an A/B test)")
    control = exp.arms[0]
    if arm is None:
        named = [a for a in exp.arms[1:] if a.model == settings.registry.challenger_alias]
        if not named and len(exp.arms) != 2:
            raise ValueError("several challenger arms: name one with --arm")
        challenger = named[0] if named else exp.arms[1]
    else:
        challenger = next((a for a in exp.arms[1:] if a.name == arm), None)
        if challenger is None:
            raise ValueError(f"no challenger arm {arm!r}; arms: "
                             f"{', '.join(a.name for a in exp.arms[1:])}")
    mlflow_for(settings)
    try:
        c_ref, x_ref = registry.resolve(control.model), registry.resolve(challenger.model)
    except LookupError as e:
        raise LookupError(f"experiment {exp.name!r}: {e}") from None
    result = compute(settings) if result is None else result

    def totals(name: str, ref) -> tuple[int, int]:
        rows = [r for r in result["arms"] if r["arm"] == name and r["model_version"] == ref.label]
        return sum(r["clicks"] for r in rows), sum(r["impressions"] for r in rows)

    (cx, cn), (xx, xn) = totals(control.name, c_ref), totals(challenger.name, x_ref)
    test = two_proportion(cx, cn, xx, xn)
    out = {"control": {"arm": control.name, "model_version": c_ref.label, "clicks": cx,
                       "impressions": cn, "ctr": cx / cn if cn else 0.0},
           "challenger": {"arm": challenger.name, "model_version": x_ref.label, "clicks": xx,
                          "impressions": xn, "ctr": xx / xn if xn else 0.0},
           **test, "alpha": cfg.alpha, "promoted": False}
    if c_ref.version == x_ref.version:
        out["reason"] = f"both arms serve {x_ref.label}: nothing to promote"
    elif min(cn, xn) < cfg.min_impressions:
        out["reason"] = (f"not enough impressions yet: {control.name} {cn:,}, {challenger.name} "
                         f"{xn:,}; each arm needs {cfg.min_impressions:,} (online.min_impressions)")
    elif xx / xn <= cx / cn:
        out["reason"] = (f"{challenger.name} CTR {xx / xn:.4f} does not beat {control.name} "
                         f"{cx / cn:.4f}")
    elif test["p_one_sided"] >= cfg.alpha:
        out["reason"] = (f"{challenger.name} CTR {xx / xn:.4f} > {control.name} {cx / cn:.4f} but "
                         f"not significantly: one-sided p {test['p_one_sided']:.4g} >= alpha "
                         f"{cfg.alpha} (z {test['z']:.3f})")
    else:
        out["promoted"] = True
        out["reason"] = (f"{challenger.name} ({x_ref.label}) CTR {xx / xn:.4f} beats {control.name} "
                         f"({c_ref.label}) {cx / cn:.4f}: z {test['z']:.3f}, one-sided p "
                         f"{test['p_one_sided']:.4g} < {cfg.alpha}")
        client = MlflowClient()
        champ = registry.current_champion(client, x_ref.registered_model)
        if champ is not None and int(champ.version) != x_ref.version:
            client.set_model_version_tag(x_ref.registered_model, str(x_ref.version),
                                         "previous_champion", champ.version)
        registry.set_alias(x_ref.version, x_ref.registered_model)
        client.set_model_version_tag(x_ref.registered_model, str(x_ref.version), "gate",
                                     "promoted-online")
        client.set_model_version_tag(x_ref.registered_model, str(x_ref.version), "gate_reason",
                                     out["reason"])
    return out
