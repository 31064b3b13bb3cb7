"""Reinforcement learning from served logs: the simulator's logging policy writes the same Delta
tables production fills (impressions with candidates, feedback with propensities), `freshrec train
--data logged` learns a bandit, REINFORCE or the slate Q-network from them, and the learned policy
beats the logging policy in the simulator's truth, with off-policy estimates close to that truth;
an empty feedback table is a clear error; the online bandit's state survives a server restart."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.storage.delta import DeltaStore
from freshrec.settings import SynthSettings
from tests.conftest import small_settings
from training import rl
from training import rl_logged as rlg

SYNTH = SynthSettings(n_events=30000, n_users=1200, n_items=400, n_clusters=6, days=30, seed=3)


def make_sim(seed: int = 0) -> rl.Simulator:
    return rl.Simulator.from_synth(SYNTH, seed=seed, n_candidates=20, k=4, fixed_history=True,
                                   unique_candidates=True)


@pytest.fixture(scope="module")
def logged_tables(tmp_path_factory):
    """5000 requests of the logging policy written through the tables."""
    sim = make_sim()
    logged = rl.log_data(sim, 5000)
    settings = small_settings(tmp_path_factory.mktemp("rl") / "data", synth=SYNTH.model_dump())
    rid = rlg.simulator_logs_to_feedback(sim, logged, DeltaStore(settings))
    return sim, logged, settings, rid


def _rows(data: rlg.LoggedSlates) -> np.ndarray:
    return np.array([int(r[1:]) for r in data.request_ids])


def test_tables_give_back_the_logged_slates_with_the_simulators_features(logged_tables):
    sim, logged, settings, rid = logged_tables
    data = rlg.load_logged(DeltaStore(settings))
    assert len(data) == len(logged.slates)  # organic feedback rows were skipped
    rows = _rows(data)
    assert (rows == np.arange(len(rows))).all()  # in serving-time order
    mem = rlg.from_simulator(sim, logged)
    np.testing.assert_allclose(data.x, mem.x, atol=1e-9)
    assert (data.slates == logged.slates).all() and (data.rewards == logged.rewards).all()
    np.testing.assert_allclose(data.mu, np.take_along_axis(logged.mu, logged.slates, axis=1))
    train, test = data.split(0.3)
    assert train.ts.max() < test.ts.min() and len(test) == 1500


@pytest.mark.parametrize("model", ["bandit", "reinforce", "dqn"])
def test_policies_learned_from_the_tables_beat_the_logging_policy(logged_tables, model):
    sim, logged, settings, _ = logged_tables
    data = rlg.load_logged(DeltaStore(settings))
    train, test = data.split(0.3)
    learned = rlg.TRAINERS[model](train)
    fresh = make_sim(seed=5).requests(2000)
    truth = rlg.true_value_in_simulator(sim, learned.scores, fresh)
    logging = rl.true_value(fresh, rl.inclusion_probs(fresh.base, sim.k, np.random.default_rng(1)))
    assert truth > 1.2 * logging, (model, truth, logging)  # measured ~1.4x
    # off-policy estimates on the held-out logs next to the truth on those same requests
    ev = rlg.evaluate_on_logs(learned, train, test)
    b = logged.batch
    rows = _rows(test)
    held_out = rl.Batch(b.users[rows], b.cands[rows], None, b.base[rows], b.p_click[rows], b.aff[rows])
    truth_there = rlg.true_value_in_simulator(sim, learned.scores, held_out)
    assert ev["ope"]["dr"] == pytest.approx(truth_there, rel=0.1), (ev, truth_there)
    assert ev["ope"]["snips"] == pytest.approx(truth_there, rel=0.1), (ev, truth_there)
    assert ev["ope"]["ips"] == pytest.approx(truth_there, rel=0.2), (ev, truth_there)


def test_train_data_logged_end_to_end_through_the_cli(logged_tables, monkeypatch, capsys):
    """`freshrec train --data logged`: MLflow run with the held-out OPE, the figure and a
    registered policy serving can load; dqn is recorded and not registered."""
    import mlflow

    from freshrec.cli.main import main

    sim, logged, settings, _ = logged_tables
    monkeypatch.setenv("FRESHREC_DATA_DIR", str(settings.data_dir))
    assert main(["train", "--model", "bandit", "--data", "logged", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "logging policy on the 1500 held-out requests" in out and "freshrec-policy v1" in out
    assert main(["train", "--model", "dqn", "--data", "logged", "--device", "cpu"]) == 0
    assert "not registered: dqn is a slate Q-network" in capsys.readouterr().out
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    runs = {r.data.tags["model"]: r for r in mlflow.search_runs(
        experiment_names=[settings.training.experiment], output_format="list")}
    for name in ("linucb", "dqn"):
        m = runs[name].data.metrics
        assert m["snips_vs_logging"] > 1.2 and m["dr_vs_logging"] > 1.2, (name, m)
        assert runs[name].data.params["data"] == "logged"
        files = {f.path for f in mlflow.MlflowClient().list_artifacts(runs[name].info.run_id)}
        assert {"ope.png", "policies.json", "model"} <= files
    # the registered policy is what the serving re-ranker loads
    from serving.rerank import Reranker

    path = mlflow.artifacts.download_artifacts(f"runs:/{runs['linucb'].info.run_id}/model")
    rr = Reranker(__import__("pathlib").Path(path), settings.data_dir / "imp")
    assert rr.name == "linucb" and rr.policy.kind == "linucb"
    assert rr.policy.A[0, 0] > 1000  # warmed by every logged shown item (3500 train requests x 4)


def test_empty_or_propensity_less_feedback_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import pyarrow as pa

    from freshrec.cli.main import main

    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path / "data"))
    # a runtime error: 1 (2 is for usage errors)
    assert main(["train", "--model", "bandit", "--data", "logged", "--no-register"]) == 1
    err = capsys.readouterr().err.strip()
    assert "table feedback (" in err and "has no served-item rows" in err
    # one line for the error (warnings such as "device auto: no GPU visible" come before it)
    errors = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert "filled from served impressions by the feedback job" in err and len(errors) == 1
    store = DeltaStore(small_settings(tmp_path / "data"))
    spec = store.spec("feedback")
    row = {f.name: None for f in spec.schema}
    row.update(request_id="r1", user_id="u1", item_id="i1", position=0, clicked=False, reward=0.0,
               organic=False, batch_date="2026-01-01")
    store.write_arrow("feedback", pa.Table.from_pylist([row], schema=spec.schema))
    assert main(["train", "--model", "dqn", "--data", "logged", "--no-register"]) == 1
    err = capsys.readouterr().err
    assert "has 1 served-item rows but no propensities" in err and "table feedback (" in err


def _bandit_dir(root, b):
    import json

    root.mkdir()
    np.savez(root / "arrays.npz", A=np.eye(6), b=np.asarray(b, float), alpha=np.array(0.5),
             epsilon=np.array(0.1), kind=np.array("linucb"))
    (root / "model.json").write_text(json.dumps({"name": "linucb", "kind": "reranker"}))
    return root


def test_bandit_state_is_persisted_periodically_and_only_restored_for_its_own_policy(tmp_path):
    from serving.rerank import Reranker

    policy = _bandit_dir(tmp_path / "p", np.zeros(6))
    r = Reranker(policy, tmp_path / "imp", state_dir=tmp_path / "state", persist_every=3,
                 persist_seconds=3600)
    assert not r.restored and not r.state_path.exists()
    x = np.arange(6.0)
    r.pending["u"] = {"a": x, "b": x + 1, "c": x + 2}
    for item in ("a", "b"):
        assert r.feedback("u", item, "click")
    assert not r.state_path.exists()  # 2 updates: not yet
    assert r.feedback("u", "c", "click")  # the 3rd: written without a stop (a crash keeps it)
    b_saved = r.policy.b.copy()
    assert not list((tmp_path / "state").glob(".*tmp"))  # the temporary file was renamed
    again = Reranker(policy, tmp_path / "imp", state_dir=tmp_path / "state")
    assert again.restored and again.updates == 3
    np.testing.assert_array_equal(again.policy.b, b_saved)
    other = _bandit_dir(tmp_path / "p2", np.ones(6))  # a newly promoted policy: its own start
    fresh = Reranker(other, tmp_path / "imp", state_dir=tmp_path / "state")
    assert not fresh.restored and np.allclose(fresh.policy.b, 1.0)


def test_dqn_on_the_simulator_improves_over_the_logging_policy(tmp_path):
    """`freshrec train --model dqn` (simulator data): trained from the simulated logging
    policy's logs, scored by the simulator's truth on fresh requests."""
    from training import run as training

    settings = small_settings(tmp_path / "data", synth=SYNTH.model_dump())
    out = training.run(settings, "dqn", "cpu", register=False, n_logged=2500)
    assert out["truth"]["dqn"] > 1.2 * out["truth"]["logging"], out["truth"]
    assert out["ope"]["dqn"]["dr"] == pytest.approx(out["truth"]["dqn"], rel=0.15), out


@pytest.mark.gpu
def test_policies_train_on_a_gpu_and_serve_from_numpy(logged_tables):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU path runs only where one is present")
    sim, _, settings, _ = logged_tables
    train, _ = rlg.load_logged(DeltaStore(settings)).split(0.3)
    fresh = make_sim(seed=5).requests(1000)
    for model in ("reinforce", "dqn"):
        gpu = rlg.TRAINERS[model](train, device="cuda")
        cpu = rlg.TRAINERS[model](train, device="cpu")
        assert rlg.true_value_in_simulator(sim, gpu.scores, fresh) == pytest.approx(
            rlg.true_value_in_simulator(sim, cpu.scores, fresh), rel=0.05)
