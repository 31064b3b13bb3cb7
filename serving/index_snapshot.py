"""Build the serving index snapshot: gold ``item_factors`` -> FAISS index + id map + manifest.

Exact inner-product search (``IndexFlatIP``) for catalogs up to ``index.exact_max_items``; above it
IVF (``IndexIVFFlat``, ``nlist`` from settings or 4*sqrt(n)) or HNSW, as settings say. Inactive
items (``items.active = false``) are left out. The snapshot is written to a temporary directory,
renamed into place and then published as LATEST (see :mod:`freshrec.snapshot`); a snapshot that
already exists for the same model version and inputs is left as it is.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow.compute as pc

from freshrec.delta import DeltaStore
from freshrec.interval import DataInterval, run_job
from freshrec.settings import IndexSettings, Settings
from serving.index import ItemIndex
from freshrec.snapshot import IDS_FILE, INDEX_FILE, Manifest, latest_snapshot, publish

log = logging.getLogger(__name__)


def build_index(vectors: np.ndarray, cfg: IndexSettings) -> tuple[faiss.Index, str, dict[str, int]]:
    """Exact search up to ``cfg.exact_max_items`` items, the configured ANN index above."""
    n = len(vectors)
    kind = "flat" if n <= cfg.exact_max_items else cfg.ann_type
    built = ItemIndex.build([str(i) for i in range(n)], vectors, kind, nlist=cfg.ivf_nlist,
                            nprobe=cfg.ivf_nprobe, hnsw_m=cfg.hnsw_m, ef_search=cfg.hnsw_ef_search)
    params = {"flat": {}, "hnsw": {"m": cfg.hnsw_m, "ef_search": cfg.hnsw_ef_search},
              "ivf": {"nlist": getattr(built.index, "nlist", 0), "nprobe": cfg.ivf_nprobe}}[kind]
    return built.index, kind, params


def run(settings: Settings, interval: DataInterval) -> dict[str, object]:
    store = DeltaStore(settings)
    versions = {t: store.version(t) for t in ("item_factors", "items", "events")}
    factors = store.read_arrow("item_factors", version=versions["item_factors"])
    if factors.num_rows == 0:
        raise ValueError("item_factors is empty: run the als job for this interval first")
    inactive = store.read_arrow("items", columns=["item_id"], filter=pc.field("active") == False)  # noqa: E712
    factors = factors.filter(pc.invert(pc.is_in(factors.column("item_id"),
                                                inactive.column("item_id"))))
    model_version = factors.column("model_version")[0].as_py()
    item_ids = factors.column("item_id").to_pylist()
    vectors = np.ascontiguousarray(np.stack(factors.column("factors").to_numpy(
        zero_copy_only=False)).astype(np.float32))
    root = settings.snapshots_dir
    name = f"{model_version}-items{versions['items']}"
    final = root / name
    if (final / "manifest.json").exists() and latest_snapshot(root) == final:
        log.info("build_index: snapshot %s already published; nothing to do", name)
        return {"snapshot": str(final), "skipped": True}
    index, kind, params = build_index(vectors, settings.index)
    manifest = Manifest(model_version=model_version, index_type=kind, metric="inner_product",
                        dim=int(vectors.shape[1]), n_items=len(item_ids), delta_versions=versions,
                        built_for_interval=interval.batch_date, params=params)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    faiss.write_index(index, str(tmp / INDEX_FILE))
    (tmp / IDS_FILE).write_text(json.dumps(item_ids))
    manifest.write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    publish(root, name)
    log.info("build_index: %s index over %d items -> %s", kind, len(item_ids), final)
    return {"snapshot": str(final), "skipped": False, "index_type": kind, "n_items": len(item_ids)}


def load_snapshot(path: Path) -> tuple[faiss.Index, list[str], Manifest]:
    return (faiss.read_index(str(path / INDEX_FILE)), json.loads((path / IDS_FILE).read_text()),
            Manifest.read(path))


def main(argv: list[str] | None = None) -> dict[str, object]:
    return run_job(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
