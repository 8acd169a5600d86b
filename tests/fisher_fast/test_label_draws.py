"""Seeded label draws: the convention of docs/architecture.md, checked by hand."""

import math
import zlib

import torch

from fisher_fast.label_draws import draw_labels, row_seed, row_uniforms


def test_inverse_cdf_picks_the_first_class_whose_cdf_exceeds_u():
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)).expand(5, 3)
    u = torch.tensor([0.1, 0.2, 0.49, 0.5, 0.999999], dtype=torch.float64)
    # cdf = [0.2, 0.5, 1.0]: 0.1 -> 0; 0.2 -> 1 (cdf must exceed u); 0.49 -> 1; 0.5 -> 2
    assert draw_labels(logits, u).tolist() == [0, 1, 1, 2, 2]


def test_row_seed_formula():
    assert row_seed(0, "a") == zlib.crc32(b"a")
    assert row_seed(2, 7) == (2 * 1_000_003 + zlib.crc32(b"7")) % 2**63


def test_uniforms_depend_only_on_the_row_id():
    a = row_uniforms(3, ["x", "y"], 4, 2)
    b = row_uniforms(3, ["y"], 4, 2)
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)
    g = torch.Generator("cpu").manual_seed(row_seed(3, "x"))
    torch.testing.assert_close(a[0], torch.rand((4, 2), dtype=torch.float64, generator=g), rtol=0, atol=0)
    assert not math.isclose(float(a[0, 0, 0]), float(a[1, 0, 0]))
