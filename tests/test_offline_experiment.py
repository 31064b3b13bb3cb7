"""`freshrec experiment` / recmodels.run_experiment: the fixed protocol in memory, from a file,
with models found by name, entry point or registration, parameters from the settings."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from freshrec.data.datasets import EventsFileError, from_file
from freshrec.settings import load_settings
from recmodels import available_models, make_model, model_params
from recmodels.experiment import expand_models, run_experiment

ROOT = Path(__file__).resolve().parent.parent


def clustered_events(n_users=300, seed=0) -> pd.DataFrame:
    """Two taste groups of 15 items each; group 0 is busier, so popularity favours its items and
    item-kNN (which sees the groups) wins clearly for group 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        g = u % 2
        n = 20 if g == 0 else 12
        for t in range(n):
            rows.append((f"u{u}", f"g{g}_{rng.integers(0, 15)}", 1_700_000_000 + u * 1000 + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


@pytest.fixture
def settings(tmp_path):
    return load_settings("local", env={}, paths={"data_dir": str(tmp_path / "data")},
                         evaluation={"max_users": 0, "bootstrap_resamples": 1000})


def test_experiment_from_a_csv_ranks_cf_above_popularity_with_a_significant_p(tmp_path, settings):
    path = tmp_path / "events.csv"
    clustered_events().to_csv(path, index=False)
    r = run_experiment(path, ["most_popular", "item_knn", "trending"], settings=settings)
    assert r.best == "item_knn"
    v = r.validation
    assert v.loc["item_knn", "ndcg_at_10"] > 1.2 * v.loc["most_popular", "ndcg_at_10"]
    assert r.p_values["item_knn"]["most_popular"] < 0.05
    # the reverse hypothesis is not significant
    assert r.p_values["most_popular"]["item_knn"] > 0.5
    assert r.test.loc["item_knn", "ndcg_at_10"] > r.test.loc["most_popular", "ndcg_at_10"]
    assert r.sizes["validation_users"] > 100 and r.sizes["test_users"] > 100
    table = r.summary()
    assert list(table.index)[0] == "item_knn"


def test_validation_and_test_periods_are_distinct_and_the_fit_sees_neither():
    from recmodels.experiment import Protocol

    ev = clustered_events(40).rename(columns={"timestamp": "ts"})
    ev["ts"] = pd.to_datetime(ev["ts"], unit="s", utc=True)
    ev["weight"] = 1.0
    p = Protocol(ev, None, [10], 0.2, 0.2)
    fit = p.validation.train_events
    val_only = pd.concat([p.test.train_events, fit]).drop_duplicates(keep=False)
    test_ev = pd.concat([ev, p.test.train_events]).drop_duplicates(keep=False)
    for u in ("u0", "u1"):
        assert fit[fit.user_id == u].ts.max() < val_only[val_only.user_id == u].ts.min()
        assert val_only[val_only.user_id == u].ts.max() < test_ev[test_ev.user_id == u].ts.min()
    assert len(fit) + len(val_only) + len(test_ev) == len(ev)


def test_bad_files_name_the_file_and_the_column(tmp_path):
    bad = tmp_path / "clicks.csv"
    bad.write_text("user,item_id,timestamp\nu1,i1,1\n")
    with pytest.raises(EventsFileError, match=r"clicks.csv: missing column\(s\) \['user_id'\]"):
        from_file(bad)
    bad.write_text("user_id,item_id,timestamp\nu1,i1,1\nu2,i2,yesterday\n")
    with pytest.raises(EventsFileError, match="clicks.csv: 1 row.*timestamp.*row 2.*'yesterday'"):
        from_file(bad)
    with pytest.raises(EventsFileError, match="does not exist"):
        from_file(tmp_path / "nope.parquet")
    ok = tmp_path / "ok.parquet"
    pd.DataFrame({"user_id": ["a"], "item_id": ["b"], "timestamp": ["2026-01-02T03:04:05Z"],
                  "value": [4.0]}).to_parquet(ok)
    ev = from_file(ok).events
    assert ev["ts"].iloc[0] == pd.Timestamp("2026-01-02T03:04:05Z")
    assert ev["value"].iloc[0] == 4.0 and ev["weight"].iloc[0] == 1.0


def test_all_names_each_model_once():
    names = expand_models(["als", "all"])
    assert len(names) == len(set(names)) and names.count("als") == 1
    assert set(names) == set(available_models())
    mem = expand_models(["all"], in_memory=True)
    assert "als" not in mem and "two_tower" not in mem and "item_knn" in mem
    with pytest.raises(ValueError, match="unknown model.*'nope'"):
        expand_models(["item_knn", "nope"])


def test_model_parameters_come_from_settings(tmp_path):
    s = load_settings("local", env={"FRESHREC__MODELS__ITEM_KNN__N_NEIGHBORS": "7"},
                      paths={"data_dir": str(tmp_path)}, models={"pure_svd": {"rank": 5}})
    assert model_params("item_knn", s) == {"n_neighbors": 7}
    assert make_model("pure_svd", **model_params("pure_svd", s)).rank == 5
    assert model_params("hybrid", s)["source_params"]["item_knn"] == {"n_neighbors": 7}
    assert model_params("als", s)["rank"] == s.als.rank
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['neighbours'\].*models.item_knn"):
        make_model("item_knn", neighbours=3)


def test_a_package_adds_a_model_by_entry_point(tmp_path):
    """A distribution on the path that declares freshrec.models = name = module:Class is found by
    name in a fresh interpreter, fitted and evaluated next to the built-ins."""
    pkg = tmp_path / "site"
    (pkg / "mymodels").mkdir(parents=True)
    (pkg / "mymodels" / "__init__.py").write_text(textwrap.dedent("""
        from recmodels.knn import ItemKNNModel

        class Mine(ItemKNNModel):
            name = "my_knn"
    """))
    dist = pkg / "mymodels-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mymodels\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[freshrec.models]\nmy_knn = mymodels:Mine\n")
    csv = tmp_path / "ev.csv"
    clustered_events(120).to_csv(csv, index=False)
    code = textwrap.dedent(f"""
        from freshrec.settings import load_settings
        from recmodels.experiment import run_experiment
        s = load_settings("local", env={{}}, paths={{"data_dir": r"{tmp_path}"}},
                          evaluation={{"bootstrap_resamples": 200}})
        r = run_experiment(r"{csv}", ["my_knn", "item_knn", "most_popular"], settings=s)
        v = r.validation["ndcg_at_10"]
        print(v["my_knn"] == v["item_knn"], v["my_knn"] > v["most_popular"])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{ROOT}:{pkg}", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


def test_the_command_prints_the_table_and_names_a_bad_file_in_one_line(tmp_path):
    good, bad = tmp_path / "events.csv", tmp_path / "bad.csv"
    clustered_events(120).to_csv(good, index=False)
    bad.write_text("user_id,item,timestamp\n1,2,3\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FRESHREC_DATA_DIR": str(tmp_path),
           "FRESHREC__EVALUATION__BOOTSTRAP_RESAMPLES": "200"}
    run = [sys.executable, "-m", "freshrec.cli.main", "experiment", "--models",
           "most_popular,item_knn", "--plot", str(tmp_path / "cmp.png"), "--events"]
    ok = subprocess.run(run + [str(good)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.splitlines()
    order = [ln.split()[0] for ln in lines if ln.startswith(("item_knn", "most_popular"))]
    assert order == ["item_knn", "most_popular"]  # best on validation first
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    err = subprocess.run(run + [str(bad)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert err.returncode != 0 and "Traceback" not in err.stderr
    assert err.stderr.strip().splitlines() == [
        f"freshrec: error: {bad}: missing column(s) ['item_id']; the file has ['user_id', 'item', "
        "'timestamp']. An events file needs user_id, item_id, timestamp (and optionally value, "
        "weight); rename the columns"]
