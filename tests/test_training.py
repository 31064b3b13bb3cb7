"""The training lane: data without leakage, two-tower and SASRec learning on a small synthetic
dataset, device-neutral export that runs without the training code, NaN and device errors, the
bandits and the offline RL learner in the simulator, OPE against the simulator's truth, MLflow runs
and the registry gate through `freshrec train`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from freshrec.data.datasets import Dataset, synthetic
from recmodels.evaluation import evaluate_scorer
from freshrec.settings import SynthSettings
from freshrec.data.synth import make_items
from training import data as td
from training import rl, trainer

SMALL_SYNTH = SynthSettings(n_events=30000, n_users=1200, n_items=400, n_clusters=6, days=30, seed=3)


@pytest.fixture(scope="module")
def small() -> Dataset:
    return synthetic(SMALL_SYNTH)


@pytest.fixture(scope="module")
def data(small) -> td.TrainData:
    return td.build(small, 0.2, 0, 13, val_users=300)


def cfg(**kw):
    from freshrec.settings import TrainingSettings

    base = dict(epochs=6, patience=2, batch_size=256, dim=32, max_len=20, samples_per_epoch=20000,
                val_users=300, negatives=128, lr=3e-3)
    return TrainingSettings(**{**base, **kw})


def popularity_ndcg(data: td.TrainData) -> float:
    pop = np.asarray(data.split.train.sum(axis=0)).ravel()
    return evaluate_scorer(data.split, lambda rows: np.tile(pop, (len(rows), 1)), [10])["ndcg_at_10"]


def test_training_data_has_no_test_period_leakage(data, small):
    split = data.split
    train_last = split.train_events.groupby("user_id")["ts"].max()
    ev = small.events.merge(train_last.rename("train_last"), on="user_id")
    test_ts = ev[~ev.set_index(["user_id", "item_id", "ts"]).index.isin(
        split.train_events.set_index(["user_id", "item_id", "ts"]).index)]
    assert (test_ts["ts"] >= test_ts["train_last"]).all()  # nothing after a user's cut is trained on
    n_train = sum(len(s) for s in data.sequences)
    assert n_train == len(split.train_events)
    seqs = data.train_sequences()
    for u, item in zip(data.val_users[:50], data.val_items[:50]):
        assert data.sequences[u][-1] == item and len(seqs[u]) == len(data.sequences[u]) - 1


@pytest.mark.parametrize("kind", ["two_tower", "sasrec"])
def test_deep_models_learn_beyond_popularity(kind, data):
    curves = []
    r = trainer.train(kind, data, cfg(), "cpu", on_epoch=lambda e, row: curves.append(row),
                      progress=False)
    assert len(curves) == r.epochs_run >= 2 and r.best_epoch >= 1
    assert curves[-1]["train_loss"] < curves[0]["train_loss"]
    assert r.test["ndcg_at_10"] > 1.5 * popularity_ndcg(data), (kind, r.test)
    assert r.samples_per_second > 0 and r.item_vectors.shape == (data.n_items, 32)


def test_export_runs_without_the_training_code(data, tmp_path):
    r = trainer.train("two_tower", data, cfg(epochs=2), "cpu", progress=False)
    out = trainer.export(r, data, tmp_path / "model", 20)
    hist = td.pad_histories(data.sequences, np.arange(5), None, 20)
    np.save(tmp_path / "hist.npy", hist)
    code = (
        "import sys, json, numpy as np, torch\n"
        f"m = torch.jit.load('{out}/user_encoder.pt')\n"
        f"u = m(torch.as_tensor(np.load('{tmp_path}/hist.npy'))).detach().numpy()\n"
        f"a = np.load('{out}/arrays.npz')\n"
        "assert not any(k.startswith(('training', 'freshrec', 'spark_jobs')) for k in sys.modules)\n"
        "print(json.dumps({'u': u.tolist(), 'n': len(a['item_ids'])}))\n")
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True, cwd=tmp_path).stdout)
    want = r.user_vectors[:5]
    np.testing.assert_allclose(np.array(got["u"]), want, atol=1e-4)
    assert got["n"] == data.n_items
    meta = json.loads((out / "model.json").read_text())
    assert meta["name"] == "two_tower" and meta["max_len"] == 20


def test_new_items_get_vectors_from_their_content(data):
    r = trainer.train("two_tower", data, cfg(epochs=3), "cpu", progress=False)
    enc = trainer.Encoders("two_tower", r.module, data, cfg(), torch.device("cpu"))
    cold = enc.items(known_ids=False)  # as if no item had an id embedding yet
    assert np.isfinite(cold).all()
    first_cat = data.cat_ids[1:, 0]
    sims = cold @ cold.T
    same = first_cat[:, None] == first_cat[None, :]
    np.fill_diagonal(same, False)
    off = ~same
    np.fill_diagonal(off, False)
    assert sims[same].mean() > sims[off].mean() + 0.1


def test_nan_loss_stops_the_run_and_marks_it_failed(small, tmp_path):
    import mlflow

    from tests.conftest import small_settings
    from training import run as training

    settings = small_settings(tmp_path / "data")
    with pytest.raises(trainer.NanLoss, match="loss is nan"):
        training.train_deep(settings, "two_tower", "cpu", small,
                            overrides={"lr": float("inf"), "epochs": 2, "samples_per_epoch": 2000,
                                       "batch_size": 256, "val_users": 100}, progress=False)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    run = mlflow.search_runs(experiment_names=["freshrec-training"], output_format="list")[0]
    assert run.info.status == "FAILED" and "loss is nan" in run.data.tags["failure_reason"]


def test_cuda_without_a_gpu_is_a_clear_error_not_a_cpu_run(small, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error path cannot happen here")
    from freshrec.device import DeviceUnavailable
    from tests.conftest import small_settings
    from training import run as training

    with pytest.raises(DeviceUnavailable, match="device 'cuda' requested"):
        training.run(small_settings(tmp_path / "data"), "two_tower", "cuda", small)


def test_tiny_or_empty_datasets_get_clear_errors(small):
    with pytest.raises(td.DatasetTooSmall, match="training needs at least"):
        td.build(Dataset("tiny", small.events.head(10), small.items))
    with pytest.raises(ValueError, match="unknown deep model"):
        trainer.build_model("gpt", None, cfg())


@pytest.mark.gpu
def test_gpu_training_with_mixed_precision_exports_for_the_cpu(data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU path runs only where one is present")
    r = trainer.train("two_tower", data, cfg(epochs=2), "cuda", progress=False)
    assert r.device.startswith("cuda") and r.test["ndcg_at_10"] > popularity_ndcg(data)
    out = trainer.export(r, data, tmp_path / "m", 20)
    m = torch.jit.load(str(out / "user_encoder.pt"), map_location="cpu")
    assert m(torch.zeros((1, 20), dtype=torch.long)).device.type == "cpu"


# -- reinforcement learning -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim() -> rl.Simulator:
    return rl.Simulator.from_synth(SMALL_SYNTH, seed=0, n_candidates=20, k=4)


def test_simulator_is_the_generators_ground_truth(sim):
    from freshrec.data.synth import ground_truth

    item_cluster, pop, users = ground_truth(SMALL_SYNTH)
    assert (sim.item_cluster == item_cluster).all() and (sim.user_clusters == users).all()
    rng = np.random.default_rng(SMALL_SYNTH.seed)
    _, ic = make_items(SMALL_SYNTH, rng)
    assert (ic == item_cluster).all()
    b = sim.requests(200)
    taste = sim.user_clusters[b.users, 0][:, None] == sim.item_cluster[b.cands]
    assert b.p_click[taste].mean() > 3 * b.p_click[~taste].mean()


def test_learned_policies_beat_random_greedy_and_logging(sim):
    res = rl.compare_policies(sim, n_logged=1500, n_eval=800, bandit_rounds=1500)
    t = res["truth"]
    for learned in ("reinforce", "linucb", "thompson"):
        assert t[learned] > 1.1 * t["logging"], (learned, t)
        assert t[learned] > t["random"] and t[learned] > t["greedy"], (learned, t)
    assert t["oracle"] >= max(t.values()) - 1e-9
    for name, est in res["ope"].items():  # OPE next to the truth on the logged contexts
        assert est["dr"] == pytest.approx(est["truth_on_logged_contexts"], rel=0.1), (name, est)
        assert est["snips"] == pytest.approx(est["truth_on_logged_contexts"], rel=0.15), (name, est)


def test_bandit_propensities_are_valid_probabilities(sim):
    b = sim.requests(50)
    for kind in ("linucb", "thompson"):
        bandit = rl.LinearPolicy(kind=kind, epsilon=0.1, seed=1)
        for t in range(50):
            slate, prop = bandit.select(b.x[t], 4)
            assert len(set(slate)) == 4 and ((prop > 0) & (prop <= 1)).all()
            bandit.update(b.x[t, slate], (sim.rng.random(4) < b.p_click[t, slate]).astype(float))
    mu = rl.inclusion_probs(b.base, 4, np.random.default_rng(0))
    assert np.allclose(mu.sum(1), 4, atol=0.1)
    with pytest.raises(ValueError, match="linucb or thompson"):
        rl.LinearPolicy(kind="greedy")


def test_freshrec_train_cli_reports_a_missing_gpu_and_an_unknown_model(tmp_path, monkeypatch, capsys):
    from freshrec.cli.main import main

    monkeypatch.setenv("FRESHREC_DATA_DIR", str(tmp_path / "data"))
    if not torch.cuda.is_available():
        assert main(["train", "--model", "bandit", "--device", "cuda"]) == 1
        assert "device 'cuda' requested" in capsys.readouterr().err
    # no tables yet: a runtime error (1); an unknown model: a usage error (2)
    assert main(["train", "--model", "two_tower", "--device", "cpu"]) == 1
    assert "no silver events table" in capsys.readouterr().err
    assert main(["train", "--model", "gpt"]) == 2
    assert "'gpt' is not one of" in capsys.readouterr().err
