"""The audit trail of admin actions: one JSON line per call (who, what, when, result), fsynced."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path


class AuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def record(self, who: str, action: str, request: dict, result: str, detail: str = "") -> None:
        line = json.dumps({"ts": datetime.now(timezone.utc).isoformat(), "who": who,
                           "action": action, "request": request, "result": result,
                           "detail": detail}, sort_keys=True)
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
