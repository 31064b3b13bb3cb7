"""Datasets for benchmarks and experiments, as pandas frames in the shape the models take.

* :func:`silver` reads the embedded (or any imported) dataset from the silver Delta tables, at a
  pinned table version that the caller records.
* :func:`movielens_100k` reads MovieLens 100K from the recbole 1.2.1 wheel on PyPI. The wheel is
  fetched with ``pip download`` into a cache directory on first use; the repository never holds the
  data. Ratings are implicit interactions (weight 1) for ranking, with the rating kept in ``value``
  for explicit-feedback models.

Both return ``Dataset(events, items, versions)``: events with user_id, item_id, ts (UTC), weight,
value, raw_id; items with item_id, title, categories, text.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

RECBOLE = "recbole==1.2.1"
ML100K = "recbole/dataset_example/ml-100k/ml-100k"


@dataclass
class Dataset:
    name: str
    events: pd.DataFrame
    items: pd.DataFrame
    versions: dict = field(default_factory=dict)


def silver(settings, version: int | None = None) -> Dataset:
    """Silver ``events`` (at ``version``, default the latest) and ``items`` of a data directory."""
    from freshrec.storage.delta import DeltaStore

    store = DeltaStore(settings)
    if not store.exists("events"):
        raise FileNotFoundError(f"{store.path('events')}: no silver events table; run `make run` "
                                "(or `freshrec import ...` and the batch lane) first")
    version = store.version("events") if version is None else version
    ev = store.read_arrow("events", version=version,
                          columns=["user_id", "item_id", "ts", "weight", "value", "raw_id"]).to_pandas()
    items_version = store.version("items") if store.exists("items") else None
    items = store.read_arrow("items", columns=["item_id", "title", "categories", "text"]).to_pandas() \
        if items_version is not None else pd.DataFrame(columns=["item_id", "title", "categories", "text"])
    ev["ts"] = pd.to_datetime(ev["ts"], utc=True)
    return Dataset("embedded", ev, items, {"events": version, "items": items_version})


def synthetic(cfg, end=None) -> Dataset:
    """The synthetic generator's clean events (no malformed rows or duplicates) and items, in
    memory, with ``cfg`` (SynthSettings): for experiments that need no Delta tables."""
    from datetime import datetime, timezone

    import numpy as np

    from freshrec.data.synth import make_events, make_items

    rng = np.random.default_rng(cfg.seed)
    items, item_cluster = make_items(cfg, rng)
    ev, _ = make_events(cfg, item_cluster, end or datetime(2026, 11, 27, tzinfo=timezone.utc), rng)
    events = pd.DataFrame({"user_id": np.char.add("u", ev["user"].astype(str)),
                           "item_id": np.char.add("i", ev["item"].astype(str)),
                           "ts": pd.to_datetime(ev["ts"], utc=True), "weight": 1.0,
                           "value": ev["value"], "raw_id": np.arange(len(ev["user"])).astype(str)})
    return Dataset("synthetic", events, items.to_pandas()[["item_id", "title", "categories", "text"]],
                   {"synth_seed": cfg.seed})


def _recbole_wheel(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
    if found:
        return found[0]
    print(f"fetching MovieLens 100K: pip download {RECBOLE} --no-deps -> {cache_dir}", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "download", RECBOLE, "--no-deps", "-q",
                           "-d", str(cache_dir)], capture_output=True, text=True)
    found = sorted(cache_dir.glob("recbole-1.2.1-*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"could not download {RECBOLE} from PyPI (needed for MovieLens 100K): "
                           f"{done.stderr.strip()[-500:]}; put the wheel in {cache_dir} by hand")
    return found[0]


def movielens_100k(cache_dir: Path) -> Dataset:
    """MovieLens 100K (943 users, 1,682 movies, 100,000 ratings) from the recbole wheel."""
    with zipfile.ZipFile(_recbole_wheel(Path(cache_dir))) as z:
        inter = pd.read_csv(io.BytesIO(z.read(f"{ML100K}.inter")), sep="\t")
        item = pd.read_csv(io.BytesIO(z.read(f"{ML100K}.item")), sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    item.columns = [c.split(":")[0] for c in item.columns]
    events = pd.DataFrame({
        "user_id": "u" + inter["user_id"].astype(str),
        "item_id": "m" + inter["item_id"].astype(str),
        "ts": pd.to_datetime(inter["timestamp"], unit="s", utc=True),
        "weight": 1.0,
        "value": inter["rating"].astype(float),
        "raw_id": inter.index.astype(str).str.zfill(6)})
    genres = item["class"].fillna("").astype(str).str.split(" ")
    items = pd.DataFrame({
        "item_id": "m" + item["item_id"].astype(str),
        "title": item["movie_title"].fillna("").astype(str),
        "categories": [[g for g in gs if g] for gs in genres],
        "text": item["release_year"].fillna("").astype(str)})
    return Dataset("ml-100k", events, items, {"source": RECBOLE})


class EventsFileError(ValueError):
    """An events file for an experiment cannot be used; the message names the file and the fix."""


EVENT_FILE_COLUMNS = ("user_id", "item_id", "timestamp")


def from_file(path: str | Path, name: str | None = None) -> Dataset:
    """Events from a CSV or Parquet file with columns user_id, item_id, timestamp (epoch seconds
    or an ISO-8601 instant; ``ts`` is accepted too) and optionally value (e.g. a rating) and
    weight (default 1: every row one implicit interaction), as a :class:`Dataset` without items.
    Nothing is written anywhere."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise EventsFileError(f"{path}: file does not exist; check the path")
    if path.is_dir():
        raise EventsFileError(f"{path}: is a directory; give one CSV or Parquet file")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        elif suffix.endswith((".csv", ".csv.gz", ".tsv")):
            df = pd.read_csv(path, sep="\t" if ".tsv" in suffix else ",", dtype=str)
        else:
            raise EventsFileError(f"{path}: cannot tell the format from the suffix "
                                  f"{path.suffix!r}; use .csv or .parquet")
    except (OSError, ValueError, pd.errors.ParserError) as e:
        if isinstance(e, EventsFileError):
            raise
        raise EventsFileError(f"{path}: could not be read ({e}); it must be a CSV with a header "
                              "row or a Parquet file") from None
    if "timestamp" not in df and "ts" in df:
        df = df.rename(columns={"ts": "timestamp"})
    missing = [c for c in EVENT_FILE_COLUMNS if c not in df]
    if missing:
        raise EventsFileError(f"{path}: missing column(s) {missing}; the file has {list(df.columns)}. "
                              "An events file needs user_id, item_id, timestamp (and optionally "
                              "value, weight); rename the columns")
    if df.empty:
        raise EventsFileError(f"{path}: holds no rows; nothing to evaluate")
    for col in ("user_id", "item_id"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise EventsFileError(f"{path}: {int(bad.sum())} row(s) have no {col} (first: row "
                                  f"{int(np.flatnonzero(bad)[0]) + 1}); fill or drop them")
    raw = df["timestamp"]
    num = pd.to_numeric(raw, errors="coerce")
    ts = pd.to_datetime(num, unit="s", utc=True, errors="coerce")
    text = num.isna() & raw.notna()
    if text.any():  # ISO-8601 instants where the value is not a number
        ts[text] = pd.to_datetime(raw[text].astype(str), utc=True, errors="coerce", format="mixed")
    bad = ts.isna()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise EventsFileError(f"{path}: {int(bad.sum())} row(s) have a timestamp that is neither "
                              f"epoch seconds nor ISO-8601 (first: row {first + 1}, "
                              f"{raw.iloc[first]!r}); fix or drop them")
    events = pd.DataFrame({"user_id": df["user_id"].astype(str).str.strip(),
                           "item_id": df["item_id"].astype(str).str.strip(), "ts": ts})
    for col in ("weight", "value"):
        if col in df:
            v = pd.to_numeric(df[col], errors="coerce")
            if v.isna().any() and col == "weight":
                first = int(np.flatnonzero(v.isna())[0])
                raise EventsFileError(f"{path}: column 'weight' has {int(v.isna().sum())} "
                                      f"non-numeric value(s) (first: row {first + 1}); fix them "
                                      "or drop the column")
            events[col] = v.astype(np.float64)
    if "weight" not in events:
        events["weight"] = 1.0
    if (events["weight"] < 0).any():
        raise EventsFileError(f"{path}: column 'weight' has negative values; weights are "
                              "interaction strengths >= 0")
    events["raw_id"] = pd.Series(np.arange(len(events))).astype(str).str.zfill(12).to_numpy()
    items = pd.DataFrame(columns=["item_id", "title", "categories", "text"])
    return Dataset(name or path.name, events, items, {"file": str(path)})
