"""Serving benchmark: FreshrecServer against a bare gRPC + FAISS server, side by side in one run.

Both servers run in their own process on the same FAISS index file, the same user vectors and the
same seen sets, and answer the same pre-serialized ``RecommendRequest`` bytes from the same load
clients. The bare server is written here (not imported from serving/): a sync Python gRPC server
that looks up the user's vector, searches FAISS, drops the user's seen items and answers. Every
figure of FreshrecServer (cache off, as deployed otherwise: auth, rate limits, pseudonymization,
impression log, metrics) is reported as a ratio to it:

- one client, one call at a time, each request sent to every server in turn: p50 / p99, and each
  server's CPU per call (its process CPU time delta over the calls, read through psutil);
- 32 calls in flight (asyncio client processes): throughput and CPU per call, in ``--slices``
  slices per server with the servers taking turns slice by slice;
- with ``--paced-seconds N``: an open-loop phase at 80% of each server's own maximum, p50 / p99
  (meaningful only on a machine no other work shares);
- recall@10 of the served lists against exact search over the items the user has not seen.

The dataset is harder than well-separated clusters: 1,000 overlapping clusters (spread 1.0 around
unit-normal centers) and each user's taste the mean of two items, so IVF recall@10 is around
0.93-0.95 (200k items, 2 sqrt(n) lists, nprobe 12), not 1.0. ``--png`` writes the latency CDF of
both servers (matplotlib).

    .venv/bin/python benchmarks/serving.py                   # 200k items, about 2 minutes
    .venv/bin/python benchmarks/serving.py --items 1000000 --nlist 4096   # the issue's 1M x 64

``--rounds 3`` alternates the servers three times and reports medians (a shared machine's busy
spells then hit both); ``--aio`` adds the bare server on grpc.aio, reported against the sync one.

``--kinds factors,two_tower,item_knn,hybrid`` then times one client's Recommend per served model
kind on the same catalog (in-process server; slow for 1M items: item-kNN lists are built first).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "dev-client-token"
METHOD = "/freshrec.v1.Recommender/Recommend"
SEEN_PER_USER = 20


# ---- the data --------------------------------------------------------------------------------
def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 1.0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    assign = rng.integers(0, clusters, n)
    vecs = centers[assign] + spread * rng.normal(size=(n, dim)).astype(np.float32)
    return vecs.astype(np.float32), rng


def make_data(args, out: Path) -> dict:
    """Items, the IVF index file both servers load, users (taste = mean of two items), each user's
    seen items (the ``SEEN_PER_USER`` best of a random sample: near their taste, so they would
    otherwise be served) and the exact top-10 of unseen items for the first 500 users."""
    import faiss
    import numpy as np

    vecs, rng = clustered(args.items, args.dim, args.clusters, 0, args.spread)
    n, d = vecs.shape
    nlist = args.nlist or max(1, int(2 * np.sqrt(n)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vecs[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
    ivf.train(sample)
    ivf.nprobe = args.nprobe
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # as recmodels/index.py builds it
    ivf.add_with_ids(vecs, np.arange(n, dtype=np.int64))
    faiss.write_index(ivf, str(out / "items.faiss"))
    uvecs = vecs[rng.integers(0, n, (args.users, 2))].mean(1).astype(np.float32)
    pool = np.sort(rng.choice(n, min(n, 50_000), replace=False))
    near = faiss.IndexFlatIP(d)
    near.add(vecs[pool])
    seen = pool[near.search(uvecs, SEEN_PER_USER)[1]].astype(np.int64)
    np.save(out / "items.npy", vecs)
    np.savez(out / "users.npz", uvecs=uvecs, seen=seen)
    exact = faiss.IndexFlatIP(d)
    exact.add(vecs)
    _, wide = exact.search(uvecs[:500], 10 + SEEN_PER_USER)
    truth = [[int(i) for i in row if i not in set(seen[u].tolist())][:10]
             for u, row in enumerate(wide)]
    return {"vecs": vecs, "uvecs": uvecs, "seen": seen, "truth": truth, "nlist": nlist,
            "index": ivf}


def _users(n: int) -> list[str]:
    return [f"user{u}" for u in range(n)]


# ---- the bare server (the floor) ---------------------------------------------------------------
def _bare_state(data: str):
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(1)
    index = faiss.read_index(str(Path(data) / "items.faiss"))
    z = np.load(Path(data) / "users.npz")
    uvecs = z["uvecs"]
    seen = [set(row.tolist()) for row in z["seen"]]
    row = {u: n for n, u in enumerate(_users(len(uvecs)))}
    ids = [f"i{i}" for i in range(index.ntotal)]
    return index, uvecs, seen, row, ids


def _bare_handler(data: str, asynchronous: bool):
    """The bare Recommend (user vector lookup, FAISS search, drop seen, answer) as a generic
    handler. Uses only the API's message classes (the wire format both servers speak)."""
    import grpc

    from freshrec.api.proto import stubs

    pb2 = stubs()["recommender_pb2"]
    index, uvecs, seen, row, ids = _bare_state(data)
    Item, Reply = pb2.ScoredItem, pb2.RecommendResponse

    def answer(request):
        r = row.get(request.user_id)
        if r is None:
            return None
        drop, k = seen[r], request.k
        scores, found = index.search(uvecs[r:r + 1], k + len(drop))
        items = [Item(item_id=ids[i], score=s) for s, i in zip(scores[0].tolist(), found[0].tolist())
                 if i >= 0 and i not in drop]
        return Reply(items=items[:k])

    if asynchronous:
        async def recommend(request, context):
            reply = answer(request)
            if reply is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "unknown user")
            return reply
    else:
        def recommend(request, context):
            reply = answer(request)
            if reply is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown user")
            return reply
    return grpc.method_handlers_generic_handler("freshrec.v1.Recommender", {
        "Recommend": grpc.unary_unary_rpc_method_handler(
            recommend, request_deserializer=pb2.RecommendRequest.FromString,
            response_serializer=Reply.SerializeToString)})


def serve_bare(data: str, workers: int, ready, stop) -> None:
    """The bare Recommend in a sync gRPC server with ``workers`` threads."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         handlers=[_bare_handler(data, False)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.put(("bare", port))
    stop.wait()
    server.stop(1).wait()


def serve_bare_aio(data: str, workers: int, ready, stop) -> None:
    """The bare Recommend in an asyncio server (grpc.aio), answered on the event loop."""
    import asyncio

    import grpc

    async def main() -> None:
        server = grpc.aio.server(handlers=[_bare_handler(data, True)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(("bare-aio", port))
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(1)

    asyncio.run(main())


# ---- freshrec --------------------------------------------------------------------------------
def serve_freshrec(data: str, workers: int, ready, stop, serving: dict) -> None:
    """FreshrecServer (cache off) serving an ALS-style state over the same index file."""
    import faiss
    import numpy as np

    from freshrec.settings import load_settings
    from recmodels.servable import FactorServable
    from recmodels.index import ItemIndex
    from serving.server import FreshrecServer
    from serving.state import build_state

    settings = load_settings(env={}, paths={"data_dir": str(Path(data) / "freshrec")}, serving={
        "port": 0, "metrics_port": -1, "cache_size": 0, "workers": workers,
        "rate_limit_per_second": 1e9, "rate_limit_burst": 10**9,
        "peer_rate_limit_per_second": 1e9, "peer_rate_limit_burst": 10**9, **serving})
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start(load=False)
    vecs = np.load(Path(data) / "items.npy")
    z = np.load(Path(data) / "users.npz")
    uvecs, seen = z["uvecs"], z["seen"]
    item_ids = [f"i{i}" for i in range(len(vecs))]
    index = ItemIndex(faiss.read_index(str(Path(data) / "items.faiss")), item_ids, vecs, "ivf")
    pseudo = [server.pseudonym(u) for u in _users(len(uvecs))]
    per = seen.shape[1]
    hist = {"indptr": np.arange(0, len(pseudo) * per + 1, per, dtype=np.int64),
            "items": seen.ravel(), "weights": np.ones(seen.size, np.float32)}
    hist["recent_indptr"], hist["recent"] = hist["indptr"].copy(), hist["items"].copy()
    state = build_state(FactorServable("als", np.asarray(item_ids), {}, vecs), "bench als", pseudo,
                        hist, index=index, index_type="ivf",
                        user_vectors=dict(zip(pseudo, uvecs)), popular=item_ids[:1000])
    server.swap(state)
    ready.put(("freshrec", port))
    stop.wait()
    server.stop(grace=1)


# ---- the clients -----------------------------------------------------------------------------
def one_client(addrs: dict[str, str], requests: list[bytes], keep: int, out) -> None:
    """One call at a time over pre-serialized requests, each request sent to every server in
    turn (the first server rotating), so a busy spell of the machine hits all of them alike.
    Returns {server: (latencies, first ``keep`` replies)}."""
    import grpc

    meta = (("authorization", f"Bearer {TOKEN}"),)
    channels = {name: grpc.insecure_channel(a) for name, a in addrs.items()}
    calls = [(name, ch.unary_unary(METHOD)) for name, ch in channels.items()]  # bytes in and out
    for r in requests[:200]:
        for _, call in calls:
            call(r, metadata=meta, timeout=5)  # warm up
    got = {name: ([], []) for name in addrs}
    for n, r in enumerate(requests):
        for j in range(len(calls)):
            name, call = calls[(n + j) % len(calls)]
            t = time.perf_counter()
            reply = call(r, metadata=meta, timeout=5)
            got[name][0].append(time.perf_counter() - t)
            if n < keep:
                got[name][1].append(reply)
    for ch in channels.values():
        ch.close()
    out.put(got)


def load_client(addr: str, requests: list[bytes], seconds: float, in_flight: int, rate: float,
                out) -> None:
    """asyncio client keeping ``in_flight`` calls open for ``seconds`` (rate 0), or sending
    ``rate`` calls per second on a fixed schedule (open loop; latency counted from the scheduled
    start, so a server that falls behind shows it). Returns (ok, errors, latencies)."""
    import asyncio

    import grpc

    async def run():
        async with grpc.aio.insecure_channel(
                addr, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.unary_unary(METHOD)
            meta = (("authorization", f"Bearer {TOKEN}"),)
            counts, lat = [0, 0], []
            t0 = time.perf_counter()
            end = t0 + seconds

            async def one(r: bytes, start: float) -> None:
                try:
                    await call(r, metadata=meta, timeout=5)
                    counts[0] += 1
                    lat.append(time.perf_counter() - start)
                except grpc.RpcError:
                    counts[1] += 1

            if rate <= 0:
                async def worker(w: int) -> None:
                    n = w
                    while time.perf_counter() < end:
                        await one(requests[n % len(requests)], time.perf_counter())
                        n += in_flight
                await asyncio.gather(*(worker(w) for w in range(in_flight)))
            else:
                tasks, n = set(), 0
                while True:
                    due = t0 + n / rate
                    if due >= end:
                        break
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.ensure_future(one(requests[n % len(requests)], due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
                await asyncio.gather(*list(tasks))
            return counts[0], counts[1], lat

    out.put(asyncio.run(run()))


def _knn_matrix(vecs, index, n_neighbors: int = 20):
    """item -> its ``n_neighbors`` nearest items (IVF search, batched), as the CSR M of
    score = history @ M."""
    import numpy as np
    import scipy.sparse as sp

    n = len(vecs)
    sims, ids = index.index.search(vecs, n_neighbors + 1)
    rows = np.repeat(np.arange(n), n_neighbors + 1)
    keep = (ids.ravel() >= 0) & (ids.ravel() != rows)
    m = sp.csr_matrix((np.maximum(sims.ravel()[keep], 0).astype(np.float32),
                       (rows[keep], ids.ravel()[keep])), shape=(n, n))
    return m


def _bench_ranker(sources: list[str]):
    """A LightGBM lambdarank ranker of the default size (200 trees, 31 leaves) trained on random
    candidate features: what the two-stage champion costs per request, whatever it learned."""
    import numpy as np

    from recmodels.ranking import feature_names, train_ranker

    names = feature_names(sources)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, len(names))).astype(np.float32)
    y = (x[:, 1] + x[:, 5] + rng.normal(size=len(x)) > 1.5).astype(np.float32)
    return train_ranker(x, y, [100] * 200, names)


def _kind_state(kind: str, factors_state, vecs, index, hist, users, item_ids, args, tmp):
    import numpy as np

    from recmodels.ranking import ITEM_FEATURES
    from recmodels.servable import (EncoderServable, FactorServable, HybridServable,
                                    ItemItemServable)
    from serving.state import build_state

    ids = np.asarray(item_ids)
    if kind == "factors":
        return factors_state
    if kind in ("item_knn", "hybrid"):
        global _KNN
        if "_KNN" not in globals():
            t = time.perf_counter()
            _KNN = _knn_matrix(vecs, index)
            print(f"  (item-kNN lists for {len(vecs):,} items in {time.perf_counter() - t:.0f}s)")
        knn = ItemItemServable("item_knn", ids, {}, _KNN, binary=True)
        if kind == "item_knn":
            return build_state(knn, "bench item_knn", users, hist, popular=item_ids[:1000])
        fac = FactorServable("als", ids, {}, vecs, np.asarray(users), np.stack(
            [factors_state.user_vectors[u] for u in users]))
        hyb = HybridServable("hybrid", ids, {"sources_used": ["item_knn", "als"]},
                             {"item_knn": knn, "als": fac}, _bench_ranker(["item_knn", "als"]),
                             {f: np.zeros(len(ids), np.float32) for f in ITEM_FEATURES}, None,
                             args.candidates)
        return build_state(hyb, "bench hybrid", users, hist, popular=item_ids[:1000])
    if kind == "two_tower":
        import torch

        class Encoder(torch.nn.Module):  # the user tower's shape: mean of item embeddings + MLP
            def __init__(self, table):
                super().__init__()
                self.items = torch.nn.Embedding.from_pretrained(
                    torch.cat([torch.zeros(1, table.shape[1]), torch.as_tensor(table)]),
                    padding_idx=0)
                d = table.shape[1]
                self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                               torch.nn.Linear(2 * d, d))

            def forward(self, history):
                mask = (history > 0).float().unsqueeze(-1)
                pooled = (self.items(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                return self.mlp(pooled) + pooled

        enc = Encoder(vecs).eval()
        path = Path(tmp) / "user_encoder.pt"
        torch.jit.trace(enc, torch.zeros((1, 50), dtype=torch.long)).save(str(path))
        torch.set_num_threads(1)
        model = EncoderServable("two_tower", ids, {}, vecs, path, 50)
        return build_state(model, "bench two_tower", users, hist, index=index, index_type="ivf",
                           popular=item_ids[:1000])
    raise SystemExit(f"unknown kind {kind!r}")


# ---- measuring -------------------------------------------------------------------------------
def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _run(ctx, target, args):
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    got = q.get()
    p.join()
    return got


def measure_one(addrs: dict[str, str], pids: dict[str, int], requests: list[bytes], args,
                ctx) -> dict[str, dict]:
    """The one-client phase, every server interleaved call by call: latency and CPU per call."""
    import numpy as np

    from freshrec.api.proto import stubs

    pb2 = stubs()["recommender_pb2"]
    c0 = {name: _cpu(pid) for name, pid in pids.items()}
    got = _run(ctx, one_client, (addrs, requests[:args.calls], 500))
    out = {}
    for name, (lat, raw) in got.items():
        out[name] = {
            "latencies_ms": [x * 1e3 for x in lat],
            "p50": float(np.percentile(lat, 50)) * 1e3, "p99": float(np.percentile(lat, 99)) * 1e3,
            # warm-up calls included in the CPU delta
            "cpu_one_us": (_cpu(pids[name]) - c0[name]) / (len(lat) + 200) * 1e6,
            "served": [[int(i.item_id[1:]) for i in pb2.RecommendResponse.FromString(r).items]
                       for r in raw]}
    return out


def load_slice(addr: str, pid: int, requests: list[bytes], seconds: float, args,
               ctx) -> tuple[int, int, float]:
    """``args.in_flight`` calls kept open for ``seconds``: (ok, errors, server CPU seconds)."""
    per = max(1, args.clients)
    share = [requests[i::per] for i in range(per)]
    procs, q = [], ctx.Queue()
    c0 = _cpu(pid)
    for i in range(per):
        p = ctx.Process(target=load_client, args=(addr, share[i], seconds,
                                                  max(1, args.in_flight // per), 0.0, q))
        p.start()
        procs.append(p)
    loads = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(x[0] for x in loads), sum(x[1] for x in loads), _cpu(pid) - c0


def measure_loads(addrs: dict[str, str], pids: dict[str, int], requests: list[bytes], args,
                  ctx) -> dict[str, tuple[int, int, float]]:
    """The loaded phase of every server, ``args.slices`` slices each, the servers taking turns
    slice by slice (first server rotating), so a busy spell of a shared machine hits all of
    them alike: {server: (ok, errors, server CPU seconds)} over ``args.seconds`` each."""
    names = list(addrs)
    got = {n: [0, 0, 0.0] for n in names}
    for s in range(args.slices):
        for j in range(len(names)):
            n = names[(s + j) % len(names)]
            ok, err, cpu = load_slice(addrs[n], pids[n], requests, args.seconds / args.slices,
                                      args, ctx)
            got[n][0] += ok
            got[n][1] += err
            got[n][2] += cpu
    return {n: tuple(v) for n, v in got.items()}


def measure_load(name: str, addr: str, pid: int, requests: list[bytes], args, ctx,
                 loaded: tuple[int, int, float]) -> dict:
    """Throughput and CPU per call of the loaded phase (``loaded``: measure_loads' figures of
    this server); then (``--paced-seconds``) an open-loop phase at 80% of that throughput."""
    import numpy as np

    ok, errors, cpu = loaded
    cpu_load = cpu / max(1, ok + errors)
    qps = ok / args.seconds
    paced = {}
    if args.paced_seconds > 0 and qps > 0:
        rate = 0.8 * qps
        pok, perr, plat = _run(ctx, load_client, (addr, requests, args.paced_seconds, 0, rate))
        paced = {"rate": rate, "ok": pok, "errors": perr,
                 "p50": float(np.percentile(plat, 50)) * 1e3 if plat else float("nan"),
                 "p99": float(np.percentile(plat, 99)) * 1e3 if plat else float("nan")}
    return {"cpu_load_us": cpu_load * 1e6, "qps": qps, "errors": errors, "paced": paced}


def _show(name: str, r: dict) -> None:
    paced = r["paced"]
    print(f"  {name:<9} p50 {r['p50']:.3f} ms  p99 {r['p99']:.3f} ms  cpu/call "
          f"{r['cpu_one_us']:.0f} us (one client) {r['cpu_load_us']:.0f} us (loaded)  "
          f"{r['qps']:,.0f}/s ({r['errors']} errors)" + (
              f"  paced {paced['rate']:,.0f}/s: p50 {paced['p50']:.2f} p99 {paced['p99']:.2f} ms"
              if paced else ""), flush=True)


def median_of(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds (latency lists pooled, first round's served lists)."""
    import numpy as np

    out = dict(rounds[0])
    for key in ("p50", "p99", "cpu_one_us", "cpu_load_us", "qps"):
        out[key] = float(np.median([r[key] for r in rounds]))
    out["errors"] = sum(r["errors"] for r in rounds)
    out["latencies_ms"] = [x for r in rounds for x in r["latencies_ms"]]
    if all(r["paced"] for r in rounds):
        out["paced"] = {k: float(np.median([r["paced"][k] for r in rounds]))
                        for k in rounds[0]["paced"]}
    return out


def recall_at_10(served: list[list[int]], truth: list[list[int]]) -> float:
    import numpy as np

    return float(np.mean([len(set(s[:10]) & set(t)) / 10 for s, t in zip(served, truth)]))


def figure(results: dict, path: Path) -> bool:
    """Latency CDF of the one-client phase, both servers; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        x = np.sort(r["latencies_ms"])
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{name} (p50 {r['p50']:.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("Recommend latency, one client (ms)")
    ax.set_ylabel("share of calls")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def report(results: dict, recall: dict, raw_p50: float, args) -> None:
    b, f = results["bare"], results["freshrec"]

    def row(label, key, fmt, better_low=True, target=None):
        x, y = b[key], f[key]
        ratio = y / x if x else float("nan")
        ok = "" if target is None else ("met" if (ratio <= target if better_low else
                                                   ratio >= target) else "MISSED")
        t = "" if target is None else f"{'<=' if better_low else '>='} {target}x {ok}"
        print(f"{label:<40}{fmt.format(x):>12}{fmt.format(y):>12}{ratio:>8.2f}x  {t}")

    print(f"\n{'':<40}{'bare':>12}{'freshrec':>12}{'ratio':>9}  target (issue 13)")
    row("one client p50 (ms)", "p50", "{:.3f}", target=1.25)
    row("one client p99 (ms)", "p99", "{:.3f}")
    row("server CPU per call, one client (us)", "cpu_one_us", "{:.0f}", target=1.25)
    row(f"server CPU per call, {args.in_flight} in flight (us)", "cpu_load_us", "{:.0f}")
    row(f"throughput, {args.in_flight} in flight (/s)", "qps", "{:,.0f}", better_low=False,
        target=0.8)
    if b["paced"] and f["paced"]:
        for key in ("p50", "p99"):
            x, y = b["paced"][key], f["paced"][key]
            print(f"{'at 80% of own max, ' + key + ' (ms)':<40}{x:>12.2f}{y:>12.2f}{y / x:>8.2f}x  "
                  + ("<= 10 ms " + ("met" if y <= 10 else "MISSED") if key == "p99" else ""))
    print(f"{'recall@10 vs exact (unseen items)':<40}{recall['bare']:>12.3f}"
          f"{recall['freshrec']:>12.3f}{recall['freshrec'] / recall['bare']:>8.2f}x  "
          f">= 0.95 {'met' if recall['freshrec'] >= 0.95 else 'MISSED'}")
    print(f"{'raw FAISS search p50, in process (ms)':<40}{raw_p50:>12.3f}")
    print(f"errors: bare {b['errors']}, freshrec {f['errors']}")
    a = results.get("bare-aio")
    if a:
        print(f"\nthe bare server on grpc.aio (asyncio) vs sync with {args.workers} threads: p50 "
              f"{a['p50']:.3f} ms ({a['p50'] / b['p50']:.2f}x), CPU per call {a['cpu_one_us']:.0f}"
              f" us ({a['cpu_one_us'] / b['cpu_one_us']:.2f}x), {args.in_flight} in flight "
              f"{a['qps']:,.0f}/s ({a['qps'] / b['qps']:.2f}x), CPU per call loaded "
              f"{a['cpu_load_us']:.0f} us ({a['cpu_load_us'] / b['cpu_load_us']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.0, help="item noise around its center")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 2 sqrt(items))")
    ap.add_argument("--nprobe", type=int, default=12)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--calls", type=int, default=3000, help="one-client calls per server")
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--clients", type=int, default=1, help="load processes sharing --in-flight")
    ap.add_argument("--seconds", type=float, default=8.0, help="loaded phase per server")
    ap.add_argument("--slices", type=int, default=4,
                    help="the loaded phase in this many slices, the servers taking turns")
    ap.add_argument("--paced-seconds", type=float, default=0.0,
                    help="open-loop phase at 80%% of each server's max (needs a quiet machine)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each server this many times, alternating; medians reported")
    ap.add_argument("--workers", type=int, default=8, help="server threads (both servers)")
    ap.add_argument("--serving", default="{}",
                    help="JSON of serving settings for FreshrecServer, e.g. '{\"workers\": 4}'")
    ap.add_argument("--aio", action="store_true",
                    help="also measure the bare server on grpc.aio (asyncio) against the sync one")
    ap.add_argument("--png", default="", help="latency CDF figure (e.g. serving_latency.png)")
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--kinds", default="",
                    help="after the comparison, time each model kind (factors,two_tower,"
                         "item_knn,hybrid)")
    ap.add_argument("--candidates", type=int, default=100,
                    help="the hybrid's candidates per source (its default, models.hybrid)")
    args = ap.parse_args()

    import faiss
    import numpy as np

    from freshrec.api.proto import stubs

    pb2 = stubs()["recommender_pb2"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, "
          f"{args.items:,} items x {args.dim}, {args.clusters} clusters (spread {args.spread}), "
          f"nprobe {args.nprobe}, {args.users} users with {SEEN_PER_USER} seen items each")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = make_data(args, Path(tmp))
        print(f"data, IVF{data['nlist']} index and exact answers in {time.perf_counter() - t0:.1f}s")
        faiss.omp_set_num_threads(1)
        raw = []
        for q in data["uvecs"][:1000]:
            t = time.perf_counter()
            data["index"].search(q.reshape(1, -1), 10 + SEEN_PER_USER)
            raw.append(time.perf_counter() - t)
        raw_p50 = float(np.percentile(raw, 50)) * 1e3
        users = _users(args.users)
        order = np.random.default_rng(1).permutation(args.users)
        # the first 500 one-client calls are the users recall is checked on, in order
        requests = [pb2.RecommendRequest(user_id=users[u], k=10).SerializeToString()
                    for u in [*range(500), *order]]
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        servers = {"bare": ctx.Process(target=serve_bare, args=(tmp, args.workers, ready, stop)),
                   "freshrec": ctx.Process(target=serve_freshrec, args=(
                       tmp, args.workers, ready, stop, json.loads(args.serving)))}
        if args.aio:
            servers["bare-aio"] = ctx.Process(target=serve_bare_aio,
                                              args=(tmp, args.workers, ready, stop))
        for p in servers.values():
            p.start()
        ports = dict(ready.get(timeout=600) for _ in servers)
        pids = {name: p.pid for name, p in servers.items()}
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        try:
            addrs = {name: f"127.0.0.1:{ports[name]}" for name in servers}
            for _ in range(args.rounds):  # alternating, so a busy spell hits every server
                one = measure_one(addrs, pids, requests, args, ctx)
                loads = measure_loads(addrs, pids, requests, args, ctx)
                for name in servers:
                    r = {**one[name], **measure_load(name, addrs[name], pids[name], requests,
                                                     args, ctx, loads[name])}
                    _show(name, r)
                    rounds[name].append(r)
        finally:
            stop.set()
            for p in servers.values():
                p.join(30)
        results = {name: median_of(rs) for name, rs in rounds.items()}
        recall = {n: recall_at_10(r["served"], data["truth"]) for n, r in results.items()}
        report(results, recall, raw_p50, args)
        if args.png:
            print(f"figure: {args.png}" if figure(results, Path(args.png))
                  else "no matplotlib: no figure")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"args": vars(args), "recall": recall, "raw_faiss_p50_ms": raw_p50,
                 "servers": {n: {k: v for k, v in r.items() if k not in ("latencies_ms", "served")}
                             for n, r in results.items()}}, indent=1))
        if args.kinds:
            per_kind(args, data, tmp, ctx)


def _kind_latency(addr: str, users: list[str], out) -> None:
    """One client (freshrec.api.client.Client), one call at a time: latencies."""
    from freshrec.api.client import Client

    c = Client(addr, TOKEN)
    for u in users[:100]:
        c.recommend(u, 10)  # warm up
    lat = []
    for u in users:
        t = time.perf_counter()
        c.recommend(u, 10)
        lat.append(time.perf_counter() - t)
    out.put(lat)


def per_kind(args, data: dict, tmp: str, ctx) -> None:
    """One client's Recommend p50/p99 for each model kind the registry can promote, over the same
    catalog and users (history: their seen items), in an in-process FreshrecServer."""
    import numpy as np

    from freshrec.settings import load_settings
    from recmodels.servable import FactorServable
    from recmodels.index import ItemIndex
    from serving.server import FreshrecServer
    from serving.state import build_state

    settings = load_settings(env={}, paths={"data_dir": str(Path(tmp) / "kinds")}, serving={
        "port": 0, "metrics_port": -1, "cache_size": 0, "workers": args.workers,
        "rate_limit_per_second": 1e9, "rate_limit_burst": 10**9})
    server = FreshrecServer(settings, use_gpu=False)
    port = server.start(load=False)
    vecs, uvecs, seen = data["vecs"], data["uvecs"], data["seen"]
    item_ids = [f"i{i}" for i in range(len(vecs))]
    index = ItemIndex(data["index"], item_ids, vecs, "ivf")
    users = _users(len(uvecs))
    pseudo = [server.pseudonym(u) for u in users]
    per = seen.shape[1]
    hist = {"indptr": np.arange(0, len(pseudo) * per + 1, per, dtype=np.int64),
            "items": seen.ravel(), "weights": np.ones(seen.size, np.float32)}
    hist["recent_indptr"], hist["recent"] = hist["indptr"].copy(), hist["items"].copy()
    factors = build_state(FactorServable("als", np.asarray(item_ids), {}, vecs), "bench als",
                          pseudo, hist, index=index, index_type="ivf",
                          user_vectors=dict(zip(pseudo, uvecs)), popular=item_ids[:1000])
    print("\nRecommend per served model kind (one client, cache off)   p50 ms    p99 ms")
    try:
        for kind in [k for k in args.kinds.split(",") if k]:
            server.swap(_kind_state(kind, factors, vecs, index, hist, pseudo, item_ids, args, tmp))
            lat = _run(ctx, _kind_latency, (f"127.0.0.1:{port}", users[:600]))
            a, b = (float(np.percentile(lat, q)) * 1e3 for q in (50, 99))
            print(f"  {kind:<52}{a:8.3f}  {b:8.3f}", flush=True)
    finally:
        server.stop(grace=1)


if __name__ == "__main__":
    main()
