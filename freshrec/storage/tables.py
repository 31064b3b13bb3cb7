"""Table specs: name, layer, Arrow schema, Change Data Feed and key of every Delta table.

The single place that says what each table holds; the Delta I/O in :mod:`freshrec.storage.delta` enforces
these schemas on every write. Timestamps are UTC-aware (``timestamp[us, UTC]``) throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

# The raw text columns of an event as it arrives (file or RPC), before validation.
RAW_EVENT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "value", "ts", "context")
REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "event_type", "ts")
ITEM_COLUMNS = ("item_id", "title", "categories", "text", "attributes")
REQUIRED_ITEM_COLUMNS = ("item_id",)


@dataclass(frozen=True)
class TableSpec:
    name: str
    layer: str
    schema: pa.Schema
    change_data_feed: bool = False
    key: tuple[str, ...] = ()
    doc: str = ""


_RAW_FIELDS = [pa.field(c, pa.string()) for c in RAW_EVENT_COLUMNS]

EVENTS_RAW = TableSpec(
    "events_raw", "bronze",
    pa.schema(_RAW_FIELDS + [
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("batch_date", pa.string(), nullable=False),
        pa.field("ingested_at", TS),
    ]),
    key=("raw_id",),
    doc="Every event row as it arrived (text columns, user ids already pseudonymized), one row per "
        "source row; raw_id = source file id + row number; batch_date = the data interval that took it.",
)

EVENTS_DEAD_LETTER = TableSpec(
    "events_dead_letter", "bronze",
    pa.schema(_RAW_FIELDS + [
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("batch_date", pa.string(), nullable=False),
    ]),
    key=("raw_id",),
    doc="Raw rows that failed validation, with the reason.",
)

EVENTS = TableSpec(
    "events", "silver",
    pa.schema([
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("weight", pa.float64(), nullable=False),
        pa.field("ts", TS, nullable=False),
        pa.field("context", pa.string()),
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("batch_date", pa.string(), nullable=False),
    ]),
    change_data_feed=True,
    key=("event_id",),
    doc="Validated, typed, deduplicated events (Change Data Feed on).",
)

ITEMS = TableSpec(
    "items", "silver",
    pa.schema([
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("text", pa.string()),
        pa.field("attributes", pa.string()),
        pa.field("active", pa.bool_(), nullable=False),
        pa.field("updated_at", TS),
    ]),
    change_data_feed=True,
    key=("item_id",),
    doc="Item metadata; attributes is a JSON object; active=false hides an item (CDF on).",
)

_AFFINITY = pa.list_(pa.struct([pa.field("category", pa.string()), pa.field("score", pa.float64())]))

USER_FEATURES = TableSpec(
    "user_features", "gold",
    pa.schema([
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("n_events", pa.int64()),
        pa.field("n_items", pa.int64()),
        pa.field("first_ts", TS),
        pa.field("last_ts", TS),
        pa.field("recency_days", pa.float64()),
        pa.field("category_affinities", _AFFINITY),
        pa.field("as_of", TS),
    ]),
    key=("user_id",),
    doc="Per user: activity, recency (days before the interval end), top category affinities.",
)

ITEM_FEATURES = TableSpec(
    "item_features", "gold",
    pa.schema([
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("n_events", pa.int64()),
        pa.field("n_users", pa.int64()),
        pa.field("popularity", pa.float64()),
        pa.field("popularity_decayed", pa.float64()),
        pa.field("last_ts", TS),
        pa.field("as_of", TS),
    ]),
    key=("item_id",),
    doc="Per item: counts, weighted popularity and time-decayed popularity at the interval end.",
)

ITEM_NEIGHBORS = TableSpec(
    "item_neighbors", "gold",
    pa.schema([
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("neighbor_id", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("cooccurrences", pa.int64()),
        pa.field("rank", pa.int32()),
    ]),
    key=("item_id", "neighbor_id"),
    doc="Top-K co-occurrence neighbours per item (cosine-normalized co-occurrence counts).",
)

IMPRESSIONS = TableSpec(
    "impressions", "bronze",
    pa.schema([
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("arm", pa.string()),
        pa.field("items", pa.list_(pa.string()), nullable=False),
        pa.field("positions", pa.list_(pa.int32()), nullable=False),
        pa.field("scores", pa.list_(pa.float64())),
        pa.field("propensities", pa.list_(pa.float64())),
        pa.field("ts", TS, nullable=False),
        pa.field("server", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("served_date", pa.string(), nullable=False),
        pa.field("candidates", pa.list_(pa.string())),
        pa.field("candidate_scores", pa.list_(pa.float64())),
    ]),
    key=("request_id",),
    doc="Every served slate, once per request_id: user pseudonym, served registry version "
        "(freshrec-retrieval/N name), A/B arm, items with their 0-based positions, scores and "
        "propensities (probability the policy that served it shows the item; 1.0 for a "
        "deterministic ranker), serving time, the server process that answered; candidates and "
        "candidate_scores: the retrieval candidates a re-ranking policy chose the slate from "
        "(null without a re-ranker), which off-policy learning needs to score other slates.",
)

IMPRESSIONS_DEAD_LETTER = TableSpec(
    "impressions_dead_letter", "bronze",
    pa.schema([
        pa.field("raw", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("served_date", pa.string(), nullable=False),
    ]),
    doc="Impression records that were malformed or repeated a request_id, with the reason.",
)

FEEDBACK = TableSpec(
    "feedback", "silver",
    pa.schema([
        pa.field("request_id", pa.string()),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("arm", pa.string()),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("position", pa.int32()),
        pa.field("score", pa.float64()),
        pa.field("propensity", pa.float64()),
        pa.field("clicked", pa.bool_(), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("impression_ts", TS),
        pa.field("event_id", pa.string()),
        pa.field("event_type", pa.string()),
        pa.field("event_ts", TS),
        pa.field("organic", pa.bool_(), nullable=False),
        pa.field("batch_date", pa.string(), nullable=False),
    ]),
    key=("request_id", "item_id", "event_id"),
    doc="One row per shown item (request_id, item_id): clicked when the user had an event on it "
        "within the attribution window after the impression, reward = that event's weight (0 "
        "when not clicked); plus one row per event on an item not shown to the user in the window "
        "before it (organic=true, request_id null).",
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (
    EVENTS_RAW, EVENTS_DEAD_LETTER, EVENTS, ITEMS,
    USER_FEATURES, ITEM_FEATURES, ITEM_NEIGHBORS,
    IMPRESSIONS, IMPRESSIONS_DEAD_LETTER, FEEDBACK,
)}
