"""The driver ``spark-submit`` runs (see :mod:`freshrec.ops.submit`): ``submit_driver.py <job> <args>``.

The project's packages come from the source tree (``FRESHREC_PROJECT_ROOT``) on the driver, so the
settings and conf files are found as in any job, and from the ``--py-files`` zip on the executors.
The job's result is the last stdout line, after ``FRESHREC_RESULT``, and, when
``FRESHREC_RESULT_FILE`` names a file, that file's JSON (Airflow's ``SparkSubmitOperator`` logs
stdout but returns nothing: the batch DAG reads the file).
"""

import importlib
import json
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
# this folder is sys.path[0] for a submitted script: its modules must not shadow packages
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
if os.environ.get("FRESHREC_PROJECT_ROOT"):
    sys.path.insert(0, os.environ["FRESHREC_PROJECT_ROOT"])


def main() -> None:
    from freshrec.ops.submit import JOBS, RESULT

    job, argv = sys.argv[1], sys.argv[2:]
    result = importlib.import_module(JOBS[job]).main(argv)
    text = json.dumps(result, default=str)
    if os.environ.get("FRESHREC_RESULT_FILE"):
        tmp = os.environ["FRESHREC_RESULT_FILE"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.environ["FRESHREC_RESULT_FILE"])
    print(RESULT + text, flush=True)


if __name__ == "__main__":
    main()
