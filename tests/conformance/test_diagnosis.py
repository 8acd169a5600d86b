"""The diagnosis catalogue names what a result is, on hand-made per-unit gradients."""

import numpy as np
import pytest
import torch

from fisher_ref.conformance.diagnosis import Candidate, best_fit, diagnose_estimate, named_scales
from fisher_ref.conformance.statistics_properties import diagnose_pvalues
from fisher_ref.results import PerUnit

TOL = {"rtol": 1e-9, "atol": 1e-14, "atol_scale": 0.0}


def _units():
    # three units, two parameters, gradients chosen so that F, S, B_2 all differ
    g = {"w": torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]], dtype=torch.float64),
         "b": torch.tensor([[0.5], [-0.25], [2.0]], dtype=torch.float64)}
    return PerUnit(g, ["a", "b", "c"], torch.ones(3, dtype=torch.float64))


def _F(pu):
    return {k: v.square().mean(0) for k, v in pu.tensors.items()}


def _S(pu):
    return {k: v.mean(0).square() for k, v in pu.tensors.items()}


CASES = [
    pytest.param(lambda pu: {k: v / 7 for k, v in _S(pu).items()}, "matches squared_mean_gradient / n_tokens",
                 id="S-over-tokens"),
    pytest.param(lambda pu: {k: v + 1e-8 for k, v in _F(pu).items()}, "matches empirical_fisher + 1e-08",
                 id="ridge"),
    pytest.param(lambda pu: {k: v.half().double() for k, v in _F(pu).items()},
                 "matches empirical_fisher rounded to float16", id="float16"),
    pytest.param(lambda pu: {k: v * 3 for k, v in _F(pu).items()}, "matches empirical_fisher × n_units",
                 id="times-U"),
    pytest.param(lambda pu: {k: v[:2].square().mean(0) for k, v in pu.tensors.items()},
                 "matches empirical_fisher of the first 2 units", id="first-units"),
    pytest.param(lambda pu: {k: (v[:2].mean(0).square() * 2 + v[2:].square().sum(0)) / 3
                             for k, v in pu.tensors.items()},
                 "matches batch_squared_gradient(2)", id="B2"),
]


@pytest.mark.parametrize("make, expected", CASES)
def test_catalogue_names_the_quantity(make, expected):
    pu = _units()
    text = diagnose_estimate(make(pu), pu, tolerance=TOL, n_tokens=7)
    assert text.startswith(expected), text


def test_nothing_fits_is_said():
    pu = _units()
    gen = torch.Generator().manual_seed(0)
    noise = {k: torch.rand(v.shape[1:], generator=gen, dtype=torch.float64) for k, v in pu.tensors.items()}
    assert diagnose_estimate(noise, pu, tolerance=TOL, n_tokens=7).startswith("no known wrong quantity fits")


def test_one_unit_cannot_tell_fisher_from_squared_mean():
    pu = PerUnit({"w": torch.tensor([[2.0, -1.0]], dtype=torch.float64)}, ["a"],
                 torch.ones(1, dtype=torch.float64))
    text = diagnose_estimate(_F(pu), pu, tolerance=TOL)
    assert "empirical_fisher" in text and "squared_mean_gradient" in text and "indistinguishable" in text


def test_a_fit_is_element_wise_not_by_norm():
    # a 1e-8 ridge is far below the L2 norm of F, but no element-wise fit for F itself
    value = {"w": torch.tensor([1.0, 1e-12], dtype=torch.float64)}
    ridge = {"w": value["w"] + 1e-8}
    assert best_fit(ridge, [Candidate("F", value)], TOL).startswith("no known")


def test_named_scales_drop_what_is_no_factor():
    assert named_scales(1, 1) == {"": 1.0}
    assert set(named_scales(3, 3)) == {"", " / n_units", " × n_units", " / n_units²"}


def _null(obs, values):
    return (0.0, obs, np.asarray(values, dtype=float))


@pytest.mark.parametrize("formula, label", [
    (lambda o, n: (1 + np.sum(n <= o)) / (len(n) + 1), "the SPEC's one-sided"),
    (lambda o, n: (1 + np.sum(n >= o)) / (len(n) + 1), "the upper tail"),
    (lambda o, n: (1 + np.sum(np.abs(n - n.mean()) >= abs(o - n.mean()))) / (len(n) + 1), "two-sided"),
    (lambda o, n: np.sum(n <= o) / len(n), "no +1"),
])
def test_pvalue_formulas_are_recognised(formula, label):
    rng = np.random.default_rng(1)
    oracle = {f"g{k}": _null(float(rng.normal()), rng.normal(size=19)) for k in range(6)}
    got = {g: float(formula(obs, null)) for g, (_, obs, null) in oracle.items()}
    assert label in diagnose_pvalues(got, oracle)
