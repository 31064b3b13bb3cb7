"""Fuzz the gRPC server: N requests across every method (Recommender, Admin, health, reflection)
with random field values (huge, empty, control characters, NUL, non-ASCII), garbage bytes, a
message of another method's type, and missing, wrong, client or admin tokens. Every reply must be
a clear status (OK or a client error: INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED,
NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED), never UNKNOWN, INTERNAL or a
deadline, and the server must still answer afterwards. The server is the in-memory one of
``tests/test_serving_guard.py`` (no Spark, no MLflow model).

    .venv/bin/python benchmarks/fuzz.py [--requests 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLEAR = {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND",
         "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE"}
TOKENS = ([None, "garbage", "", "DEV-CLIENT-TOKEN", "x" * 5000] + ["dev-client-token"] * 4
          + ["dev-admin-token"] * 6)


def _text(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.25:
        return rng.choice(["u1", "i1", "i7", "view", "rating", "champion", "1", "", " ",
                           "../../etc/passwd", "/etc", "snap", "2026-11-01T00:00:00Z"])
    if pick < 0.45:
        return "".join(chr(rng.randrange(0, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if pick < 0.55:
        return "x" * rng.choice([129, 1000, 70_000, 300_000])
    if pick < 0.6:
        return "\x00" * rng.randrange(1, 10)
    return "".join(rng.choice("abcdefghij0123456789-_./:") for _ in range(rng.randrange(0, 30)))


def _floats(rng: random.Random) -> list[float]:
    n = rng.choice([0, 1, 7, 8, 8, 8, 9, 64])
    special = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, 1e-40]
    return [rng.choice(special) if rng.random() < 0.1 else rng.uniform(-2, 2) for _ in range(n)]


def _ctx(rng: random.Random) -> dict[str, str]:
    return {_text(rng)[:1000]: _text(rng)[:5000] for _ in range(rng.choice([0, 1, 3, 40]))}


def build(rng: random.Random, pb: dict) -> tuple[str, bytes]:
    """(method path, request bytes) for one fuzzed call."""
    r, a = pb["recommender_pb2"], pb["admin_pb2"]
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    def filters():
        kw = {"include_categories": [_text(rng) for _ in range(rng.choice([0, 1, 3]))],
              "exclude_items": [_text(rng) for _ in range(rng.choice([0, 1, 3]))]}
        if rng.random() < 0.5:
            kw["exclude_seen"] = rng.random() < 0.5
        return r.Filters(**kw)

    def k():
        return rng.choice([-1, 0, 1, 5, 10, 100, 101, 2**31 - 1, -2**31])

    def event():
        kw = {"user_id": _text(rng), "item_id": _text(rng), "event_type": _text(rng),
              "ts": _text(rng), "event_id": _text(rng), "context": _ctx(rng)}
        if rng.random() < 0.6:
            kw["value"] = rng.choice([float("nan"), float("inf"), -1.0, 3.0, 1e300])
        return r.Event(**kw)

    def vec():
        return a.Vector(id=_text(rng), values=_floats(rng))

    makers = {
        "/freshrec.v1.Recommender/Recommend": lambda: r.RecommendRequest(
            user_id=_text(rng), k=k(), filters=filters(), context=_ctx(rng)),
        "/freshrec.v1.Recommender/SimilarItems": lambda: r.SimilarItemsRequest(
            item_id=_text(rng), k=k(), filters=filters()),
        "/freshrec.v1.Recommender/RecordEvents": lambda: r.RecordEventsRequest(
            events=[event() for _ in range(rng.choice([0, 1, 3, 8]))]),
        "/freshrec.v1.Admin/LoadSnapshot": lambda: a.LoadSnapshotRequest(path=_text(rng)),
        "/freshrec.v1.Admin/LoadModel": lambda: a.LoadModelRequest(model=_text(rng)),
        "/freshrec.v1.Admin/ApplyDeltas": lambda: a.ApplyDeltasRequest(
            upsert_items=[vec() for _ in range(rng.choice([0, 1, 2]))],
            remove_items=[_text(rng) for _ in range(rng.choice([0, 1, 2]))],
            upsert_users=[vec() for _ in range(rng.choice([0, 1]))],
            remove_users=[_text(rng) for _ in range(rng.choice([0, 1]))],
            users_pseudonymized=rng.random() < 0.5,
            applied_versions={_text(rng)[:50]: rng.randrange(-5, 10)
                              for _ in range(rng.choice([0, 1]))},
            newest_event_ts=rng.choice([0.0, -1.0, float("nan"), 1.7e9]),
            expect_state_id=rng.choice([0, 0, 1, 2, 2**63]),
            upsert_histories=[a.UserHistory(user_id=_text(rng),
                                            item_ids=[_text(rng) for _ in range(n)],
                                            weights=_floats(rng)[:n + rng.choice([0, 1])])
                              for n in [rng.choice([0, 1, 3])] * rng.choice([0, 1])]),
        "/freshrec.v1.Admin/DeleteUser": lambda: a.DeleteUserRequest(user_id=_text(rng)),
        "/freshrec.v1.Admin/Status": lambda: a.StatusRequest(),
        "/grpc.health.v1.Health/Check": lambda: health_pb2.HealthCheckRequest(service=_text(rng)),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo":
            lambda: reflection_pb2.ServerReflectionRequest(list_services=""),
    }
    path = rng.choice(list(makers))
    pick = rng.random()
    if pick < 0.12:  # garbage bytes: wrong wire types, truncated varints, invalid UTF-8
        body = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 17, 200])))
    elif pick < 0.2:  # a message of another method's type
        body = makers[rng.choice(list(makers))]().SerializeToString()
    else:
        body = makers[path]().SerializeToString()
    return path, body


def fuzz(addr: str, n: int, seed: int = 1) -> tuple[Counter, list[str]]:
    """Send ``n`` fuzzed calls; returns (codes by name, examples of unclear answers)."""
    import grpc

    from freshrec.api.proto import stubs

    pb = stubs()
    rng = random.Random(seed)
    channel = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)])
    codes: Counter = Counter()
    bad: list[str] = []
    for _ in range(n):
        path, body = build(rng, pb)
        token = rng.choice(TOKENS)
        meta = (("authorization", f"Bearer {token}"),) if token is not None else None
        try:
            if path.endswith("ServerReflectionInfo"):
                list(channel.stream_stream(path)(iter([body]), metadata=meta, timeout=10))
            else:
                channel.unary_unary(path)(body, metadata=meta, timeout=10)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            if code not in CLEAR and len(bad) < 20:
                bad.append(f"{path} {code}: {e.details()}")
        codes[code] += 1
    channel.close()
    return codes, bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from tests.test_serving_guard import start

    with tempfile.TemporaryDirectory() as tmp:
        server, addr = start(Path(tmp), rate_limit_per_second=1e9, rate_limit_burst=10**9,
                             peer_rate_limit_per_second=1e9, peer_rate_limit_burst=10**9)
        t0 = time.perf_counter()
        codes, bad = fuzz(addr, args.requests, args.seed)
        took = time.perf_counter() - t0
        from freshrec.api.client import Client

        alive = len(Client(addr, "dev-client-token").recommend("u1", 3).items) == 3
        server.stop(grace=0)
    clear = sum(v for c, v in codes.items() if c in CLEAR)
    print(f"{args.requests:,} fuzzed requests in {took:.1f}s across every method")
    for c, v in codes.most_common():
        print(f"  {c:<20} {v:6d}")
    print(f"clear status codes: {clear}/{args.requests} ({100 * clear / args.requests:.2f}%); "
          f"server still answering: {alive}")
    for b in bad:
        print("  UNCLEAR:", b)


if __name__ == "__main__":
    main()
