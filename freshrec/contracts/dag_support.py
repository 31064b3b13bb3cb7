"""What every freshrec DAG shares: task defaults, the failure notifier and the Airflow Assets.

Imported when a DAG file is parsed, so it imports nothing heavy and reads no settings: the
notifier loads the settings when a task has failed, in the worker.

- :func:`task_defaults`: ``retries`` with exponential backoff (``retry_exponential_backoff``,
  capped by ``max_retry_delay``), an ``execution_timeout`` and :class:`FileNotifier` as the
  ``on_failure_callback`` (it runs once a task has failed for good, not on a retry).
- Assets: the batch lane's outputs. The batch tasks name them as ``outlets``; the training DAG is
  scheduled on the silver events, the rollout DAG on a promoted retrieval model
  (:data:`RETRIEVAL_CHAMPION`, emitted through the alias :data:`PROMOTED` only when a gate
  promoted, see :func:`emit_promoted`).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import Asset, AssetAlias, BaseNotifier

# The batch lane's outputs (names, not locations: the tables' place comes from the settings when a
# task runs; each event's `extra` carries the table's URI and Delta version).
RAW_EVENTS = Asset(name="freshrec.bronze.events_raw", uri="freshrec://bronze/events_raw")
EVENTS = Asset(name="freshrec.silver.events", uri="freshrec://silver/events")
DEAD_LETTER = Asset(name="freshrec.silver.events_dead_letter",
                    uri="freshrec://silver/events_dead_letter")
FEATURES = Asset(name="freshrec.gold.features", uri="freshrec://gold/features")
EVALUATION = Asset(name="freshrec.reports.evaluation", uri="freshrec://reports/evaluation")
# a new @champion (or @challenger) of freshrec-retrieval; only emitted when a gate promoted
RETRIEVAL_CHAMPION = Asset(name="freshrec.contracts.registry.retrieval",
                           uri="freshrec://registry/freshrec-retrieval")
PROMOTED = AssetAlias(name="freshrec.promoted_retrieval")

FALLBACK_FAILURE_LOG = "freshrec-task-failures.jsonl"


def task_defaults(retry_delay: timedelta, max_retry_delay: timedelta,
                  execution_timeout: timedelta, retries: int = 2) -> dict:
    """``default_args`` for a freshrec DAG: retries that back off exponentially (the delay
    doubles each try, never over ``max_retry_delay``), a time limit per try and the notifier."""
    return {"owner": "freshrec", "retries": retries, "retry_delay": retry_delay,
            "retry_exponential_backoff": 2.0, "max_retry_delay": max_retry_delay,
            "execution_timeout": execution_timeout, "on_failure_callback": FileNotifier()}


def failure_log_path() -> tuple[Path, str | None]:
    """Where a failure is written: ``airflow.failure_log`` of the settings (default
    ``<data_dir>/alerts/task_failures.jsonl``). When the settings cannot be loaded, or the data
    directory is an object-store URI and no local ``airflow.failure_log`` is set, the failure
    goes to ``$AIRFLOW_HOME/freshrec-task-failures.jsonl`` with the reason returned."""
    try:
        from freshrec.settings import load_settings

        settings = load_settings()
        return settings.failure_log, None
    except Exception as e:  # noqa: BLE001 - a failure must be written down whatever else is wrong
        home = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow"))
        return home / FALLBACK_FAILURE_LOG, f"{type(e).__name__}: {e}"


class FileNotifier(BaseNotifier):
    """Appends one JSON line per failed task (DAG, task, run, try, interval, the error, the log
    URL) to :func:`failure_log_path`, synced to disk. A monitoring agent tails that file."""

    def notify(self, context) -> None:
        ti = context.get("ti") or context.get("task_instance")
        err = context.get("exception")
        record = {
            "at": datetime.now(timezone.utc).isoformat(),
            "dag_id": getattr(context.get("dag"), "dag_id", None) or getattr(ti, "dag_id", None),
            "task_id": getattr(ti, "task_id", None),
            "run_id": context.get("run_id") or getattr(ti, "run_id", None),
            "try_number": getattr(ti, "try_number", None),
            "data_interval_start": _iso(context.get("data_interval_start")),
            "data_interval_end": _iso(context.get("data_interval_end")),
            "error": f"{type(err).__name__}: {err}" if err is not None else None,
            "log_url": getattr(ti, "log_url", None),
        }
        path, why = failure_log_path()
        if why:
            record["failure_log_fallback"] = why
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _iso(v) -> str | None:
    return v.isoformat() if hasattr(v, "isoformat") else (None if v is None else str(v))


def emit_promoted(context, gate: dict) -> None:
    """Emit :data:`RETRIEVAL_CHAMPION` through :data:`PROMOTED` when ``gate`` (a gate's report)
    promoted a ``freshrec-retrieval`` version; nothing otherwise, so the rollout DAG runs only
    for a new model. The task must name ``PROMOTED`` in its ``outlets``."""
    if gate.get("promoted") and gate.get("registered_model", "freshrec-retrieval") == "freshrec-retrieval":
        context["outlet_events"][PROMOTED].add(
            RETRIEVAL_CHAMPION, extra={"version": str(gate.get("version")),
                                       "candidate": str(gate.get("candidate"))})


def emit_table(context, asset: Asset, table: str) -> None:
    """Attach the table's location and current Delta version to ``asset``'s event (the task must
    name ``asset`` in its ``outlets``). Reads the settings: call it from a task only."""
    from freshrec.storage.delta import DeltaStore
    from freshrec.settings import load_settings

    store = DeltaStore(load_settings())
    extra = {"table": table}
    try:
        extra["version"] = store.version(table)
    except Exception as e:  # noqa: BLE001 - the event is still emitted; the extra says why not
        extra["version_error"] = str(e)[:200]
    context["outlet_events"][asset].extra = extra
