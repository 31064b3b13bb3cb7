"""Encryption at rest, the parts beyond the logs and users.npz (those: tests/test_erasure.py): the
admin audit log sealed line by line, the landing zone's Parquet files sealed whole and still read by
both ingests, and the volume-encryption requirement for the Delta tables checked at start.

Real files, real Delta tables (delta-rs), a real gRPC server on loopback, the real CLI in a
subprocess; the dm-crypt detection is also run on a hand-built sysfs tree (this machine has no
encrypted volume to show the accepted outcome on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from freshrec.storage.crypto import DecryptError, cipher_for, is_sealed, read_parquet
from freshrec.storage.delta import DeltaStore
from freshrec.settings import SettingsError
from freshrec.api.client import Client
from tests.conftest import small_settings
from tests.test_erasure import ADMIN, CLIENT, make_snapshot, start_server

ROOT = Path(__file__).resolve().parent.parent
KEY, OTHER = "ab" * 32, "cd" * 32


@pytest.fixture(autouse=True)
def _umask():
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def _settings(tmp_path: Path, key: str | None = KEY, **privacy):
    if key is not None:
        privacy = {"encrypt_at_rest": True, "data_key": key, **privacy}
    return small_settings(tmp_path / "data", privacy=privacy,
                          serving={"port": 0, "metrics_port": -1, "wal_flush_seconds": 3600})


def _csv(tmp_path: Path, users: list[str]) -> Path:
    f = tmp_path / "events.csv"
    f.write_text("user_id,item_id,event_type,ts\n" + "".join(
        f"{u},i{n},click,2026-11-0{1 + n % 3}T10:00:00Z\n" for n, u in enumerate(users)))
    return f


# ---- the audit log ---------------------------------------------------------------------------
def test_the_audit_log_is_sealed_and_read_back_only_with_its_key(tmp_path):
    from freshrec.privacy.pseudonyms import pseudonymizer
    from serving.audit import read_audit

    settings = _settings(tmp_path)
    user = pseudonymizer(settings)("frank")
    make_snapshot(settings, "snap", users=[user, "p_other"])
    server, addr = start_server(settings)
    try:
        Client(addr, CLIENT).record([{"user_id": "frank", "item_id": "i7", "event_type": "click"}])
        admin = Client(addr, ADMIN)
        admin.call_admin("DeleteUser", admin.admin_pb2.DeleteUserRequest(user_id="frank"))
        admin.call_admin("ApplyDeltas", admin.admin_pb2.ApplyDeltasRequest(remove_items=["i7"]))
    finally:
        server.stop(grace=0)
    path = settings.data_dir / "audit" / "admin.jsonl"
    data = path.read_bytes()
    lines = data.splitlines()
    assert len(lines) == 2 and all(ln.startswith(b"enc1:") for ln in lines)
    for needle in (b"frank", user.encode(), b"DeleteUser", b"dev-admin"):
        assert needle not in data
    records = read_audit(path, cipher_for(settings))
    assert [(r["action"], r["who"], r["result"]) for r in records] == [
        ("DeleteUser", "dev-admin", "ok"), ("ApplyDeltas", "dev-admin", "ok")]
    with pytest.raises(DecryptError, match=r"sealed with data key .* configured privacy.data_key"):
        read_audit(path, cipher_for(_settings(tmp_path, OTHER)))
    with pytest.raises(DecryptError, match="privacy.encrypt_at_rest is off"):
        read_audit(path, None)


# ---- the landing zone ------------------------------------------------------------------------
def test_landed_files_are_sealed_and_the_nearline_ingest_reads_them(tmp_path):
    from freshrec.data.importers import import_events_file
    from freshrec.privacy.pseudonyms import pseudonymizer
    from nearline.ingest import ingest_landed

    settings = _settings(tmp_path)
    p = pseudonymizer(settings)
    users = ["frank", "grace", "frank", "heidi"]
    src = _csv(tmp_path, users)
    landed = import_events_file(settings, src).landed_path
    assert is_sealed(landed) and oct(landed.stat().st_mode & 0o777) == "0o600"
    data = landed.read_bytes()
    for u in users:
        assert u.encode() not in data and p(u).encode() not in data
    assert b"PAR1" not in data
    assert import_events_file(settings, src).landed_path is None  # the same file lands once

    # a reader with another key, or with encryption off, is told which key the file needs
    with pytest.raises(DecryptError, match="sealed with data key"):
        ingest_landed(_settings(tmp_path, OTHER))
    with pytest.raises(DecryptError, match="encrypt_at_rest is off: configure privacy.data_key"):
        ingest_landed(_settings(tmp_path, key=None))

    report = ingest_landed(settings)
    assert report["files"] == 1 and report["raw"] == 4 and report["clean"] == 4
    events = DeltaStore(settings).read_arrow("events")
    assert sorted(events.column("user_id").to_pylist()) == sorted(p(u) for u in users)
    assert ingest_landed(settings)["files"] == 0  # taken once


def test_the_write_ahead_log_lands_sealed_and_erasure_and_rotation_keep_it_sealed(tmp_path):
    from freshrec.privacy.erasure import erase_user
    from freshrec.privacy.pseudonyms import pseudonymizer

    settings = _settings(tmp_path)
    p = pseudonymizer(settings)
    make_snapshot(settings, "snap", users=[p("frank"), p("grace")])
    server, addr = start_server(settings)
    try:
        Client(addr, CLIENT).record([{"user_id": u, "item_id": "i3", "event_type": "click"}
                                     for u in ("frank", "grace")])
        server.wal.land()
    finally:
        server.stop(grace=0)
    [landed] = settings.landing_dir.glob("events/*/*.parquet")
    assert is_sealed(landed) and p("frank").encode() not in landed.read_bytes()
    assert sorted(read_parquet(landed, cipher_for(settings)).column("user_id").to_pylist()) == \
        sorted([p("frank"), p("grace")])
    report = erase_user(settings, p("frank"))
    assert report["landing_rows"] == 1 and is_sealed(landed)
    left = read_parquet(landed, cipher_for(settings))
    assert left.column("user_id").to_pylist() == [p("grace")]


def test_the_spark_ingest_reads_sealed_landed_files(spark, tmp_path):
    from freshrec.data.importers import import_events_file
    from spark_jobs.ingest import read_landed

    plain, sealed = _settings(tmp_path / "plain", key=None), _settings(tmp_path / "sealed")
    src = _csv(tmp_path, ["frank", "grace", "heidi"])
    files = [import_events_file(s, src).landed_path for s in (plain, sealed)]
    assert not is_sealed(files[0]) and is_sealed(files[1])
    a = read_landed(spark, [files[0]], None)
    b = read_landed(spark, [files[1]], cipher_for(sealed))
    cols = sorted(a.columns)
    assert sorted(b.columns) == cols
    assert sorted(a.select(cols).collect()) == sorted(b.select(cols).collect())
    assert b.count() == 3


# ---- the volume-encryption requirement -------------------------------------------------------
def _fake_sys(root: Path, path: Path, uuid: str, slave_uuid: str | None = None) -> Path:
    """A sysfs tree in which ``path``'s device is a device-mapper device with ``uuid`` (stacked,
    when ``slave_uuid``, on another dm device with that uuid)."""
    st = os.stat(path)
    dev = root / "devices" / "virtual" / "block" / "dm-1"
    (dev / "dm").mkdir(parents=True)
    (dev / "dm" / "uuid").write_text(uuid + "\n")
    (dev / "dm" / "name").write_text("vg-data\n")
    if slave_uuid:
        low = root / "devices" / "virtual" / "block" / "dm-0"
        (low / "dm").mkdir(parents=True)
        (low / "dm" / "uuid").write_text(slave_uuid + "\n")
        (low / "dm" / "name").write_text("luks-disk\n")
        (dev / "slaves").mkdir()
        (dev / "slaves" / "dm-0").symlink_to(low)
    (root / "dev" / "block").mkdir(parents=True)
    (root / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}").symlink_to(dev)
    return root


def test_dm_crypt_below_the_data_directory_is_found(tmp_path):
    from freshrec.privacy.volume import check_volume_encryption, encrypted_volume

    settings = _settings(tmp_path, key=None, volume_encryption="required")
    data = settings.data_dir / "not-yet-created"  # the nearest existing parent is checked
    luks = _fake_sys(tmp_path / "luks", tmp_path, "CRYPT-LUKS2-0123abcd-luks-disk")
    ok, found = encrypted_volume(data, luks)
    assert ok and "dm-crypt volume vg-data" in found
    stacked = _fake_sys(tmp_path / "lvm", tmp_path, "LVM-abc", "CRYPT-LUKS2-0123abcd-luks-disk")
    ok, found = encrypted_volume(data, stacked)
    assert ok and "luks-disk" in found
    assert "luks-disk" in check_volume_encryption(settings, "serve", stacked)
    plain_lvm = _fake_sys(tmp_path / "plain", tmp_path, "LVM-abc")
    assert encrypted_volume(data, plain_lvm)[0] is False
    with pytest.raises(SettingsError, match="no dm-crypt/LUKS below it"):
        check_volume_encryption(settings, "serve", plain_lvm)


def test_required_volume_encryption_refuses_the_server_and_batch_jobs_unless_attested(tmp_path):
    from freshrec.privacy.volume import encrypted_volume
    from serving.server import FreshrecServer

    if encrypted_volume(tmp_path)[0]:
        pytest.skip("this machine's temporary directory is on an encrypted volume")
    refused = _settings(tmp_path, key=None, volume_encryption="required")
    with pytest.raises(SettingsError) as e:
        FreshrecServer(refused, use_gpu=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("serve: privacy.volume_encryption is required")
    assert "privacy.volume_encrypted_attested: true" in msg and str(refused.data_dir) in msg

    # a batch job through the CLI: exit 1, one line naming the setting, nothing run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FRESHREC_PROFILE": "local",
           "FRESHREC_DATA_DIR": str(tmp_path / "job"),
           "FRESHREC__PRIVACY__VOLUME_ENCRYPTION": "required"}
    r = subprocess.run([sys.executable, "-m", "freshrec.cli.main", "run", "ingest", "--date",
                        "2026-11-01"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("freshrec: error: ingest: privacy.volume_encryption is required")
    assert not (tmp_path / "job" / "tables").exists()

    # the operator's attestation, or the local profile's default, lets both start
    attested = _settings(tmp_path, key=None, volume_encryption="required",
                         volume_encrypted_attested=True)
    make_snapshot(attested, "snap", users=["p_a"])
    server, addr = start_server(attested)
    try:
        assert len(Client(addr, CLIENT).recommend("someone", 3).items) == 3
    finally:
        server.stop(grace=0)
    r = subprocess.run([sys.executable, "-m", "freshrec.cli.main", "run", "ingest", "--date",
                        "2026-11-01"], capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env={**env, "FRESHREC__PRIVACY__VOLUME_ENCRYPTION": "not_required"})
    assert r.returncode == 0, r.stderr


def test_hmac_rotation_rekeys_a_sealed_landed_file_and_keeps_it_sealed(tmp_path):
    import pyarrow as pa

    from freshrec.storage.crypto import write_parquet
    from freshrec.privacy.pseudonyms import pseudonymizer
    from freshrec.privacy.rotation import rotate_key
    from freshrec.settings import load_settings

    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    for name, value in (("hmac_key", "base-key-for-the-rotation-test-0123"), ("data_key", KEY)):
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)

    def load():
        return load_settings("local", env={"FRESHREC_SECRETS_DIR": str(secrets)},
                             paths={"data_dir": str(tmp_path / "data")},
                             privacy={"encrypt_at_rest": True})

    settings = load()
    old = [pseudonymizer(settings)(u) for u in ("frank", "grace")]
    f = settings.landing_dir / "events" / "landed_date=2026-11-01" / "f1.parquet"
    f.parent.mkdir(parents=True)
    write_parquet(f, pa.table({"user_id": old, "item_id": ["i1", "i2"]}), cipher_for(settings))
    assert rotate_key(settings)["landing_files"] == 1
    rotated = load()
    new = [pseudonymizer(rotated)(u) for u in ("frank", "grace")]
    assert not set(new) & set(old) and is_sealed(f)
    assert all(u.encode() not in f.read_bytes() for u in old + new)
    assert read_parquet(f, cipher_for(rotated)).column("user_id").to_pylist() == new
