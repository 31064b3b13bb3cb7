"""The worker process of evaluate (:func:`spark_jobs.evaluate.fit_in_worker`): reads a pickled job
from stdin, runs :func:`spark_jobs.evaluate.fit_candidates` and pickles its result to the job's
``out`` file (written to a temporary file beside it, then renamed: ``out`` is whole or absent).
It dies with its driver (``PR_SET_PDEATHSIG`` on Linux; the driver's pid comes in
``FRESHREC_EVALUATE_PARENT``). Its log goes to stderr, which it shares with the driver, at the
driver's level. Not a command for users."""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent dies; False when the parent named in
    ``FRESHREC_EVALUATE_PARENT`` is already gone (it died before the request)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the worker ends when its fit does
        return True
    parent = os.environ.get("FRESHREC_EVALUATE_PARENT")
    return not parent or os.getppid() == int(parent)


def _write(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(value, f)
    os.replace(tmp, path)


def main() -> int:
    if not _die_with_parent():
        return 1
    job = pickle.loads(sys.stdin.buffer.read())
    # the driver's level: quiet under the CLI, progress lines under Airflow and spark-submit
    logging.basicConfig(level=job.get("log_level", logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = job["settings"]
    if job["spark_master"] and settings.spark.master != job["spark_master"]:
        # the driver's session was given its master by spark-submit: fit Spark models there too
        settings = settings.model_copy(update={"spark": settings.spark.model_copy(
            update={"master": job["spark_master"]})})
    from spark_jobs.evaluate import fit_candidates

    try:
        out = fit_candidates(settings, job["interval"], job["names"], job["versions"],
                             job["parent_run_id"], own_spark=True)
    except Exception as e:  # the driver re-raises it (ValueError stays bad input)
        log = logging.getLogger("spark_jobs.evaluate")
        if isinstance(e, ValueError):  # bad input: its message says it all
            log.error("evaluate worker: %s", e)
        else:
            log.exception("evaluate worker failed")
        _write(job["out"], {"error": f"{type(e).__name__}: {e}",
                            "bad_input": isinstance(e, ValueError)})
        return 1
    _write(job["out"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
