"""The ``freshrec`` command: import data, make the embedded dataset, run batch jobs, evaluate, train,
serve, recommend and report.

This module only parses (Typer on click); what each subcommand does lives in
:mod:`freshrec.cli.commands`. To add a subcommand: write its function there (or in your own module),
then a thin ``@app.command()`` below that calls it with ``_ctx()``'s profile and output.

Global options (``--profile``, ``--json``, ``-v``, ``-q``, ``--debug``) may come anywhere on the line.
Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted. Every error is one line on stderr
(``--debug`` adds the traceback).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from datetime import date as _date
from datetime import datetime, timezone
from typing import Literal, Optional

import typer

try:  # typer vendors click since 0.2x; its exceptions are not the `click` package's
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on the real click
    import click.exceptions as click_exc

from freshrec.cli import commands
from freshrec.cli.console import Output, error_line, view

JOBS = commands.JOBS  # kept for importers of freshrec.cli.main.JOBS

EPILOG = ("Examples: [bold]freshrec data synth --if-missing[/]; [bold]freshrec run all --date "
          "2026-11-28 --profile cluster[/]; [bold]freshrec evaluate --models als,item_knn --json[/]; "
          "[bold]freshrec recommend --user u42[/]. Settings: FRESHREC_CONF_DIR, ./conf or "
          "~/.config/freshrec (see `freshrec config`).")

app = typer.Typer(name="freshrec", help=__doc__.split("\n\n")[0], epilog=EPILOG,
                  rich_markup_mode="rich", no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
model_app = typer.Typer(help="The served model: status, rollout to the replicas, rollback of "
                        "@champion, the online gate.", no_args_is_help=True)
privacy_app = typer.Typer(help="Privacy operations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(privacy_app, name="privacy")


@dataclass
class Globals:
    profile: Optional[str] = None
    json: bool = False
    verbose: int = 0
    quiet: bool = False
    debug: bool = False


G = Globals()
OUT = Output()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("freshrec")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def _show_version(value: bool) -> None:
    if value:
        print(f"freshrec {_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    profile: Optional[str] = typer.Option(None, "--profile", help="Settings profile (default: "
                                          "FRESHREC_PROFILE or local). Allowed anywhere on the line."),
    json_: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout "
                               "(for scripts); progress and errors stay on stderr."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True,
                                help="-v: every progress line of the jobs; -vv: all logging at DEBUG."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Errors only: no progress view."),
    debug: bool = typer.Option(False, "--debug", help="On an error, print the traceback too."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Real-time recommendation pipeline: batch lane, training, serving, reports."""
    G.profile, G.json, G.verbose, G.quiet, G.debug = profile, json_, verbose, quiet, debug
    OUT.json_mode, OUT.quiet = json_, quiet


def _day(value: str) -> str:
    try:
        return _date.fromisoformat(value).isoformat()
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a day: write it as YYYY-MM-DD, e.g. "
                                 f"{_today()}") from None


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def _column_map(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for p in pairs:
        if "=" not in p:
            raise typer.BadParameter(f"{p!r}: write it as target=source, e.g. --map user_id=userId",
                                     param_hint="--map")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


DATE = typer.Option(None, "--date", help="The day, YYYY-MM-DD (default: today, UTC).",
                    callback=lambda v: _day(v) if v is not None else _today(), show_default=False)
REPLICA = typer.Option(None, "--replica", help="host:port (repeatable; default: refresher.replicas).")


JobName = Literal[tuple([*commands.JOBS, "all"])]  # type: ignore[valid-type]


# ---- subcommands (thin: parse, then call freshrec.cli.commands) --------------------------------

@app.command("import", epilog="Example: freshrec import events clicks.csv --map user_id=userId")
def import_(
    kind: Literal["events", "items", "movielens"] = typer.Argument(...,
                               help="events, items or movielens"),
    path: str = typer.Argument(..., help="The file (events, items) or folder (movielens)."),
    fmt: Optional[Literal["csv", "parquet", "json"]] = typer.Option(None, "--format",
                                      help="Override the suffix."),
    map_: Optional[list[str]] = typer.Option(None, "--map", metavar="TARGET=SOURCE",
                                             help="Take column SOURCE as TARGET (repeatable)."),
) -> None:
    """Import events, items or a MovieLens folder."""
    commands.import_file(OUT, G.profile, kind, path, fmt, _column_map(map_))


@data_app.command("synth", epilog="Example: freshrec data synth --events 100000 --if-missing")
def data_synth(
    events: Optional[int] = typer.Option(None, "--events", help="Events (default: synth.n_events)."),
    users: Optional[int] = typer.Option(None, "--users", help="Users (default: synth.n_users)."),
    items: Optional[int] = typer.Option(None, "--items", help="Items (default: synth.n_items)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for events.parquet/items.parquet "
                                      "(default: <data_dir>/raw/synth)."),
    if_missing: bool = typer.Option(False, "--if-missing", help="Keep an existing dataset."),
) -> None:
    """Make and import the embedded default dataset."""
    commands.synth(OUT, G.profile, events, users, items, out, if_missing)


@app.command("run", epilog="Example: freshrec run all --date 2026-11-28")
def run(
    job: JobName = typer.Argument(...,
                              help="One batch job, or all of them in order."),
    date: str = DATE,
    submit: bool = typer.Option(False, "--submit", help="Run the Spark jobs under spark-submit on "
                                "spark.master (default: the spark.submit setting, on in the cluster "
                                "profile)."),
) -> None:
    """Run one batch job (or all) for a day without Airflow."""
    commands.run_jobs(OUT, G.profile, job, date, submit)


@app.command("evaluate", epilog="Example: freshrec evaluate --models als,item_knn,hybrid")
def evaluate(
    date: str = DATE,
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated model names, or "
                                         "all (default: evaluation.models)."),
) -> None:
    """Compare models on the temporal split (one table)."""
    commands.evaluate(OUT, G.profile, date, models)


@app.command("experiment", epilog="Example: freshrec experiment --events ratings.csv --models "
             "most_popular,item_knn,ease --plot quality.png")
def experiment(
    events: str = typer.Option(..., "--events", help="CSV or Parquet with user_id, item_id, "
                               "timestamp (epoch seconds or ISO-8601) [, value, weight]."),
    models: str = typer.Option("most_popular,item_knn", "--models", help="Comma-separated model "
                               "names, or all (every model that needs neither Spark nor torch)."),
    ks: Optional[str] = typer.Option(None, "--ks", help="Cut-offs, e.g. 10,20 (default: "
                                     "evaluation.ks)."),
    max_users: Optional[int] = typer.Option(None, "--max-users", help="Test a seeded sample of "
                                            "this many users."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG of the metrics per model "
                                       "here."),
) -> None:
    """Evaluate models on an events file in memory: the evaluate protocol (temporal validation and
    test splits, paired p-values) without Airflow, Spark or Delta."""
    commands.experiment(OUT, G.profile, events, models, ks, max_users, plot)


@app.command("train", epilog="Example: freshrec train --model two_tower --epochs 5 --device cpu")
def train(
    model: Literal["two_tower", "sasrec", "bandit", "reinforce", "dqn"] = typer.Option(..., "--model"),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", "--device"),
    dataset: Literal["embedded", "ml-100k"] = typer.Option("embedded", "--dataset",
                                help="Deep models: the silver tables or MovieLens 100K."),
    bandit: Literal["linucb", "thompson"] = typer.Option("linucb", "--bandit"),
    data: Literal["simulator", "logged"] = typer.Option("simulator", "--data",
                             help="Policies: the simulator of the synthetic data, or the served logs "
                             "(the Delta feedback and impressions tables)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default: training.epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: training.batch_size."),
    samples_per_epoch: Optional[int] = typer.Option(None, "--samples-per-epoch",
                                                    help="Default: training.samples_per_epoch."),
    data_version: Optional[int] = typer.Option(None, "--data-version",
                                               help="Silver events Delta version (default: latest)."),
    no_register: bool = typer.Option(False, "--no-register", help="Skip the registry gate."),
    no_rollout: bool = typer.Option(False, "--no-rollout", help="Register and gate, but do not load a "
                                    "promoted champion on the replicas (refresher.replicas)."),
) -> None:
    """Train a deep retrieval model or an RL re-ranking policy (tracked in MLflow, gated into the
    registry)."""
    commands.train(OUT, G.profile, model, device, dataset, bandit, data, epochs, batch_size,
                   samples_per_epoch, data_version, no_register, no_rollout)


@app.command("recommend", epilog="Examples: freshrec recommend --user u42 --k 5; freshrec recommend "
             "--users users.txt --output top10.csv")
def recommend(
    user: Optional[str] = typer.Option(None, "--user", help="One raw user id (asks the running server)."),
    users: Optional[str] = typer.Option(None, "--users", help="File with one raw user id per line."),
    k: int = typer.Option(10, "--k", help="Items per user."),
    output: Optional[str] = typer.Option(None, "--output", help="CSV to write: user_id, rank, "
                                         "item_id, score."),
    server: Optional[str] = typer.Option(None, "--server", help="host:port of a freshrec server "
                                         "(default: from settings)."),
    token: Optional[str] = typer.Option(None, "--token", help="Bearer token (default: FRESHREC_TOKEN "
                                        "or the dev token)."),
    ca: Optional[str] = typer.Option(None, "--ca", help="CA certificate (PEM) when the server uses TLS."),
    model: Optional[str] = typer.Option(None, "--model", help="Offline: the registered version or "
                                        "alias to answer with (default: serving.model)."),
) -> None:
    """Top-K per user: through the server (--user, --server) or offline from the served model's
    snapshot (--users FILE --output FILE)."""
    if bool(user) == bool(users):
        raise typer.BadParameter("give exactly one of --user U or --users FILE",
                                 param_hint="--user/--users")
    commands.recommend(OUT, G.profile, user, users, k, output, server, token, ca, model)


@app.command("refresh", epilog="Example: freshrec refresh --loop --interval 60s")
def refresh(
    once: bool = typer.Option(False, "--once", help="One round (the default)."),
    loop: bool = typer.Option(False, "--loop", help="Keep refreshing every --interval."),
    interval: Optional[str] = typer.Option(None, "--interval", help="e.g. 60s, 5m (default: "
                                           "refresher.interval_seconds)."),
    replica: Optional[list[str]] = REPLICA,
) -> None:
    """Take live events into bronze/silver, then push fresh user/item state to the serving replicas."""
    if interval is not None:
        try:
            commands.seconds(interval)
        except ValueError:
            raise typer.BadParameter(f"{interval!r}: write it as e.g. 500ms, 60s, 5m or 1h",
                                     param_hint="--interval") from None
    commands.refresh(OUT, G.profile, loop, interval, replica)


@app.command("serve", epilog="Example: freshrec serve --port 50051")
def serve(
    port: Optional[int] = typer.Option(None, "--port", help="Override serving.port."),
    smoke: Optional[str] = typer.Option(None, "--smoke", metavar="USER", help="Start, answer one live "
                                        "Recommend for USER through a real client, then stop."),
) -> None:
    """Run the gRPC server on the latest snapshot."""
    commands.serve(OUT, G.profile, port, smoke)


@model_app.command("status")
def model_status() -> None:
    """Which version holds @champion and what it replaced."""
    commands.model_status(OUT, G.profile)


@model_app.command("rollout")
def model_rollout(
    version: Optional[str] = typer.Argument(None, help="Alias or version number (default: "
                                            "serving.model)."),
    replica: Optional[list[str]] = REPLICA,
) -> None:
    """Build the snapshot of a version and load it on every replica, one at a time, health-checked."""
    commands.model_rollout(OUT, G.profile, version, replica)


@model_app.command("rollback")
def model_rollback(
    to: Optional[int] = typer.Option(None, "--to", help="The version to go back to."),
    replica: Optional[list[str]] = REPLICA,
) -> None:
    """Move @champion back to the version it replaced (or --to N) and roll that out."""
    commands.model_rollback(OUT, G.profile, to, replica)


@model_app.command("promote-online")
def model_promote_online(
    arm: Optional[str] = typer.Option(None, "--arm", help="The challenger arm (default: the arm on "
                                      "@challenger, else the only non-control arm)."),
    no_reload: bool = typer.Option(False, "--no-reload", help="Do not ask the replicas to reload "
                                   "their arms after a promotion."),
    replica: Optional[list[str]] = REPLICA,
) -> None:
    """Move @champion to the A/B challenger arm's version when its CTR beats the control's."""
    commands.promote_online(OUT, G.profile, arm, replica, not no_reload)


@privacy_app.command("rotate-key")
def privacy_rotate_key() -> None:
    """Add a new HMAC key to the chain and re-key every stored pseudonym (stop the server, refresher
    and DAG first; re-run to finish an interrupted rotation)."""
    commands.rotate_key(OUT, G.profile)


@app.command("erase", epilog="Example: freshrec erase --user u42; freshrec erase --vacuum")
def erase(
    user: Optional[str] = typer.Option(None, "--user", help="The raw user id (pseudonymized with "
                                       "the HMAC key)."),
    pseudonymized: bool = typer.Option(False, "--pseudonymized", help="--user is already the "
                                       "pseudonym the tables hold."),
    vacuum: bool = typer.Option(False, "--vacuum", help="VACUUM the user tables with "
                                "privacy.vacuum_retention_hours (run it after that many hours when "
                                "it is above 0, so erased rows leave the old versions)."),
    replica: Optional[list[str]] = typer.Option(None, "--replica", help="host:port told to forget "
                                                "the user now (repeatable; default: "
                                                "refresher.replicas)."),
    no_push: bool = typer.Option(False, "--no-push", help="Tell no replica (they drop the user at "
                                 "the refresher's next round)."),
) -> None:
    """Erase a user everywhere: tables and their earlier versions, landing, logs, snapshots, MLflow
    artifacts (what Admin.DeleteUser does); exits 1 when a file still holds the user."""
    rc = commands.erase(OUT, G.profile, user, pseudonymized, vacuum, replica, no_push)
    if rc:
        raise typer.Exit(rc)


@app.command("report", epilog="Examples: freshrec report --date 2026-11-28; freshrec report --online")
def report(
    date: str = DATE,
    online: bool = typer.Option(False, "--online", help="Per-arm CTR, hit-rate and coverage with "
                                "confidence intervals from the feedback table (recorded in MLflow), "
                                "and each replica's drift gauges."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="--online: do not record a run."),
    replica: Optional[list[str]] = typer.Option(None, "--replica", help="--online: host:port whose "
                                                "gauges to show (repeatable; default: refresher.replicas)."),
) -> None:
    """Rows per table, dead letters, evaluation, samples; --online: per-arm online metrics and drift."""
    commands.report(OUT, G.profile, date, online, no_mlflow, replica)


@app.command("config")
def config() -> None:
    """Where the settings come from (settings folder, profile, data folder) and what they resolve
    to; --json prints the whole tree with secrets masked."""
    commands.config(OUT, G.profile)


# ---- running it ---------------------------------------------------------------------------------

_FLAGS = {"--json", "-q", "--quiet", "--debug", "--version"}


def hoist_globals(argv: list[str]) -> list[str]:
    """Move the global options to the front wherever they were written (``freshrec run all
    --profile cluster`` works like ``freshrec --profile cluster run all``); ``--`` stops the search."""
    front, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a in _FLAGS or a in ("-v", "--verbose") or (len(a) > 2 and a[0] == "-" and a[1] != "-"
                                                       and set(a[1:]) == {"v"}):
            front.append(a)
        elif a == "--profile" and i + 1 < len(argv):
            front += [a, argv[i + 1]]
            i += 1
        elif a.startswith("--profile="):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    from freshrec.storage.crypto import private_umask

    private_umask()  # every file freshrec creates: the owner's only (0600 / 0700)
    args = hoist_globals(list(sys.argv[1:] if argv is None else argv))
    G.__init__()
    OUT.__init__()
    command = typer.main.get_command(app)
    debug = "--debug" in args
    verbosity = sum(len(a) - 1 for a in args if len(a) > 1 and a[0] == "-" and set(a[1:]) == {"v"}) \
        + args.count("--verbose")
    quiet = ("-q" in args or "--quiet" in args or "--json" in args) and verbosity == 0
    with view(verbosity=verbosity, quiet=quiet) as v:
        try:
            rc = command.main(args=args, prog_name="freshrec", standalone_mode=False)
        except click_exc.UsageError as e:
            v.close()
            if type(e).__name__ == "NoArgsIsHelpError":  # `freshrec` or `freshrec model` alone
                print(e.format_message(), file=sys.stderr)
                return 2
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            print(f"freshrec: usage error: {' '.join(e.format_message().split())}{hint}",
                  file=sys.stderr)
            return 2
        except typer.Abort:
            v.close()
            print("freshrec: interrupted", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            v.close()
            print("freshrec: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - every runtime error becomes one line
            v.close()
            if debug:
                traceback.print_exc()
            target = commands.current_target[0] if commands.current_target else None
            print(f"freshrec: error: {error_line(e, target)}", file=sys.stderr)
            return 1
        finally:
            commands.current_target.clear()
    if rc == 130:  # typer turns KeyboardInterrupt into Exit(130)
        print("freshrec: interrupted", file=sys.stderr)
    if isinstance(rc, int) and rc != 0:
        return rc
    OUT.flush_json()
    return 0


def shutdown_threads() -> None:
    """What the interpreter does first at exit: run threading's own exit hooks (each
    ``concurrent.futures`` executor is told to stop, so its idle workers leave) and join every
    non-daemon thread. ``threading._shutdown`` is that step (CPython 3.9+); where it is missing,
    the pools' hook is called and the threads are joined here."""
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
        return
    from concurrent.futures import thread as futures_thread  # pragma: no cover - other Pythons

    futures_thread._python_exit()  # pragma: no cover
    for t in threading.enumerate():  # pragma: no cover
        if t is not threading.main_thread() and not t.daemon:
            t.join()


def entry() -> None:
    """The ``freshrec`` program: run :func:`main`, then leave without the interpreter's final
    teardown.

    After the work is done and printed, Arrow's C++ thread pools can still be torn down under a live
    worker during that teardown, and the process aborts with "terminate called without an active
    exception" (exit 134) although the command succeeded (apache/arrow#34314; seen here about one
    ``freshrec report`` in six on a loaded machine). So: do the first two steps of that teardown
    as Python does them, then leave: ``threading._shutdown`` (it first tells every
    ``concurrent.futures`` pool to stop, then joins the non-daemon threads), the ``atexit`` hooks
    (MLflow's, logging's), a flush, and ``os._exit`` with the command's code.

    Joining the threads by hand without the first half hung for ever once MLflow had logged an
    artifact: its upload pool's idle workers leave only when that signal comes."""
    import atexit
    import os

    try:
        rc = main()
    except SystemExit as e:  # pragma: no cover - main returns its codes; keep sys.exit's meaning
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    shutdown_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
