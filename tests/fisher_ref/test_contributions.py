"""per_sample_contributions: C_u = g_u^2 at full shape, keyed by the callers' ids."""

import numpy as np
import pytest
import torch

from fisher_ref.contributions import per_sample_contributions
from fisher_ref.gradient_moments import empirical_fisher
from fisher_ref.losses import CausalLMLoss
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_ref._tiny import SoftmaxRegression, softmax_data, softmax_grads_by_hand

RTOL, ATOL = tolerance("float64-paths")


def _ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def test_contribution_is_the_squared_hand_gradient():
    model, batch = SoftmaxRegression(), softmax_data(n=4)
    ids = ["a_1", "a_2", 7, "b"]
    pu = per_sample_contributions(model, batch, loss_fn=_ce, sample_ids=ids)
    expected = softmax_grads_by_hand(model, batch) ** 2
    assert pu.ids == ids
    np.testing.assert_allclose(pu.tensors["W"].numpy(), expected, rtol=RTOL, atol=ATOL)


def test_full_shape_and_weighted_mean_is_the_empirical_fisher():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(batch_size=3, seed=3)
    loss = CausalLMLoss("sum")
    pu = per_sample_contributions(model, batch, loss_fn=loss, weighting="token")
    params = dict(model.named_parameters())
    assert all(t.shape == (3, *params[n].shape) for n, t in pu.tensors.items())
    mean = {n: torch.einsum("u,u...->...", pu.weights, c) / pu.weights.sum() for n, c in pu.tensors.items()}
    assert_dicts_close(mean, dict(empirical_fisher(model, batch, loss_fn=loss, weighting="token")),
                       rtol=RTOL, atol=ATOL)


def test_empty_rows_are_dropped_and_token_units_keep_positions():
    model = build_model(TinyConfig(arch="llama", num_layers=1))
    batch = random_batch(batch_size=3, seed=4, empty_rows=(1,), sample_ids=["x_0", "x_1", "x_2"])
    pu = per_sample_contributions(model, batch)
    assert pu.ids == ["x_0", "x_2"] and pu.empty_ids == ["x_1"]
    tok = per_sample_contributions(model, batch, unit="token", loss_fn=CausalLMLoss())
    assert {i for i, _ in tok.ids} == {"x_0", "x_2"}
    assert all(isinstance(t, int) for _, t in tok.ids)


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(sample_ids=[1, 1, 2, 3]), "duplicates", id="duplicate-ids"),
    pytest.param(dict(sample_ids=[1, 2]), "expected 4 ids", id="wrong-count"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        per_sample_contributions(SoftmaxRegression(), softmax_data(n=4), loss_fn=_ce, **kwargs)
