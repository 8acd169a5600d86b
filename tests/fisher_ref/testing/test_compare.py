"""compare_dicts: an absolute tolerance proportional to each tensor's largest value."""

import torch

from fisher_ref.testing.compare import compare_dicts


def test_atol_scale_catches_a_ridge_an_absolute_atol_hides():
    expected = {"w": torch.tensor([1e-3, 1e-9, 0.0], dtype=torch.float64)}
    ridge = {"w": expected["w"] + 1e-8}
    assert not compare_dicts(ridge, expected, rtol=2e-4, atol=1e-7)  # hidden by atol 1e-7
    bad = compare_dicts(ridge, expected, rtol=2e-4, atol=0.0, atol_scale=1e-9)
    assert len(bad) == 1 and "atol=1e-12" in bad[0].message  # 1e-9 x max 1e-3


def test_atol_scale_is_per_tensor():
    expected = {"big": torch.tensor([10.0, 0.0]), "small": torch.tensor([1e-6, 0.0])}
    actual = {"big": torch.tensor([10.0, 1e-8]), "small": torch.tensor([1e-6, 1e-8])}
    bad = compare_dicts(actual, expected, rtol=0.0, atol=0.0, atol_scale=1e-8)
    assert [m.name for m in bad] == ["small"]  # 1e-8 <= 1e-8 x 10 but > 1e-8 x 1e-6
