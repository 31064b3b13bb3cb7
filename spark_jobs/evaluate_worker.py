"""The worker process of evaluate (:func:`spark_jobs.evaluate.fit_in_worker`): reads a pickled job
from stdin, runs :func:`spark_jobs.evaluate.fit_candidates` and pickles its result to the job's
``out`` file. Its log goes to stderr, which it shares with the driver, at the driver's level.
Not a command for users."""

from __future__ import annotations

import logging
import pickle
import sys


def main() -> int:
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
                             job["parent_run_id"])
    except Exception as e:  # the driver re-raises it (ValueError stays bad input)
        logging.getLogger("spark_jobs.evaluate").exception("evaluate worker failed")
        with open(job["out"], "wb") as f:
            pickle.dump({"error": f"{type(e).__name__}: {e}",
                         "bad_input": isinstance(e, ValueError)}, f)
        return 1
    with open(job["out"], "wb") as f:
        pickle.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
