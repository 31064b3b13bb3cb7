"""The index snapshot contract between the batch lane and serving.

A snapshot is a directory ``<data>/snapshots/<model_version>/`` holding ``index.faiss`` (vectors
keyed by int64 position), ``item_ids.json`` (position -> item id) and ``manifest.json`` (model
version, index type, metric, sizes, and the Delta versions it was built from). ``LATEST`` in the
snapshots directory names the newest complete snapshot; it is replaced atomically after the
snapshot directory is complete, so a reader sees the old or the new snapshot, never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.json"
MANIFEST_FILE = "manifest.json"
LATEST = "LATEST"


@dataclass(frozen=True)
class Manifest:
    model_version: str
    index_type: str  # flat | ivf | hnsw
    metric: str  # inner_product
    dim: int
    n_items: int
    delta_versions: dict[str, int | None] = field(default_factory=dict)
    built_for_interval: str = ""
    params: dict[str, int] = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        return cls(**json.loads((directory / MANIFEST_FILE).read_text()))


def latest_snapshot(snapshots_dir: Path) -> Path | None:
    pointer = snapshots_dir / LATEST
    if not pointer.exists():
        return None
    path = snapshots_dir / pointer.read_text().strip()
    return path if (path / MANIFEST_FILE).exists() else None


def publish(snapshots_dir: Path, name: str) -> None:
    tmp = snapshots_dir / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, snapshots_dir / LATEST)
