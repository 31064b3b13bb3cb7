"""Micro-batched search (recmodels/batcher.py): concurrent single searches answered by one batched
search give the same results as searching alone; the exact torch search matches FAISS; the GPU
path where a GPU is visible."""

from __future__ import annotations

import gc
import threading
import time

import faiss
import numpy as np
import pytest

from recmodels.batcher import SearchBatcher, TorchExactSearch, torch_cuda_reason
from recmodels.index import REBUILD_TOMBSTONE_SHARE, ItemIndex, gpu_count


def _data(n: int = 20_000, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(200, d)).astype(np.float32)
    vecs = centers[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    queries = vecs[rng.integers(0, n, 400)] + 0.1 * rng.normal(size=(400, d)).astype(np.float32)
    return [f"i{i}" for i in range(n)], vecs.astype(np.float32), queries.astype(np.float32)


def _concurrently(fn, jobs: list, threads: int = 16) -> list:
    out = [None] * len(jobs)
    errors = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for n in range(t, len(jobs), threads):
            try:
                out[n] = fn(*jobs[n])
            except Exception as e:  # noqa: BLE001 - collected and asserted on
                errors.append(e)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:3]
    return out


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_concurrent_searches_are_batched_and_get_what_single_searches_get(index_type):
    ids, vecs, queries = _data()
    alone = ItemIndex.build(ids, vecs, index_type, nlist=64, nprobe=64)
    batched = ItemIndex(alone.index, ids, vecs, index_type, batch_window_ms=1.0, batch_max=64)
    jobs = [(q, 5 + n % 20) for n, q in enumerate(queries)]  # different k in one batch
    got = _concurrently(batched.search_positions, jobs)
    want = [alone.search_positions(q, k) for q, k in jobs]
    assert [[(p, i) for p, i, _ in g] for g in got] == [[(p, i) for p, i, _ in w] for w in want]
    assert all(np.allclose([s for *_, s in g], [s for *_, s in w], atol=1e-5)
               for g, w in zip(got, want))
    b = batched.batcher
    assert b.requests == len(jobs)
    assert b.calls < b.requests / 2, (b.calls, b.requests)  # batches of several, not one each
    b.close()


def test_batched_search_never_returns_removed_items_and_finds_upserted_ones():
    ids, vecs, queries = _data(5_000)
    index = ItemIndex.build(ids, vecs, "flat")
    batched = ItemIndex(index.index, ids, vecs, "flat", batch_window_ms=1.0)
    first = [i for _, i, _ in batched.search_positions(queries[0], 10)]
    batched.remove(first[:5])
    batched.upsert([("new", queries[1] * 10)])
    jobs = [(q, 10) for q in queries[:64]]
    got = _concurrently(batched.search_positions, jobs)
    served = {i for g in got for _, i, _ in g}
    assert not served & set(first[:5])
    assert got[1][0][1] == "new"
    batched.batcher.close()


def _search_from_threads(b, q, n: int, expected: type[BaseException]):
    """``n`` threads (daemons: one left waiting must not hold the test run) each search ``q``
    through ``b`` once; returns the ``expected`` errors they caught and the threads, each joined
    for at most 5 s."""
    errors = []

    def call():
        try:
            b.search(q, 3)
        except expected as e:
            errors.append(e)

    ts = [threading.Thread(target=call, daemon=True) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    return errors, ts


def test_a_failing_batch_fails_each_of_its_callers_and_none_hangs():
    def broken(queries, k):
        raise MemoryError("out of GPU memory")

    b = SearchBatcher(broken, window_ms=1.0)
    q = np.zeros(8, np.float32)
    errors, ts = _search_from_threads(b, q, 8, MemoryError)
    assert len(errors) == 8 and not any(t.is_alive() for t in ts)
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.search(q, 3)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_batcher_thread_fails_its_callers_instead_of_hanging_them():
    class Killed(BaseException):  # escapes the batcher's `except Exception`: its thread dies
        pass

    def dying(queries, k):
        raise Killed()

    b = SearchBatcher(dying, window_ms=1.0)
    q = np.zeros(8, np.float32)
    errors, ts = _search_from_threads(b, q, 4, RuntimeError)
    assert not any(t.is_alive() for t in ts), "a caller still waits on a dead batcher thread"
    assert len(errors) == 4 and all("thread" in str(e) and "dead" in str(e) for e in errors)
    with pytest.raises(RuntimeError, match="dead"):  # later searches fail at once
        b.search(q, 3)


def test_the_batcher_thread_ends_when_its_index_is_replaced():
    ids, vecs, queries = _data(2_000)
    index = ItemIndex.build(ids, vecs, "flat")
    batched = ItemIndex(index.index, ids, vecs, "flat", batch_window_ms=1.0)
    batched.search_positions(queries[0], 3)
    thread = batched.batcher._thread
    del batched
    gc.collect()
    end = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < end:
        time.sleep(0.05)
    assert not thread.is_alive()  # nothing keeps the old index (its GPU memory) alive


def test_batching_a_read_only_cpu_index_is_refused_naming_the_setting():
    ids, vecs, _ = _data(1_000)
    index = ItemIndex.build(ids, vecs, "flat")
    with pytest.raises(ValueError, match="gpu_batch_window_ms"):
        ItemIndex(index.index, ids, vecs, "flat", read_only=True, batch_window_ms=1.0)


def test_torch_exact_search_gives_faiss_exact_top_k_and_masks_removed_rows():
    pytest.importorskip("torch")
    ids, vecs, queries = _data(5_000)
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs)
    exact = TorchExactSearch(vecs[:4_000], device="cpu")
    exact.add_with_ids(vecs[4_000:], np.arange(4_000, 5_000))
    want_s, want_i = flat.search(queries, 10)
    got_s, got_i = exact.search(queries, 10)
    assert (got_i == want_i).mean() > 0.999 and np.allclose(got_s, want_s, atol=1e-3)
    exact.mask_positions(want_i[:, 0].tolist())
    _, masked = exact.search(queries, 10)
    assert not set(masked.ravel().tolist()) & set(want_i[:, 0].tolist())
    with pytest.raises(ValueError, match="next positions"):
        exact.add_with_ids(vecs[:2], np.array([7, 8]))
    small = TorchExactSearch(vecs[:3], device="cpu", dead=[1])
    s, i = small.search(queries[:1], 5)  # fewer live rows than k: padded like FAISS
    assert sorted(i[0, :2].tolist()) == [0, 2] and i[0, 2:].tolist() == [-1, -1, -1]


def test_the_torch_replica_drops_removed_rows_past_the_rebuild_threshold():
    """Removed items are masked on the torch copy; past REBUILD_TOMBSTONE_SHARE of the live
    items the copy is rebuilt over the live rows only (its memory shrinks), same answers."""
    pytest.importorskip("torch")
    ids, vecs, queries = _data(3_000)
    index = ItemIndex(ItemIndex.build(ids, vecs, "flat").index, ids, vecs, "flat", use_gpu=True,
                      replica_device="cpu")
    assert index._gpu.ntotal == 3_000
    for start in range(0, 1_500, 100):  # half the items removed, a hundred at a time
        index.remove(ids[start:start + 100])
        assert index._gpu.masked <= REBUILD_TOMBSTONE_SHARE * index.size + 100
    assert index._gpu.ntotal < 1_500 * (1 + REBUILD_TOMBSTONE_SHARE) + 100  # was 3,000 rows
    index.upsert([("new-a", vecs[0]), ("new-b", vecs[1])])  # new positions after a rebuild
    cpu = ItemIndex.build(ids[1_500:] + ["new-a", "new-b"], np.vstack([vecs[1_500:], vecs[:2]]),
                          "flat")
    for q in queries[:50]:
        got = [(i, round(s, 3)) for i, s in index.search(q, 10)]
        want = [(i, round(s, 3)) for i, s in cpu.search(q, 10)]
        assert [i for i, _ in got] == [i for i, _ in want]
    assert {i for i, _ in index.search(vecs[0], 3)} >= {"new-a"}
    assert not {i for q in queries[:50] for i, _ in index.search(q, 10)} & set(ids[:1_500])


GPU_REASON = None if gpu_count() > 0 else torch_cuda_reason()


@pytest.mark.skipif(GPU_REASON is not None,
                    reason=f"no GPU visible: FAISS has no GPU build and {GPU_REASON}")
def test_gpu_batched_search_matches_the_cpu_index():
    ids, vecs, queries = _data()
    cpu = ItemIndex.build(ids, vecs, "flat")
    gpu = ItemIndex(cpu.index, ids, vecs, "flat", use_gpu=True, batch_window_ms=1.0)
    jobs = [(q, 10) for q in queries]
    got = _concurrently(gpu.search_positions, jobs)
    want = [cpu.search_positions(q, 10) for q, _ in jobs]
    agree = np.mean([len({p for p, *_ in g} & {p for p, *_ in w}) / 10
                     for g, w in zip(got, want)])
    assert agree > 0.99, agree
    assert gpu.batcher.calls < gpu.batcher.requests / 2
    gpu.remove([got[0][0][1]])
    assert got[0][0][1] not in [i for _, i, _ in gpu.search_positions(queries[0], 10)]


def test_device_cuda_without_any_gpu_refuses_naming_faiss_and_torch():
    if GPU_REASON is None:
        pytest.skip("a GPU is visible here")
    from freshrec.device import DeviceUnavailable
    from serving.server import serving_gpu

    assert serving_gpu("cpu") is False and serving_gpu("auto") is False
    with pytest.raises(DeviceUnavailable, match="neither FAISS nor torch"):
        serving_gpu("cuda")


@pytest.mark.skipif(GPU_REASON is not None,
                    reason=f"no GPU visible: FAISS has no GPU build and {GPU_REASON}")
def test_the_server_searches_on_the_gpu_where_faiss_or_torch_sees_one(tmp_path):
    """device: auto with a GPU visible to FAISS or (no faiss-gpu) to torch only: the server's
    index has a GPU replica and answers what the CPU index answers."""
    from freshrec.settings import load_settings
    from freshrec.api.client import Client
    from serving.server import FreshrecServer
    from serving.synthetic import write_snapshot

    key = load_settings("local", env={}).privacy.hmac_key
    write_snapshot(tmp_path / "snapshots", key, n_items=5_000, dim=16, n_users=50,
                   index_type="flat")
    settings = load_settings("local", env={"FRESHREC_DATA_DIR": str(tmp_path)},
                             serving={"port": 0, "metrics_port": -1}, device="auto")
    gpu = FreshrecServer(settings)
    cpu = FreshrecServer(settings.model_copy(update={"device": "cpu"}))
    addrs = []
    try:
        for server in (gpu, cpu):
            addrs.append(f"127.0.0.1:{server.start()}")
        assert gpu.use_gpu and not cpu.use_gpu
        assert gpu.state.items._gpu is not None  # FAISS's GPU replica or the torch search
        a, b = Client(addrs[0], "dev-admin-token"), Client(addrs[1], "dev-admin-token")
        assert a.call_admin("Status", a.admin_pb2.StatusRequest()).device == "cuda"
        for u in range(20):
            got = [i.item_id for i in a.recommend(f"u{u}", 10).items]
            want = [i.item_id for i in b.recommend(f"u{u}", 10).items]
            assert len(set(got) & set(want)) >= 9, (got, want)  # exact, up to ties
        a.close()
        b.close()
    finally:
        gpu.stop(grace=0)
        cpu.stop(grace=0)
