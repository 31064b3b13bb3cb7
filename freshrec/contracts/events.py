"""The event rules: what an event must look like to count, and what it weighs.

One module for both doors an event comes in by, so they cannot disagree: ``RecordEvents`` checks
each event with :meth:`EventRules.check` before acknowledging it and folds it into the user's
vector with :meth:`EventRules.weight`; the batch ``clean`` job runs :meth:`EventRules.check_table`
over bronze (inside Spark, on Arrow batches) and writes its weight to silver ``events.weight``; the
importers count with :meth:`EventRules.refusals` what the batch will refuse. An event that the
server accepts is accepted by the batch, with the same weight (``tests/test_event_rules.py``).

Text fields are trimmed of ASCII whitespace (`` \\t\\n\\r\\f\\v``) first. The checks, in order; the
first that fails is the reason (the dead-letter code):

1. ``missing_user_id`` / ``missing_item_id``: null or blank.
2. ``id_too_long``: user_id, item_id or event_id longer than ``events.max_id_length`` characters.
3. ``unparseable_ts``: ``ts`` is neither epoch seconds (``[0-9]{1,13}(.[0-9]+)?``; an integer part
   of 10^11 or more is milliseconds) nor ISO-8601 ``YYYY-MM-DD[(T| )HH:MM[:SS[.f{1,9}]][Z|±HH[:MM]]]``
   (no zone means UTC; fractions beyond microseconds are cut), or names no real instant (month 13).
4. ``ts_too_old``: before ``events.earliest_ts``.
5. ``ts_in_future``: more than ``events.max_future_skew_seconds`` after the reference instant: now
   for ``RecordEvents``, the data interval's end for ``clean``, the end of the landing day for the
   importers. (An event acknowledged at ``now`` lands in a batch whose end is later, so the batch's
   bound is never stricter than the server's.)
6. ``unknown_event_type``: not a key of ``events.types`` (exact, case-sensitive).
7. ``bad_value``: a value is given but is not a finite decimal number
   (``[+-]?(digits[.digits]|.digits)[e[+-]digits]``; ``nan``/``inf`` and overflow are bad).
8. ``value_out_of_range``: outside ``[min, max]`` of the event type's value rule
   (``events.values[type]``, else ``events.default_value``).

Weight (the confidence the models see), for an accepted event of type ``t`` with type weight ``w``:
no value: ``w``; with value ``v`` by the type's transform: ``linear`` ``w * v`` (ratings),
``log1p`` ``w * log1p(v)`` (counts, durations: play counts), ``constant`` ``w`` (the value is kept
in ``events.value`` but not weighed: quantities, amounts). Both paths compute it with the same
IEEE operations (``math.log1p``), so the numbers are equal, not merely close.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:  # pragma: no cover
    from freshrec.settings import EventSettings, Settings

REASONS = ("missing_user_id", "missing_item_id", "id_too_long", "unparseable_ts", "ts_too_old",
           "ts_in_future", "unknown_event_type", "bad_value", "value_out_of_range")
TRANSFORMS = ("linear", "log1p", "constant")
WHITESPACE = " \t\n\r\f\v"
TEXT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "value", "ts")
MS_EPOCH_FROM = 10 ** 11  # an epoch integer part this large is milliseconds (10^11 s: year 5138)

_EPOCH = r"(?P<es>[0-9]{1,13})(?:\.(?P<ef>[0-9]+))?"
_ISO = (r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
        r"(?:[Tt ](?P<h>[0-9]{2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?:[.,](?P<f>[0-9]{1,9}))?)?"
        r"(?P<z>[Zz]|(?P<zs>[+-])(?P<zh>[0-9]{2})(?::?(?P<zm>[0-9]{2}))?)?)?")
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_EPOCH_RE, _ISO_RE, _NUMBER_RE = re.compile(_EPOCH), re.compile(_ISO), re.compile(_NUMBER)
_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)
_EPOCH_DT = datetime(1970, 1, 1, tzinfo=timezone.utc)
TS_TYPE = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class ValueRule:
    min: float
    max: float
    transform: str  # one of TRANSFORMS


# ---- shared arithmetic (Python ints or numpy int64 arrays alike) --------------------------------
def _civil_ok(y, mo, d, h, mi, s, zh, zm):
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    dim = _DAYS_IN_MONTH[np.clip(mo, 1, 12) - 1] + ((mo == 2) & leap) * 1
    return ((y >= 1) & (mo >= 1) & (mo <= 12) & (d >= 1) & (d <= dim) & (h <= 23) & (mi <= 59)
            & (s <= 59) & (zh <= 23) & (zm <= 59))


def _civil_us(y, mo, d, h, mi, s, us, offset_min):
    """Microseconds since the epoch of a proleptic Gregorian UTC wall time minus an offset."""
    yy = y - (mo <= 2) * 1
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * ((mo + 9) % 12) + 2) // 5 + d - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return ((days * 24 + h) * 60 + mi - offset_min) * 60_000_000 + s * 1_000_000 + us


def _epoch_us(secs, frac6, frac3, is_ms):
    """Epoch seconds (or milliseconds when ``is_ms``) plus the fraction's first digits -> us."""
    if isinstance(secs, np.ndarray):
        return np.where(is_ms, secs * 1000 + frac3, np.where(is_ms, 0, secs) * 1_000_000 + frac6)
    return secs * 1000 + frac3 if is_ms else secs * 1_000_000 + frac6


def to_micros(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt - _EPOCH_DT) // timedelta(microseconds=1)


def _trim(v: Any) -> str | None:
    if v is None:
        return None
    return (v if isinstance(v, str) else str(v)).strip(WHITESPACE)


def parse_ts(text: Any) -> int | None:
    """One ``ts`` text -> microseconds since the epoch (UTC), or None when it is not a time."""
    t = _trim(text)
    if not t:
        return None
    m = _EPOCH_RE.fullmatch(t)
    if m:
        secs, frac = int(m["es"]), m["ef"] or ""
        return int(_epoch_us(secs, int(frac[:6].ljust(6, "0")), int(frac[:3].ljust(3, "0")),
                             secs >= MS_EPOCH_FROM))
    m = _ISO_RE.fullmatch(t)
    if not m:
        return None
    g = {k: int(m[k]) if m[k] else 0 for k in ("y", "mo", "d", "h", "mi", "s", "zh", "zm")}
    if not bool(_civil_ok(g["y"], g["mo"], g["d"], g["h"], g["mi"], g["s"], g["zh"], g["zm"])):
        return None
    us = int((m["f"] or "")[:6].ljust(6, "0"))
    offset = (g["zh"] * 60 + g["zm"]) * (-1 if m["zs"] == "-" else 1)
    return int(_civil_us(g["y"], g["mo"], g["d"], g["h"], g["mi"], g["s"], us, offset))


def parse_value(value: Any) -> tuple[float | None, bool]:
    """``(number or None, bad)``: None/blank is no value; a float must be finite; text must be a
    decimal number that parses to a finite float."""
    if value is None:
        return None, False
    if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
        v = float(value)
        return (v, False) if math.isfinite(v) else (None, True)
    t = _trim(value)
    if not t:
        return None, False
    if not _NUMBER_RE.fullmatch(t):
        return None, True
    v = float(t)
    return (v, False) if math.isfinite(v) else (None, True)


def value_text(value: float | None) -> str | None:
    """How a numeric value is written into a raw (text) event row: ``repr``, which round-trips."""
    return None if value is None else repr(float(value))


# ---- the rules --------------------------------------------------------------------------------
class EventRules:
    """The event rules of one settings tree (see the module docstring)."""

    def __init__(self, weights: Mapping[str, float], values: Mapping[str, ValueRule],
                 default_value: ValueRule, max_id_length: int, earliest: datetime,
                 max_future_skew: timedelta) -> None:
        self.weights = dict(weights)
        self.values = {t: values.get(t, default_value) for t in self.weights}
        self.max_id_length = max_id_length
        self.earliest = earliest if earliest.tzinfo else earliest.replace(tzinfo=timezone.utc)
        self.earliest_us = to_micros(self.earliest)
        self.max_future_skew = max_future_skew
        self.skew_us = max_future_skew // timedelta(microseconds=1)

    @classmethod
    def from_settings(cls, settings: "Settings | EventSettings") -> "EventRules":
        ev = getattr(settings, "events", settings)
        rule = lambda r: ValueRule(float(r.min), float(r.max), r.transform)  # noqa: E731
        return cls(ev.types, {t: rule(r) for t, r in ev.values.items()}, rule(ev.default_value),
                   ev.max_id_length, datetime.fromisoformat(ev.earliest_ts),
                   timedelta(seconds=ev.max_future_skew_seconds))

    def _latest_us(self, reference: datetime | None) -> int:
        return to_micros(reference or datetime.now(timezone.utc)) + self.skew_us

    # -- one event (RecordEvents) ---------------------------------------------------------------
    def check(self, user_id: Any, item_id: Any, event_type: Any, ts: Any, value: Any = None,
              event_id: Any = None, *, reference: datetime | None = None) -> str | None:
        """None when the event is accepted, else its reason code (one of :data:`REASONS`).
        ``value``: a number or its text; ``reference``: the instant ``ts`` may not exceed by more
        than the skew (default now)."""
        user, item, eid = _trim(user_id), _trim(item_id), _trim(event_id)
        if not user:
            return "missing_user_id"
        if not item:
            return "missing_item_id"
        if max(len(user), len(item), len(eid or "")) > self.max_id_length:
            return "id_too_long"
        us = parse_ts(ts)
        if us is None:
            return "unparseable_ts"
        if us < self.earliest_us:
            return "ts_too_old"
        if us > self._latest_us(reference):
            return "ts_in_future"
        etype = _trim(event_type)
        if etype not in self.weights:
            return "unknown_event_type"
        v, bad = parse_value(value)
        if bad:
            return "bad_value"
        rule = self.values[etype]
        if v is not None and not (rule.min <= v <= rule.max):
            return "value_out_of_range"
        return None

    def weight(self, event_type: Any, value: Any = None) -> float:
        """The confidence weight of an accepted event (see the module docstring)."""
        etype = _trim(event_type)
        w = float(self.weights[etype])
        v, bad = parse_value(value)
        if bad:
            raise ValueError(f"value {value!r} is not a finite number")
        transform = self.values[etype].transform
        if v is None or transform == "constant":
            return w
        return w * v if transform == "linear" else w * math.log1p(v)

    def explain(self, reason: str, *, event_type: Any = None, value: Any = None,
                ts: Any = None) -> str:
        """A sentence for a refused event (what RecordEvents answers), ending in the code."""
        etype = _trim(event_type)
        rule = self.values.get(etype or "")
        text = {
            "missing_user_id": "user_id is empty",
            "missing_item_id": "item_id is empty",
            "id_too_long": f"an id is longer than {self.max_id_length} characters",
            "unparseable_ts": f"ts {ts!r} is neither ISO-8601 nor epoch seconds",
            "ts_too_old": f"ts {ts!r} is before {self.earliest.isoformat()}",
            "ts_in_future": f"ts {ts!r} is more than {self.max_future_skew.total_seconds():g} s "
                            "in the future",
            "unknown_event_type": f"unknown event_type {event_type!r}; known: "
                                  f"{sorted(self.weights)}",
            "bad_value": f"value {value!r} is not a finite number",
            "value_out_of_range": f"value {value!r} outside [{rule.min:g}, {rule.max:g}] for "
                                  f"event_type {etype!r}" if rule else f"value {value!r} out of range",
        }.get(reason, reason)
        return f"{text} ({reason})"

    # -- a batch (clean, importers) -------------------------------------------------------------
    def check_table(self, table: pa.Table | pa.RecordBatch | pd.DataFrame,
                    reference: datetime) -> pa.Table:
        """Every row of ``table`` (text columns ``user_id, item_id, event_type, ts`` and optional
        ``value, event_id``; other columns are ignored) checked at once. Returns, row for row:
        ``reason`` (null: accepted), ``ts`` (UTC timestamp), ``value`` (float), ``weight`` (null
        when refused) and the trimmed ``user_id, item_id, event_type, event_id`` (a blank
        event_id is null). ``reference``: the batch's end."""
        t = _as_arrow(table)
        n = t.num_rows
        cols = {c: _trimmed(_text_column(t, c, n)) for c in TEXT_COLUMNS}
        blank = {c: _np_bool(pc.equal(pc.utf8_length(cols[c]), 0), True) for c in TEXT_COLUMNS}
        length = lambda c: np.nan_to_num(  # noqa: E731
            pc.utf8_length(cols[c]).to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0)
        too_long = (length("user_id") > self.max_id_length) | (length("item_id") >
                                                               self.max_id_length) \
            | (length("event_id") > self.max_id_length)
        ts_us, ts_ok = _parse_ts_array(cols["ts"], n)
        etype = cols["event_type"]
        known = _np_bool(pc.is_in(etype, value_set=pa.array(list(self.weights), pa.string())),
                         False)
        value, value_bad = _parse_value_array(cols["value"], blank["value"], n)
        w = np.zeros(n)
        lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
        transform = np.zeros(n, np.int8)
        for name, weight in self.weights.items():
            m = _np_bool(pc.equal(etype, name), False)
            rule = self.values[name]
            w[m], lo[m], hi[m] = weight, rule.min, rule.max
            transform[m] = TRANSFORMS.index(rule.transform)
        has_value = ~np.isnan(value)
        checks = [
            ("missing_user_id", blank["user_id"]),
            ("missing_item_id", blank["item_id"]),
            ("id_too_long", too_long),
            ("unparseable_ts", ~ts_ok),
            ("ts_too_old", ts_ok & (ts_us < self.earliest_us)),
            ("ts_in_future", ts_ok & (ts_us > self._latest_us(reference))),
            ("unknown_event_type", ~known),
            ("bad_value", value_bad),
            ("value_out_of_range", has_value & ((value < lo) | (value > hi))),
        ]
        reason = np.full(n, None, object)
        open_ = np.ones(n, bool)
        for code, failed in checks:
            hit = open_ & failed
            reason[hit] = code
            open_ &= ~hit
        weight = w.copy()
        lin = open_ & has_value & (transform == TRANSFORMS.index("linear"))
        weight[lin] = w[lin] * value[lin]
        logs = open_ & has_value & (transform == TRANSFORMS.index("log1p"))
        if logs.any():
            weight[logs] = w[logs] * np.fromiter(map(math.log1p, value[logs].tolist()),
                                                 np.float64, int(logs.sum()))
        return pa.table({
            "reason": pa.array(reason, pa.string()),
            "ts": pa.array(np.where(ts_ok, ts_us, 0), pa.int64(), mask=~ts_ok).cast(TS_TYPE),
            "value": pa.array(value, pa.float64(), mask=~has_value),
            "weight": pa.array(weight, pa.float64(), mask=~open_),
            "user_id": cols["user_id"], "item_id": cols["item_id"],
            "event_type": cols["event_type"],
            "event_id": pc.if_else(pa.array(blank["event_id"]), pa.scalar(None, pa.string()),
                                   cols["event_id"]),
        })

    def refusals(self, table: pa.Table | pd.DataFrame, reference: datetime) -> dict[str, int]:
        """Rows the rules refuse, by reason (reasons with no row are left out)."""
        counts = self.check_table(table, reference).column("reason").value_counts()
        return {r.as_py(): c.as_py() for r, c in zip(counts.field("values"),
                                                       counts.field("counts"))
                if r.as_py() is not None}


def describe_refusals(refused: Mapping[str, int]) -> str:
    """``"3 refused (ts_in_future 2, bad_value 1)"`` or ``"none refused"``."""
    if not refused:
        return "none refused"
    parts = ", ".join(f"{r} {refused[r]:,}" for r in REASONS if refused.get(r)) or \
        ", ".join(f"{r} {c:,}" for r, c in refused.items())
    return f"{sum(refused.values()):,} refused ({parts})"


# ---- vectorized helpers -----------------------------------------------------------------------
def _as_arrow(table: pa.Table | pa.RecordBatch | pd.DataFrame) -> pa.Table:
    if isinstance(table, pd.DataFrame):
        return pa.Table.from_pandas(table, preserve_index=False)
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    return table


def _text_column(t: pa.Table, name: str, n: int) -> pa.Array:
    if name not in t.column_names:
        return pa.nulls(n, pa.string())
    col = t.column(name).combine_chunks()
    if pa.types.is_floating(col.type):
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col if pa.types.is_string(col.type) else col.cast(pa.string())


def _trimmed(col: pa.Array) -> pa.Array:
    return pc.utf8_trim(col, characters=WHITESPACE)


def _np_bool(arr: pa.Array, null_as: bool) -> np.ndarray:
    return pc.fill_null(arr, null_as).to_numpy(zero_copy_only=False).astype(bool)


def _ints(col: pa.Array, default: int = 0) -> np.ndarray:
    """Digit strings (``""`` or null: ``default``) -> int64."""
    col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
    return pc.fill_null(col.cast(pa.int64()), default).to_numpy(zero_copy_only=False)


def _anchored(pattern: str) -> str:
    return f"^(?:{pattern})$"


def _parse_ts_array(ts: pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    ts = pc.fill_null(ts, "")
    us, ok = np.zeros(n, np.int64), np.zeros(n, bool)
    epoch = pc.extract_regex(ts, _anchored(_EPOCH))
    is_epoch = _np_bool(epoch.is_valid(), False)
    if is_epoch.any():
        e = epoch.filter(pa.array(is_epoch))
        secs = _ints(e.field("es"))
        frac = pc.utf8_rpad(e.field("ef"), width=6, padding="0")
        frac6 = _ints(pc.utf8_slice_codeunits(frac, 0, 6))
        frac3 = _ints(pc.utf8_slice_codeunits(frac, 0, 3))
        us[is_epoch] = _epoch_us(secs, frac6, frac3, secs >= MS_EPOCH_FROM)
        ok[is_epoch] = True
    iso = pc.extract_regex(ts, _anchored(_ISO))
    is_iso = _np_bool(iso.is_valid(), False) & ~is_epoch
    if is_iso.any():
        s = iso.filter(pa.array(is_iso))
        g = {k: _ints(s.field(k)) for k in ("y", "mo", "d", "h", "mi", "s", "zh", "zm")}
        frac = _ints(pc.utf8_slice_codeunits(pc.utf8_rpad(s.field("f"), width=6, padding="0"),
                                             0, 6))
        sign = np.where(_np_bool(pc.equal(s.field("zs"), "-"), False), -1, 1)
        valid = _civil_ok(g["y"], g["mo"], g["d"], g["h"], g["mi"], g["s"], g["zh"], g["zm"])
        stamp = _civil_us(g["y"], g["mo"], g["d"], g["h"], g["mi"], g["s"], frac,
                          (g["zh"] * 60 + g["zm"]) * sign)
        idx = np.flatnonzero(is_iso)
        us[idx] = np.where(valid, stamp, 0)
        ok[idx] = valid
    return us, ok


def _parse_value_array(value: pa.Array, blank: np.ndarray, n: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """(float values, NaN where none or bad; bad mask)."""
    out = np.full(n, np.nan)
    numeric = _np_bool(pc.match_substring_regex(value, _anchored(_NUMBER)), False)
    given = ~blank
    if numeric.any():
        texts = value.filter(pa.array(numeric))
        try:
            parsed = texts.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # Python's float() decides
            parsed = np.array([float(v) for v in texts.to_pylist()], np.float64)
        out[numeric] = parsed
    finite = np.isfinite(out)
    out[~finite] = np.nan
    return out, given & ~finite


# ---- one rules object per settings tree --------------------------------------------------------
_cache: dict[int, tuple[Any, EventRules]] = {}
_cache_lock = threading.Lock()


def rules_for(settings: "Settings | EventSettings") -> EventRules:
    """The :class:`EventRules` of a settings tree, built once per (immutable) tree."""
    ev = getattr(settings, "events", settings)
    with _cache_lock:
        hit = _cache.get(id(ev))
        if hit is not None and hit[0] is ev:
            return hit[1]
        rules = EventRules.from_settings(ev)
        if len(_cache) > 64:
            _cache.clear()
        _cache[id(ev)] = (ev, rules)
        return rules
