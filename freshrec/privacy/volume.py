"""The volume-encryption requirement for what ``privacy.encrypt_at_rest`` cannot seal itself.

The Delta tables (delta-rs writes no Parquet modular encryption), MLflow's artifacts and the
snapshots' model files rely on the volume under the data directory being encrypted. With
``privacy.volume_encryption: required`` (every profile but ``local``) the server and the batch
jobs check at start, and refuse to start otherwise with one line naming the setting:

* the data directory's block device (``st_dev`` of the directory, or of its nearest existing
  parent) is a device-mapper crypt target, or is stacked on one (LVM on LUKS): its
  ``/sys/dev/block/<major>:<minor>/dm/uuid``, or a slave's, starts with ``CRYPT-`` (what
  cryptsetup writes for dm-crypt/LUKS);
* or the operator attests it (``privacy.volume_encrypted_attested: true``): for what this check
  cannot see, e.g. a cloud provider's disk encryption, or tables in object storage with
  server-side encryption (an object-store ``paths.data_dir`` always needs the attestation).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from freshrec.settings import Settings, SettingsError

log = logging.getLogger(__name__)
SYS = Path("/sys")


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _crypt_below(dev_dir: Path, seen: set[Path] | None = None) -> str | None:
    """The name of a dm-crypt device at or below the block device ``dev_dir`` (a sysfs device
    directory), or None."""
    seen = seen if seen is not None else set()
    dev_dir = dev_dir.resolve()
    if dev_dir in seen:
        return None
    seen.add(dev_dir)
    try:
        if (dev_dir / "dm" / "uuid").read_text().startswith("CRYPT-"):
            return (dev_dir / "dm" / "name").read_text().strip() or dev_dir.name
    except OSError:
        pass
    slaves = dev_dir / "slaves"
    for s in sorted(slaves.iterdir()) if slaves.is_dir() else []:
        hit = _crypt_below(s, seen)
        if hit:
            return hit
    return None


def encrypted_volume(path: Path, sys_root: Path = SYS) -> tuple[bool, str]:
    """Whether ``path`` lives on a dm-crypt volume, and what was found (for messages)."""
    st = os.stat(_existing(path))
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    dev_dir = sys_root / "dev" / "block" / dev
    if not dev_dir.exists():
        return False, f"device {dev} (not a block device: no {dev_dir})"
    crypt = _crypt_below(dev_dir)
    if crypt:
        return True, f"device {dev} on dm-crypt volume {crypt}"
    return False, f"device {dev} ({dev_dir.resolve().name}, no dm-crypt/LUKS below it)"


def check_volume_encryption(settings: Settings, who: str, sys_root: Path = SYS) -> str:
    """Refuse to start (SettingsError, one line naming the setting) when
    ``privacy.volume_encryption`` is ``required`` and the data directory is not shown to be on an
    encrypted volume; returns what was found."""
    p = settings.privacy
    if p.volume_encryption == "not_required":
        return "not required"
    if p.volume_encrypted_attested:
        log.info("%s: volume encryption attested by privacy.volume_encrypted_attested", who)
        return "attested"
    if settings.data_is_uri:
        raise SettingsError(
            f"{who}: privacy.volume_encryption is required and the tables are in object storage "
            f"({settings.tables_uri}), which this check cannot see: enable the store's encryption "
            "and set privacy.volume_encrypted_attested: true")
    ok, found = encrypted_volume(settings.data_dir, sys_root)
    if not ok:
        raise SettingsError(
            f"{who}: privacy.volume_encryption is required but the data directory "
            f"{settings.data_dir} is on {found}: move it to a dm-crypt/LUKS volume, or set "
            "privacy.volume_encrypted_attested: true if it is encrypted another way, or "
            "privacy.volume_encryption: not_required")
    log.info("%s: data directory on %s", who, found)
    return found
