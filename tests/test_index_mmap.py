"""The memory-mapped, read-only FAISS index (serving.mmap_index): the same answers as the index
in memory through upserts, removals and the copy into memory, for flat, IVF and HNSW."""

from __future__ import annotations

import numpy as np
import pytest

from recmodels.index import REBUILD_TOMBSTONE_SHARE, ItemIndex
from freshrec.contracts.snapshot import load_snapshot
from serving.synthetic import write_snapshot


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_read_only_index_answers_like_the_writable_one_through_deltas(tmp_path, kind):
    snap = write_snapshot(tmp_path, "k", n_items=3000, dim=16, n_users=10, index_type=kind,
                          nlist=16, nprobe=16)
    ids = [f"i{i}" for i in range(3000)]
    mapped, item_ids, _ = load_snapshot(snap, mmap=True)
    inmem, _, _ = load_snapshot(snap, mmap=False)
    from recmodels.servable import load

    vectors = load(snap / "model").item_vectors()
    ro = ItemIndex(mapped, item_ids, vectors, kind, read_only=True)
    rw = ItemIndex(inmem, item_ids, vectors, kind)
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(20, 16)).astype(np.float32)

    def same():
        for q in queries:
            a, b = ro.search(q, 10), rw.search(q, 10)
            if kind == "hnsw":  # approximate: an item added to the graph may be missed there
                assert len({i for i, _ in a} & {i for i, _ in b}) >= 8
                continue
            assert [i for i, _ in a] == [i for i, _ in b]
            # the serving hot path's search: (position, id, score), positions the index's own
            assert [(p, i) for p, i, _ in ro.search_positions(q, 10)] == \
                [(ro.position[i], i) for i, _ in a]
            assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-4)

    same()
    # removals: the answer for a query is its best items; remove them and they never come back
    best = [i for i, _ in ro.search(queries[0], 5)]
    assert ro.remove(best) == rw.remove(best) == 5
    assert not set(best) & {i for i, _ in ro.search(queries[0], 50)}
    same()
    # upserts: a new item right on the query comes first; a replaced item moves with its vector
    new = [("new1", queries[1] * 3), (ids[7], queries[2] * 3)]
    assert ro.upsert(new) == rw.upsert(new) == 2
    assert ro.search(queries[1], 1)[0][0] == "new1" and ro.search(queries[2], 1)[0][0] == ids[7]
    same()
    ro.remove(["new1"]), rw.remove(["new1"])
    assert "new1" not in {i for i, _ in ro.search(queries[1], 50)}
    same()
    assert ro.read_only  # still shared: nothing was copied yet
    # past the share, the index is copied into memory and stays right
    many = ids[100:100 + int(REBUILD_TOMBSTONE_SHARE * 3000) + 5]
    ro.remove(many), rw.remove(many)
    assert not ro.read_only and ro.overlay is None
    same()
    ro.upsert([("new2", queries[3] * 3)]), rw.upsert([("new2", queries[3] * 3)])
    assert ro.search(queries[3], 1)[0][0] == "new2"
    same()
