"""Encryption at rest for the files freshrec writes outside Delta that hold personal data.

With ``privacy.encrypt_at_rest`` on, these are sealed with AES-256-GCM under ``privacy.data_key``
(the secrets directory's ``data_key`` file or ``FRESHREC_DATA_KEY``: 32 bytes as 64 hex digits or
urlsafe base64); every sealed unit names the key it needs (``key_id``: the first 16 hex digits of
the key's SHA-256), so a reader with another key fails naming both ids instead of returning noise:

* the event write-ahead log and the impression log (:mod:`freshrec.storage.segments`): each JSON line
  becomes ``enc1:<key_id>:<base64(nonce + ciphertext)>``; a reader takes plaintext and sealed
  lines alike, so the setting can be turned on without draining the logs first;
* the admin audit log (:mod:`serving.audit`): sealed line by line like the logs above;
* the snapshots' ``users.npz`` (histories and user vectors): the file becomes
  ``FRENC1:<key_id>\\n`` + nonce + ciphertext (:func:`save_npz` / :func:`load_npz`);
* the landing zone's Parquet files: sealed whole the same way (:func:`write_parquet` /
  :func:`read_parquet`). Not Parquet modular encryption: Spark reads that only through a JVM
  ``KmsClient`` class on its classpath (parquet-hadoop ships none but a test one), so the batch
  ingest would need a Python decrypting step either way; one sealing format keeps one key id
  check, and the ingests read sealed files through :func:`read_parquet`.

Not covered (they rely on volume encryption, checked at start by
:func:`freshrec.privacy.volume.check_volume_encryption`, see the README): Delta tables (delta-rs writes no
Parquet modular encryption), MLflow artifacts and the model directory inside a snapshot.

Independent of the setting, :func:`private_umask` makes every file and directory freshrec
creates readable by its owner only (0600 / 0700).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from freshrec.durable import atomic_write

LINE_PREFIX = b"enc1:"
FILE_MAGIC = b"FRENC1:"
NONCE = 12


class DecryptError(ValueError):
    """Sealed data that cannot be opened: no key configured, another key, or corrupt bytes."""


def parse_key(text: str) -> bytes:
    """32 key bytes from 64 hex digits or urlsafe base64; ValueError says what is expected."""
    t = text.strip()
    try:
        if len(t) == 64:
            return binascii.unhexlify(t)
        raw = base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("privacy.data_key must be 32 random bytes as 64 hex digits or urlsafe "
                         "base64 (python -c 'import secrets; print(secrets.token_hex(32))')")
    return raw


class DataCipher:
    """AES-256-GCM with a random 96-bit nonce per sealed unit; the key id is bound as associated
    data, so a unit cannot be passed off as sealed under another key."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aes = AESGCM(key)
        self.key_id = hashlib.sha256(key).hexdigest()[:16]

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aes.encrypt(nonce, data, self.key_id.encode())

    def open(self, blob: bytes, key_id: str, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if key_id != self.key_id:
            raise DecryptError(f"{what} is sealed with data key {key_id}, the configured "
                               f"privacy.data_key is {self.key_id}: configure the key it was "
                               "written with")
        try:
            return self._aes.decrypt(blob[:NONCE], blob[NONCE:], key_id.encode())
        except InvalidTag:
            raise DecryptError(f"{what}: authentication failed (corrupt or altered)") from None

    # ---- lines of the append-only logs ----------------------------------------------------
    def seal_line(self, line: bytes) -> bytes:
        """One JSON line (without its newline) -> one sealed line (without a newline)."""
        return LINE_PREFIX + self.key_id.encode() + b":" + base64.b64encode(self.seal(line))


def cipher_for(settings) -> DataCipher | None:
    """The cipher when ``privacy.encrypt_at_rest`` is on, else None."""
    p = settings.privacy
    if not p.encrypt_at_rest:
        return None
    return DataCipher(parse_key(p.data_key.get_secret_value()))


def open_line(line: bytes, cipher: DataCipher | None, what: str = "a log line") -> bytes:
    """A log line as written: plaintext lines pass through, sealed ones are opened."""
    if not line.startswith(LINE_PREFIX):
        return line
    try:
        key_id, body = line[len(LINE_PREFIX):].split(b":", 1)
        blob = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        raise DecryptError(f"{what} is not a well-formed sealed line") from None
    if cipher is None:
        raise DecryptError(f"{what} is encrypted (data key {key_id.decode()}) but "
                           "privacy.encrypt_at_rest is off: configure privacy.data_key")
    return cipher.open(blob, key_id.decode(), what)


def read_bytes(path: Path, cipher: DataCipher | None) -> bytes:
    """A file's bytes, opened when it is sealed."""
    data = Path(path).read_bytes()
    if not data.startswith(FILE_MAGIC):
        return data
    head, _, blob = data.partition(b"\n")
    key_id = head[len(FILE_MAGIC):].decode()
    if cipher is None:
        raise DecryptError(f"{path} is encrypted (data key {key_id}) but privacy.encrypt_at_rest "
                           "is off: configure privacy.data_key")
    return cipher.open(blob, key_id, str(path))


def write_bytes(path: Path, data: bytes, cipher: DataCipher | None) -> None:
    """Write ``data`` (sealed when ``cipher``) atomically: temporary file (0600), fsync, rename,
    fsync of the directory."""
    path = Path(path)
    if cipher is not None:
        data = FILE_MAGIC + cipher.key_id.encode() + b"\n" + cipher.seal(data)
    atomic_write(path, data)


def load_npz(path: Path, cipher: DataCipher | None) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(path, cipher)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_npz(path: Path, arrays: dict[str, np.ndarray], cipher: DataCipher | None) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue(), cipher)


def read_parquet(path: Path, cipher: DataCipher | None, columns: list[str] | None = None):
    """A Parquet file as a pyarrow Table, opened first when it is sealed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not is_sealed(path):
        return pq.read_table(path, columns=columns)
    return pq.read_table(pa.BufferReader(read_bytes(path, cipher)), columns=columns)


def write_parquet(path: Path, table, cipher: DataCipher | None) -> None:
    """Write ``table`` as Parquet (sealed when ``cipher``) atomically, like :func:`write_bytes`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(path, sink.getvalue().to_pybytes(), cipher)


def is_sealed(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(FILE_MAGIC)) == FILE_MAGIC


def private_umask() -> int:
    """Files and directories created from now on are the owner's only (umask 077); returns the
    previous umask."""
    return os.umask(0o077)
