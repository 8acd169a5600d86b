"""Seeded label draws: the convention of docs/architecture.md, checked by hand."""

import math
import zlib

import torch

from fisher_fast.batching.label_draws import draw_label_sets, draw_labels, row_seed, row_uniforms


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


def test_draws_do_not_depend_on_dtype_slicing_or_active_positions():
    g = torch.Generator("cpu").manual_seed(0)
    logits = (3 * torch.randn((3, 7, 11), generator=g)).float()  # float32 logits
    u = torch.rand((3, 7, 4), dtype=torch.float64, generator=g)
    active = torch.rand((3, 7), generator=g) > 0.3
    # the oracle's formula, per position on the CPU
    cdf = torch.cumsum(torch.softmax(logits.double(), dim=-1), dim=-1)
    # two draws right at a float64 boundary (any other rounding of the cdf would flip some)
    u[..., 2] = cdf[..., 4]  # -> class 5: cdf must exceed u
    u[..., 3] = torch.nextafter(cdf[..., 4], torch.tensor(0.0, dtype=torch.float64))  # -> 4
    want = torch.searchsorted(cdf, u, right=True).clamp(max=10)
    assert (want[..., 2] == 5).all() and (want[..., 3] == 4).all()
    for z in (logits, logits.double()):
        for slice_bytes in (1 << 27, 8 * 11, 3 * 8 * 11):  # one slice; one position; three
            got = draw_label_sets(z, u, slice_bytes=slice_bytes)
            assert torch.equal(got, want)
            got = draw_label_sets(z, u, active, fill=-100, slice_bytes=slice_bytes)
            assert torch.equal(got, torch.where(active[..., None], want, -100))
            one = draw_labels(z, u[..., 1], active, fill=-100, slice_bytes=slice_bytes)
            assert torch.equal(one, torch.where(active, want[..., 1], -100))
