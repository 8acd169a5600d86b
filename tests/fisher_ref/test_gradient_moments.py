"""F, S, V, the mean gradient and the legacy batch-squared estimator: closed forms worked
by hand, and the identities of SPEC §2.
"""

import numpy as np
import pytest
import torch

from fisher_ref.gradient_moments import (
    batch_squared_gradient,
    empirical_fisher,
    gradient_variance,
    mean_gradient,
    squared_mean_gradient,
)
from fisher_ref.losses import causal_lm_loss
from fisher_ref.losses import sequence_classification_loss as cls_loss
from fisher_ref.testing.batches import concat_batches, random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance
from fisher_ref.units import per_sample_gradients
from tests.fisher_ref._tiny import SoftmaxRegression, softmax_data, softmax_grads_by_hand

RTOL, ATOL = tolerance("float64-paths")
ESTIMATORS = (empirical_fisher, squared_mean_gradient, gradient_variance)


def _close(a, b):
    assert_dicts_close(a, b, rtol=RTOL, atol=ATOL)


def test_softmax_regression_closed_form():
    model, batch = SoftmaxRegression(), softmax_data()
    g = softmax_grads_by_hand(model, batch)  # [n, C, d]
    F, S = (g ** 2).mean(0), g.mean(0) ** 2
    expected = {"F": F, "S": S, "V": F - S, "mean": g.mean(0)}
    got = {"F": empirical_fisher(model, batch, loss_fn=cls_loss)["W"],
           "S": squared_mean_gradient(model, batch, loss_fn=cls_loss)["W"],
           "V": gradient_variance(model, batch, loss_fn=cls_loss)["W"],
           "mean": mean_gradient(model, batch, loss_fn=cls_loss)["W"]}
    _close(got, {k: torch.from_numpy(v) for k, v in expected.items()})


class LinearRegression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))

    def forward(self, x, y):
        return x @ self.w


def squared_loss(model, batch):  # a plain callable: 0.5 (w.x - y)^2 per row
    return 0.5 * (model(**batch) - batch["y"]) ** 2


def test_linear_model_squared_loss_closed_form():
    x = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0], [3.0, 1.0, 0.0], [0.0, 2.0, -1.0]])
    y = np.array([1.0, -2.0, 0.5, 3.0])
    w = np.array([0.5, -1.0, 2.0])
    g = (x @ w - y)[:, None] * x  # gradient of 0.5 r^2 is r x
    batch = {"x": torch.tensor(x), "y": torch.tensor(y)}
    model = LinearRegression()
    F = empirical_fisher(model, batch, loss_fn=squared_loss)["w"]
    V = gradient_variance(model, batch, loss_fn=squared_loss, unbiased=True)["w"]
    torch.testing.assert_close(F, torch.tensor((g ** 2).mean(0)), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(V, torch.tensor(g.var(0, ddof=1)), rtol=RTOL, atol=ATOL)


def test_batch_squared_gradient_by_hand():
    model, batch = SoftmaxRegression(), softmax_data(n=5)
    g = softmax_grads_by_hand(model, batch)
    parts = [g[0:2].mean(0), g[2:4].mean(0), g[4:5].mean(0)]  # b = 2: sizes 2, 2, 1
    expected = (2 * parts[0] ** 2 + 2 * parts[1] ** 2 + parts[2] ** 2) / 5
    got = batch_squared_gradient(model, batch, loss_fn=cls_loss, micro_batch_size=2)["W"]
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def gpt2():
    return build_model(TinyConfig(arch="gpt2", num_layers=1))


@pytest.mark.parametrize("unit,weighting", [("sample", "sample"), ("sample", "token"),
                                            ("token", "sample")])
def test_F_at_least_S_and_V_is_their_nonnegative_difference(gpt2, unit, weighting):
    batch = random_batch(kind="causal", batch_size=4, seed=11)
    kw = dict(unit=unit, weighting=weighting)
    F, S, V = (f(gpt2, batch, **kw) for f in ESTIMATORS)
    for k in F:
        assert (F[k] >= S[k] - ATOL).all() and (V[k] >= 0).all()
    _close(V, {k: F[k] - S[k] for k in F})


@pytest.mark.parametrize("weighting", ["sample", "token"])
def test_batch_squared_gradient_endpoints_are_F_and_S(gpt2, weighting):
    batch = random_batch(kind="causal", batch_size=4, seed=12)
    kw = dict(weighting=weighting)
    _close(batch_squared_gradient(gpt2, batch, micro_batch_size=1, **kw), empirical_fisher(gpt2, batch, **kw))
    for b in (4, 9):
        _close(batch_squared_gradient(gpt2, batch, micro_batch_size=b, **kw),
               squared_mean_gradient(gpt2, batch, **kw))


def test_duplicating_every_unit_changes_nothing(gpt2):
    batch = random_batch(kind="causal", batch_size=3, seed=13)
    twice = concat_batches([batch, batch])
    for f in ESTIMATORS:
        _close(f(gpt2, twice), f(gpt2, batch))


def test_permuting_rows_changes_nothing(gpt2):
    batch = random_batch(kind="causal", batch_size=4, seed=14)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = {k: v[perm] for k, v in batch.items()}
    for kw in (dict(unit="token"), dict(unit="sample", weighting="token")):
        for f in ESTIMATORS:
            _close(f(gpt2, shuffled, **kw), f(gpt2, batch, **kw))


def test_scaling_the_loss_by_c_scales_by_c_squared(gpt2):
    batch = random_batch(kind="causal", batch_size=3, seed=15)

    def scaled(model, b):
        return 3.0 * causal_lm_loss(model, b)

    for f in ESTIMATORS:
        base = f(gpt2, batch)
        _close(f(gpt2, batch, loss_fn=scaled), {k: 9.0 * v for k, v in base.items()})


def test_token_weighting_equals_repeating_each_row_K_times(gpt2):
    batch = random_batch(kind="causal", batch_size=3, seed=16)
    counts = causal_lm_loss.token_counts(batch).tolist()
    rows = torch.tensor([i for i, k in enumerate(counts) for _ in range(k)])
    repeated = {k: v[rows] for k, v in batch.items()}
    for f in ESTIMATORS:
        _close(f(gpt2, batch, weighting="token"), f(gpt2, repeated))


def test_unbiased_variance_uses_reliability_weights(gpt2):
    batch = random_batch(kind="causal", batch_size=4, seed=17)
    pu = per_sample_gradients(gpt2, batch, weighting="token")
    w = pu.weights
    biased = gradient_variance(gpt2, batch, weighting="token")
    unbiased = gradient_variance(gpt2, batch, weighting="token", unbiased=True)
    factor = float(w.sum() ** 2 / (w.sum() ** 2 - (w ** 2).sum()))
    _close(unbiased, {k: v * factor for k, v in biased.items()})
    plain = gradient_variance(gpt2, batch, unbiased=True)  # unit weights: torch.var(ddof=1)
    grads = per_sample_gradients(gpt2, batch).tensors
    _close(plain, {k: g.var(0, correction=1) for k, g in grads.items()})


def test_result_reports_units_weight_and_empty_rows(gpt2):
    batch = random_batch(kind="causal", batch_size=4, empty_rows=(2,), seed=18)
    counts = causal_lm_loss.token_counts(batch)
    F = empirical_fisher(gpt2, batch, weighting="token")
    assert (F.n_units, F.total_weight, F.empty_ids) == (3, float(counts.sum()), [2])
    assert set(F) == {n for n, _ in gpt2.named_parameters()}
