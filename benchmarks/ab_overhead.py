"""A/B assignment overhead per Recommend, in-process, side by side with the same server without an
experiment.

1. The assignment step alone over 100k distinct user pseudonyms: what ``Recommend`` does per call
   for arms (``arm_for``: the salted BLAKE2b hash and the arm lookup; the per-arm/version counter
   increment; the monitor's sampling tick), timed call by call, p50/p99 in microseconds, against
   the same steps on a server without an experiment (one arm: no hash). The difference is the
   overhead of the experiment; the target is <= 20 us p50.
2. The whole ``RecommenderServicer.Recommend`` path without gRPC (cache off, a factor model over a
   flat index of ``--items`` items), interleaved call by call, p50 each: without an experiment;
   two arms on one version (only the assignment differs); two arms on two versions of the same
   size (adds what serving two models costs: two indexes competing for the CPU caches).

Impression logging (the other half of the issue's "assignment and logging" target) is not timed
here.

    .venv/bin/python benchmarks/ab_overhead.py [--users 100000] [--items 20000] [--calls 4000]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _Context:
    """The few ServicerContext calls Recommend makes on its happy path."""

    def time_remaining(self):
        return None

    def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


def _state(n_items: int, n_users: int, dim: int, label: str):
    import numpy as np

    from freshrec.privacy.pseudonyms import pseudonymize
    from recmodels.servable import FactorServable
    from recmodels.index import ItemIndex
    from serving.state import build_state

    rng = np.random.default_rng(3)
    ids = [f"i{n}" for n in range(n_items)]
    vecs = rng.normal(size=(n_items, dim)).astype(np.float32)
    users = [pseudonymize(f"u{n}", "freshrec-local-development-key") for n in range(n_users)]
    per = 10
    hist = rng.integers(0, n_items, (n_users, per))
    indptr = np.arange(0, n_users * per + 1, per, dtype=np.int64)
    arrays = {"indptr": indptr, "items": hist.ravel().astype(np.int64),
              "weights": np.ones(n_users * per, np.float32), "recent_indptr": indptr.copy(),
              "recent": hist.ravel().astype(np.int64)}
    uvecs = rng.normal(size=(n_users, dim)).astype(np.float32)
    index = ItemIndex.build(ids, vecs, "flat")
    model = FactorServable("als", np.asarray(ids), {}, vecs)
    return build_state(model, label, users, arrays, index=index, index_type="flat",
                       user_vectors=dict(zip(users, uvecs)), popular=ids[:1000])


def _servers(args):
    from freshrec.settings import load_settings
    from serving.server import FreshrecServer

    common = {"port": 0, "metrics_port": -1, "cache_size": 0,
              "monitor": {"reference_users": 0, "sample_every": 16}}
    base = load_settings("local", env={}, serving=common,
                         paths={"data_dir": str(Path(args.tmp) / "data")})
    exp = {"name": "bench", "salt": "s", "arms": [
        {"name": "control", "model": "1", "share": 0.5},
        {"name": "challenger", "model": "2", "share": 0.5}]}
    with_exp = load_settings("local", env={}, serving={**common, "experiment": exp},
                             paths={"data_dir": str(Path(args.tmp) / "data")})
    a, b = _state(args.items, args.state_users, args.dim, "freshrec-retrieval/1 als"), \
        _state(args.items, args.state_users, args.dim, "freshrec-retrieval/2 als")
    plain = FreshrecServer(base, use_gpu=False)
    plain.state = a
    ab = FreshrecServer(with_exp, use_gpu=False)
    ab.arms = (ab._arm("control", "1", 0.5, 1, a, {}), ab._arm("challenger", "2", 0.5, 2, b, {}))
    ab._state = a
    same = FreshrecServer(with_exp, use_gpu=False)  # both arms on one version: one state
    same.arms = (same._arm("control", "1", 0.5, 1, a, {}),
                 same._arm("challenger", "1", 0.5, 1, a, {}))
    same._state = a
    gc.collect()
    gc.freeze()
    return plain, ab, same


def _assignment_ns(server, users) -> list[int]:
    """Per call: arm_for + counter + the monitor's sampling tick, as Recommend does them."""
    clock = time.perf_counter_ns
    tick, every = server.sample_tick, server.sample_every
    out = []
    for u in users:
        t0 = clock()
        arm = server.arm_for(u)
        arm.served.inc()
        if next(tick) % every == 0:
            pass
        out.append(clock() - t0)
    return out


def main() -> None:
    import tempfile

    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--state-users", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--calls", type=int, default=4_000)
    args = p.parse_args()
    from freshrec.privacy.pseudonyms import pseudonymize
    from serving.server import RecommenderServicer, rec_pb2

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        plain, ab, same = _servers(args)
        users = [pseudonymize(f"bench-{n}", "freshrec-local-development-key")
                 for n in range(args.users)]
        clock = [time.perf_counter_ns() - time.perf_counter_ns() for _ in range(10_000)]
        _assignment_ns(plain, users[:5000])  # warm up
        _assignment_ns(ab, users[:5000])
        base = np.array(_assignment_ns(plain, users)) / 1e3
        exp = np.array(_assignment_ns(ab, users)) / 1e3
        h = ab.assigner
        t = []
        for u in users:
            t0 = time.perf_counter_ns()
            h.index(u)
            t.append(time.perf_counter_ns() - t0)
        hashed = np.array(t) / 1e3
        arms = np.bincount([h.index(u) for u in users], minlength=2) / len(users)
        print(f"A/B assignment over {len(users):,} users (timer overhead p50 "
              f"{np.percentile(np.abs(clock), 50) / 1e3:.2f} us, included below):")
        print(f"  {'':<38}{'p50 us':>8}{'p99 us':>8}")
        print(f"  {'no experiment (arm_for + counter)':<38}{np.percentile(base, 50):>8.2f}"
              f"{np.percentile(base, 99):>8.2f}")
        print(f"  {'2-arm experiment (hash + arm + counter)':<38}{np.percentile(exp, 50):>8.2f}"
              f"{np.percentile(exp, 99):>8.2f}")
        print(f"  {'  of which the salted hash + lookup':<38}{np.percentile(hashed, 50):>8.2f}"
              f"{np.percentile(hashed, 99):>8.2f}")
        over = np.percentile(exp, 50) - np.percentile(base, 50)
        print(f"  overhead of the experiment, p50: {over:.2f} us (target <= 20 us: "
              f"{'met' if np.percentile(exp, 50) <= 20 else 'NOT met'}); "
              f"ratio {np.percentile(exp, 50) / np.percentile(base, 50):.2f}x; "
              f"arm shares {arms[0]:.3f} / {arms[1]:.3f}")

        # whole servicer path, interleaved
        ctx = _Context()
        svcs = {"plain": RecommenderServicer(plain), "same": RecommenderServicer(same),
                "ab": RecommenderServicer(ab)}
        raws = [f"u{n}" for n in range(args.state_users)]
        lat: dict[str, list[float]] = {k: [] for k in svcs}
        order = list(svcs)
        for n in range(args.calls + 200):
            req = rec_pb2.RecommendRequest(user_id=raws[n % len(raws)], k=10)
            for name in order[n % 3:] + order[:n % 3]:  # rotate who goes first
                t0 = time.perf_counter_ns()
                reply = svcs[name].Recommend(req, ctx)
                if n >= 200:
                    lat[name].append((time.perf_counter_ns() - t0) / 1e3)
        assert reply.arm in ("control", "challenger")
        p50 = {k: float(np.percentile(v, 50)) for k, v in lat.items()}
        print(f"Recommend servicer path, no gRPC ({args.items:,} items x {args.dim}, flat, k=10, "
              f"cache off, {args.calls:,} calls each, interleaved), p50:")
        print(f"  no experiment {p50['plain']:.1f} us | 2 arms on one version (assignment only) "
              f"{p50['same']:.1f} us ({p50['same'] - p50['plain']:+.1f} us, "
              f"{p50['same'] / p50['plain']:.3f}x) | 2 arms on two versions {p50['ab']:.1f} us "
              f"({p50['ab'] - p50['plain']:+.1f} us, {p50['ab'] / p50['plain']:.3f}x: two indexes "
              "share the CPU caches)")


if __name__ == "__main__":
    main()
