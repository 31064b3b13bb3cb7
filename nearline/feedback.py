"""The feedback join: ``impressions`` x later silver ``events`` -> ``feedback`` (vectorized Arrow).

Labels, with ``w`` = ``feedback.window_minutes``:

* one row per shown item (``request_id``, ``item_id``): ``clicked`` when the user had an event on
  that item in ``(impression ts, impression ts + w]``; the first such event gives ``reward`` (its
  silver ``weight``), ``event_id``, ``event_type``, ``event_ts``; not clicked: reward 0. An event
  after the window does not click the impression;
* one row per event on an item that was not shown to the user in ``[event ts - w, event ts)``:
  ``organic`` = true, ``request_id`` null (clicks with no impression, or with an impression the
  attribution window had closed on). An event attributed to an impression is not organic.

Incremental by a watermark ``W`` stored in the commit that wrote the rows (custom commit metadata
``freshrec.feedback_watermark``, so the rows and the checkpoint move in one atomic commit): a run at
``now`` labels the impressions with ``ts`` in ``[W_old - w, W_new - w)`` and the organic events
with ``ts`` in ``[W_old, W_new)``, where ``W_new = now - feedback.settle_minutes`` (how late events
and impressions may reach the tables). The first run starts at the earliest impression. A re-run
at the same ``now`` finds nothing to do and commits nothing. Events that reach silver after the
watermark passed their ``ts`` (clients reporting old timestamps, a round down for longer than the
settle time) are not labelled. Rows take ``batch_date`` = the impression's ``served_date`` (the
event's day for organic rows). Runs in every nearline round (``feedback.in_nearline``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, write_deltalake

from freshrec.storage.delta import DeltaStore, conform
from freshrec.settings import Settings
from freshrec.storage.tables import FEEDBACK, TS
from freshrec.storage.segments import flocked

log = logging.getLogger(__name__)
WATERMARK_KEY = "freshrec.feedback_watermark"


def watermark(store: DeltaStore) -> datetime | None:
    """The newest watermark committed with feedback rows (None before the first run)."""
    if not store.exists("feedback"):
        return None
    table = store.table("feedback")
    for limit in (50, None):  # the newest commits first; the whole log only when they lack it
        for commit in table.history(limit):
            value = commit.get(WATERMARK_KEY)
            if value:
                return datetime.fromisoformat(value)
    return None


def explode(impressions: pa.Table) -> pa.Table:
    """One row per shown item of each slate."""
    items = impressions.column("items").combine_chunks()
    parent = pc.list_parent_indices(items)
    flat = lambda c: pc.list_flatten(impressions.column(c).combine_chunks())  # noqa: E731
    base = impressions.select(["request_id", "user_id", "model_version", "arm", "ts",
                               "served_date"]).take(parent)
    n = len(parent)
    scores = flat("scores") if impressions.column("scores").null_count == 0 else None
    props = flat("propensities") if impressions.column("propensities").null_count == 0 else None
    return pa.table({
        "request_id": base.column("request_id"), "user_id": base.column("user_id"),
        "model_version": base.column("model_version"), "arm": base.column("arm"),
        "item_id": pc.list_flatten(items), "position": flat("positions").cast(pa.int32()),
        "score": scores if scores is not None and len(scores) == n
        else _per_item(impressions, "scores", parent),
        "propensity": props if props is not None and len(props) == n
        else _per_item(impressions, "propensities", parent),
        "impression_ts": base.column("ts"), "batch_date": base.column("served_date")})


def _per_item(impressions: pa.Table, col: str, parent: pa.Array) -> pa.Array:
    """A list column some slates lack (null lists): per shown item, null where missing."""
    values = impressions.column(col).to_pylist()
    counts = [len(v) for v in impressions.column("items").to_pylist()]
    out = []
    for v, c in zip(values, counts):
        out.extend(v if v is not None else [None] * c)
    return pa.array(out, pa.float64())


def label(shown: pa.Table, events: pa.Table, window: timedelta, organic_from: datetime,
          organic_to: datetime, label_to: datetime) -> pa.Table:
    """The feedback rows for the shown items with ``impression_ts < label_to`` and the events with
    ``ts`` in ``[organic_from, organic_to)`` (see the module docstring). ``shown``: :func:`explode`
    rows; ``events``: silver rows (event_id, user_id, item_id, event_type, weight, ts)."""
    w_us = int(window / timedelta(microseconds=1))
    shown = shown.append_column("_row", pa.array(np.arange(shown.num_rows, dtype=np.int64)))
    ev = events.select(["event_id", "user_id", "item_id", "event_type", "weight", "ts"])
    pairs = shown.select(["_row", "user_id", "item_id", "impression_ts"]).join(
        ev, keys=["user_id", "item_id"], join_type="inner")
    imp_us = pc.cast(pairs.column("impression_ts"), pa.int64()).to_numpy()
    ev_us = pc.cast(pairs.column("ts"), pa.int64()).to_numpy()
    inside = (ev_us > imp_us) & (ev_us <= imp_us + w_us)
    hits = pairs.filter(pa.array(inside))
    # clicks: per shown row the first event inside its window
    label_mask = pc.less(shown.column("impression_ts"),
                         pa.scalar(label_to, TS)).to_numpy(zero_copy_only=False)
    rows = shown.filter(pa.array(label_mask))
    n = rows.num_rows
    first = hits.sort_by([("_row", "ascending"), ("ts", "ascending"), ("event_id", "ascending")])
    r = first.column("_row").to_numpy()
    keep = np.r_[True, r[1:] != r[:-1]] if len(r) else np.zeros(0, bool)
    first = first.filter(pa.array(keep))
    at = np.full(shown.num_rows, -1, np.int64)
    at[first.column("_row").to_numpy()] = np.arange(first.num_rows)
    pos = at[rows.column("_row").to_numpy()]
    clicked = pos >= 0
    take = pa.array(np.where(clicked, pos, 0))
    mask = pa.array(~clicked)

    def ev_col(name: str) -> pa.Array:
        col = first.column(name).combine_chunks() if first.num_rows else \
            pa.nulls(0, first.schema.field(name).type)
        if not len(col):
            return pa.nulls(n, col.type)
        return pc.if_else(mask, pa.scalar(None, col.type), col.take(take))

    reward = ev_col("weight")
    labelled = pa.table({
        "request_id": rows.column("request_id"), "user_id": rows.column("user_id"),
        "model_version": rows.column("model_version"), "arm": rows.column("arm"),
        "item_id": rows.column("item_id"), "position": rows.column("position"),
        "score": rows.column("score"), "propensity": rows.column("propensity"),
        "clicked": pa.array(clicked), "reward": pc.fill_null(reward, 0.0),
        "impression_ts": rows.column("impression_ts"), "event_id": ev_col("event_id"),
        "event_type": ev_col("event_type"), "event_ts": ev_col("ts"),
        "organic": pa.array(np.zeros(n, bool)), "batch_date": rows.column("batch_date")})
    # organic: events in [organic_from, organic_to) with no shown item in the window before
    in_range = pc.and_(pc.greater_equal(ev.column("ts"), pa.scalar(organic_from, TS)),
                       pc.less(ev.column("ts"), pa.scalar(organic_to, TS)))
    candidates = ev.filter(in_range)
    attributed = hits.column("event_id")
    org = candidates.filter(pc.invert(pc.is_in(candidates.column("event_id"), attributed)))
    m = org.num_rows
    null = lambda t: pa.nulls(m, t)  # noqa: E731
    organic = pa.table({
        "request_id": null(pa.string()), "user_id": org.column("user_id"),
        "model_version": null(pa.string()), "arm": null(pa.string()),
        "item_id": org.column("item_id"), "position": null(pa.int32()), "score": null(pa.float64()),
        "propensity": null(pa.float64()), "clicked": pa.array(np.zeros(m, bool)),
        "reward": org.column("weight"), "impression_ts": null(TS),
        "event_id": org.column("event_id"), "event_type": org.column("event_type"),
        "event_ts": org.column("ts"), "organic": pa.array(np.ones(m, bool)),
        "batch_date": pc.strftime(org.column("ts"), format="%Y-%m-%d")})
    return pa.concat_tables([conform(labelled, FEEDBACK), conform(organic, FEEDBACK)])


def run_feedback(settings: Settings, now: datetime | None = None) -> dict:
    """One incremental run (see the module docstring); returns counts."""
    cfg = settings.feedback
    window = timedelta(minutes=cfg.window_minutes)
    store = DeltaStore(settings)
    lock = settings.data_dir / "refresher" / "feedback.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with flocked(lock):
        new = (now or datetime.now(timezone.utc)) - timedelta(minutes=cfg.settle_minutes)
        old = watermark(store)
        if old is None:
            first = pc.min(store.read_arrow("impressions", columns=["ts"]).column("ts")).as_py()
            if first is None:
                return {"rows": 0, "clicked": 0, "organic": 0, "watermark": None}
            old = first
        report = {"rows": 0, "clicked": 0, "organic": 0, "watermark": old.isoformat()}
        if new <= old:
            return report
        lo = pa.scalar(old - window, TS)
        hi = pa.scalar(new, TS)
        imps = store.read_arrow("impressions", filter=(pc.field("ts") >= lo) & (pc.field("ts") < hi))
        events = store.read_arrow("events", columns=["event_id", "user_id", "item_id",
                                                     "event_type", "weight", "ts"],
                                  filter=(pc.field("ts") >= lo) & (pc.field("ts") < hi))
        rows = label(explode(imps), events, window, old, new, new - window)
        if rows.num_rows:
            from freshrec.privacy.erasure import drop_erased, guarded

            store.ensure("feedback")
            with guarded(settings) as erased:  # an erased user's rows do not come back
                rows = drop_erased("feedback", rows, erased)
                write_deltalake(store.path("feedback"), rows, mode="append",
                                storage_options=store.options,
                                commit_properties=CommitProperties(
                                    custom_metadata={WATERMARK_KEY: new.isoformat()}))
        organic = int(pc.sum(rows.column("organic").cast(pa.int64())).as_py() or 0)
        clicked = int(pc.sum(rows.column("clicked").cast(pa.int64())).as_py() or 0)
        report.update(rows=rows.num_rows, clicked=clicked, organic=organic,
                      watermark=(new if rows.num_rows else old).isoformat())
        if rows.num_rows:
            log.info("feedback: %s", report)
        return report
