"""Several serving processes per host: throughput with 32 calls in flight, `serving.processes=N`
against one process (the baseline, same run, same snapshot, same load client), and each process's
resident memory with the FAISS index memory-mapped read-only (shared) against loaded into memory.

Every configuration is a real `freshrec serve` subprocess on loopback over one synthetic snapshot
(clustered vectors, IVF, no Spark). The load: ``--clients`` asyncio client processes, each with
its own connection (so the kernel spreads them over the processes sharing the port), together
keeping 32 Recommend calls in flight for ``--seconds``. The client processes run on the same
cores as the servers (as in benchmarks/serving.py): the ratio is what this machine can give.

Memory per serving process, from /proc/<pid>/smaps_rollup: RSS (pages it touches, shared ones
counted in full), PSS (shared pages split between the processes mapping them) and private pages.

    .venv/bin/python benchmarks/processes.py [--items 200000] [--dim 64] [--processes 2]
        [--clients 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN, ADMIN = "dev-client-token", "dev-admin-token"
IN_FLIGHT = 32


def _load_proc(addr: str, users: int, seconds: float, in_flight: int, out) -> None:
    import asyncio

    import grpc

    from freshrec.api.proto import stubs

    pb = stubs()
    rec_pb2 = pb["recommender_pb2"]

    async def run() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(
                addr, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb["recommender_pb2_grpc"].RecommenderStub(channel)
            meta = (("authorization", f"Bearer {TOKEN}"),)
            reqs = [rec_pb2.RecommendRequest(user_id=f"u{u}", k=10) for u in range(users)]
            for r in reqs[:50]:  # warm up
                await stub.Recommend(r, metadata=meta, timeout=10)
            end = time.perf_counter() + seconds
            counts = [0, 0]

            async def worker(w: int) -> None:
                n = w
                while time.perf_counter() < end:
                    try:
                        await stub.Recommend(reqs[n % users], metadata=meta, timeout=10)
                        counts[0] += 1
                    except grpc.RpcError:
                        counts[1] += 1
                    n += in_flight

            await asyncio.gather(*(worker(w) for w in range(in_flight)))
            return counts[0], counts[1]

    out.put(asyncio.run(run()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory(pid: int) -> dict[str, float]:
    """RSS, PSS and private (clean + dirty) MiB of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            out[key] = int(rest.split()[0]) / 1024
    return {"rss": out["Rss"], "pss": out["Pss"],
            "private": out["Private_Clean"] + out["Private_Dirty"]}


def _serve(data: Path, processes: int, mmap: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "FRESHREC_DATA_DIR": str(data), "FRESHREC_PROFILE": "local",
           "FRESHREC__SERVING__METRICS_PORT": "-1", "FRESHREC__SERVING__JSON_LOGS": "false",
           "FRESHREC__SERVING__PROCESSES": str(processes), "FRESHREC__SERVING__MMAP_INDEX": mmap,
           "FRESHREC__SERVING__CACHE_SIZE": "0", "FRESHREC__SERVING__LOG_IMPRESSIONS": "false",
           "FRESHREC__SERVING__RATE_LIMIT_PER_SECOND": "1.0e9",
           "FRESHREC__SERVING__RATE_LIMIT_BURST": "1000000000",
           "FRESHREC__SERVING__PEER_RATE_LIMIT_PER_SECOND": "1.0e9",
           "FRESHREC__SERVING__PEER_RATE_LIMIT_BURST": "1000000000", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli.main", "serve", "--port",
                             str(port)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _pids(addr: str, processes: int, proc, timeout: float = 300) -> list[int]:
    """The serving pids once every process serves (the one server's own pid with one)."""
    import grpc

    from freshrec.api.client import Client

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"freshrec serve exited with {proc.returncode}: run it by hand "
                               "with the same FRESHREC_ variables to see why")
        c = Client(addr, ADMIN)
        try:
            st = c.call_admin("Status", c.admin_pb2.StatusRequest(), timeout=5)
            if processes == 1:
                return []
            if sum(p.serving for p in st.processes) == processes:
                return [p.pid for p in st.processes]
        except grpc.RpcError:
            pass
        finally:
            c.close()
        time.sleep(0.5)
    raise RuntimeError(f"{addr}: {processes} processes did not come up in {timeout}s")


def _run(data: Path, processes: int, mmap: str, args) -> dict:
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    proc = _serve(data, processes, mmap, port)
    try:
        pids = _pids(addr, processes, proc) or [proc.pid]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        per = IN_FLIGHT // args.clients
        clients = [ctx.Process(target=_load_proc, args=(addr, args.users, args.seconds, per, queue))
                   for _ in range(args.clients)]
        for c in clients:
            c.start()
        results = [queue.get() for _ in clients]
        for c in clients:
            c.join()
        memory = [_memory(p) for p in pids]
        return {"qps": sum(r[0] for r in results) / args.seconds,
                "errors": sum(r[1] for r in results), "memory": memory}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4, help="load processes sharing 32 in flight")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()

    from freshrec.settings import load_settings
    from serving.synthetic import write_snapshot

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        key = load_settings("local", env={}).privacy.hmac_key
        write_snapshot(data / "snapshots", key, n_items=args.items, dim=args.dim,
                       n_users=args.users, index_type="ivf", nprobe=8, clusters=1000)
        index_mib = (data / "snapshots" / "synthetic" / "index.faiss").stat().st_size / 2**20
        print(f"{os.cpu_count()} cores; snapshot {args.items:,} items x {args.dim} (IVF, nprobe 8, "
              f"index file {index_mib:.0f} MiB) in {time.perf_counter() - t0:.1f}s; load: "
              f"{args.clients} client processes, {IN_FLIGHT} in flight, {args.seconds:.0f}s each",
              flush=True)
        one = _run(data, 1, "false", args)
        print(f"  1 process (baseline):     {one['qps']:8.0f} /s  ({one['errors']} errors)", flush=True)
        many = _run(data, args.processes, "true", args)
        print(f"  {args.processes} processes, mmap index: {many['qps']:8.0f} /s  "
              f"({many['errors']} errors)", flush=True)
        copied = _run(data, args.processes, "false", args)
        print(f"  {args.processes} processes, in memory:  {copied['qps']:8.0f} /s  "
              f"({copied['errors']} errors)", flush=True)

    print(f"\nthroughput, {IN_FLIGHT} in flight        measured   ratio to 1 process   target")
    print(f"1 process                         {one['qps']:8.0f}    1.00")
    for name, r in ((f"{args.processes} processes, mmap index", many),
                    (f"{args.processes} processes, in memory", copied)):
        ratio = r["qps"] / one["qps"]
        print(f"{name:<34}{r['qps']:8.0f}    {ratio:4.2f}               >= 1.6 "
              f"{'met' if ratio >= 1.6 else 'MISSED'}")
    print("\nmemory per serving process (MiB)      RSS      PSS   private")
    for name, r in (("1 process, in memory", one),
                    (f"{args.processes} processes, mmap index", many),
                    (f"{args.processes} processes, in memory", copied)):
        for n, m in enumerate(r["memory"]):
            print(f"  {name + f' [{n}]':<34}{m['rss']:7.0f}  {m['pss']:7.0f}  {m['private']:7.0f}")
    saved = (sum(m["pss"] for m in copied["memory"]) - sum(m["pss"] for m in many["memory"]))
    print(f"PSS saved on the host by the mmap index: {saved:.0f} MiB over {args.processes} "
          f"processes (index file {index_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
