"""File importers: events (CSV, Parquet, JSON lines), items, and the MovieLens formats.

Events: a file is read with every column as text, checked for the required columns, its user ids
pseudonymized, and written to the landing zone ``<data>/landing/events/landed_date=D/<file_id>.parquet``
(``file_id`` is a content hash, so importing the same file twice lands it once). The batch DAG's
ingest job moves landed files into the bronze ``events_raw`` table; row-level problems (bad ids,
timestamps, types, values) are left for the clean job, which dead-letters them with a reason. The
importer checks the rows with the same event rules (``freshrec/contracts/events.py``) and says how
many the batch will refuse, by reason (``LandingResult.refused``), in its log line and summary.

Items: upserted (MERGE on ``item_id``) straight into the silver ``items`` table.

A missing file, an unreadable file, a missing column or a wrong type stops the import with an
:class:`InputFileError` that names the file, the column and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from freshrec.contracts.events import WHITESPACE, describe_refusals, rules_for
from freshrec.storage.delta import DeltaStore
from freshrec.privacy.pseudonyms import pseudonymize_array
from freshrec.settings import Settings
from freshrec.storage.tables import (ITEM_COLUMNS, RAW_EVENT_COLUMNS, REQUIRED_EVENT_COLUMNS,
                             REQUIRED_ITEM_COLUMNS)

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "json", ".ndjson": "json", ".json": "json"}


class InputFileError(ValueError):
    """An input file cannot be imported; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class LandingResult:
    source: str
    file_id: str
    rows: int
    landed_path: Path | None  # None when the same content had been landed before
    refused: dict[str, int] = field(default_factory=dict)  # rows the event rules refuse, by reason

    @property
    def already_landed(self) -> bool:
        return self.landed_path is None

    @property
    def refusal_summary(self) -> str:
        """``"12 refused (ts_in_future 10, bad_value 2)"`` or ``"none refused"``."""
        return describe_refusals(self.refused)


def _file_digest(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def detect_format(path: Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in ("csv", "parquet", "json"):
            raise InputFileError(f"{path}: unknown format {fmt!r}; use csv, parquet or json")
        return fmt
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise InputFileError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                             "name it .csv, .parquet or .jsonl, or pass --format") from None


def read_text_table(path: Path, fmt: str | None = None) -> pa.Table:
    """Read a CSV, Parquet or JSON-lines file; CSV columns are read as text (nothing is guessed)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: file does not exist; check the path")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory; give one file")
    kind = detect_format(path, fmt)
    try:
        if kind == "csv":
            parse = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            with pacsv.open_csv(path, parse_options=parse) as reader:
                head = reader.schema.names
            return pacsv.read_csv(
                path, parse_options=parse,
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in head},
                                                     strings_can_be_null=False))
        if kind == "parquet":
            return pq.read_table(path)
        try:
            return pajson.read_json(path)
        except pa.ArrowInvalid:
            return _read_json_lines_as_text(path)  # a column mixes types across rows
    except (pa.ArrowInvalid, OSError) as e:
        raise InputFileError(f"{path}: could not be read as {kind}: {e}. Check that the file is "
                             f"complete and really {kind} (or pass --format)") from e


def _read_json_lines_as_text(path: Path) -> pa.Table:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{path}: line {n} is not valid JSON ({e.msg}); each line "
                                     "must be one JSON object") from e
            if not isinstance(obj, dict):
                raise InputFileError(f"{path}: line {n} is not a JSON object")
            rows.append({k: v if v is None or isinstance(v, str) else json.dumps(v)
                         for k, v in obj.items()})
    return pa.Table.from_pylist(rows)


def _as_text(col: pa.ChunkedArray, name: str, source: str) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
        return col.cast(pa.string())
    if pa.types.is_timestamp(t):
        if t.tz is None:
            col = col.cast(pa.timestamp(t.unit, tz="UTC"))
        return pc.strftime(col, format="%Y-%m-%dT%H:%M:%S%z")
    if pa.types.is_date(t):
        return pc.strftime(col.cast(pa.timestamp("s", tz="UTC")), format="%Y-%m-%dT%H:%M:%S%z")
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
            or pa.types.is_decimal(t):
        return col.cast(pa.string())
    if pa.types.is_dictionary(t):
        return col.cast(t.value_type).cast(pa.string())
    if name == "context" and (pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_list(t)):
        return pa.chunked_array([pa.array([None if v is None else json.dumps(v, default=str)
                                           for v in col.to_pylist()], pa.string())])
    raise InputFileError(f"{source}: column {name!r} has type {t}, which cannot be read as an "
                         f"event {name}; write it as text or a number")


def _apply_column_map(table: pa.Table, column_map: dict[str, str] | None, source: str) -> pa.Table:
    if not column_map:
        return table
    missing = [src for src in column_map.values() if src not in table.column_names]
    if missing:
        raise InputFileError(f"{source}: --map names column(s) {missing} that the file lacks; "
                             f"its columns are {table.column_names}")
    rename = {src: dst for dst, src in column_map.items()}
    return table.rename_columns([rename.get(c, c) for c in table.column_names])


def normalize_events(table: pa.Table, source: str,
                     column_map: dict[str, str] | None = None) -> pa.Table:
    """The raw event columns as text; context gathers any extra columns as a JSON object."""
    table = _apply_column_map(table, column_map, source)
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in table.column_names]
    if missing:
        raise InputFileError(
            f"{source}: missing required column(s) {missing}; the file has {table.column_names}. "
            "Rename the columns, or map them with --map user_id=<col> (repeatable)")
    extra = [c for c in table.column_names if c not in RAW_EVENT_COLUMNS]
    cols: dict[str, pa.ChunkedArray] = {}
    n = table.num_rows
    for c in RAW_EVENT_COLUMNS:
        if c in table.column_names:
            cols[c] = _as_text(table.column(c), c, source)
        elif c == "context" and extra:
            rows = table.select(extra).to_pylist()
            cols[c] = pa.chunked_array([pa.array([json.dumps(r, default=str) for r in rows],
                                                 pa.string())])
        else:
            cols[c] = pa.chunked_array([pa.nulls(n, pa.string())])
    return pa.table(cols)


def _landing_dir(settings: Settings) -> Path:
    return settings.landing_dir / "events"


def find_landed(settings: Settings, file_id: str) -> Path | None:
    hits = list(_landing_dir(settings).glob(f"landed_date=*/{file_id}.parquet"))
    return hits[0] if hits else None


def land_events(settings: Settings, raw: pa.Table, source: str, file_id: str,
                landed_at: datetime | None = None, pseudonymized: bool = False) -> LandingResult:
    """Pseudonymize (unless the ids already are) and write normalized events to the landing
    zone, once per ``file_id``."""
    if find_landed(settings, file_id) is not None:
        log.info("%s: already imported (file id %s); nothing to do", source, file_id)
        return LandingResult(source, file_id, raw.num_rows, None)
    if raw.num_rows == 0:
        raise InputFileError(f"{source}: holds no event rows; nothing to import")
    if settings.privacy.pseudonymize_users and not pseudonymized:
        from freshrec.privacy.rotation import check_keyring

        check_keyring(settings)  # the keys the data is pseudonymized with
        users = raw.column("user_id")  # a blank id stays missing (its pseudonym would not be)
        users = pc.if_else(pc.equal(pc.utf8_trim(users, characters=WHITESPACE), ""),
                           pa.scalar(None, pa.string()), users)
        raw = raw.set_column(raw.schema.get_field_index("user_id"), "user_id",
                             pseudonymize_array(users, settings.privacy.hmac_key,
                                                settings.privacy.hmac_key_chain))
    rows = pa.array(range(raw.num_rows), pa.int64()).cast(pa.string())
    raw = raw.append_column("raw_id", pc.binary_join_element_wise(file_id, rows, ":"))
    raw = raw.append_column("source_file", pa.array([source] * raw.num_rows, pa.string()))
    day = (landed_at or datetime.now(timezone.utc)).strftime("%Y-%m-%d")
    # the earliest batch that ingests the file ends when its landing day does
    batch_end = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc) + timedelta(days=1)
    refused = rules_for(settings).refusals(raw, batch_end)
    out_dir = _landing_dir(settings) / f"landed_date={day}"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{file_id}.parquet"
    from freshrec.storage.crypto import cipher_for, write_parquet
    from freshrec.privacy.erasure import drop_erased, guarded

    with guarded(settings) as erased:  # an erasure meanwhile: its user's rows stay out
        kept = drop_erased("events_raw", raw, erased)
        # temporary file, fsync, rename (the ingest job never sees half a file), fsync of the
        # directory (durable before a write-ahead log segment is deleted); sealed when
        # privacy.encrypt_at_rest is on
        write_parquet(final, kept, cipher_for(settings))
    result = LandingResult(source, file_id, raw.num_rows, final, refused)
    log.info("%s: landed %d rows as %s; %s by the event rules (clean dead-letters them)", source,
             raw.num_rows, final, result.refusal_summary)
    return result


def import_events_file(settings: Settings, path: Path, fmt: str | None = None,
                       column_map: dict[str, str] | None = None,
                       landed_at: datetime | None = None) -> LandingResult:
    path = Path(path)
    table = read_text_table(path, fmt)
    raw = normalize_events(table, str(path), column_map)
    file_id = _file_digest(path, extra=json.dumps(column_map or {}, sort_keys=True))
    return land_events(settings, raw, path.name, file_id, landed_at)


def normalize_items(table: pa.Table, source: str, column_map: dict[str, str] | None = None,
                    updated_at: datetime | None = None) -> pa.Table:
    """Items to the ``items`` schema: categories as a list (``a|b`` or ``a,b`` text is split),
    extra columns gathered into the ``attributes`` JSON object, ``active`` true unless given."""
    table = _apply_column_map(table, column_map, source)
    missing = [c for c in REQUIRED_ITEM_COLUMNS if c not in table.column_names]
    if missing:
        raise InputFileError(f"{source}: missing required column(s) {missing}; the file has "
                             f"{table.column_names}. Rename them or use --map item_id=<col>")
    n = table.num_rows
    names = table.column_names

    def text(c: str) -> pa.ChunkedArray:
        return _as_text(table.column(c), c, source) if c in names \
            else pa.chunked_array([pa.nulls(n, pa.string())])

    item_id = text("item_id")
    if item_id.null_count or pc.any(pc.equal(item_id, "")).as_py():
        raise InputFileError(f"{source}: column 'item_id' has empty values; every item needs an id")
    if "categories" in names and pa.types.is_list(table.column("categories").type):
        categories = table.column("categories").cast(pa.list_(pa.string()))
    else:
        cats = text("categories").to_pylist()
        categories = pa.chunked_array([pa.array(
            [None if v is None else [s.strip() for s in v.replace("|", ",").split(",") if s.strip()]
             for v in cats], pa.list_(pa.string()))])
    extra = [c for c in names if c not in ITEM_COLUMNS and c != "active"]
    if "attributes" in names:
        attributes = text("attributes")
    elif extra:
        attributes = pa.chunked_array([pa.array(
            [json.dumps(r, default=str) for r in table.select(extra).to_pylist()], pa.string())])
    else:
        attributes = pa.chunked_array([pa.nulls(n, pa.string())])
    if "active" in names:
        active = pc.fill_null(table.column("active").cast(pa.bool_()), True)
    else:
        active = pa.chunked_array([pa.array([True] * n, pa.bool_())])
    stamp = updated_at or datetime.now(timezone.utc)
    return pa.table({
        "item_id": item_id, "title": text("title"), "categories": categories, "text": text("text"),
        "attributes": attributes, "active": active,
        "updated_at": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
    })


def _dedupe_items(items: pa.Table, source: str) -> pa.Table:
    ids = items.column("item_id")
    if len(pc.unique(ids)) != items.num_rows:
        log.warning("%s: repeated item ids; the last row of each wins", source)
        idx = pa.table({"item_id": ids, "i": pa.array(range(items.num_rows))}) \
            .group_by("item_id").aggregate([("i", "max")]).column("i_max")
        last_rows = idx.combine_chunks()
        items = items.take(pc.take(last_rows, pc.sort_indices(last_rows)))
    return items


def import_items_table(settings: Settings, items: pa.Table, source: str) -> dict[str, int]:
    items = _dedupe_items(items, source)
    # Unchanged rows keep their stored updated_at, so re-importing a file changes nothing.
    store = DeltaStore(settings)
    current = store.read_arrow("items")
    if current.num_rows:
        items = _restamp_unchanged(items, current)
    return store.upsert_arrow("items", items)


def _restamp_unchanged(items: pa.Table, current: pa.Table) -> pa.Table:
    """Give rows whose content equals the stored row the stored ``updated_at``."""
    stored = {r["item_id"]: r for r in current.to_pylist()}
    stamps = []
    for r in items.to_pylist():
        old = stored.get(r["item_id"])
        same = old is not None and all(old[c] == r[c] for c in
                                       ("title", "categories", "text", "attributes", "active"))
        stamps.append(old["updated_at"] if same else r["updated_at"])
    return items.set_column(items.schema.get_field_index("updated_at"), "updated_at",
                            pa.array(stamps, pa.timestamp("us", tz="UTC")))


def import_items_file(settings: Settings, path: Path, fmt: str | None = None,
                      column_map: dict[str, str] | None = None) -> dict[str, int]:
    path = Path(path)
    items = normalize_items(read_text_table(path, fmt), str(path), column_map)
    return import_items_table(settings, items, path.name)
