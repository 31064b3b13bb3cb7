"""The paired per-user bootstrap: known answers, and the per-user metrics it is fed."""

import numpy as np
import pytest
from scipy.stats import binom

from recmodels.evaluation import paired_bootstrap, per_user_metric, ranking_metrics


def test_bootstrap_p_value_matches_the_exact_binomial_answer():
    # 60 users gain 0.1, 40 lose 0.1: a resample's mean is <= 0 exactly when it draws at most 50
    # gainers of 100, so the exact bootstrap p-value is P(Binomial(100, 0.6) <= 50)
    a = np.r_[np.full(60, 0.3), np.full(40, 0.1)]
    b = np.full(100, 0.2)
    t = paired_bootstrap(a, b, resamples=20000, seed=1)
    exact = binom.cdf(50, 100, 0.6)  # 0.0271
    assert t.p_value == pytest.approx(exact, abs=0.005)
    assert t.mean_diff == pytest.approx(0.02)
    assert t.ci_low < 0.02 < t.ci_high
    assert t.p_value < 0.05  # significant at 5% ...
    t10 = paired_bootstrap(a[::10], b[::10], resamples=20000, seed=1)
    assert t10.p_value > 0.05  # ... the same effect on 10 users is not


def test_identical_models_are_never_significant_and_a_sweep_is_as_small_as_resamples_allow():
    x = np.random.default_rng(0).random(500)
    assert paired_bootstrap(x, x, resamples=999).p_value == 1.0
    assert paired_bootstrap(x + 0.5, x, resamples=999).p_value == pytest.approx(1 / 1000)
    assert paired_bootstrap(x, x + 0.5, resamples=999).p_value == 1.0  # one-sided: B better


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same order"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="ndcg_at_K"):
        per_user_metric(np.zeros((1, 3), int), [np.array([1])], "coverage_at_3")


def test_per_user_values_average_to_the_reported_metrics():
    rng = np.random.default_rng(3)
    recs = np.stack([rng.permutation(50)[:10] for _ in range(40)])
    relevant = [rng.choice(50, rng.integers(1, 6), replace=False) for _ in range(40)]
    agg = ranking_metrics(recs, relevant, [5, 10], 50)
    for m in ("ndcg_at_5", "recall_at_10", "hr_at_10", "ndcg_at_10"):
        assert per_user_metric(recs, relevant, m).mean() == pytest.approx(agg[m])
