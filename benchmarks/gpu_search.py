"""GPU batched search against the CPU search serving uses, queries per second at their recall.

CPU: what a Recommend does on the CPU, a single-query FAISS IVF search (one OpenMP thread), from
as many threads as the machine has cores (FAISS releases the GIL), so all cores are busy. Without
FAISS (the lent GPU machine's image has none) the CPU side is an exact single-query search in
torch on the CPU instead, and says so.

GPU (skipped, with the reason, when no GPU is visible): single queries from ``--clients`` threads
through recmodels/batcher.py's SearchBatcher (window ``--window-ms``, at most ``--max-batch`` per
batch) over recmodels.batcher.TorchExactSearch (exact: the GPU path serving takes where FAISS has
no GPU build), float32 and float16; plus the raw batched search alone (no threads, no batcher),
the ceiling. Recall@10 of every path against exact float64-accumulated answers for 1,000 users.

    .venv/bin/python benchmarks/gpu_search.py                      # 200k items x 64
    .venv/bin/python benchmarks/gpu_search.py --items 1000000      # the issue's size

Imports numpy and recmodels/batcher.py only (plus faiss and torch where present).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recmodels.batcher import SearchBatcher, TorchExactSearch, torch_cuda_reason  # noqa: E402


def make_data(items: int, dim: int, clusters: int, users: int, seed: int = 0):
    """benchmarks/serving.py's catalog: overlapping clusters, users the mean of two items."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    vecs = centers[rng.integers(0, clusters, items)] + rng.normal(size=(items, dim)).astype(
        np.float32)
    uvecs = vecs[rng.integers(0, items, (users, 2))].mean(1).astype(np.float32)
    return vecs.astype(np.float32), uvecs


def exact_top(vecs: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    out = []
    for q in np.array_split(queries, max(1, len(queries) // 100)):
        s = q.astype(np.float64) @ vecs.T.astype(np.float64)
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10].tolist()) & set(t.tolist())) / 10
                          for f, t in zip(found, truth)]))


def threaded_qps(search_one, queries: np.ndarray, threads: int, seconds: float) -> float:
    """Single-query searches from ``threads`` threads for ``seconds``: answered per second."""
    counts = [0] * threads
    end = time.perf_counter() + seconds
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        n = t
        start.wait()
        while time.perf_counter() < end:
            search_one(queries[n % len(queries)])
            n += threads
            counts[t] += 1

    ts = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def cpu_side(args, vecs, uvecs, truth) -> tuple[str, float, float]:
    threads = os.cpu_count() or 1
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(1)
        d = vecs.shape[1]
        nlist = args.nlist or max(1, int(2 * np.sqrt(len(vecs))))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(1)
        ivf.train(vecs[np.sort(rng.choice(len(vecs), min(len(vecs), 64 * nlist), replace=False))])
        ivf.add(vecs)
        ivf.nprobe = args.nprobe
        _, found = ivf.search(uvecs[:len(truth)], 10)
        qps = threaded_qps(lambda q: ivf.search(q.reshape(1, -1), 10), uvecs, threads,
                           args.seconds)
        return f"FAISS IVF{nlist} nprobe {args.nprobe}, single queries, {threads} threads", \
            qps, recall(found, truth)
    exact = TorchExactSearch(vecs, device="cpu")
    _, found = exact.search(uvecs[:len(truth)], 10)
    qps = threaded_qps(lambda q: exact.search(q.reshape(1, -1), 10), uvecs, threads, args.seconds)
    return f"exact torch on the CPU (no FAISS here), single queries, {threads} threads", qps, \
        recall(found, truth)


def gpu_side(args, vecs, uvecs, truth) -> list[tuple[str, float, float]]:
    import torch

    rows = []
    for half in (False, True):
        exact = TorchExactSearch(vecs, device="cuda", half=half)
        _, found = exact.search(uvecs[:len(truth)], 10)
        r = recall(found, truth)
        kind = "float16" if half else "float32"
        batch = uvecs[:args.max_batch]
        exact.search(batch, 10)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            exact.search(uvecs[(n * args.max_batch) % (len(uvecs) - args.max_batch):][
                :args.max_batch], 10)
            n += 1
        raw = n * args.max_batch / (time.perf_counter() - t0)
        b = SearchBatcher(exact.search, args.window_ms, args.max_batch)
        qps = threaded_qps(lambda q, b=b: b.search(q, 10), uvecs, args.clients, args.seconds)
        mean_batch = b.requests / max(1, b.calls)
        b.close()
        rows.append((f"GPU exact {kind}, {args.clients} threads through the batcher "
                     f"(window {args.window_ms} ms, mean batch {mean_batch:.0f})", qps, r))
        rows.append((f"GPU exact {kind}, raw batches of {args.max_batch} (ceiling)", raw, r))
        del exact
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 2 sqrt(items))")
    ap.add_argument("--nprobe", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--clients", type=int, default=64, help="threads sending single queries")
    ap.add_argument("--window-ms", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=256)
    args = ap.parse_args()

    t0 = time.perf_counter()
    vecs, uvecs = make_data(args.items, args.dim, args.clusters, args.users)
    truth = exact_top(vecs, uvecs[:1000])
    print(f"{args.items:,} items x {args.dim}, {args.clusters} clusters, {args.users:,} users; "
          f"data and exact answers in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} cores")
    name, cpu_qps, cpu_recall = cpu_side(args, vecs, uvecs, truth)
    print(f"{'path':<88}{'queries/s':>12}{'recall@10':>11}{'vs CPU':>9}")
    print(f"{'CPU: ' + name:<88}{cpu_qps:>12,.0f}{cpu_recall:>11.3f}{1:>8.2f}x")
    why = torch_cuda_reason()
    if why is not None:
        print(f"GPU: skipped ({why}); the batching logic is tested on the CPU by "
              "tests/test_serving_batcher.py")
        return
    for label, qps, r in gpu_side(args, vecs, uvecs, truth):
        print(f"{label:<88}{qps:>12,.0f}{r:>11.3f}{qps / cpu_qps:>8.2f}x"
              + ("  (target >= 10x: " + ("met" if qps >= 10 * cpu_qps else "MISSED") + ")"
                 if "batcher" in label else ""))


if __name__ == "__main__":
    main()
