import numpy as np
import pytest

from recmodels.foldin import fold_in, fold_in_batch, gram


def test_fold_in_solves_the_implicit_als_normal_equations():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 8))
    items, w, alpha, reg = np.array([3, 7, 9]), np.array([1.0, 5.0, 2.0]), 2.0, 0.1
    x = fold_in(y[items], w, gram(y), alpha, reg)
    # the loss gradient at x is zero: (YtCY + reg*n*I) x = YtCp over all items (p=1 on items)
    c = np.ones(50)
    c[items] += alpha * w
    p = np.zeros(50)
    p[items] = 1.0
    lhs = (y.T * c) @ y + reg * len(items) * np.eye(8)
    np.testing.assert_allclose(lhs @ x, (y.T * c) @ p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [7, 64, 8192])
def test_batched_fold_in_equals_one_at_a_time(chunk):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(300, 16)).astype(np.float32)
    users = np.repeat(np.arange(40), rng.integers(1, 15, 40))
    items = rng.integers(0, 300, len(users))
    keep = np.unique(users * 1000 + items, return_index=True)[1]
    users, items = users[keep], items[keep]
    w = rng.random(len(users)).astype(np.float32) * 3
    batch = fold_in_batch(y, users, items, w, 45, 1.5, 0.05, chunk=chunk)
    for u in range(40):
        m = users == u
        np.testing.assert_allclose(batch[u], fold_in(y[items[m]], w[m], gram(y), 1.5, 0.05),
                                   rtol=1e-3, atol=1e-4)
    assert not batch[40:].any()
