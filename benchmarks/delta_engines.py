"""delta-rs vs delta-spark for the Spark jobs, side by side: per-stage seconds on the same data.

Makes the synthetic dataset once (``--events``, default 200k), imports it, copies the data dir per
engine, then runs each engine in a fresh interpreter (its own JVM): Spark session start, ingest,
clean, features, and a re-run of clean + features (which commits nothing: the cost of the "unchanged?"
check). With ``--cluster spark://127.0.0.1:7077`` (``make cluster-up``) a third column submits
each job with spark-submit to that cluster (delta-spark; each job's time includes its application
start, so "session" is 0 there). Needs the Delta jars (``make jars``). Usage:

    .venv/bin/python benchmarks/delta_engines.py [--events N] [--master local[2]] [--cluster URL]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGES = ["session", "ingest", "clean", "features", "rerun_clean", "rerun_features"]


def worker(spec: dict) -> dict:
    from freshrec.storage.delta import DeltaStore
    from freshrec.interval import DataInterval
    from freshrec.settings import load_settings
    from freshrec.storage.spark import get_spark
    from spark_jobs import clean, features, ingest

    settings = load_settings("local", env={}, **spec["tree"])
    interval = DataInterval.for_day(spec["day"])
    times: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t0

    timed("session", lambda: get_spark(settings))
    timed("ingest", lambda: ingest.run(settings, interval))
    timed("clean", lambda: clean.run(settings, interval))
    timed("features", lambda: features.run(settings, interval))
    timed("rerun_clean", lambda: clean.run(settings, interval))
    timed("rerun_features", lambda: features.run(settings, interval))
    engine = DeltaStore(settings).spark_backend(get_spark(settings))
    return {"times": times, "engine": engine}


def submitted(master: str, data_dir: Path, day: str, synth_cfg: dict) -> dict[str, float]:
    """Each stage submitted with spark-submit to ``master`` (cluster profile), timed."""
    from freshrec.settings import load_settings
    from freshrec.ops.submit import submit

    env = {"FRESHREC_DATA_DIR": str(data_dir), "SPARK_MASTER": master,
           **{f"FRESHREC__SYNTH__{k.upper()}": str(v) for k, v in synth_cfg.items()}}
    settings = load_settings("cluster", env=env)
    times = {"session": 0.0}
    for stage, job in [("ingest", "ingest"), ("clean", "clean"), ("features", "features"),
                       ("rerun_clean", "clean"), ("rerun_features", "features")]:
        t0 = time.perf_counter()
        submit(job, ["--date", day, "--profile", "cluster"], settings, env=env)
        times[stage] = time.perf_counter() - t0
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--master", default="local[*]")
    ap.add_argument("--cluster", help="also submit every job to this standalone master")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    from freshrec.data import importers
    from freshrec.ops.jars import delta_jars
    from freshrec.settings import load_settings
    from freshrec.data.synth import write_synth

    if not delta_jars():
        sys.exit("the Delta jars are not in .jars/: run `make jars` first")
    root = Path(tempfile.mkdtemp(prefix="freshrec-engines-"))
    try:
        synth_cfg = {"n_events": args.events, "n_users": max(500, args.events // 20),
                     "n_items": max(200, args.events // 50)}
        base = {"synth": synth_cfg, "spark": {"master": args.master}}
        settings = load_settings("local", env={}, paths={"data_dir": str(root / "rs")}, **base)
        end = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        synth = write_synth(settings.synth, root / "raw", end=end)
        importers.import_events_file(settings, synth.events_path, landed_at=end)
        importers.import_items_file(settings, synth.items_path)
        shutil.copytree(root / "rs", root / "spark")
        if args.cluster:
            shutil.copytree(root / "rs", root / "cluster")
        day = (end.date().isoformat())
        results = {}
        for backend in ("rs", "spark"):
            tree = {**base, "paths": {"data_dir": str(root / backend)},
                    "delta": {"backend": backend}}
            env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
            proc = subprocess.run([sys.executable, __file__, "--worker",
                                   json.dumps({"tree": tree, "day": day})],
                                  capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{backend} run failed:\n{proc.stderr[-4000:]}")
            results[backend] = json.loads(lines[-1][7:])
        if args.cluster:
            results["cluster"] = {"times": submitted(args.cluster, root / "cluster", day, synth_cfg)}
        rs, sp = results["rs"]["times"], results["spark"]["times"]
        cl = results.get("cluster", {}).get("times")
        print(f"{args.events:,} events, master {args.master}, {os.cpu_count()} cores")
        print(f"  {'stage':<16}{'delta-rs':>10}{'delta-spark':>13}{'spark/rs':>10}"
              + (f"{'cluster':>10}{'cluster/rs':>12}" if cl else ""))
        for stage in STAGES + ["total"]:
            a = sum(rs.values()) if stage == "total" else rs[stage]
            b = sum(sp.values()) if stage == "total" else sp[stage]
            line = f"  {stage:<16}{a:>9.1f}s{b:>12.1f}s{b / a:>9.2f}x"
            if cl:
                c = sum(cl.values()) if stage == "total" else cl[stage]
                line += f"{c:>9.1f}s{c / a:>11.2f}x"
            print(line)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
