import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.data.importers import InputFileError, import_events_file, import_items_file
from freshrec.data.movielens import import_movielens
from freshrec.privacy.pseudonyms import pseudonymize

EVENTS_CSV = "user_id,item_id,event_type,value,ts\nalice,i1,view,,2026-11-01T10:00:00Z\n" \
             "bob,i2,rating,4,1762000000\n"


def _landed(path: Path) -> pa.Table:
    return pq.read_table(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_events_land_in_every_format_with_pseudonymized_users(settings, tmp_path, suffix):
    rows = [{"user_id": "alice", "item_id": "i1", "event_type": "view", "ts": "2026-11-01T10:00:00Z"},
            {"user_id": "bob", "item_id": "i2", "event_type": "rating", "value": 4,
             "ts": 1762000000, "device": "phone"}]
    path = tmp_path / f"events{suffix}"
    if suffix == ".csv":
        path.write_text(EVENTS_CSV)
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist([{**r, "value": str(r.get("value", "")),
                                              "ts": str(r["ts"])} for r in rows]), path)
    result = import_events_file(settings, path)
    landed = _landed(result.landed_path)
    assert landed.num_rows == 2
    users = landed.column("user_id").to_pylist()
    assert "alice" not in users and users[0] == pseudonymize("alice", settings.privacy.hmac_key)
    assert landed.column("ts").to_pylist()[1].startswith("1762000000")
    assert landed.column("raw_id").to_pylist() == [f"{result.file_id}:0", f"{result.file_id}:1"]


def test_reimporting_the_same_file_lands_it_once(settings, tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(EVENTS_CSV)
    first = import_events_file(settings, path)
    second = import_events_file(settings, path)
    assert not first.already_landed and second.already_landed
    assert len(list((settings.landing_dir / "events").rglob("*.parquet"))) == 1


def test_missing_column_names_file_and_column(settings, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user,item_id,event_type,ts\na,i1,view,2026-01-01\n")
    with pytest.raises(InputFileError, match=r"bad\.csv: missing required column\(s\) \['user_id'\]"
                       r".*--map"):
        import_events_file(settings, path)
    # and the map fixes it
    r = import_events_file(settings, path, column_map={"user_id": "user"})
    assert r.rows == 1


def test_missing_and_unreadable_files(settings, tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        import_events_file(settings, tmp_path / "nope.csv")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(InputFileError, match=r"broken\.parquet: could not be read as parquet"):
        import_events_file(settings, broken)
    odd = tmp_path / "events.xlsx"
    odd.write_text("x")
    with pytest.raises(InputFileError, match="--format"):
        import_events_file(settings, odd)


def test_wrong_column_type_is_named(settings, tmp_path):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["i"], "event_type": ["view"],
                             "ts": ["2026-01-01"], "value": pa.array([[1, 2]])}), path)
    with pytest.raises(InputFileError, match="column 'value' has type list"):
        import_events_file(settings, path)


def test_items_upsert_and_reimport_changes_nothing(settings, tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title,categories,text,price\ni1,One,a|b,hello,3\ni2,Two,b,world,4\n")
    assert import_items_file(settings, path) == {"inserted": 2, "updated": 0}
    store = DeltaStore(settings)
    version = store.version("items")
    assert import_items_file(settings, path) == {"inserted": 0, "updated": 0}
    assert store.version("items") == version
    rows = {r["item_id"]: r for r in store.read_arrow("items").to_pylist()}
    assert rows["i1"]["categories"] == ["a", "b"]
    assert json.loads(rows["i1"]["attributes"]) == {"price": "3"}
    assert rows["i1"]["active"] is True
    path.write_text("item_id,title,categories,text,price\ni1,One v2,a|b,hello,3\n")
    assert import_items_file(settings, path) == {"inserted": 0, "updated": 1}


def test_items_without_ids_are_refused(settings, tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("title\nfoo\n")
    with pytest.raises(InputFileError, match="missing required column"):
        import_items_file(settings, path)


def _ml_dir(tmp_path: Path, flavour: str) -> Path:
    d = tmp_path / flavour
    d.mkdir()
    if flavour == "ml-100k":
        (d / "u.data").write_text("1\t10\t5\t881250949\n2\t10\t3\t891717742\n1\t20\t4\t878887116\n")
        genres = ["0"] * 19
        g1 = genres.copy()
        g1[5] = "1"
        (d / "u.item").write_bytes(("10|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(g1)
                                    + "\n20|Caf\xe9 (1994)|01-Jan-1994||http://y|"
                                    + "|".join(genres) + "\n").encode("latin-1"))
    elif flavour == "ml-1m":
        (d / "ratings.dat").write_text("1::10::5::978300760\n2::20::3::978302109\n")
        (d / "movies.dat").write_text("10::Toy Story (1995)::Animation|Comedy\n20::Heat::Action\n")
    else:
        (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.5,1112486027\n"
                                       "2,20,3.0,1112484676\n")
        (d / "movies.csv").write_text('movieId,title,genres\n10,"Toy Story, The (1995)",'
                                      "Animation|Comedy\n20,Heat,(no genres listed)\n")
    return d


@pytest.mark.parametrize("flavour", ["ml-100k", "ml-1m", "ml-20m"])
def test_movielens_formats(settings, tmp_path, flavour):
    landed, items = import_movielens(settings, _ml_dir(tmp_path, flavour))
    assert items["inserted"] == 2
    raw = _landed(landed.landed_path)
    assert set(raw.column("event_type").to_pylist()) == {"rating"}
    assert raw.column("item_id").to_pylist()[0] == "10"
    catalog = {r["item_id"]: r for r in DeltaStore(settings).read_arrow("items").to_pylist()}
    assert "Comedy" in catalog["10"]["categories"]
    assert catalog["10"]["title"].startswith("Toy Story")


def test_movielens_folder_without_ratings(settings, tmp_path):
    with pytest.raises(InputFileError, match="no MovieLens ratings file"):
        import_movielens(settings, tmp_path)


def test_repeated_item_ids_keep_the_last_row(settings, tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\ni1,first\ni2,other\ni1,second\n")
    assert import_items_file(settings, path) == {"inserted": 2, "updated": 0}
    rows = {r["item_id"]: r["title"] for r in DeltaStore(settings).read_arrow("items").to_pylist()}
    assert rows == {"i1": "second", "i2": "other"}
