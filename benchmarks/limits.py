"""The server under resource attacks, side by side with a baseline server (the same file at an
earlier git revision, default the commit before the limits work), each in its own process, on
the in-memory state of ``tests/test_serving_guard.py`` (8 workers):

1. Recommend latency for one authenticated client, first alone, then while 64 idle
   unauthenticated streams are open (16 each: reflection, a unary method opened as a stream
   without a body, health Check without a body, health Watch). Target: answers within 50 ms.
2. Resident memory after 25 Recommend calls with an 8 MiB context.
3. Resident memory after RecordEvents for 400,000 new user ids (400 calls of 1,000).

    .venv/bin/python benchmarks/limits.py [--baseline-rev 292842e] [--users 400000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _server_class(rev: str | None):
    if rev is None:
        from serving.server import FreshrecServer
        return FreshrecServer
    import importlib.util

    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:serving/server.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_server.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_server", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_server"] = mod
    spec.loader.exec_module(mod)
    return mod.FreshrecServer


def run(rev: str | None, n_users: int, out) -> None:
    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from freshrec.api.client import Client
    from tests.conftest import small_settings
    from tests.test_serving_guard import make_state

    tmp = Path(tempfile.mkdtemp())
    settings = small_settings(tmp / "data", serving={
        "port": 0, "metrics_port": -1, "wal_flush_seconds": 3600, "workers": 8,
        "rate_limit_per_second": 1e9, "rate_limit_burst": 10**9,
        "peer_rate_limit_per_second": 1e9, "peer_rate_limit_burst": 10**9,
        "stream_idle_seconds": 120})
    server = _server_class(rev)(settings, use_gpu=False)
    port = server.start(load=False)
    server.state = make_state(settings)
    addr = f"127.0.0.1:{port}"
    client = Client(addr, "dev-client-token")

    def latencies(n: int = 200) -> list[float]:
        lat = []
        for i in range(n):
            t = time.perf_counter()
            try:
                client.recommend(f"u{i % 40}", 10, timeout=2.0)
                lat.append(time.perf_counter() - t)
            except grpc.RpcError:
                lat.append(float("inf"))
        return lat

    res: dict = {}
    lat = latencies()
    res["alone_p50_ms"] = float(np.percentile(lat, 50)) * 1e3
    stop = threading.Event()

    def idle():
        stop.wait()
        return
        yield

    chans, calls = [], []
    for n in range(64):
        ch = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
        chans.append(ch)
        kind = n % 4
        if kind == 0:
            calls.append(ch.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(idle()))
        elif kind == 1:
            calls.append(ch.stream_unary("/freshrec.v1.Recommender/Recommend").future(idle()))
        elif kind == 2:
            calls.append(ch.stream_unary("/grpc.health.v1.Health/Check").future(idle()))
        else:
            calls.append(health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="")))
    time.sleep(1.0)
    lat = latencies(50)
    ok = [x for x in lat if x != float("inf")]
    res["idle64_answered"] = f"{len(ok)}/{len(lat)}"
    res["idle64_p50_ms"] = float(np.percentile(ok, 50)) * 1e3 if ok else None
    res["idle64_max_ms"] = max(ok) * 1e3 if ok else None
    stop.set()
    for c in calls:
        c.cancel()
    for ch in chans:
        ch.close()
    time.sleep(0.5)

    base = rss_mb()
    big = Client(addr, "dev-client-token", options=[("grpc.max_send_message_length", 64 << 20)])
    codes = {}
    for n in range(25):
        try:
            big.recommend(f"u{n}", 5, context={"blob": chr(65 + n) * (8 << 20)}, timeout=30)
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as e:
            codes[e.code().name] = codes.get(e.code().name, 0) + 1
    res["ctx8mib_codes"] = codes
    res["ctx8mib_rss_delta_mb"] = rss_mb() - base

    base = rss_mb()
    now = datetime.now(timezone.utc).isoformat()
    t0 = time.perf_counter()
    for start in range(0, n_users, 1000):
        client.record([{"user_id": f"attacker{u}", "item_id": "i1", "event_type": "view",
                        "ts": now} for u in range(start, min(n_users, start + 1000))], timeout=60)
    res["new_ids_seconds"] = time.perf_counter() - t0
    res["new_ids_rss_delta_mb"] = rss_mb() - base
    res["recent_users_held"] = len(server.recent)
    server.stop(grace=0)
    out.put(res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", default="292842e")
    ap.add_argument("--users", type=int, default=400_000)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for name, rev in (("baseline " + args.baseline_rev, args.baseline_rev), ("this tree", None)):
        q = ctx.Queue()
        p = ctx.Process(target=run, args=(rev, args.users, q))
        p.start()
        while True:
            try:
                results[name] = q.get(timeout=5)
                break
            except Exception:
                if not p.is_alive():
                    raise SystemExit(f"the {name} run died (exit code {p.exitcode})") from None
        p.join()
    names = list(results)
    print(f"{'':38} " + "  ".join(f"{n:>22}" for n in names))
    def show(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else json.dumps(v, default=str)[:22]

    for key in results[names[1]]:
        print(f"{key:38} " + "  ".join(f"{show(results[n].get(key)):>22}" for n in names))
    print("(RSS is the whole process: server and the in-process client; the ids are new users "
          "recording one event each)")


if __name__ == "__main__":
    main()
