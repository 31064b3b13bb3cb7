"""MovieLens importers for the files users download themselves.

* ml-100k: ``u.data`` (user, item, rating, epoch; tab-separated) and ``u.item`` (``|``-separated,
  latin-1, 19 genre flags);
* ml-1m / ml-10m: ``ratings.dat`` (``user::item::rating::epoch``) and ``movies.dat``
  (``item::title::Genre|Genre``);
* ml-20m / ml-25m / ml-latest: ``ratings.csv`` and ``movies.csv`` (with a header).

Ratings become ``rating`` events with the rating as ``value``; movies become items with their
genres as categories. The files go through the same landing and item paths as any import.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from freshrec.data.importers import (InputFileError, LandingResult, _file_digest, import_items_table,
                                land_events, normalize_events, normalize_items)
from freshrec.settings import Settings

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@dataclass(frozen=True)
class MovieLensFiles:
    flavour: str
    ratings: Path
    movies: Path | None


def detect(directory: Path) -> MovieLensFiles:
    d = Path(directory)
    if not d.is_dir():
        raise InputFileError(f"{d}: not a directory; give the unpacked MovieLens folder "
                             "(e.g. ml-100k/ with u.data and u.item)")
    for flavour, ratings, movies in (("ml-100k", "u.data", "u.item"),
                                     ("ml-1m", "ratings.dat", "movies.dat"),
                                     ("ml-20m", "ratings.csv", "movies.csv")):
        if (d / ratings).exists():
            return MovieLensFiles(flavour, d / ratings,
                                  d / movies if (d / movies).exists() else None)
    raise InputFileError(f"{d}: no MovieLens ratings file found; expected u.data (ml-100k), "
                         "ratings.dat (ml-1m/10m) or ratings.csv (ml-20m/ml-latest)")


def _read_sep(path: Path, sep: str, names: list[str], encoding: str = "utf-8",
              header: bool = False) -> pa.Table:
    text = path.read_bytes().decode(encoding, errors="replace")
    if len(sep) > 1:
        text = text.replace(sep, "\t")
        sep = "\t"
    try:
        return pacsv.read_csv(
            io.BytesIO(text.encode()),
            read_options=pacsv.ReadOptions(column_names=None if header else names,
                                           skip_rows=0),
            parse_options=pacsv.ParseOptions(delimiter=sep, quote_char='"' if header else False),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}))
    except pa.ArrowInvalid as e:
        raise InputFileError(f"{path}: not a readable MovieLens file: {e}") from e


def read_ratings(files: MovieLensFiles) -> pa.Table:
    names = ["user_id", "item_id", "value", "ts"]
    if files.flavour == "ml-100k":
        t = _read_sep(files.ratings, "\t", names)
    elif files.flavour == "ml-1m":
        t = _read_sep(files.ratings, "::", names)
    else:
        t = _read_sep(files.ratings, ",", ["userId", "movieId", "rating", "timestamp"], header=True)
        t = t.rename_columns(names)
    n = t.num_rows
    return t.append_column("event_type", pa.array(["rating"] * n, pa.string()))


def read_movies(files: MovieLensFiles) -> pa.Table:
    assert files.movies is not None
    if files.flavour == "ml-100k":
        cols = ["item_id", "title", "release", "video_release", "url"] + ML100K_GENRES
        t = _read_sep(files.movies, "|", cols, encoding="latin-1")
        flags = [t.column(g).to_pylist() for g in ML100K_GENRES]
        cats = [[g for g, f in zip(ML100K_GENRES, row) if f == "1"] for row in zip(*flags)]
        return pa.table({"item_id": t.column("item_id"), "title": t.column("title"),
                         "categories": pa.array(cats, pa.list_(pa.string())),
                         "attributes": pa.array([json.dumps({"release": r}) for r in
                                                 t.column("release").to_pylist()])})
    if files.flavour == "ml-1m":
        t = _read_sep(files.movies, "::", ["item_id", "title", "genres"], encoding="latin-1")
    else:
        t = _read_sep(files.movies, ",", ["movieId", "title", "genres"], header=True)
        t = t.rename_columns(["item_id", "title", "genres"])
    cats = [[] if g in (None, "(no genres listed)") else g.split("|")
            for g in t.column("genres").to_pylist()]
    return pa.table({"item_id": t.column("item_id"), "title": t.column("title"),
                     "categories": pa.array(cats, pa.list_(pa.string()))})


def import_movielens(settings: Settings, directory: Path) -> tuple[LandingResult, dict[str, int]]:
    files = detect(directory)
    items_result = {"inserted": 0, "updated": 0}
    if files.movies is not None:
        items = normalize_items(read_movies(files), str(files.movies))
        items_result = import_items_table(settings, items, files.movies.name)
    raw = normalize_events(read_ratings(files), str(files.ratings))
    landed = land_events(settings, raw, f"{files.flavour}/{files.ratings.name}",
                         _file_digest(files.ratings, extra=files.flavour))
    return landed, items_result
