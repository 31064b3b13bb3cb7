"""Impressions intake, in every nearline round: every serving process's impression segments are
sealed and each record written into ``impressions`` once per ``request_id``; malformed records and
repeated request ids go to ``impressions_dead_letter`` with their reason
(:data:`freshrec.contracts.impressions.REASONS`). Exactly once per segment: the dead-letter rows and
then the impressions rows are appended (each skipping segments already there by ``source_file``,
the segment's content hash), then the segment is deleted; a round that dies in between is redone by
the next one without doubles."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from freshrec.contracts.events import parse_ts
from freshrec.contracts.impressions import RECORD_FIELDS, REQUIRED
from freshrec.settings import Settings
from freshrec.storage.delta import DeltaStore
from freshrec.storage.segments import (
    RECORD_PREFIX,
    impressions_root,
    flocked,
    line_text,
    process_dirs,
    read_record,
    remove_if_abandoned,
    seal,
)
from freshrec.storage.tables import IMPRESSIONS, IMPRESSIONS_DEAD_LETTER

log = logging.getLogger(__name__)


class _Undecodable:
    """A line that is neither JSON nor a readable record line of :data:`RECORD_FIELDS`."""

    def __init__(self, why: str) -> None:
        self.why = why


def _parse(line: bytes, server: str):
    """A record (dict) from a JSON line or a record line, or what made it unreadable."""
    if line.startswith(RECORD_PREFIX):
        try:
            rec = read_record(line)
        except ValueError as e:
            return _Undecodable(str(e))
        if not isinstance(rec, tuple) or len(rec) != len(RECORD_FIELDS):
            return _Undecodable(f"a record line must hold a tuple of the {len(RECORD_FIELDS)} "
                                f"fields {', '.join(RECORD_FIELDS)}")
        out = dict(zip(RECORD_FIELDS, rec))
        out["server"] = server
        return out
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _readable(line: bytes, rec) -> str:
    """A dead-lettered line as text in which its strings (the user id included) appear as
    written, so that an erasure's ``raw LIKE '%<id>%'`` finds it: a decoded record line as JSON
    of its fields, an undecodable one as its pickle bytes (strings are UTF-8 there) with other
    bytes backslash-escaped, a JSON line as itself."""
    if line.startswith(RECORD_PREFIX):
        if isinstance(rec, dict):
            return json.dumps(rec, ensure_ascii=False, default=repr)
        return line_text(line).decode("utf-8", "backslashreplace")
    return line.decode("utf-8", "backslashreplace")


def _check(rec, seen: set[str]) -> tuple[dict | None, str | None]:
    """(typed row, None) or (None, reason)."""
    if isinstance(rec, _Undecodable):
        return None, f"not_decodable: {rec.why}"
    if not isinstance(rec, dict):
        return None, "not_json"
    for f in REQUIRED:
        v = rec.get(f)
        if v is None or v == "" or v == []:
            return None, f"missing_field: {f}"
    items = rec["items"]
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        return None, "bad_items: items must be a list of non-empty item ids"
    if not all(isinstance(rec[f], str) for f in ("request_id", "user_id", "model_version")):
        return None, "missing_field: request_id, user_id and model_version must be text"
    n = len(items)
    positions = rec.get("positions")
    positions = list(range(n)) if positions is None else positions
    scores, props = rec.get("scores"), rec.get("propensities")
    for name, col in (("positions", positions), ("scores", scores), ("propensities", props)):
        if col is not None and (not isinstance(col, list) or len(col) != n):
            return None, f"length_mismatch: {name} does not match the {n} items"
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in positions):
        return None, "length_mismatch: positions must be non-negative integers"
    if scores is not None and not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                      and math.isfinite(s) for s in scores):
        return None, "bad_score: scores must be finite numbers"
    if props is not None and not all(isinstance(p, (int, float)) and not isinstance(p, bool)
                                     and 0 < p <= 1 for p in props):
        return None, "bad_propensity: propensities must be in (0, 1]"
    cands, cscores = rec.get("candidates"), rec.get("candidate_scores")
    if cands is not None and (not isinstance(cands, list)
                              or not all(isinstance(i, str) and i for i in cands)):
        return None, "bad_candidates: candidates must be a list of non-empty item ids"
    if cscores is not None and (cands is None or not isinstance(cscores, list)
                                or len(cscores) != len(cands)
                                or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                           and math.isfinite(x) for x in cscores)):
        return None, "bad_candidates: candidate_scores must be finite numbers, one per candidate"
    ts = rec["ts"]
    us = ts if isinstance(ts, int) and not isinstance(ts, bool) else \
        parse_ts(ts) if isinstance(ts, str) else None
    if us is None:
        return None, "bad_ts: ts must be epoch microseconds or ISO-8601"
    if rec["request_id"] in seen:
        return None, "duplicate_request_id"
    seen.add(rec["request_id"])
    arm = rec.get("arm")
    return {"request_id": rec["request_id"], "user_id": rec["user_id"],
            "model_version": rec["model_version"], "arm": arm if isinstance(arm, str) else None,
            "items": items, "positions": positions,
            "scores": [float(s) for s in scores] if scores is not None else None,
            "propensities": [float(p) for p in props] if props is not None else None,
            "ts": us, "server": rec.get("server") if isinstance(rec.get("server"), str) else None,
            "candidates": cands,
            "candidate_scores": [float(x) for x in cscores] if cscores is not None else None},\
        None


def _day(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, timezone.utc).strftime("%Y-%m-%d")


def take_impressions(settings: Settings, crash=None) -> dict:
    """Seal every server's impression log and take the sealed segments into the tables (see the
    module docstring); returns counts."""
    from freshrec.storage.segments import read_lines

    crash = crash or (lambda name: None)
    root = impressions_root(settings)
    report = {"segments": 0, "impressions": 0, "dead_letter": 0}
    if not root.exists():
        return report
    store = DeltaStore(settings)
    lock = settings.data_dir / "refresher" / "impressions.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with flocked(lock):
        dirs = process_dirs(root)
        for d in dirs:
            seal(d)
        segments = [s for d in dirs for s in sorted(d.glob("sealed-*.jsonl"))]
        if not segments:
            for d in dirs:
                remove_if_abandoned(d)
            return report
        sources = {}
        from freshrec.storage.crypto import cipher_for

        cipher = cipher_for(settings)
        for seg in segments:
            data, lines = read_lines(seg, cipher)
            sources[seg] = ("imp" + hashlib.sha256(data).hexdigest()[:21], lines)
        ids = [sid for sid, _ in sources.values()]
        done_imp = set(store.read_arrow("impressions", columns=["source_file"], filter=pc.field(
            "source_file").isin(ids)).column("source_file").to_pylist())
        done_dead = set(store.read_arrow("impressions_dead_letter", columns=["source_file"],
                                         filter=pc.field("source_file").isin(ids))
                        .column("source_file").to_pylist())
        # request ids already in the table from OTHER segments (a redone segment's own rows are
        # not duplicates of themselves)
        seen: set[str] = set()
        good, bad = [], []
        today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        parsed = []
        for seg, (sid, lines) in sources.items():
            server = seg.parent.name  # the writing process's name (ImpressionLog.server)
            recs = [(line, _parse(line, server)) for line in lines]
            parsed.append((sid, recs))
        candidates = [r.get("request_id") for _, recs in parsed for _, r in recs
                      if isinstance(r, dict) and isinstance(r.get("request_id"), str)]
        own = set(ids)
        if candidates:
            stored = store.read_arrow("impressions", columns=["request_id", "source_file"],
                                      filter=pc.field("request_id").isin(candidates))
            seen = {r for r, s in zip(stored.column("request_id").to_pylist(),
                                      stored.column("source_file").to_pylist())
                    if s not in own}
        for sid, recs in parsed:
            for line, rec in recs:
                row, reason = _check(rec, seen)
                if row is not None:
                    row.update(source_file=sid, served_date=_day(row["ts"]))
                    good.append(row)
                else:
                    ts = rec.get("ts") if isinstance(rec, dict) else None
                    us = ts if isinstance(ts, int) and not isinstance(ts, bool) else None
                    bad.append({"raw": _readable(line, rec), "reason": reason,
                                "source_file": sid, "served_date": _day(us) if us else today})
        dead = [r for r in bad if r["source_file"] not in done_dead]
        if dead:
            store.write_arrow("impressions_dead_letter",
                              pa.Table.from_pylist(dead, schema=IMPRESSIONS_DEAD_LETTER.schema))
        crash("impressions_after_dead_letter")
        rows = [r for r in good if r["source_file"] not in done_imp]
        if rows:
            as_int = pa.schema([f.with_type(pa.int64()) if f.name == "ts" else f
                                for f in IMPRESSIONS.schema])
            table = pa.Table.from_pylist(rows, schema=as_int)
            table = table.set_column(table.schema.get_field_index("ts"), "ts",
                                     table.column("ts").cast(IMPRESSIONS.schema.field("ts").type))
            store.write_arrow("impressions", table)
        crash("impressions_after_table")
        for seg in segments:
            seg.unlink()
        for d in dirs:
            remove_if_abandoned(d)
        report.update(segments=len(segments), impressions=len(rows), dead_letter=len(dead))
        if rows or dead:
            log.info("impressions: %s", report)
        return report
