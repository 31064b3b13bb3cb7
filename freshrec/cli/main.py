"""The ``freshrec`` command: import data, make the embedded dataset, run batch jobs, evaluate,
recommend and report. Lanes are imported lazily inside each subcommand."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from freshrec.settings import SettingsError, load_settings

JOBS = {"ingest": "spark_jobs.ingest", "clean": "spark_jobs.clean",
        "features": "spark_jobs.features",
        "evaluate": "spark_jobs.evaluate", "gate": "spark_jobs.gate",
        "build-index": "serving.index_snapshot"}


def _column_map(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--map {p!r}: write it as target=source, e.g. --map user_id=userId")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_import(args: argparse.Namespace) -> int:
    from freshrec import importers

    settings = load_settings(args.profile)
    if args.kind == "events":
        r = importers.import_events_file(settings, Path(args.path), args.format,
                                         _column_map(args.map))
        print(f"{args.path}: {'already imported' if r.already_landed else 'landed'} "
              f"{r.rows:,} event rows (file id {r.file_id}); the next batch run ingests them"
              + ("" if r.already_landed else f"; {r.refusal_summary} by the event rules"))
    elif args.kind == "items":
        r2 = importers.import_items_file(settings, Path(args.path), args.format,
                                         _column_map(args.map))
        print(f"{args.path}: items inserted {r2['inserted']:,}, updated {r2['updated']:,}")
    else:
        from freshrec.movielens import import_movielens

        landed, items = import_movielens(settings, Path(args.path))
        print(f"{args.path}: {landed.rows:,} ratings "
              f"{'already imported' if landed.already_landed else 'landed'}"
              + ("" if landed.already_landed else f" ({landed.refusal_summary} by the event rules)")
              + f"; items inserted {items['inserted']:,}, updated {items['updated']:,}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from freshrec import importers
    from freshrec.synth import write_synth

    overrides = {k: v for k, v in (("n_events", args.events), ("n_users", args.users),
                                   ("n_items", args.items)) if v}
    settings = load_settings(args.profile, **({"synth": overrides} if overrides else {}))
    out = Path(args.out) if args.out else settings.data_dir / "raw" / "synth"
    if args.if_missing and (out / "events.parquet").exists() and (out / "items.parquet").exists():
        print(f"embedded dataset already in {out}; skipping (drop --if-missing to remake it)")
    else:
        print(f"making the embedded dataset: {settings.synth.n_events:,} events, "
              f"{settings.synth.n_users:,} users, {settings.synth.n_items:,} items -> {out}")
        r = write_synth(settings.synth, out)
        print(f"  {r.n_events:,} rows ({r.n_malformed:,} malformed, {r.n_duplicates:,} duplicated)")
    landed = importers.import_events_file(settings, out / "events.parquet",
                                          landed_at=datetime.now(timezone.utc))
    items = importers.import_items_file(settings, out / "items.parquet")
    print(f"  events {'already landed' if landed.already_landed else 'landed'} "
          f"({landed.rows:,} rows); items inserted {items['inserted']:,}, "
          f"updated {items['updated']:,}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    names = list(JOBS) if args.job == "all" else [args.job]
    argv = ["--date", args.date] + (["--profile", args.profile] if args.profile else [])
    from freshrec.submit import SubmitError, run_job

    for name in names:
        print(f"== {name} {args.date}", flush=True)
        try:  # under spark-submit with spark.submit (the cluster profile) or --submit
            result = run_job(name, argv, True if args.submit else None)
        except SubmitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"   {result if name != 'evaluate' else result['table']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading
    import time

    from serving.server import FreshrecServer

    from freshrec.logs import configure

    settings = load_settings(args.profile)
    configure(json_lines=settings.serving.json_logs and not args.smoke)
    server = FreshrecServer(settings)
    port = server.start(port=args.port)
    print(f"freshrec serving on {settings.serving.host}:{port}", flush=True)
    if args.smoke:
        from serving.client import Client

        client = Client(f"{settings.serving.host}:{port}", "dev-client-token")
        user = args.smoke
        print(f"live request: Recommend(user_id={user!r}, k=10) over gRPC on loopback")
        t0 = time.perf_counter()
        reply = client.recommend(user, 10, explain=True)
        print(f"answered in {(time.perf_counter() - t0) * 1000:.1f} ms")
        _print_reply(user, reply)
        client.close()
        server.stop()
        print("server stopped; run `freshrec serve` (or .venv/bin/freshrec serve) to keep it up")
        return 0
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("shutting down: letting in-flight calls finish", flush=True)
    server.stop()
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from freshrec.logs import configure
    from serving import refresher

    settings = load_settings(args.profile)
    if args.replica:
        settings = settings.model_copy(update={"refresher": settings.refresher.model_copy(
            update={"replicas": args.replica})})
    configure(json_lines=False)
    if args.loop:
        interval = _seconds(args.interval) if args.interval else settings.refresher.interval_seconds
        refresher.loop(settings, interval)
        return 0
    report = refresher.refresh_once(settings)
    print(report)
    return 0


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _print_reply(user: str, reply) -> None:
    print(f"user {user}: model {reply.model_version}{' (cold start)' if reply.cold_start else ''}")
    for rank, it in enumerate(reply.items, 1):
        print(f"  {rank:>2}. {it.item_id:<12} {it.score:8.4f}  [{it.source}] {it.explanation}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from freshrec.interval import DataInterval
    from spark_jobs import evaluate

    settings = load_settings(args.profile)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    result = evaluate.run(settings, DataInterval.for_day(args.date), models)
    print(result["table"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training import run as training

    settings = load_settings(args.profile)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                   ("samples_per_epoch", args.samples_per_epoch)) if v is not None}
    extra = {"kind": args.bandit} if args.model == "bandit" else {}
    if args.model in ("bandit", "reinforce", "dqn"):
        extra["data"] = args.data
    if args.data_version is not None and args.model in ("two_tower", "sasrec"):
        extra["data_version"] = args.data_version
    out = training.run(settings, args.model, args.device, args.dataset, overrides,
                       register=not args.no_register, **extra)
    print(f"run {out['run_id']} ({settings.training.experiment})")
    if "table" in out:
        print(out["table"])
        print(f"device {out['device']}, best epoch {out['best_epoch']}/{out['epochs_run']}, "
              f"{out['samples_per_second']:,.0f} training samples/s")
    else:
        if out["truth"]:
            print("true value (clicks per slate):",
                  ", ".join(f"{k} {v:.3f}" for k, v in out["truth"].items()))
        if "logging_value" in out:
            print(f"logging policy on the {out['n_test']} held-out requests: "
                  f"{out['logging_value']:.3f} clicks per slate")
        print("off-policy estimates of", out["model"], {k: round(v, 3) for k, v in
                                                        out["ope"][out["model"]].items()})
    if "gate_skipped" in out:
        print(out["gate_skipped"])
    if "gate" in out:
        g = out["gate"]
        print(f"{g['registered_model']} v{g['version']}: {'@champion' if g['promoted'] else 'not promoted'}"
              f" ({g['reason']})")
        if g["promoted"] and g["registered_model"] == "freshrec-retrieval" and not args.no_rollout:
            from serving.rollout import RolloutFailed, rollout

            try:
                r = rollout(settings, int(g["version"]))
            except RolloutFailed as e:
                raise RuntimeError(f"{e}. The new version is @champion; roll it out again with "
                                   f"`freshrec model rollout {g['version']}` once the replica "
                                   "is up") from None
            print(f"rolled out {r['model_version']} to {len(r['replicas'])} replica(s)"
                  + (f" ({r['note']})" if "note" in r else ""))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    settings = load_settings(args.profile)
    if args.user or args.server:
        import os

        from serving.client import Client
        from serving.offline import read_user_file

        address = args.server or f"{settings.serving.host}:{settings.serving.port}"
        token = args.token or os.environ.get("FRESHREC_TOKEN", "dev-client-token")
        client = Client(address, token, ca_file=args.ca)
        users = [args.user] if args.user else read_user_file(Path(args.users))
        rows = []
        for u in users:
            reply = client.recommend(u, args.k, explain=not args.output)
            if args.output:
                rows += [(u, r, it.item_id, it.score) for r, it in enumerate(reply.items, 1)]
            else:
                _print_reply(u, reply)
        if args.output:
            import csv

            with open(args.output, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["user_id", "rank", "item_id", "score"])
                w.writerows(rows)
            print(f"wrote {len(rows):,} rows for {len(users):,} users to {args.output}")
        client.close()
        return 0
    if not (args.users and args.output):
        raise ValueError("give --user U (through the server), or --users FILE with --output FILE "
                         "(offline, from the served model's snapshot), or --server ADDR")
    from serving.offline import recommend_to_csv

    s = recommend_to_csv(settings, Path(args.users), args.k, Path(args.output), args.model)
    print(f"wrote {s['rows']:,} rows for {s['users']:,} users to {args.output} from "
          f"{s['model_version']} ({s['cold_start_fallbacks']:,} unknown users got popular items)")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    import json

    settings = load_settings(args.profile)
    replicas = args.replica if args.replica else None
    if args.model_command == "promote-online":
        return promote_online(settings, args.arm, replicas, not args.no_reload)
    if args.model_command == "status":
        from freshrec import registry
        from freshrec.tracking import mlflow_for

        mlflow_for(settings)
        champ = registry.resolve(registry.ALIAS)
        print(f"@champion: {champ.label} ({champ.tags.get('gate_reason', '')})")
        if champ.tags.get("previous_champion"):
            print(f"  replaced version {champ.tags['previous_champion']} (freshrec model rollback "
                  "goes back to it)")
        return 0
    from serving import rollout

    if args.model_command == "rollout":
        report = rollout.rollout(settings, args.version or settings.serving.model, replicas)
    else:
        report = rollout.rollback(settings, args.to, replicas)
    print(json.dumps(report, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from freshrec.cli.report import render, render_online

    settings = load_settings(args.profile)
    if args.online:
        print(render_online(settings, log_mlflow=not args.no_mlflow, replicas=args.replica))
        return 0
    print(render(settings, args.date))
    return 0


def promote_online(settings, arm: str | None, replicas: list[str] | None, reload: bool) -> int:
    """The online gate, then (when promoted) every replica reloads its arms from the settings."""
    from freshrec import online

    decision = online.promote_online(settings, arm=arm)
    c, x = decision["control"], decision["challenger"]
    print(f"control {c['arm']} {c['model_version']}: CTR {c['ctr']:.4f} ({c['clicks']:,}/"
          f"{c['impressions']:,}); challenger {x['arm']} {x['model_version']}: CTR {x['ctr']:.4f} "
          f"({x['clicks']:,}/{x['impressions']:,})")
    print(("PROMOTED to @champion: " if decision["promoted"] else "not promoted: ")
          + decision["reason"])
    if decision["promoted"] and reload:
        from serving.client import Client

        cfg = settings.refresher
        for address in replicas or cfg.replicas:
            client = Client(address, cfg.token, ca_file=cfg.ca_file or None)
            try:
                r = client.call_admin("LoadModel", client.admin_pb2.LoadModelRequest(), timeout=600)
                print(f"  {address}: arms reloaded (control now {r.model_version})")
            except Exception as e:  # grpc.RpcError
                raise RuntimeError(f"{address}: reloading the arms failed ({e}); the registry "
                                   "already moved: reload with `freshrec model rollout`") from None
            finally:
                client.close()
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from freshrec.rotation import rotate_key

    settings = load_settings(args.profile)
    r = rotate_key(settings)
    print(f"HMAC key rotated to {r['key']} (fingerprint; the key is in the secrets directory's "
          f"hmac_key_chain): re-keyed {sum(r['tables'].values()):,} rows in "
          f"{len(r['tables'])} table(s), {r['landing_files']} landing file(s), "
          f"{r['snapshots']} snapshot(s); key chain now {' -> '.join(r['chain'])}")
    print("older Delta versions keep the old pseudonyms until VACUUM; MLflow artifacts and the "
          "audit log are not re-keyed (see README, Privacy and secrets)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec", description=__doc__)
    p.add_argument("--profile", help="settings profile (default: FRESHREC_PROFILE or local)")
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="import events, items or a MovieLens folder")
    imp.add_argument("kind", choices=["events", "items", "movielens"])
    imp.add_argument("path", help="the file (events, items) or folder (movielens)")
    imp.add_argument("--format", choices=["csv", "parquet", "json"], help="override the suffix")
    imp.add_argument("--map", action="append", metavar="TARGET=SOURCE",
                     help="take column SOURCE as TARGET (repeatable), e.g. user_id=userId")
    imp.set_defaults(fn=cmd_import)

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="make and import the embedded default dataset")
    synth.add_argument("--events", type=int)
    synth.add_argument("--users", type=int)
    synth.add_argument("--items", type=int)
    synth.add_argument("--out", help="folder for events.parquet/items.parquet")
    synth.add_argument("--if-missing", action="store_true", help="keep an existing dataset")
    synth.set_defaults(fn=cmd_synth)

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    run = sub.add_parser("run", help="run one batch job (or all) for a day without Airflow")
    run.add_argument("job", choices=[*JOBS, "all"])
    run.add_argument("--date", default=today)
    run.add_argument("--submit", action="store_true",
                     help="run the Spark jobs under spark-submit on spark.master (default: the "
                     "spark.submit setting, on in the cluster profile)")
    run.set_defaults(fn=cmd_run)

    ev = sub.add_parser("evaluate", help="compare models on the temporal split (one table)")
    ev.add_argument("--date", default=today)
    ev.add_argument("--models", help="comma-separated model names, or all (default: settings)")
    ev.set_defaults(fn=cmd_evaluate)

    tr = sub.add_parser("train", help="train a deep retrieval model or an RL re-ranking policy "
                        "(tracked in MLflow, gated into the registry)")
    tr.add_argument("--model", required=True,
                    choices=["two_tower", "sasrec", "bandit", "reinforce", "dqn"])
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--dataset", default="embedded", choices=["embedded", "ml-100k"],
                    help="deep models: the silver tables or MovieLens 100K")
    tr.add_argument("--bandit", default="linucb", choices=["linucb", "thompson"])
    tr.add_argument("--data", default="simulator", choices=["simulator", "logged"],
                    help="policies: the simulator of the synthetic data, or the served logs (the "
                    "Delta feedback and impressions tables)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--samples-per-epoch", type=int)
    tr.add_argument("--data-version", type=int, help="silver events Delta version (default: latest)")
    tr.add_argument("--no-register", action="store_true", help="skip the registry gate")
    tr.add_argument("--no-rollout", action="store_true", help="register and gate, but do not load a "
                    "promoted champion on the replicas (refresher.replicas)")
    tr.set_defaults(fn=cmd_train)

    rec = sub.add_parser("recommend", help="top-K per user: through the server (--user, --server) "
                         "or offline from the served model's snapshot (--users FILE --output FILE)")
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="one raw user id (asks the running server)")
    who.add_argument("--users", help="file with one raw user id per line")
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--output", help="CSV to write: user_id, rank, item_id, score")
    rec.add_argument("--server", help="host:port of a freshrec server (default: from settings)")
    rec.add_argument("--token", help="bearer token (default: FRESHREC_TOKEN or the dev token)")
    rec.add_argument("--ca", help="CA certificate (PEM) when the server uses TLS")
    rec.add_argument("--model", help="offline: the registered version or alias to answer with "
                     "(default: serving.model)")
    rec.set_defaults(fn=cmd_recommend)

    ref = sub.add_parser("refresh", help="take live events into bronze/silver, then push fresh "
                         "user/item state to the serving replicas")
    ref.add_argument("--once", action="store_true", help="one round (the default)")
    ref.add_argument("--loop", action="store_true", help="keep refreshing every --interval")
    ref.add_argument("--interval", help="e.g. 60s, 5m (default: refresher.interval_seconds)")
    ref.add_argument("--replica", action="append", help="host:port (repeatable; default: settings)")
    ref.set_defaults(fn=cmd_refresh)

    srv = sub.add_parser("serve", help="run the gRPC server on the latest snapshot")
    srv.add_argument("--port", type=int, help="override serving.port")
    srv.add_argument("--smoke", metavar="USER", help="start, answer one live Recommend for USER "
                     "through a real client, then stop (make run ends with this)")
    srv.set_defaults(fn=cmd_serve)

    mod = sub.add_parser("model", help="the served model: status, rollout to the replicas, "
                         "rollback of @champion")
    msub = mod.add_subparsers(dest="model_command", required=True)
    msub.add_parser("status", help="which version holds @champion and what it replaced")
    ro = msub.add_parser("rollout", help="build the snapshot of a version (default serving.model) "
                         "and load it on every replica, one at a time, health-checked")
    ro.add_argument("version", nargs="?", help="alias or version number (default: serving.model)")
    rb = msub.add_parser("rollback", help="move @champion back to the version it replaced (or "
                         "--to N) and roll that out")
    rb.add_argument("--to", type=int, help="the version to go back to")
    po = msub.add_parser("promote-online", help="move @champion to the A/B challenger arm's "
                         "version when its CTR beats the control's (online settings); say why not")
    po.add_argument("--arm", help="the challenger arm (default: the arm on @challenger, else the "
                    "only non-control arm)")
    po.add_argument("--no-reload", action="store_true", help="do not ask the replicas to reload "
                    "their arms after a promotion")
    for p_ in (ro, rb, po):
        p_.add_argument("--replica", action="append", help="host:port (repeatable; default: "
                        "refresher.replicas)")
    mod.set_defaults(fn=cmd_model)

    prv = sub.add_parser("privacy", help="privacy operations")
    psub = prv.add_subparsers(dest="privacy_command", required=True)
    psub.add_parser("rotate-key", help="add a new HMAC key to the chain and re-key every stored "
                    "pseudonym (stop the server, refresher and DAG first; re-run to finish an "
                    "interrupted rotation)")
    prv.set_defaults(fn=cmd_privacy)

    rep = sub.add_parser("report", help="rows per table, dead letters, evaluation, samples; "
                         "--online: per-arm online metrics and drift")
    rep.add_argument("--date", default=today)
    rep.add_argument("--online", action="store_true", help="per-arm CTR, hit-rate and coverage "
                     "with confidence intervals from the feedback table (recorded in MLflow), "
                     "and each replica's drift gauges")
    rep.add_argument("--no-mlflow", action="store_true", help="--online: do not record a run")
    rep.add_argument("--replica", action="append", help="--online: host:port whose gauges to show "
                     "(repeatable; default: refresher.replicas)")
    rep.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SettingsError, ValueError, FileNotFoundError, RuntimeError, FloatingPointError,
            LookupError) as e:
        print(f"freshrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
