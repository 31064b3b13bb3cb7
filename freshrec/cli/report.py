"""The end-of-run report: rows per table, dead-letter reasons, evaluation, sample recommendations."""

from __future__ import annotations

import json

import pyarrow.compute as pc

from freshrec.contracts.reports import INDEX, latest_evaluation
from freshrec.storage.delta import DeltaStore
from freshrec.settings import Settings
from freshrec.contracts.snapshot import latest_snapshot
from freshrec.storage.tables import TABLES


def render(settings: Settings, batch_date: str) -> str:
    store = DeltaStore(settings)
    out = [f"freshrec batch report for {batch_date} (profile {settings.profile})", ""]
    out.append("Delta tables (rows, version):")
    for name, spec in TABLES.items():
        out.append(f"  {spec.layer:<7}{name:<20}{store.count(name):>12,}   v{store.version(name)}")
    raw, clean, dead = (store.count(t) for t in ("events_raw", "events", "events_dead_letter"))
    out += ["", f"Events: raw {raw:,} = clean {clean:,} + dead-letter {dead:,} + duplicates "
            f"{raw - clean - dead:,}", "Dead-letter rows by reason:"]
    dl = store.read_arrow("events_dead_letter", columns=["reason"])
    if dl.num_rows:
        counts = pc.value_counts(dl.column("reason").combine_chunks()).to_pylist()
        for c in sorted(counts, key=lambda c: -c["counts"]):
            out.append(f"  {c['values']:<22}{c['counts']:>8,}")
    else:
        out.append("  (none)")
    reports = settings.data_dir / "reports"
    found = latest_evaluation(reports, batch_date)
    out.append("")
    if found is not None:
        ev_file, ev = found
        out.append(f"Evaluation (temporal split, {ev['n_test_users']:,} test users, "
                   f"{ev['n_items']:,} items; full ranking, training items excluded; "
                   f"the newest run of {batch_date}, {ev_file.name}):")
        out += ["  " + ln for ln in ev["table"].splitlines()]
    else:
        out.append(f"Evaluation: no results for {batch_date} (no run of it in {reports / INDEX})")
    out.append("")
    feats = store.read_arrow("user_features", columns=["user_id", "n_events"])
    served = "(none)"
    try:
        from serving.logic import Filters, recommend
        from nearline.snapshots import build_for_serving
        from serving.state import load_state

        state = load_state(settings, build=build_for_serving)
        served = state.model_version
    except (FileNotFoundError, LookupError, ValueError) as e:
        state = None
        out.append(f"Served model: none ({e})")
    gate_file = settings.data_dir / "reports" / f"gate-{batch_date}.json"
    if gate_file.exists():
        g = json.loads(gate_file.read_text())
        out.append(f"Gate: {g['candidate']} -> {g['registered_model']}/{g['version']} "
                   f"{'PROMOTED' if g['promoted'] else 'not promoted'}: {g['reason']}")
    if feats.num_rows and state is not None:
        order = pc.sort_indices(feats, sort_keys=[("n_events", "descending"),
                                                  ("user_id", "ascending")])
        sample = [feats.column("user_id")[int(order[i].as_py())].as_py()
                  for i in (len(order) // 4, len(order) // 2, 3 * len(order) // 4)]
        titles = {r["item_id"]: r["title"] for r in
                  store.read_arrow("items", columns=["item_id", "title"]).to_pylist()}
        out.append(f"Top-10 for three sample users, as served (model {served}):")
        for user in sample:
            r = recommend(state, user, 10, Filters(), {}, [], settings.serving.overfetch)
            out.append(f"  user {user} ({len(state.seen.get(user, ()))} items seen"
                       f"{', cold start' if r.cold_start else ''}):")
            for rank, s in enumerate(r.items, 1):
                out.append(f"    {rank:>2}. {s.item_id:<10} {titles.get(s.item_id) or '(no title)':<45} "
                           f"{s.score:8.4f}")
    snap = latest_snapshot(settings.snapshots_dir)
    out += ["", f"Served model:   {served}  (serving.model = {settings.serving.model})",
            f"Index snapshot: {snap or '(none)'}",
            f"Tables:         {settings.tables_uri}",
            f"MLflow:         {settings.mlflow_tracking_uri}",
            f"  UI: {settings.mlflow_tracking_uri} (the tracking server)"
            if settings.mlflow_tracking_uri.startswith("http") else
            f"  UI: .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} "
            "--port 5000"]
    return "\n".join(out)


def monitoring(settings: Settings, replicas: list[str] | None = None) -> list[str]:
    """Per replica and arm: the drift gauges (Admin.Status), or why a replica did not answer."""
    from freshrec.api.client import Client

    out = ["Online monitoring per replica and arm (score drift: (served mean - reference mean) / "
           "reference std; popular share: served items among the top-N popular at load):"]
    for address in replicas if replicas is not None else settings.refresher.replicas:
        # the token's value: the SecretStr itself would send "Bearer **********"
        client = Client(address, settings.refresher.token.get_secret_value() or None,
                        ca_file=settings.refresher.ca_file or None)
        try:
            st = client.call_admin("Status", client.admin_pb2.StatusRequest(), timeout=5)
        except Exception as e:  # grpc.RpcError: the replica is down or refuses
            why = e.code().name if hasattr(e, "code") else type(e).__name__
            out.append(f"  {address}: no answer ({why})")
            continue
        finally:
            client.close()
        for a in st.arms:
            out.append(
                f"  {address} arm {a.name or '-':<11}{a.model_version:<34}samples {a.monitor_samples:>6,}"
                f"  score mean {a.served_score_mean:8.4f} (ref {a.reference_score_mean:8.4f}, drift "
                f"{a.score_drift:+.2f})  popular share {a.popular_share:.3f} (ref "
                f"{a.popular_share_reference:.3f}, {a.popularity_drift:+.3f})")
    return out


def render_online(settings: Settings, log_mlflow: bool = True,
                  replicas: list[str] | None = None) -> str:
    """``freshrec report --online``: the per-arm table from ``feedback`` (also written to
    ``reports/online-latest.json`` for the server's CTR gauges, and to an MLflow run), then the
    replicas' drift gauges."""
    from freshrec.contracts import online

    result = online.compute(settings)
    online.write_latest(settings, result)
    out = [online.render(result), ""]
    if log_mlflow:
        run_id = online.log_run(settings, result)
        out += [f"MLflow run {run_id} (experiment {settings.online.experiment}): metrics per arm, "
                "online.json, ctr_by_arm.png", ""]
    out += monitoring(settings, replicas)
    return "\n".join(out)
