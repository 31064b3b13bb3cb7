"""The audit trail of admin actions: one JSON line per call (who, what, when, result), fsynced.

With ``privacy.encrypt_at_rest`` each line is sealed on its own (AES-GCM, :mod:`freshrec.storage.crypto`),
like the event log; :func:`read_audit` opens plaintext and sealed lines alike.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from freshrec.storage.crypto import DataCipher, open_line


class AuditLog:
    def __init__(self, path: Path, cipher: DataCipher | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.cipher = cipher
        self._lock = threading.Lock()

    def record(self, who: str, action: str, request: dict, result: str, detail: str = "") -> None:
        line = json.dumps({"ts": datetime.now(timezone.utc).isoformat(), "who": who,
                           "action": action, "request": request, "result": result,
                           "detail": detail}, sort_keys=True).encode()
        if self.cipher is not None:
            line = self.cipher.seal_line(line)
        with self._lock, open(self.path, "ab") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())


def read_audit(path: Path, cipher: DataCipher | None = None) -> list[dict]:
    """The audit log's records, oldest first; sealed lines are opened with ``cipher`` (a
    :class:`freshrec.storage.crypto.DecryptError` names the key a line needs when it is missing or
    another)."""
    out = []
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            out.append(json.loads(open_line(line, cipher, f"{path} line {n}")))
    return out
