"""The event rules (freshrec/contracts/events.py): one contract for RecordEvents and for clean.

What the server acknowledges, the batch keeps, with the weight the server folded in; the per-event
and the vectorized rules give the same reason on any row; the cases that used to disagree
(``ts="12345"``, far-future times, play counts as ``view`` values) are decided once.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from freshrec.data import importers
from freshrec.contracts.events import (REASONS, EventRules, parse_ts, rules_for, to_micros,
                                       value_text)
from freshrec.settings import SettingsError, load_settings
from tests.conftest import small_settings

NOW = datetime(2026, 11, 27, 15, 30, tzinfo=timezone.utc)
BATCH_END = datetime(2026, 11, 28, tzinfo=timezone.utc)  # the interval that ingests NOW's events
BASE = load_settings("local", env={})
RULES = rules_for(BASE)
TYPES = list(BASE.events.types)


def _batch(rows: list[dict], reference: datetime = BATCH_END) -> list[dict]:
    return RULES.check_table(pd.DataFrame(rows, columns=["event_id", "user_id", "item_id",
                                                         "event_type", "value", "ts"]),
                             reference).to_pylist()


# ---- strategies -------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_id = st.one_of(st.sampled_from(["u1", "item-9", " padded ", "", " ", "\t"]), _text,
                st.text("ab", min_size=120, max_size=140))
_instant = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2030, 1, 1),
                        timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=5,
                                                  minutes=30)), timezone(timedelta(hours=-8))]))


@st.composite
def _ts(draw) -> str:
    kind = draw(st.sampled_from(["iso", "iso_space", "iso_z", "iso_naive", "date", "epoch",
                                 "epoch_frac", "epoch_ms", "near_now", "text", "digits"]))
    dt = draw(_instant)
    if kind == "iso":
        return dt.isoformat(timespec=draw(st.sampled_from(["minutes", "seconds",
                                                           "milliseconds", "microseconds"])))
    if kind == "iso_space":
        return dt.isoformat(sep=" ")
    if kind == "iso_z":
        return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if kind == "iso_naive":
        return dt.replace(tzinfo=None).isoformat()
    if kind == "date":
        return dt.date().isoformat()
    if kind == "epoch":
        return str(int(dt.timestamp()))
    if kind == "epoch_frac":
        return f"{dt.timestamp():.{draw(st.integers(1, 9))}f}"
    if kind == "epoch_ms":
        return str(int(dt.timestamp() * 1000))
    if kind == "near_now":  # around the future bound
        return (NOW + timedelta(seconds=draw(st.integers(-3600, 2 * 86400)))).isoformat()
    if kind == "digits":
        return draw(st.text("0123456789.", min_size=1, max_size=16))
    return draw(_text)


_value = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                   st.integers(0, 500_000).map(float), st.floats(0, 5))
_raw_value = st.one_of(st.none(), st.just(""), _text,
                       _value.map(lambda v: None if v is None else repr(v)),
                       st.sampled_from(["+5", "5.", ".5", "1e3", "1E-2", " 4 ", "nan", "inf",
                                        "1e400", "0x10", "٣"]))
_event_type = st.one_of(st.sampled_from(TYPES), st.sampled_from(["hover", "", " view", "VIEW"]))


# ---- the properties ---------------------------------------------------------------------------
@hsettings(max_examples=400, deadline=None)
@given(user=_id, item=_id, etype=_event_type, value=_value, ts=st.one_of(st.just(""), _ts()),
       event_id=st.one_of(st.just(""), _id))
def test_what_the_rpc_rule_accepts_the_batch_rule_accepts_with_the_same_weight(
        user, item, etype, value, ts, event_id):
    ts = ts or NOW.isoformat()  # RecordEvents: an empty ts means now
    if RULES.check(user, item, etype, ts, value, event_id, reference=NOW) is not None:
        return
    # the raw row the write-ahead log lands, checked against the batch that ingests it
    row = {"event_id": event_id, "user_id": user, "item_id": item, "event_type": etype,
           "value": value_text(value), "ts": ts}
    [out] = _batch([row], BATCH_END)
    assert out["reason"] is None
    assert out["weight"] == RULES.weight(etype, value)  # equal, not close
    assert out["ts"] == datetime.fromtimestamp(0, timezone.utc) + timedelta(
        microseconds=parse_ts(ts))


@hsettings(max_examples=300, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({
    "event_id": st.one_of(st.none(), _id), "user_id": st.one_of(st.none(), _id),
    "item_id": st.one_of(st.none(), _id), "event_type": st.one_of(st.none(), _event_type),
    "value": _raw_value, "ts": st.one_of(st.none(), _ts())}), min_size=1, max_size=12))
def test_per_event_and_vectorized_rules_agree_on_every_row(rows):
    out = _batch(rows, NOW)
    for row, got in zip(rows, out):
        want = RULES.check(row["user_id"], row["item_id"], row["event_type"], row["ts"],
                           row["value"], row["event_id"], reference=NOW)
        assert got["reason"] == want, row
        if want is None:
            assert got["weight"] == RULES.weight(row["event_type"], row["value"]), row
        else:
            assert want in REASONS and got["weight"] is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serving.server import FreshrecServer

    s = FreshrecServer(small_settings(tmp_path_factory.mktemp("rules") / "data"), use_gpu=False)
    yield s
    s.wal.close()


@hsettings(max_examples=150, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=_id, item=_id, etype=_event_type, value=_value, ts=st.one_of(st.just(""), _ts()))
def test_record_events_acceptance_implies_batch_acceptance_with_the_folded_weight(
        server, user, item, etype, value, ts):
    """Through FreshrecServer's own methods: validate_event, event_record, note_events."""
    from serving.server import rec_pb2

    ev = rec_pb2.Event(user_id=user, item_id=item, event_type=etype, ts=ts,
                       **({} if value is None else {"value": value}))
    if server.validate_event(ev) is not None:
        return
    record = server.event_record(ev)
    server.note_events([record])
    folded = server.recent_events(record["user_id"])[-1]
    today_end = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0,
                                                   microsecond=0) + timedelta(days=1)
    [out] = _batch([record], today_end)
    assert out["reason"] is None
    assert folded == (out["item_id"], out["weight"])


# ---- the cases that used to disagree -----------------------------------------------------------
@pytest.mark.parametrize("ts, reason", [
    ("12345", "ts_too_old"),                      # epoch seconds: 1970-01-01T03:25:45Z
    ("2100-01-01T00:00:00Z", "ts_in_future"),
    ("4102444800", "ts_in_future"),               # 2100 as epoch seconds
    ("9999999999999", "ts_in_future"),            # epoch milliseconds, year 2286
    ("2026-02-30T00:00:00Z", "unparseable_ts"),   # no such day
    ("yesterday-ish", "unparseable_ts"),
    ("1989-12-31T23:59:59Z", "ts_too_old"),  # before events.earliest_ts (MovieLens 100K: 1997)
])
def test_bad_timestamps_are_refused_by_both_rules(ts, reason):
    assert RULES.check("u", "i", "view", ts, reference=NOW) == reason
    assert _batch([{"user_id": "u", "item_id": "i", "event_type": "view", "ts": ts}])[0][
        "reason"] == reason


def test_the_future_bound_is_the_skew_past_now_or_the_batch_end():
    skew = timedelta(seconds=BASE.events.max_future_skew_seconds)
    edge, past = (NOW + skew).isoformat(), (NOW + skew + timedelta(seconds=1)).isoformat()
    assert RULES.check("u", "i", "view", edge, reference=NOW) is None
    assert RULES.check("u", "i", "view", past, reference=NOW) == "ts_in_future"
    # the batch that ingests an event acknowledged at NOW ends later: it keeps it
    assert _batch([{"user_id": "u", "item_id": "i", "event_type": "view", "ts": edge}])[0][
        "reason"] is None


def test_record_events_refuses_what_clean_would_dead_letter(server):
    from serving.server import rec_pb2

    for ts, code in [("12345", "ts_too_old"), ("2100-01-01T00:00:00Z", "ts_in_future")]:
        reason = server.validate_event(rec_pb2.Event(user_id="u", item_id="i",
                                                     event_type="view", ts=ts))
        assert reason is not None and reason.endswith(f"({code})")
    assert server.validate_event(rec_pb2.Event(user_id="u", item_id="i", event_type="view",
                                               ts=datetime.now(timezone.utc).isoformat())) is None
    assert server.validate_event(rec_pb2.Event(user_id=" ", item_id="i", event_type="view")) \
        .startswith("user_id")
    assert server.validate_event(rec_pb2.Event(user_id="u", item_id="i", event_type="rating",
                                               value=9.0)).startswith("value")


def test_lastfm_play_counts_as_view_values_are_accepted_with_a_log1p_weight(settings, tmp_path):
    counts = [1, 2, 17, 250, 1_337, 24_902, 301_544]
    w = settings.events.types["view"]
    for c in counts:
        assert RULES.check("u", "artist", "view", "2026-11-01T00:00:00Z", float(c),
                           reference=NOW) is None
        assert RULES.weight("view", float(c)) == w * math.log1p(c)
    rows = [{"user_id": f"user_{n}", "item_id": f"artist_{n}", "event_type": "view",
             "value": str(c), "ts": "2026-11-01T00:00:00Z"} for n, c in enumerate(counts)]
    out = _batch(rows)
    assert [r["reason"] for r in out] == [None] * len(counts)
    assert [r["weight"] for r in out] == [w * math.log1p(c) for c in counts]
    # the importer lands them and says none will be refused
    path = tmp_path / "lastfm.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    landed = importers.import_events_file(settings, path, landed_at=NOW)
    assert landed.refused == {} and landed.refusal_summary == "none refused"


def test_ratings_out_of_range_are_refused_and_in_range_weigh_their_value():
    for v in (9.0, -1.0, 5.01):
        assert RULES.check("u", "i", "rating", "1762000000", v, reference=NOW) == \
            "value_out_of_range"
    for v in ("many", "nan", "inf"):
        assert RULES.check("u", "i", "rating", "1762000000", v, reference=NOW) == "bad_value"
    out = _batch([{"user_id": "u", "item_id": "i", "event_type": "rating", "value": v,
                   "ts": "1762000000"} for v in ("9", "-1", "4.5", "", "many")])
    assert [r["reason"] for r in out] == ["value_out_of_range", "value_out_of_range", None, None,
                                          "bad_value"]
    assert [r["weight"] for r in out][2:4] == [4.5 * BASE.events.types["rating"],
                                               BASE.events.types["rating"]]


def test_importer_counts_the_rows_the_rules_will_refuse_by_reason(settings, tmp_path, caplog):
    rows = [("u1", "i1", "view", "", "2026-11-01T00:00:00Z"),
            ("u2", "i1", "view", "", "12345"),
            ("u3", "i1", "view", "", "2100-01-01T00:00:00Z"),
            (" ", "i1", "view", "", "2026-11-01T00:00:00Z"),   # blank: missing, not pseudonymized
            ("u4", "i1", "rating", "42", "2026-11-01T00:00:00Z"),
            ("u5", "i1", "rating", "4", "2026-11-01T00:00:00Z")]
    path = tmp_path / "events.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "ts"]).to_csv(
        path, index=False)
    with caplog.at_level("INFO", logger="freshrec.data.importers"):
        landed = importers.import_events_file(settings, path, landed_at=NOW)
    assert landed.refused == {"ts_too_old": 1, "ts_in_future": 1, "missing_user_id": 1,
                              "value_out_of_range": 1}
    assert landed.refusal_summary == ("4 refused (missing_user_id 1, ts_too_old 1, "
                                      "ts_in_future 1, value_out_of_range 1)")
    assert "4 refused (" in caplog.text


# ---- settings ---------------------------------------------------------------------------------
def test_value_rules_are_per_type_and_old_keys_still_set_the_rating_range():
    ev = BASE.events
    assert ev.values["rating"].transform == "linear" and ev.values["rating"].max == 5.0
    assert ev.values["view"].transform == "log1p" and ev.values["view"].max >= 1e6
    old = load_settings("local", env={}, events={"value_min": 1.0, "value_max": 10.0})
    rules = EventRules.from_settings(old)
    assert rules.values["rating"].min == 1.0 and rules.values["rating"].max == 10.0
    assert rules.values["view"] == RULES.values["view"]  # only the linear (rating) types
    custom = load_settings("local", env={}, events={"types": {"play": 1.0},
                                                    "values": {"play": {"transform": "log1p"}}})
    assert EventRules.from_settings(custom).weight("play", "3") == math.log1p(3)
    # a type without a value rule uses default_value (constant: the value is only checked)
    other = load_settings("local", env={}, events={"types": {"like": 2.0}})
    assert EventRules.from_settings(other).weight("like", "7") == 2.0
    with pytest.raises(SettingsError, match="values.view"):
        load_settings("local", env={}, events={"values": {"view": {"min": -1.0}}})


def test_reasons_and_timestamp_grammar():
    assert to_micros(datetime(2026, 1, 1, tzinfo=timezone.utc)) == parse_ts("2026-01-01")
    assert parse_ts("2026-01-01T05:30:00+05:30") == parse_ts("2026-01-01T00:00:00Z") \
        == parse_ts("2026-01-01 00:00") == parse_ts("1767225600") == parse_ts("1767225600000")
    assert parse_ts("1767225600.5") == parse_ts("2026-01-01T00:00:00.5Z")
    assert parse_ts("٣") is None and parse_ts("2026-1-1") is None and parse_ts("") is None
    assert pa.array([r for r in REASONS]).null_count == 0 and len(set(REASONS)) == 9
