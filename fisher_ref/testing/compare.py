r"""One comparison helper that explains a failure.

``compare_dicts`` checks two dicts of tensors entry by entry and returns a report naming
every parameter that differs: the worst element's index, both values, their ratio, how many
elements are outside tolerance, and the tolerances. ``assert_dicts_close`` raises once with
the whole report.

An element passes when :math:`|a - b| \le \mathrm{atol} + \mathrm{atol\_scale} \cdot
\max|b_{\text{tensor}}| + \mathrm{rtol}\,|b|`: ``atol_scale`` makes the absolute tolerance
proportional to the largest expected value of each tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mismatch:
    """One tensor that differs: its name and the explanation."""

    name: str
    message: str


def _describe(name: str, a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float,
              atol_scale: float = 0.0) -> str | None:
    if a.shape != b.shape:
        return f"{name}: shape mismatch: expected {tuple(b.shape)}, got {tuple(a.shape)}"
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if a64.numel() == 0:
        return None
    if atol_scale:
        finite_b = b64[torch.isfinite(b64)]
        atol = atol + atol_scale * (float(finite_b.abs().max()) if finite_b.numel() else 0.0)
    finite = torch.isfinite(a64) & torch.isfinite(b64)
    same_nonfinite = (~finite) & ((a64 == b64) | (torch.isnan(a64) & torch.isnan(b64)))
    err = (a64 - b64).abs()
    bound = atol + rtol * b64.abs()
    bad = (finite & (err > bound)) | (~finite & ~same_nonfinite)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    excess = torch.where(bad, torch.nan_to_num(err - bound, nan=float("inf"), posinf=float("inf")),
                         torch.zeros_like(err))
    flat = int(excess.flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a64.shape))
    va, vb = float(a64[idx]), float(b64[idx])
    ratio = va / vb if vb != 0 else float("inf") if va != 0 else 1.0
    return (f"{name}: {n_bad}/{a64.numel()} elements differ; worst at {idx}: got {va:.6g}, "
            f"expected {vb:.6g} (ratio {ratio:.6g}); rtol={rtol:g}, atol={atol:g}")


def compare_dicts(actual: dict, expected: dict, *, rtol: float, atol: float,
                  what: str = "result", atol_scale: float = 0.0) -> list[Mismatch]:
    """All mismatches between two dicts of tensors (missing/extra keys included).

    ``atol_scale`` adds ``atol_scale * max|expected[k]|`` to the absolute tolerance of
    tensor ``k`` (see the module docstring).
    """
    out: list[Mismatch] = []
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing:
        out.append(Mismatch("<keys>", f"{what}: missing entries {missing}"))
    if extra:
        out.append(Mismatch("<keys>", f"{what}: unexpected entries {extra}"))
    for k in expected:
        if k in actual:
            msg = _describe(str(k), torch.as_tensor(actual[k]), torch.as_tensor(expected[k]), rtol,
                            atol, atol_scale)
            if msg:
                out.append(Mismatch(str(k), msg))
    return out


def assert_dicts_close(actual: dict, expected: dict, *, rtol: float, atol: float,
                       what: str = "result") -> None:
    """Raise one AssertionError listing every mismatch, or return quietly."""
    bad = compare_dicts(actual, expected, rtol=rtol, atol=atol, what=what)
    if bad:
        lines = "\n  ".join(m.message for m in bad)
        noun = "entry" if len(bad) == 1 else "entries"
        raise AssertionError(f"{what}: {len(bad)} mismatching {noun}:\n  {lines}")
