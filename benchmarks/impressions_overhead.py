"""Impression logging overhead per Recommend: what the request thread pays, and the call side by
side with logging off.

1. The request-thread work alone (``ImpressionLog.new_request_id`` + ``record`` of a 10-item slate
   with its scores and propensities, the lists built as the servicer builds them), per call, while
   the background thread flushes to a real segment directory: p50/p99 in microseconds;
2. ``Recommend`` over gRPC on loopback against two servers on the same data, one with
   ``serving.log_impressions`` on and one off, interleaved calls from one client, cache off:
   p50/p99 latency of each and the difference.

Target (with the A/B assignment another part adds): <= 20 us p50 per Recommend.

    .venv/bin/python benchmarks/impressions_overhead.py [--calls 20000] [--rpcs 3000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np

    from freshrec.settings import load_settings
    from freshrec.api.client import Client
    from serving.impressions import ImpressionLog
    from serving.server import FreshrecServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--rpcs", type=int, default=3000)
    args = ap.parse_args()
    source = load_settings()
    tmp = Path(tempfile.mkdtemp(prefix="imp-overhead-"))
    try:
        settings = load_settings(paths={"data_dir": str(tmp / "micro")})
        log = ImpressionLog(settings)
        items = [f"i{n}" for n in range(10)]
        scores = [1.0 - n / 10 for n in range(10)]
        cost = np.empty(args.calls)
        for n in range(args.calls):
            t = time.perf_counter_ns()
            rid = log.new_request_id()
            ids, sc = list(items), [float(s) for s in scores]
            log.record(rid, "user-pseudonym", "freshrec-retrieval/1 als", None, ids, sc,
                       [1.0] * len(ids))
            cost[n] = time.perf_counter_ns() - t
        log.close()
        print(f"request-thread cost of logging one slate: p50 {np.percentile(cost, 50) / 1e3:.2f} us,"
              f" p99 {np.percentile(cost, 99) / 1e3:.2f} us ({log.written:,} written, "
              f"{log.dropped} dropped)")

        if not (source.snapshots_dir.exists() and (source.tables_dir / "events").exists()):
            print(f"no snapshot in {source.data_dir}: run `make run` for the gRPC comparison")
            return
        for part in ("tables", "snapshots", "mlflow"):
            shutil.copytree(source.data_dir / part, tmp / "data" / part)
        servers, clients = {}, {}
        for on in (True, False):
            s = load_settings(paths={"data_dir": str(tmp / "data")}, serving={
                "port": 0, "metrics_port": -1, "json_logs": False, "cache_size": 0,
                "log_impressions": on, "rate_limit_per_second": 1e9, "rate_limit_burst": 10**9})
            servers[on] = FreshrecServer(s, use_gpu=False)
            port = servers[on].start()
            clients[on] = Client(f"127.0.0.1:{port}", "dev-client-token",
                                 options=[("grpc.use_local_subchannel_pool", 1)])
        lat = {True: [], False: []}
        for n in range(args.rpcs + 200):
            for on in ((True, False) if n % 2 else (False, True)):
                t = time.perf_counter()
                clients[on].recommend(f"u{n % 5000}", 10)
                if n >= 200:  # warm-up
                    lat[on].append(time.perf_counter() - t)
        for s in servers.values():
            s.stop(grace=0)
        p = {on: (np.percentile(v, 50) * 1e6, np.percentile(v, 99) * 1e6) for on, v in lat.items()}
        print(f"Recommend over gRPC, logging on:  p50 {p[True][0]:.0f} us, p99 {p[True][1]:.0f} us")
        print(f"Recommend over gRPC, logging off: p50 {p[False][0]:.0f} us, p99 {p[False][1]:.0f} us")
        print(f"difference p50: {p[True][0] - p[False][0]:+.0f} us (noise of loopback gRPC on "
              f"{os.cpu_count()} shared cores is of the same order; the request-thread cost above "
              "is the figure that can be compared with the target)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
