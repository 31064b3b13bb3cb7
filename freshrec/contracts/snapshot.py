"""The snapshot contract between the batch lane and serving: everything a replica needs to serve
one registered model, so that it reads no Delta table to start.

A snapshot is a directory ``<data>/snapshots/<name>/`` holding

* ``model/``: the registered version's servable artifact (see :mod:`recmodels.servable`);
* ``item_ids.json``: the model's catalog (position -> item id), ``items.json``: which of them are
  active, their categories and the popularity order (the cold-start ranking);
* ``users.npz``: every user's history over catalog positions (summed weights), their newest items in
  time order, and for embedding models their vectors from the whole history;
* ``index.faiss`` for embedding models (item vectors keyed by position);
* ``neighbors.npz``: the gold ``item_neighbors`` (co-occurrence) over catalog positions, the
  ``SimilarItems`` source of models without an item similarity of their own;
* ``manifest.json``: the served version's label (``freshrec-retrieval/3 two_tower``), kind, index
  type, sizes and the Delta versions it was built from.

``LATEST`` names the newest complete snapshot; it is replaced atomically after the snapshot directory
is complete (written under a temporary name, then renamed), so a reader sees the old or the new
snapshot, never half of one. :func:`find_snapshot` finds the newest one of a registered version.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import faiss

INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.json"
ITEMS_FILE = "items.json"
USERS_FILE = "users.npz"
NEIGHBORS_FILE = "neighbors.npz"  # gold item_neighbors over catalog positions (CSR)
MODEL_DIR = "model"
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
    registered_model: str = ""
    registry_version: int = 0
    model_name: str = ""
    kind: str = ""  # embedding | history | popularity | hybrid

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


def find_snapshot(snapshots_dir: Path, registry_version: int) -> Path | None:
    """The newest complete snapshot of a registered version, or None."""
    if not snapshots_dir.exists():
        return None
    found = []
    for d in snapshots_dir.iterdir():
        if d.name.startswith(".") or not (d / MANIFEST_FILE).exists():
            continue
        try:
            m = json.loads((d / MANIFEST_FILE).read_text())
        except ValueError:
            continue
        if m.get("registry_version") == registry_version:
            found.append((d.stat().st_mtime, d))
    return max(found)[1] if found else None


def publish(snapshots_dir: Path, name: str) -> None:
    from freshrec.durable import fsync_path

    tmp = snapshots_dir / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    fsync_path(tmp)
    os.replace(tmp, snapshots_dir / LATEST)
    fsync_path(snapshots_dir)


def load_snapshot(path: Path, mmap: bool = False) -> tuple["faiss.Index | None", list[str], Manifest]:
    """The snapshot's FAISS index (``mmap``: memory-mapped read-only, ``IO_FLAG_MMAP_IFC``: the
    page cache is shared by every process mapping the file; such an index must never be written,
    see :class:`recmodels.index.ItemIndex`), its item ids and manifest."""
    import faiss  # heavy: only where a snapshot is read

    index = path / INDEX_FILE
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return (faiss.read_index(str(index), flags) if index.exists() else None,
            json.loads((path / IDS_FILE).read_text()), Manifest.read(path))
