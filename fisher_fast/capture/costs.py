r"""Which way a Linear-like weight's statistics are computed, per module and per chunk.

A Linear, HF Conv1D or Conv2d weight (``d_out x d_in`` once flattened, T positions per row:
tokens, or a convolution's output pixels) can reach the sink three ways:

- **materialise**: form each row's gradient ``[d_out, d_in]`` (in blocks), square it, sum
  it. Serves every statistic (moments, groups, micro-batches, per-row tensors);
- **separable** (T = 1 only, E[g²] alone): :math:`\sum_n w_n g_n^2 = (w \odot \delta^2)^\top
  x^2`, one GEMM per chunk (``LinearRule.separable``);
- **Gram** (group statistics whose groups follow one weight axis, or one group per tensor):
  T x T Gram products (``LinearRule.gram_norms``), no per-row gradient.

``route`` picks, for what the sink wants of the weight, the cheapest ways by the estimate
below, in multiply-adds of one large matrix product ("GEMM MACs") per chunk of n rows:

.. math::

    c_\text{materialise} = n\, d_\text{in} d_\text{out} (P + \eta T), \qquad
    c_\text{separable} = n\, d_\text{in} d_\text{out} + P\, n (d_\text{in} + d_\text{out}), \qquad
    c_\text{Gram} = n\, T^2 (\eta (d_\text{in} + d_\text{out}) + P)

with P = ``PASS_MACS`` (one elementwise pass over an element: forming, squaring and
summing a materialised block cost about P MACs per element) and η = ``SMALL_GEMM``
(the batched per-row products run at 1/η of a large GEMM's speed). Both were measured on
the CPU of docs/benchmarks.md (1 thread, d = 512-784): a materialised ``[n, 512, 784]``
weight cost 27, 42, 70 and 258 MACs per element at T = 1, 4, 16 and 64. The choice never
changes a result beyond rounding; ``forced`` overrides it (tests take every path).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

#: GEMM multiply-adds that one elementwise pass over one element costs (measured, CPU).
PASS_MACS = 25.0
#: slowdown of the batched per-row products against one large GEMM (measured, CPU).
SMALL_GEMM = 3.6

PATHS = ("materialise", "separable", "gram")
_FORCED: dict = {}


@dataclass(frozen=True)
class Route:
    """How one weight's statistics are computed in one chunk.

    Attributes:
        elements: ``"separable"`` or ``"materialise"`` for its per-element statistics, or
            ``None`` when none are wanted.
        groups: ``"gram"`` or ``"materialise"`` for its group statistics, or ``None``.
    """

    elements: str | None
    groups: str | None

    @property
    def materialises(self) -> bool:
        """Whether per-row gradients of the weight are formed at all."""
        return "materialise" in (self.elements, self.groups)


def materialise_cost(n: int, T: int, d_in: int, d_out: int) -> float:
    """Estimated GEMM MACs of forming, squaring and summing n rows' gradients."""
    return n * d_in * d_out * (PASS_MACS + SMALL_GEMM * T)


def separable_cost(n: int, T: int, d_in: int, d_out: int) -> float:
    """Estimated GEMM MACs of the separable E[g²] (infinite unless T = 1)."""
    if T != 1:
        return float("inf")
    return n * d_in * d_out + PASS_MACS * n * (d_in + d_out)


def gram_cost(n: int, T: int, d_in: int, d_out: int) -> float:
    """Estimated GEMM MACs of the per-row group norms from T x T Gram products."""
    return n * T * T * (SMALL_GEMM * (d_in + d_out) + PASS_MACS)


def route(n: int, T: int, d_in: int, d_out: int, *, elements: str | None, groups: bool,
          gram_ok: bool) -> Route:
    """The cheapest ways to give the sink what it wants of one weight.

    Args:
        n: the chunk's rows.
        T: positions per row (tokens, or a convolution's output pixels).
        d_in: the weight's input axis, flattened (``in * kh * kw`` for a Conv2d).
        d_out: the weight's output axis.
        elements: what the sink wants per element: ``"second"`` (E[g²] alone: the separable
            form is exact when T = 1), ``"rows"`` (moments, micro-batch states or per-row
            tensors: only materialised rows serve), or ``None``.
        groups: whether the sink wants the weight's group statistics.
        gram_ok: whether the groups follow one weight axis (or are one group), so that the
            Gram form can give them.

    Materialised rows serve every statistic at once, so groups are never computed twice:
    when the elements are materialised anyway, or the groups cannot take the Gram form,
    everything is materialised.
    """
    forced_e, forced_g = _FORCED.get("elements"), _FORCED.get("groups")
    sep_ok = elements == "second" and T == 1
    if elements == "rows" or (groups and (not gram_ok or forced_g == "materialise")):
        return Route("materialise" if elements else None, "materialise" if groups else None)
    mat = materialise_cost(n, T, d_in, d_out)
    if elements is None:
        via_gram = forced_g == "gram" or (forced_g is None and gram_cost(n, T, d_in, d_out) < mat)
        return Route(None, ("gram" if via_gram else "materialise") if groups else None)
    # E[g²] per element, perhaps with groups
    sep = separable_cost(n, T, d_in, d_out) + (gram_cost(n, T, d_in, d_out) if groups else 0)
    use_sep = sep_ok and (forced_e == "separable" or (forced_e is None and sep < mat))
    if use_sep:
        return Route("separable", "gram" if groups else None)
    return Route("materialise", "materialise" if groups else None)


@contextlib.contextmanager
def forced(elements: str | None = None, groups: str | None = None):
    """Take these paths wherever they apply (``elements``: ``"separable"`` or
    ``"materialise"``; ``groups``: ``"gram"`` or ``"materialise"``), whatever the estimate
    says: for tests that check every path against the oracle. Not thread-safe; restored on
    exit.
    """
    for what, value, allowed in (("elements", elements, ("separable", "materialise")),
                                 ("groups", groups, ("gram", "materialise"))):
        if value is not None and value not in allowed:
            raise ValueError(f"{what}: expected one of {allowed} or None, got {value!r}.")
    old = dict(_FORCED)
    _FORCED.clear()
    _FORCED.update({k: v for k, v in (("elements", elements), ("groups", groups)) if v})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)
