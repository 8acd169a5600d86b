"""Classifiers with one position per row (MLPs, CNNs): every capture path the cost model can
take (square-separable E[g²], Gram norms, materialised rows; Conv2d via unfold) equals the
oracle, for E[g²], the variance, group statistics, exact and MC Fisher, any chunk size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fisher_fast as ff
import fisher_ref as fr
from fisher_fast.capture import costs
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.strategies import chunk_sizes
from fisher_ref.testing.tolerances import tolerance

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
F64 = dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True))
GRAM = dict(zip(("rtol", "atol"), tolerance("ghost-norm"), strict=True))


@st.composite
def classifiers(draw):
    """``(model, batch)``: an MLP on features or a CNN on 2-channel images, float64, eval."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    classes = draw(st.integers(2, 4))
    rows = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(seed + 1)
    if draw(st.booleans()):
        d_in, hidden = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        model = nn.Sequential(nn.Linear(d_in, hidden, bias=draw(st.booleans())), nn.Tanh(),
                              nn.Linear(hidden, classes))
        x = torch.randn(rows, d_in, generator=g, dtype=torch.float64)
    else:
        k = draw(st.integers(1, 3))
        padding = draw(st.sampled_from((0, 1, "same")))
        stride = 1 if padding == "same" else draw(st.integers(1, 2))
        side = draw(st.integers(k, 5))
        model = nn.Sequential(nn.Conv2d(2, 3, k, padding=padding, stride=stride), nn.Tanh(),
                              nn.Flatten(), nn.LazyLinear(classes))
        x = torch.randn(rows, 2, side, side, generator=g, dtype=torch.float64)
    model = model.double()
    model(x)  # materialise a lazy layer
    return model.eval(), {"input": x, "labels": torch.randint(0, classes, (rows,), generator=g)}


PATHS = st.tuples(st.sampled_from((None, "separable", "materialise")),
                  st.sampled_from((None, "gram", "materialise")))


@settings(max_examples=15)
@given(case=classifiers(), path=PATHS, chunk=chunk_sizes())
def test_classifier_statistics_match_oracle_on_every_path(case, path, chunk):
    model, batch = case
    kw = dict(loss_fn=ff.sequence_classification_loss, dtype=torch.float64, chunk_size=chunk)
    ref = dict(loss_fn=fr.sequence_classification_loss)
    with costs.forced(*path):
        fisher = ff.empirical_fisher(model, batch, **kw)
        variance = ff.gradient_variance(model, batch, **kw)
        groups = ff.group_fisher(model, batch, **kw)
    assert_dicts_close(fisher, fr.empirical_fisher(model, batch, **ref), **F64, what=f"F {path}")
    assert_dicts_close(variance, fr.gradient_variance(model, batch, **ref), **F64, what="V")
    want = fr.group_fisher(model, batch, **ref)
    for stat in ("mean", "variance"):
        assert_dicts_close({k: v[stat] for k, v in groups.items()},
                           {k: v[stat] for k, v in want.items()}, **GRAM, what=f"{stat} {path}")


@settings(max_examples=10)
@given(case=classifiers(), path=PATHS, chunk=chunk_sizes(), n_samples=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_classifier_exact_and_mc_fisher_match_oracle(case, path, chunk, n_samples, seed):
    # each class (exact) or draw (MC) is a backward pass of one forward; the separable
    # path folds the passes' weighted δ² into one product per weight
    model, batch = case
    kw = dict(loss_fn=ff.sequence_classification_loss, dtype=torch.float64, chunk_size=chunk)
    ref = dict(loss_fn=fr.sequence_classification_loss)
    with costs.forced(*path):
        exact = ff.exact_fisher(model, batch, unit="token", **kw)
        mc = ff.mc_fisher(model, batch, n_samples=n_samples, seed=seed, **kw)
    assert_dicts_close(exact, fr.exact_fisher(model, batch, **ref), **F64, what=f"exact {path}")
    assert_dicts_close(mc, fr.mc_fisher(model, batch, n_samples=n_samples, seed=seed, **ref),
                       **F64, what=f"mc {path}")
