"""Where the evaluation reports live: one file per evaluate run, never overwritten, and an index
that the gate, ``freshrec report``, ``freshrec train`` and the benchmarks read to find the newest.

* ``<data>/reports/evaluation-<batch_date>-<run id>.json``: the summary of one evaluate run (the id
  of its MLflow parent run), written once; a second evaluate of the same interval writes its own.
* ``<data>/reports/evaluations.jsonl``: one line per finished run, appended after its file is
  complete (``{"batch_date", "run_id", "file", "written_at"}``); the newest run of a date is its
  last line there.

A data directory from before this layout holds one ``evaluation-<batch_date>.json`` per date
(overwritten by every run): it is still read for a date the index does not know.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

INDEX = "evaluations.jsonl"
_LEGACY = re.compile(r"^evaluation-\d{4}-\d{2}-\d{2}\.json$")


def evaluation_path(reports: Path, batch_date: str, run_id: str) -> Path:
    """The report file of evaluate run ``run_id`` for ``batch_date``."""
    return Path(reports) / f"evaluation-{batch_date}-{run_id}.json"


def write_evaluation(reports: Path, summary: dict) -> Path:
    """Write ``summary`` (with ``batch_date`` and ``evaluation_run``) as its own report file and
    append it to the index; returns the file. A file that already exists is never replaced."""
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    batch_date, run_id = summary["batch_date"], summary["evaluation_run"]
    path = evaluation_path(reports, batch_date, run_id)
    if path.exists():
        raise FileExistsError(f"{path}: evaluate run {run_id} already wrote its report; a report "
                              "is never overwritten (start a new evaluate run)")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)  # whole or absent: the index only ever names complete files
    line = {"batch_date": batch_date, "run_id": run_id, "file": path.name,
            "written_at": datetime.now(timezone.utc).isoformat()}
    index = reports / INDEX
    torn = False  # a line a crash cut short must not swallow this one
    if index.exists() and index.stat().st_size:
        with open(index, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(index, "a") as f:  # one short line per append (O_APPEND)
        f.write(("\n" if torn else "") + json.dumps(line) + "\n")
    return path


def evaluation_runs(reports: Path, batch_date: str | None = None) -> list[dict]:
    """The index's runs (of ``batch_date``, else of every date), oldest first, whose file exists."""
    index = Path(reports) / INDEX
    if not index.exists():
        return []
    runs = []
    for text in index.read_text().splitlines():
        try:
            row = json.loads(text)
        except ValueError:  # a line cut short by a crash mid-append: that run wrote no entry
            continue
        if (batch_date is None or row.get("batch_date") == batch_date) \
                and (Path(reports) / row.get("file", "")).is_file():
            runs.append(row)
    return runs


def latest_evaluation_path(reports: Path, batch_date: str | None = None) -> Path | None:
    """The newest evaluation report of ``batch_date`` (else of any date), or None."""
    reports = Path(reports)
    runs = evaluation_runs(reports, batch_date)
    if runs:
        return reports / runs[-1]["file"]
    if batch_date is not None:  # a data directory written before the index existed
        legacy = reports / f"evaluation-{batch_date}.json"
        return legacy if legacy.is_file() else None
    legacy = sorted(p for p in reports.glob("evaluation-*.json") if _LEGACY.match(p.name)) \
        if reports.is_dir() else []
    return legacy[-1] if legacy else None


def latest_evaluation(reports: Path, batch_date: str | None = None) -> tuple[Path, dict] | None:
    """(file, summary) of the newest evaluation report of ``batch_date`` (else of any date)."""
    path = latest_evaluation_path(reports, batch_date)
    return None if path is None else (path, json.loads(path.read_text()))


def evaluations(reports: Path) -> list[tuple[Path, dict]]:
    """Every evaluation report, newest first (the index's runs, then files from before it)."""
    reports = Path(reports)
    paths = [reports / r["file"] for r in reversed(evaluation_runs(reports))]
    if reports.is_dir():
        paths += sorted((p for p in reports.glob("evaluation-*.json") if _LEGACY.match(p.name)),
                        reverse=True)
    return [(p, json.loads(p.read_text())) for p in paths]
