"""HMAC key rotation: a new key on the chain, applied to every stored pseudonym.

A pseudonym after rotations k1..kn is ``HMAC(kn, ... HMAC(k1, HMAC(hmac_key, user_id)))`` (see
:mod:`freshrec.privacy.pseudonyms`), so rotating to a new key maps each stored pseudonym ``p`` to
``HMAC(k_new, p)``: no raw id is needed, every row is re-keyed, and a raw id arriving later gets
the same new pseudonym. After a rotation a leaked earlier key alone re-identifies nobody.

What :func:`rotate_key` rewrites (stop the server, the refresher and the batch DAG first):
every Delta table with a ``user_id`` column (one overwrite commit per table, tagged with the new
key's fingerprint), the landing zone's Parquet files, every snapshot's ``users.npz`` and the
erasure log (so erased users stay out after the rotation). It does
not rewrite older Delta versions (they keep the old pseudonyms until VACUUM), MLflow artifacts,
the audit log or logs: they stay under the old chain.

Crash-safe: the new key is written to ``<secrets_dir>/hmac_key_chain.pending`` and the rotation
recorded as pending in ``<data_dir>/privacy/keyring.json`` before anything is rewritten; each
rewritten table, file or snapshot carries the new key's fingerprint, so a re-run after a crash
skips what is done and finishes. Only then is the key appended to ``hmac_key_chain``. While a
rotation is pending, or when the configured chain differs from the data's, everything that
pseudonymizes refuses to start (:func:`check_keyring`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from freshrec.durable import atomic_write
from freshrec.privacy.pseudonyms import key_fingerprint, rekey
from freshrec.settings import Settings, SettingsError

log = logging.getLogger(__name__)
PENDING_FILE = "hmac_key_chain.pending"
CHAIN_FILE = "hmac_key_chain"
MARK = "freshrec.rekey"


def keyring_path(settings: Settings) -> Path:
    return settings.data_dir / "privacy" / "keyring.json"


def configured_chain(settings: Settings) -> list[str]:
    """Fingerprints of the configured keys: the base key, then each rotation key."""
    p = settings.privacy
    return [key_fingerprint(p.hmac_key)] + [key_fingerprint(k) for k in p.hmac_key_chain]


def read_keyring(settings: Settings) -> dict | None:
    path = keyring_path(settings)
    return json.loads(path.read_text()) if path.exists() else None


def check_keyring(settings: Settings) -> None:
    """Refuse to pseudonymize with keys other than the data's (or mid-rotation)."""
    ring = read_keyring(settings)
    if ring is None or not settings.privacy.pseudonymize_users:
        return
    if ring.get("pending"):
        raise SettingsError(f"an HMAC key rotation is in progress in {settings.data_dir} (key "
                            f"{ring['pending']['fingerprint']}): finish it with `freshrec privacy "
                            "rotate-key` before serving or importing")
    if ring["applied"] != configured_chain(settings):
        raise SettingsError(
            f"the data in {settings.data_dir} is pseudonymized with the key chain "
            f"{ring['applied']} (fingerprints), the settings give {configured_chain(settings)}: "
            "set privacy.hmac_key and privacy.hmac_key_chain (secrets files hmac_key, "
            "hmac_key_chain) to the keys of the last rotation")


def _write_ring(settings: Settings, ring: dict) -> None:
    atomic_write(keyring_path(settings), json.dumps(ring, indent=1).encode(), 0o600)


def _rekey_array(arr: pa.Array | pa.ChunkedArray, key: str) -> pa.Array:
    """Map each distinct pseudonym once; nulls and empty strings stay as they are."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    arr = arr.cast(pa.string())
    enc = pc.dictionary_encode(arr)
    mapped = pa.array([rekey(v, key) if v else v for v in enc.dictionary.to_pylist()], pa.string())
    return pc.take(mapped, enc.indices)


def _rekey_tables(settings: Settings, key: str, fp: str) -> dict[str, int]:
    from deltalake import CommitProperties, write_deltalake

    from freshrec.storage.delta import DeltaStore
    from freshrec.storage.tables import TABLES

    store = DeltaStore(settings)
    done: dict[str, int] = {}
    for name, spec in TABLES.items():
        if "user_id" not in spec.schema.names or not store.exists(name):
            continue
        dt = store.table(name)
        if any(h.get(MARK) == fp for h in dt.history(50)):
            log.info("%s: already re-keyed", name)
            continue
        table = store.read_arrow(name)
        col = table.schema.get_field_index("user_id")
        table = table.set_column(col, table.schema.field(col), _rekey_array(table.column(col), key))
        write_deltalake(store.path(name), table, mode="overwrite", schema_mode=None,
                        storage_options=store.options,
                        commit_properties=CommitProperties(custom_metadata={MARK: fp}))
        done[name] = table.num_rows
        log.info("%s: %d rows re-keyed", name, table.num_rows)
    return done


def _rekey_landing(settings: Settings, key: str, fp: str) -> int:
    from freshrec.storage.crypto import cipher_for, is_sealed, read_parquet, write_parquet

    cipher = cipher_for(settings)
    n = 0
    for f in sorted(settings.landing_dir.glob("**/*.parquet")):
        table = read_parquet(f, cipher)
        meta = table.schema.metadata or {}
        if meta.get(MARK.encode()) == fp.encode() or "user_id" not in table.schema.names:
            continue
        col = table.schema.get_field_index("user_id")
        table = table.set_column(col, table.schema.field(col), _rekey_array(table.column(col), key))
        table = table.replace_schema_metadata({**meta, MARK.encode(): fp.encode()})
        if is_sealed(f):
            write_parquet(f, table, cipher)
        else:
            tmp = f.with_name(f".{f.name}.rekey.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, f)
        n += 1
    return n


def _rekey_snapshots(settings: Settings, key: str, fp: str) -> int:
    from freshrec.contracts.snapshot import USERS_FILE

    from freshrec.storage.crypto import cipher_for, is_sealed, load_npz, save_npz

    cipher = cipher_for(settings)
    n = 0
    for f in sorted(settings.snapshots_dir.glob(f"*/{USERS_FILE}")):
        arrays = load_npz(f, cipher)
        if str(arrays.get("rekey_fingerprint", np.array(""))) == fp:
            continue
        users = arrays["user_ids"]
        arrays["user_ids"] = np.asarray([rekey(str(u), key) for u in users.tolist()],
                                        dtype=users.dtype if users.size else "<U34")
        arrays["rekey_fingerprint"] = np.array(fp)
        save_npz(f, arrays, cipher if is_sealed(f) else None)
        n += 1
    return n


def _rekey_erasure_log(settings: Settings, key: str, fp: str) -> int:
    """The erasure log's pseudonyms under the new key (its first line records the key it was
    re-keyed to, so a re-run after a crash does not re-key twice)."""
    from freshrec.privacy.erasure import exclusive, log_path

    path = log_path(settings)
    if not path.exists():
        return 0
    with exclusive(settings):
        lines = [json.loads(x) for x in path.read_bytes().split(b"\n")[:-1] if x.strip()]
        if any(r.get("rekey") == fp for r in lines):
            return 0
        out = [{"rekey": fp}] + [{**r, "user_id": rekey(r["user_id"], key)} for r in lines
                                 if "user_id" in r]
        atomic_write(path, b"".join(json.dumps(r).encode() + b"\n" for r in out))
        return len(out) - 1


def rotate_key(settings: Settings) -> dict:
    """Add a new key to the chain and re-key the stored pseudonyms (or finish a pending
    rotation). Returns what was rewritten. Needs ``paths.secrets_dir``."""
    root = settings.paths.secrets_dir
    if root is None:
        raise SettingsError("key rotation writes the new key to the secrets directory: set "
                            "paths.secrets_dir or FRESHREC_SECRETS_DIR")
    if not settings.privacy.pseudonymize_users:
        raise SettingsError("privacy.pseudonymize_users is off: there are no pseudonyms to re-key")
    ring = read_keyring(settings) or {"applied": configured_chain(settings), "pending": None}
    pending_file = Path(root) / PENDING_FILE
    if ring.get("pending"):
        if not pending_file.exists():
            raise SettingsError(f"a rotation to key {ring['pending']['fingerprint']} is pending "
                                f"but {pending_file} is missing: restore it from your backup")
        key = pending_file.read_text().strip()
        fp = key_fingerprint(key)
        if fp != ring["pending"]["fingerprint"]:
            raise SettingsError(f"{pending_file} holds key {fp}, the pending rotation is to "
                                f"{ring['pending']['fingerprint']}: restore the right file")
        log.info("finishing the pending rotation to key %s", fp)
    else:
        if ring["applied"] != configured_chain(settings):
            check_keyring(settings)  # raises, naming both chains
        key = secrets.token_urlsafe(32)
        fp = key_fingerprint(key)
        atomic_write(pending_file, (key + "\n").encode())
        ring["pending"] = {"fingerprint": fp}
        _write_ring(settings, ring)
    report = {"key": fp, "tables": _rekey_tables(settings, key, fp),
              "landing_files": _rekey_landing(settings, key, fp),
              "snapshots": _rekey_snapshots(settings, key, fp),
              "erasures": _rekey_erasure_log(settings, key, fp)}
    chain_file = Path(root) / CHAIN_FILE
    keys = [k.get_secret_value() for k in settings.privacy.hmac_key_chain]
    if chain_file.exists():  # the file is the source of truth for what it already lists
        keys = [k.strip() for k in chain_file.read_text().splitlines() if k.strip()]
    if key not in keys:
        keys.append(key)
    atomic_write(chain_file, ("\n".join(keys) + "\n").encode())
    ring = {"applied": ring["applied"] + [fp], "pending": None}
    _write_ring(settings, ring)
    pending_file.unlink(missing_ok=True)
    report["chain"] = ring["applied"]
    return report
