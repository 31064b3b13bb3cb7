"""What each ``freshrec`` subcommand does, apart from parsing (freshrec/cli/main.py wires these to
the command line). Each takes the resolved profile, an :class:`Output` and plain values, prints
for people through ``out.say``, records its outcome with ``out.result`` (the ``--json`` object)
and raises on failure (the CLI turns that into one line and exit code 1). Lanes are imported
lazily inside each function."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from freshrec.cli.console import Output
from freshrec.progress import advance
from freshrec.contracts.jobs import JOBS as BATCH_JOBS
from freshrec.settings import SettingsError, load_settings

log = logging.getLogger("freshrec.cli")

JOBS = {j.name: j.module for j in BATCH_JOBS}  # freshrec.contracts.jobs

# The gRPC server a command is talking to, for the one-line error of a failed call.
current_target: list[str] = []


def import_file(out: Output, profile: str | None, kind: str, path: str, fmt: str | None,
                column_map: dict[str, str] | None) -> None:
    from freshrec.data import importers

    settings = load_settings(profile)
    if kind == "events":
        r = importers.import_events_file(settings, Path(path), fmt, column_map)
        out.say(f"{path}: {'already imported' if r.already_landed else 'landed'} "
                f"{r.rows:,} event rows (file id {r.file_id}); the next batch run ingests them"
                + ("" if r.already_landed else f"; {r.refusal_summary} by the event rules"))
        out.result(kind=kind, path=path, rows=r.rows, file_id=r.file_id,
                   already_imported=r.already_landed,
                   refused=None if r.already_landed else r.refusal_summary)
    elif kind == "items":
        r2 = importers.import_items_file(settings, Path(path), fmt, column_map)
        out.say(f"{path}: items inserted {r2['inserted']:,}, updated {r2['updated']:,}")
        out.result(kind=kind, path=path, inserted=r2["inserted"], updated=r2["updated"])
    else:
        from freshrec.data.movielens import import_movielens

        landed, items = import_movielens(settings, Path(path))
        out.say(f"{path}: {landed.rows:,} ratings "
                f"{'already imported' if landed.already_landed else 'landed'}"
                + ("" if landed.already_landed else f" ({landed.refusal_summary} by the event rules)")
                + f"; items inserted {items['inserted']:,}, updated {items['updated']:,}")
        out.result(kind=kind, path=path, rows=landed.rows, already_imported=landed.already_landed,
                   items_inserted=items["inserted"], items_updated=items["updated"])


def synth(out: Output, profile: str | None, events: int | None, users: int | None,
          items: int | None, out_dir: str | None, if_missing: bool) -> None:
    from freshrec.data import importers
    from freshrec.data.synth import write_synth

    overrides = {k: v for k, v in (("n_events", events), ("n_users", users), ("n_items", items)) if v}
    settings = load_settings(profile, **({"synth": overrides} if overrides else {}))
    folder = Path(out_dir) if out_dir else settings.data_dir / "raw" / "synth"
    made = None
    if if_missing and (folder / "events.parquet").exists() and (folder / "items.parquet").exists():
        out.say(f"embedded dataset already in {folder}; skipping (drop --if-missing to remake it)")
    else:
        out.say(f"making the embedded dataset: {settings.synth.n_events:,} events, "
                f"{settings.synth.n_users:,} users, {settings.synth.n_items:,} items -> {folder}")
        advance(log, "data synth", 0, 2, "making %s events", f"{settings.synth.n_events:,}")
        r = write_synth(settings.synth, folder)
        made = {"rows": r.n_events, "malformed": r.n_malformed, "duplicated": r.n_duplicates}
        out.say(f"  {r.n_events:,} rows ({r.n_malformed:,} malformed, {r.n_duplicates:,} duplicated)")
    advance(log, "data synth", 1, 2, "landing events and items")
    landed = importers.import_events_file(settings, folder / "events.parquet",
                                          landed_at=datetime.now(timezone.utc))
    its = importers.import_items_file(settings, folder / "items.parquet")
    advance(log, "data synth", 2, 2, "dataset landed")
    out.say(f"  events {'already landed' if landed.already_landed else 'landed'} "
            f"({landed.rows:,} rows); items inserted {its['inserted']:,}, "
            f"updated {its['updated']:,}")
    out.result(folder=str(folder), made=made, events_rows=landed.rows,
               events_already_landed=landed.already_landed, items_inserted=its["inserted"],
               items_updated=its["updated"])


def run_jobs(out: Output, profile: str | None, job: str, date: str, submit: bool) -> None:
    from freshrec.ops.submit import run_job

    names = list(JOBS) if job == "all" else [job]
    argv = ["--date", date] + (["--profile", profile] if profile else [])
    results = {}
    for n, name in enumerate(names):
        advance(log, "run", n, len(names), "%s %s", name, date)
        out.say(f"== {name} {date}")
        t0 = time.perf_counter()
        # under spark-submit with spark.submit (the cluster profile) or --submit
        result = run_job(name, argv, True if submit else None)
        shown = result["table"] if name == "evaluate" and isinstance(result, dict) else result
        out.say(f"   {shown}")
        results[name] = {"result": result, "seconds": round(time.perf_counter() - t0, 1)}
    advance(log, "run", len(names), len(names), "%s %s done", job, date)
    out.result(date=date, jobs=results)


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def reply_dict(user: str, reply) -> dict:
    return {"user": user, "model_version": reply.model_version, "cold_start": reply.cold_start,
            "items": [{"rank": r, "item_id": it.item_id, "score": it.score, "source": it.source,
                       "explanation": it.explanation} for r, it in enumerate(reply.items, 1)]}


def print_reply(out: Output, user: str, reply) -> None:
    out.say(f"user {user}: model {reply.model_version}{' (cold start)' if reply.cold_start else ''}")
    for rank, it in enumerate(reply.items, 1):
        out.say(f"  {rank:>2}. {it.item_id:<12} {it.score:8.4f}  [{it.source}] {it.explanation}")


def serve(out: Output, profile: str | None, port: int | None, smoke: str | None) -> None:
    import signal
    import threading

    from serving.server import FreshrecServer

    from freshrec.logs import configure

    settings = load_settings(profile)
    configure(json_lines=settings.serving.json_logs and not smoke)
    from nearline.snapshots import ensure_served

    ensure_served(settings)  # built here once; the server processes only load snapshots
    if not smoke:
        from serving.host import Supervisor, process_count

        if process_count(settings) > 1:  # serving.processes: children share the port
            sup = Supervisor(settings, port=port)
            bound = sup.start()
            out.say(f"freshrec serving on {settings.serving.host}:{bound} ({sup.n} processes, "
                    f"pids {sup.pids()})")
            stopping: list[int] = []  # appended by the handler (no lock a 2nd signal could hit)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stopping.append(1))
            while not stopping:
                time.sleep(0.2)
            out.say("shutting down: letting in-flight calls finish")
            sup.stop()
            out.result(address=f"{settings.serving.host}:{bound}", processes=sup.n, stopped=True)
            return
    server = FreshrecServer(settings)
    bound = server.start(port=port)
    out.say(f"freshrec serving on {settings.serving.host}:{bound}")
    if smoke:
        from freshrec.api.client import Client

        address = f"{settings.serving.host}:{bound}"
        current_target[:] = [address]
        token = os.environ.get("FRESHREC_TOKEN") or (
            "dev-client-token" if settings.profile == "local" else "")
        if not token:
            server.stop()
            raise SettingsError(f"--smoke needs a client token in profile {settings.profile!r}: "
                                "export FRESHREC_TOKEN (the dev token is for the local profile "
                                "only)")
        client = Client(address, token)
        try:
            out.say(f"live request: Recommend(user_id={smoke!r}, k=10) over gRPC on loopback")
            t0 = time.perf_counter()
            reply = client.recommend(smoke, 10, explain=True)
            ms = (time.perf_counter() - t0) * 1000
            out.say(f"answered in {ms:.1f} ms")
            print_reply(out, smoke, reply)
            out.result(address=address, answered_ms=round(ms, 1), **reply_dict(smoke, reply))
        finally:
            client.close()
            server.stop()
        out.say("server stopped; run `freshrec serve` (or .venv/bin/freshrec serve) to keep it up")
        return
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    out.say("shutting down: letting in-flight calls finish")
    server.stop()
    out.result(address=f"{settings.serving.host}:{bound}", stopped=True)


def refresh(out: Output, profile: str | None, loop: bool, interval: str | None,
            replicas: list[str] | None) -> None:
    from nearline import refresher

    from freshrec.logs import configure

    settings = load_settings(profile)
    if replicas:
        settings = settings.model_copy(update={"refresher": settings.refresher.model_copy(
            update={"replicas": replicas})})
    configure(json_lines=False)
    if loop:
        refresher.loop(settings, seconds(interval) if interval else settings.refresher.interval_seconds)
        return
    report = refresher.refresh_once(settings)
    out.say(report)
    out.result(report=report)


def evaluate(out: Output, profile: str | None, date: str, models: str | None) -> None:
    from spark_jobs import evaluate as job

    from freshrec.interval import DataInterval

    settings = load_settings(profile)
    names = [m.strip() for m in models.split(",")] if models else None
    result = job.run(settings, DataInterval.for_day(date), names)
    out.say(result["table"])
    out.result(**result)


def train(out: Output, profile: str | None, model: str, device: str, dataset: str, bandit: str,
          data: str, epochs: int | None, batch_size: int | None, samples_per_epoch: int | None,
          data_version: int | None, no_register: bool, no_rollout: bool) -> None:
    from training import run as training

    settings = load_settings(profile)
    overrides = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size),
                                   ("samples_per_epoch", samples_per_epoch)) if v is not None}
    extra: dict = {"kind": bandit} if model == "bandit" else {}
    if model in ("bandit", "reinforce", "dqn"):
        extra["data"] = data
    if data_version is not None and model in ("two_tower", "sasrec"):
        extra["data_version"] = data_version
    res = training.run(settings, model, device, dataset, overrides, register=not no_register, **extra)
    out.result(**{k: v for k, v in res.items()})
    out.say(f"run {res['run_id']} ({settings.training.experiment})")
    if "table" in res:
        out.say(res["table"])
        out.say(f"device {res['device']}, best epoch {res['best_epoch']}/{res['epochs_run']}, "
                f"{res['samples_per_second']:,.0f} training samples/s")
    else:
        if res["truth"]:
            out.say("true value (clicks per slate):",
                    ", ".join(f"{k} {v:.3f}" for k, v in res["truth"].items()))
        if "logging_value" in res:
            out.say(f"logging policy on the {res['n_test']} held-out requests: "
                    f"{res['logging_value']:.3f} clicks per slate")
        out.say("off-policy estimates of", res["model"], {k: round(v, 3) for k, v in
                                                          res["ope"][res["model"]].items()})
    if "gate_skipped" in res:
        out.say(res["gate_skipped"])
    if "gate" in res:
        g = res["gate"]
        out.say(f"{g['registered_model']} v{g['version']}: "
                f"{'@champion' if g['promoted'] else 'not promoted'} ({g['reason']})")
        if g["promoted"] and g["registered_model"] == "freshrec-retrieval" and not no_rollout:
            from nearline.rollout import RolloutFailed, rollout

            if not settings.refresher.replicas:  # no server to load it: training still succeeded
                out.say(f"v{g['version']} not rolled out: no replicas configured "
                        "(refresher.replicas is empty); `freshrec serve` loads @champion, or "
                        f"`freshrec model rollout {g['version']} --replica HOST:PORT` loads it on "
                        "a running server")
                out.result(rollout={"replicas": [], "note": "no replicas configured"})
                return
            try:
                r = rollout(settings, int(g["version"]))
            except RolloutFailed as e:
                raise RuntimeError(f"{e}. The new version is @champion; roll it out again with "
                                   f"`freshrec model rollout {g['version']}` once the replica "
                                   "is up") from None
            out.say(f"rolled out {r['model_version']} to {len(r['replicas'])} replica(s)"
                    + (f" ({r['note']})" if "note" in r else ""))
            out.result(rollout=r)


def recommend(out: Output, profile: str | None, user: str | None, users: str | None, k: int,
              output: str | None, server: str | None, token: str | None, ca: str | None,
              model: str | None) -> None:
    settings = load_settings(profile)
    if user or server:
        from freshrec.api.client import Client
        from serving.offline import read_user_file

        address = server or f"{settings.serving.host}:{settings.serving.port}"
        current_target[:] = [address]
        # a person waits for an answer: a server that is not there is UNAVAILABLE at once (after
        # the channel's retries), not DEADLINE_EXCEEDED 5 s later
        client = Client(address, token or os.environ.get("FRESHREC_TOKEN", "dev-client-token"),
                        ca_file=ca, wait_for_ready=False)
        try:
            who = [user] if user else read_user_file(Path(users))
            rows, replies = [], []
            for u in who:
                reply = client.recommend(u, k, explain=not output)
                replies.append(reply_dict(u, reply))
                if output:
                    rows += [(u, r, it.item_id, it.score) for r, it in enumerate(reply.items, 1)]
                else:
                    print_reply(out, u, reply)
        finally:
            client.close()
        if output:
            import csv

            with open(output, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["user_id", "rank", "item_id", "score"])
                w.writerows(rows)
            out.say(f"wrote {len(rows):,} rows for {len(who):,} users to {output}")
            out.result(output=output, rows=len(rows), users=len(who))
        else:
            out.result(server=address, replies=replies)
        return
    if not (users and output):
        raise ValueError("give --user U (through the server), or --users FILE with --output FILE "
                         "(offline, from the served model's snapshot), or --server ADDR")
    from serving.offline import recommend_to_csv

    from nearline.snapshots import build_for_serving

    s = recommend_to_csv(settings, Path(users), k, Path(output), model, build=build_for_serving)
    out.say(f"wrote {s['rows']:,} rows for {s['users']:,} users to {output} from "
            f"{s['model_version']} ({s['cold_start_fallbacks']:,} unknown users got popular items)")
    out.result(output=output, **s)


def model_status(out: Output, profile: str | None) -> None:
    from freshrec.contracts import registry
    from freshrec.tracking import mlflow_for

    settings = load_settings(profile)
    mlflow_for(settings)
    champ = registry.resolve(registry.ALIAS)
    out.say(f"@champion: {champ.label} ({champ.tags.get('gate_reason', '')})")
    if champ.tags.get("previous_champion"):
        out.say(f"  replaced version {champ.tags['previous_champion']} (freshrec model rollback "
                "goes back to it)")
    out.result(champion=champ.label, gate_reason=champ.tags.get("gate_reason", ""),
               previous_champion=champ.tags.get("previous_champion"))


def model_rollout(out: Output, profile: str | None, version: str | None,
                  replicas: list[str] | None) -> None:
    import json

    from nearline import rollout

    settings = load_settings(profile)
    report = rollout.rollout(settings, version or settings.serving.model, replicas or None)
    out.say(json.dumps(report, indent=2))
    out.result(**report)


def model_rollback(out: Output, profile: str | None, to: int | None,
                   replicas: list[str] | None) -> None:
    import json

    from nearline import rollout

    settings = load_settings(profile)
    report = rollout.rollback(settings, to, replicas or None)
    out.say(json.dumps(report, indent=2))
    out.result(**report)


def promote_online(out: Output, profile: str | None, arm: str | None, replicas: list[str] | None,
                   reload: bool) -> None:
    """The online gate, then (when promoted) every replica reloads its arms from the settings."""
    from freshrec.contracts import online

    settings = load_settings(profile)
    decision = online.promote_online(settings, arm=arm)
    out.result(**decision)
    c, x = decision["control"], decision["challenger"]
    out.say(f"control {c['arm']} {c['model_version']}: CTR {c['ctr']:.4f} ({c['clicks']:,}/"
            f"{c['impressions']:,}); challenger {x['arm']} {x['model_version']}: CTR {x['ctr']:.4f} "
            f"({x['clicks']:,}/{x['impressions']:,})")
    out.say(("PROMOTED to @champion: " if decision["promoted"] else "not promoted: ")
            + decision["reason"])
    if decision["promoted"] and reload:
        from freshrec.api.client import Client
        from freshrec.api.replicas import expand_replicas

        cfg = settings.refresher
        reloaded = {}
        for address in expand_replicas(replicas or cfg.replicas, settings):  # every process
            client = Client(address, cfg.bearer(), ca_file=cfg.ca_file or None)
            try:
                r = client.call_admin("LoadModel", client.admin_pb2.LoadModelRequest(), timeout=600)
                out.say(f"  {address}: arms reloaded (control now {r.model_version})")
                reloaded[address] = r.model_version
            except Exception as e:  # grpc.RpcError
                raise RuntimeError(f"{address}: reloading the arms failed ({e}); the registry "
                                   "already moved: reload with `freshrec model rollout`") from None
            finally:
                client.close()
        out.result(reloaded=reloaded)


def rotate_key(out: Output, profile: str | None) -> None:
    from freshrec.privacy.rotation import rotate_key as rotate

    settings = load_settings(profile)
    r = rotate(settings)
    out.say(f"HMAC key rotated to {r['key']} (fingerprint; the key is in the secrets directory's "
            f"hmac_key_chain): re-keyed {sum(r['tables'].values()):,} rows in "
            f"{len(r['tables'])} table(s), {r['landing_files']} landing file(s), "
            f"{r['snapshots']} snapshot(s); key chain now {' -> '.join(r['chain'])}")
    out.say("older Delta versions keep the old pseudonyms until VACUUM; MLflow artifacts and the "
            "audit log are not re-keyed (see README, Privacy and secrets)")
    out.result(**r)


def experiment(out: Output, profile: str | None, events: str, models: str, ks: str | None,
               max_users: int | None, plot: str | None) -> None:
    """The evaluate protocol in memory on an events file (recmodels.experiment.run_experiment)."""
    from recmodels.experiment import run_experiment

    settings = load_settings(profile)
    current_target[:] = [events]
    names = [m.strip() for m in models.split(",")]
    result = run_experiment(
        Path(events), names, settings=settings,
        ks=[int(k) for k in ks.split(",")] if ks else None, max_users=max_users,
        progress=lambda name, n, total: advance(log, "experiment", n - 1, total,
                                                "experiment: [%d/%d] fitting %s", n, total, name))
    summary = result.summary()
    out.say(f"{events}: {result.sizes}")
    out.say(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    for name, why in result.skipped.items():
        out.say(f"{name}: skipped: {why}")
    if plot:
        result.plot(plot)
        out.say(f"plot: {plot}")
    out.result(events=events, sizes=result.sizes, skipped=result.skipped, plot=plot,
               summary=summary.reset_index().to_dict(orient="records"))


def erase(out: Output, profile: str | None, user: str | None, pseudonymized: bool, vacuum: bool,
          replicas: list[str] | None, no_push: bool) -> int:
    from freshrec.privacy.erasure import erase_user, rows_removed, vacuum_user_tables
    from freshrec.privacy.pseudonyms import pseudonymizer

    settings = load_settings(profile)
    if vacuum:
        gone = vacuum_user_tables(settings)
        out.say(f"vacuumed the user tables (retention {settings.privacy.vacuum_retention_hours} h): "
                f"{sum(gone.values())} file(s) removed")
        if not user:
            out.result(vacuumed_files=sum(gone.values()))
            return 0
    if not user:
        raise ValueError("name the user: freshrec erase --user USER_ID (or --vacuum alone)")
    raw = user.strip()
    pseudonym = raw if pseudonymized else pseudonymizer(settings)(raw)
    r = erase_user(settings, pseudonym, None if pseudonymized else raw)
    out.say(f"erased the user: {rows_removed(r):,} row(s) removed ({r['tables']}; landing "
            f"{r['landing_rows']}, log lines {r['log_lines']}, raw input {r['raw_rows']}); "
            f"{r['snapshot_files']} snapshot file(s) and {r['mlflow_files']} MLflow artifact "
            f"file(s) rewritten; {r['vacuumed_files']} old Delta file(s) vacuumed")
    told = {}
    for address in ([] if no_push else (replicas or settings.refresher.replicas)):
        told[address] = _push_removal(settings, address, pseudonym)
        out.say(f"replica {address}: {told[address]}")
    out.result(rows_removed=rows_removed(r), replicas=told,
               **{k: v for k, v in r.items() if k != "unscrubbed"}, unscrubbed=r["unscrubbed"])
    if r["unscrubbed"]:
        print("files that still hold the user (not a format erasure rewrites): "
              + ", ".join(r["unscrubbed"]), file=sys.stderr)
        return 1
    return 0


def _push_removal(settings, address: str, user: str) -> str:
    """Ask one replica to forget the user now (ApplyDeltas remove_users, one try)."""
    import grpc

    from freshrec.api.client import Client

    try:
        client = Client(address, settings.refresher.bearer(),
                        ca_file=settings.refresher.ca_file or None)
    except SettingsError as e:
        return f"not told ({e}); it drops the user at the refresher's next round"
    try:
        pb = client.admin_pb2
        reply = client.call_admin("ApplyDeltas", pb.ApplyDeltasRequest(
            remove_users=[user], users_pseudonymized=True), timeout=10)
        return f"forgot the user ({reply.users_removed} vector removed)"
    except grpc.RpcError as e:
        return (f"not reached ({e.code().name}); it drops the user at the refresher's next "
                "round")
    finally:
        client.close()


def report(out: Output, profile: str | None, date: str, online: bool, no_mlflow: bool,
           replicas: list[str] | None) -> None:
    from freshrec.cli.report import render, render_online

    settings = load_settings(profile)
    text = (render_online(settings, log_mlflow=not no_mlflow, replicas=replicas) if online
            else render(settings, date))
    out.say(text)
    out.result(date=date, online=online, report=text)


def config(out: Output, profile: str | None) -> None:
    """Where the settings come from and what they resolve to (secrets masked)."""
    from freshrec.settings import find_conf_dir

    settings = load_settings(profile)
    conf_dir, why = find_conf_dir()
    try:
        data_dir = str(settings.data_dir)
    except ValueError:
        data_dir = settings.data_uri
    out.say(f"profile {settings.profile}; settings folder {conf_dir} ({why}); data {data_dir}")
    out.say(f"MLflow tracking {settings.mlflow_tracking_uri}")
    out.result(profile=settings.profile, conf_dir=str(conf_dir), conf_source=why,
               data_dir=data_dir, mlflow_tracking_uri=settings.mlflow_tracking_uri,
               settings=settings.model_dump(mode="json"))
