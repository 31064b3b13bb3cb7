"""HMAC key rotation on real Delta tables, landing Parquet and a snapshot's users.npz: every
stored pseudonym is re-keyed once, raw ids arriving later map to the same new pseudonym, an
interrupted rotation blocks pseudonymizing until it is finished, and finishing it re-keys nothing
twice."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.privacy.pseudonyms import pseudonymize, pseudonymizer
from freshrec.settings import SettingsError, load_settings
from freshrec.storage.tables import EVENTS
from tests.conftest import small_settings

BASE = "base-key-for-the-rotation-test-0123"
USERS = [f"u{n}" for n in range(5)]


def _settings(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    (secrets / "hmac_key").write_text(BASE)
    (secrets / "hmac_key").chmod(0o600)
    return load_settings("local", env={"FRESHREC_SECRETS_DIR": str(secrets)},
                         paths={"data_dir": str(tmp_path / "data")})


def _seed(settings):
    p = pseudonymizer(settings)
    ts = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = [{"event_id": f"e{u}", "user_id": p(u), "item_id": "i1", "event_type": "view",
             "value": None, "weight": 1.0, "ts": ts, "context": None, "raw_id": f"f:{u}",
             "batch_date": "2026-11-01"} for u in USERS]
    DeltaStore(settings).write_arrow("events", pa.Table.from_pylist(rows, schema=EVENTS.schema))
    land = settings.landing_dir / "events" / "landed_date=2026-11-01"
    land.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": [p(u) for u in USERS] + [None], "item_id": ["i"] * 6}),
                   land / "f1.parquet")
    snap = settings.snapshots_dir / "v1-20261101"
    snap.mkdir(parents=True)
    np.savez(snap / "users.npz", user_ids=np.asarray([p(u) for u in USERS]),
             indptr=np.arange(6, dtype=np.int64))


def _stored(settings) -> dict[str, list]:
    land = settings.landing_dir / "events" / "landed_date=2026-11-01" / "f1.parquet"
    with np.load(settings.snapshots_dir / "v1-20261101" / "users.npz") as z:
        snap = z["user_ids"].tolist()
    ev = DeltaStore(settings).read_arrow("events").sort_by("event_id")
    return {"events": ev.column("user_id").to_pylist(),
            "landing": pq.read_table(land).column("user_id").to_pylist()[:5], "snapshot": snap}


def test_rotation_rekeys_every_store_and_new_raw_ids_follow(tmp_path):
    from freshrec.privacy.rotation import rotate_key

    settings = _settings(tmp_path)
    _seed(settings)
    old = [pseudonymize(u, BASE) for u in USERS]
    assert _stored(settings) == {"events": old, "landing": old, "snapshot": old}
    report = rotate_key(settings)
    assert report["tables"] == {"events": 5} and report["landing_files"] == 1
    assert report["snapshots"] == 1
    chain_file = settings.paths.secrets_dir / "hmac_key_chain"
    assert oct(chain_file.stat().st_mode & 0o777) == "0o600"
    new_key = chain_file.read_text().strip()
    rotated = _settings(tmp_path)  # reads hmac_key_chain from the secrets directory
    assert [k.get_secret_value() for k in rotated.privacy.hmac_key_chain] == [new_key]
    new = [pseudonymizer(rotated)(u) for u in USERS]
    assert new == [pseudonymize(u, BASE, [new_key]) for u in USERS]
    assert _stored(rotated) == {"events": new, "landing": new, "snapshot": new}
    assert not set(old) & set(new)
    # the old settings (without the new key) no longer pseudonymize against this data
    old_settings = small_settings(tmp_path / "data", privacy={"hmac_key": BASE})
    with pytest.raises(SettingsError, match="pseudonymized with the key chain"):
        pseudonymizer(old_settings)


def test_an_interrupted_rotation_blocks_until_finished_and_rekeys_once(tmp_path, monkeypatch):
    from freshrec.privacy import rotation

    settings = _settings(tmp_path)
    _seed(settings)

    def crash(*_a, **_k):
        raise OSError("disk gone")

    monkeypatch.setattr(rotation, "_rekey_snapshots", crash)
    with pytest.raises(OSError):
        rotation.rotate_key(settings)
    with pytest.raises(SettingsError, match="rotation is in progress"):
        pseudonymizer(settings)
    monkeypatch.undo()
    report = rotation.rotate_key(settings)
    assert report["tables"] == {} and report["landing_files"] == 0  # done before the crash
    assert report["snapshots"] == 1
    rotated = _settings(tmp_path)
    new = [pseudonymizer(rotated)(u) for u in USERS]
    assert _stored(rotated) == {"events": new, "landing": new, "snapshot": new}
    # a second rotation chains a second key
    rotation.rotate_key(rotated)
    twice = _settings(tmp_path)
    assert len(twice.privacy.hmac_key_chain) == 2
    assert _stored(twice)["events"] == [pseudonymizer(twice)(u) for u in USERS]


def test_rotate_key_command_needs_a_secrets_directory(tmp_path, monkeypatch, capsys):
    from freshrec.cli.main import main

    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FRESHREC_SECRETS_DIR", raising=False)
    assert main(["privacy", "rotate-key"]) == 1  # a runtime error (exit 2 is for usage errors)
    err = capsys.readouterr().err
    assert "paths.secrets_dir or FRESHREC_SECRETS_DIR" in err and err.count("\n") == 1
