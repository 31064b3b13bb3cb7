"""Every ``freshrec`` command leaves when its work is done, with its own exit code.

``freshrec run all`` used to print ``[6/6] all ... done`` and then hang for ever: ``entry()`` joined
every non-daemon thread by hand, and the idle workers of MLflow's artifact upload pool (a
``concurrent.futures`` pool) leave only when the interpreter's thread shutdown tells their
executor to stop. These tests run the real program: the installed console script, as a user
does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def console_script() -> Path:
    script = Path(sys.executable).parent / "freshrec"
    if not script.exists():
        pytest.skip(f"no installed console script at {script} (pip install -e . makes it)")
    return script


def test_entry_leaves_after_a_thread_pool_was_used_and_keeps_the_commands_code():
    """The mechanism alone, in a second: a command that used a ``concurrent.futures`` pool (as
    MLflow's artifact upload does) and returned 3 must exit 3, not wait for the pool's workers."""
    program = textwrap.dedent("""
        from concurrent.futures import ThreadPoolExecutor
        from freshrec.cli import main as cli

        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="LikeMlflowArtifacts")

        def work():
            assert pool.submit(sum, [1, 2]).result() == 3
            return 3

        cli.main = work
        cli.entry()
    """)
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 3, r.stderr


@pytest.mark.integration
def test_the_installed_run_all_exits_0_after_logging_to_mlflow(tmp_path):
    """``freshrec data synth`` then ``freshrec run all`` through the console script on a small
    dataset: the evaluation logs MLflow artifacts, and the program must still exit 0 within the
    limit (it hung until killed before the fix)."""
    freshrec = console_script()
    data = tmp_path / "data"
    env = {**os.environ, "FRESHREC_DATA_DIR": str(data), "FRESHREC_PROFILE": "local",
           "FRESHREC__SYNTH__N_EVENTS": "6000", "FRESHREC__SYNTH__N_USERS": "300",
           "FRESHREC__SYNTH__N_ITEMS": "120", "FRESHREC__SYNTH__DAYS": "10",
           "FRESHREC__ALS__RANK": "8", "FRESHREC__ALS__ITERATIONS": "3",
           "FRESHREC__SPARK__SHUFFLE_PARTITIONS": "2", "FRESHREC__EVALUATION__MODELS":
           '["most_popular", "item_knn", "als"]', "FRESHREC__EVALUATION__KS": "[10]"}
    r = subprocess.run([str(freshrec), "data", "synth"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    try:
        r = subprocess.run([str(freshrec), "run", "all", "--date", day], capture_output=True,
                           text=True, timeout=900, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:  # the hang: it printed "done" and never left
        pytest.fail(f"`freshrec run all` did not exit within {e.timeout} s; its last output: "
                    f"{(e.stdout or b'')[-500:]!r}")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((data / "mlflow").rglob("MLmodel"))
    assert runs, f"the run logged no MLflow model under {data / 'mlflow'}: the hang's trigger was absent"
