r"""QK-OV interference between two tasks (SPEC §6).

For task-A units i, task-B units j, layer l, head h and block B,

.. math::

    M^B[i, j, l, h] = \sum_{p \in I(l, h, B)}
        \frac{C^A_i[p]}{\hat F[p] + \varepsilon_{l,h,B}}\ \varphi\big(g^B_j[p]\big),
    \qquad C^A_i = (g^A_i)^2,

with :math:`\varphi = |\cdot|` (default) or the identity (``signed=True``) and the
per-slice :math:`\varepsilon_{l,h,B} = \texttt{eps} + \texttt{ridge\_rel}\cdot
\mathrm{median}_{p \in I(l,h,B)} \hat F[p]` (the median of an even count averages the two
middle values). An entry with :math:`C^A_i[p] = 0` contributes 0 (also when
:math:`\hat F[p] + \varepsilon = 0`).

:math:`\hat F` is task A's empirical Fisher by default (``fisher="a"``), or B's
(``"b"``), the pooled one over the units of both tasks (``"pooled"``), or a given dict.
With :math:`\hat F = \mathrm{mean}_i C^A_i` and :math:`\varepsilon = 0`,
:math:`\mathrm{mean}_i M[i, j] = \lVert g^B_j \rVert_1` on the slice: the mean carries no
task-A information.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fisher_ref._types import Batch, LossFn, SampleId, UnitId
from fisher_ref.layouts import AttentionLayout, attention_layout
from fisher_ref.results import PerUnit
from fisher_ref.slicing import BLOCKS, axis_roles, slice_masks
from fisher_ref.units import per_sample_gradients


class InterferenceResult(dict):
    """``{"Q"|"K"|"V"|"O": Tensor[N_A, N_B, L, H]}`` with the means, top-k and ids.

    Axes: ``Tensor[units_a, units_b, layer, head]``, N_A task-A units, N_B task-B units, L
    layers, H query heads.

    Attributes:
        means: block -> ``Tensor[L, H]``, the mean of M over all (i, j).
        top_k: list of dicts ``{"score", "id_a", "id_b", "layer", "head", "block"}``, the
            largest M (signed mode: largest |M|; ``score`` keeps the sign), ties broken by
            (block, layer, head, i, j) order.
        ids_a, ids_b: the units' ids (callers' sample ids) along axes 0 and 1.
        signed: whether φ is the identity.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], *, ids_a: Sequence[UnitId],
                 ids_b: Sequence[UnitId], signed: bool, top_k: int) -> None:
        super().__init__(scores)
        self.ids_a, self.ids_b, self.signed = list(ids_a), list(ids_b), bool(signed)
        self.means = {b: m.mean(dim=(0, 1)) for b, m in scores.items()}
        self.top_k = _top_k(scores, self.ids_a, self.ids_b, signed, top_k)

    def pair(self, id_a: UnitId, id_b: UnitId) -> dict[str, torch.Tensor]:
        """Block -> ``Tensor[L, H]`` for one (task-A id, task-B id) pair.

        Raises:
            ValueError: an id that is not one of the units'.
        """
        i, j = _position(self.ids_a, id_a, "id_a"), _position(self.ids_b, id_b, "id_b")
        return {b: m[i, j] for b, m in self.items()}


def _position(ids: list, uid, what: str) -> int:
    for k, x in enumerate(ids):
        if x == uid:
            return k
    raise ValueError(f"{what}: expected one of the units' ids {ids[:10]}"
                     f"{' ...' if len(ids) > 10 else ''}, got unknown id {uid!r}.")


def _top_k(scores: dict, ids_a, ids_b, signed: bool, k: int) -> list:
    blocks = list(scores)
    # axes [block, layer, head, i, j]: a flat index in this order is the tie-break order
    stacked = torch.stack([scores[b].permute(2, 3, 0, 1) for b in blocks]).numpy()
    key = np.abs(stacked) if signed else stacked
    key = np.where(np.isnan(key), -np.inf, key).ravel()
    order = np.argsort(-key, kind="stable")[:k]
    out = []
    for flat in order:
        b, layer, h, i, j = np.unravel_index(flat, stacked.shape)
        out.append({"score": float(stacked[b, layer, h, i, j]), "id_a": ids_a[i], "id_b": ids_b[j],
                    "layer": int(layer), "head": int(h), "block": blocks[b]})
    return out


def check_same_parameters(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Both tasks' tensors have the same names and per-unit shapes, else ValueError.

    Args:
        a: task A's name -> ``Tensor[units_a, *param_shape]``.
        b: task B's name -> ``Tensor[units_b, *param_shape]``.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
        raise ValueError(f"tasks measured on different models: expected the same parameters, "
                         f"got {only_a} only in task A and {only_b} only in task B.")
    for n in a:
        if a[n].shape[1:] != b[n].shape[1:]:
            raise ValueError(f"tasks measured on different models: expected {n!r} of shape "
                             f"{tuple(a[n].shape[1:])} in both, got {tuple(b[n].shape[1:])} in task B.")


def _float64(pu: PerUnit) -> PerUnit:
    """The oracle computes in float64 on the CPU whatever dtype the gradients come in."""
    return PerUnit({n: t.detach().to("cpu", torch.float64) for n, t in pu.tensors.items()},
                   list(pu.ids), pu.weights.detach().to("cpu", torch.float64), list(pu.empty_ids))


def _fisher_hat(fisher, a: PerUnit, b: PerUnit) -> dict:
    if isinstance(fisher, dict):
        for n, g in a.tensors.items():
            f = fisher.get(n)
            if f is None:
                continue
            f = torch.as_tensor(f)
            if f.shape != g.shape[1:]:
                raise ValueError(f"fisher[{n!r}]: expected shape {tuple(g.shape[1:])}, got {tuple(f.shape)}.")
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise ValueError(f"fisher[{n!r}]: expected finite, non-negative values (a diagonal "
                                 f"Fisher), got values in [{float(f.min())}, {float(f.max())}].")
        return {n: torch.as_tensor(f).detach().to("cpu", torch.float64) for n, f in fisher.items()}
    parts = {"a": [a], "b": [b], "pooled": [a, b]}.get(fisher)
    if parts is None:
        raise ValueError(f"fisher: expected 'a', 'b', 'pooled' or a dict of tensors, got {fisher!r}.")
    W = sum(float(p.weights.sum()) for p in parts)
    out = {}
    for n in a.tensors:
        total = sum(torch.einsum("u,u...->...", p.weights, p.tensors[n].square()) for p in parts)
        out[n] = total / W
    return out


def _check_options(signed, eps, ridge_rel, top_k) -> None:
    if not isinstance(signed, bool):
        raise ValueError(f"signed: expected True or False, got {signed!r}.")
    for name, v in (("eps", eps), ("ridge_rel", ridge_rel)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0, got {top_k!r}.")


def slice_score(c_a: torch.Tensor, f_hat: torch.Tensor, phi_b: torch.Tensor, eps: float,
                ridge_rel: float) -> torch.Tensor:
    r"""M for one slice: :math:`\sum_p C^A_i[p] / (\hat F[p] + \varepsilon)\ \varphi(g^B_j[p])`.

    An entry with ``c_a == 0`` contributes 0, also where ``f_hat + ε == 0``.

    Args:
        c_a: task A's contributions on the slice, ``Tensor[units_a, entries]``.
        f_hat: :math:`\hat F` on the slice, ``Tensor[entries]``.
        phi_b: :math:`\varphi(g^B)` on the slice, ``Tensor[units_b, entries]``.
        eps: the absolute ε.
        ridge_rel: adds ``ridge_rel * median(f_hat)`` to ε.

    Returns:
        ``Tensor[units_a, units_b]``.
    """
    epsilon = eps + (ridge_rel * float(torch.quantile(f_hat, 0.5)) if ridge_rel else 0.0)
    denom = f_hat + epsilon
    ratio = torch.where(c_a == 0, torch.zeros_like(c_a), c_a / denom)
    return ratio @ phi_b.T


def interference_from_gradients(grads_a: PerUnit, grads_b: PerUnit, layout: AttentionLayout, *,
                                fisher: str | Mapping[str, torch.Tensor] = "a", signed: bool = False,
                                eps: float = 1e-12, ridge_rel: float = 0.0, top_k: int = 100,
                                include_bias: bool = False) -> InterferenceResult:
    """:func:`interference` on given per-unit gradients (``PerUnit`` of each task).

    The core of :func:`interference`, usable without a model: ``layout`` names the tensors;
    the slices are computed from the gradients' shapes.

    Args:
        grads_a: task A's gradients, ``Tensor[units_a, *param_shape]`` per parameter (any
            dtype; computed in float64).
        grads_b: task B's, ``Tensor[units_b, *param_shape]``, the same names and shapes.
        layout: the attention layout naming the Q/K/V/O tensors.
        fisher: see :func:`interference`.
        signed: see :func:`interference`.
        eps: see :func:`interference`.
        ridge_rel: see :func:`interference`.
        top_k: see :func:`interference`.
        include_bias: see :func:`interference`.

    Returns:
        InterferenceResult: as :func:`interference`.
    """
    _check_options(signed, eps, ridge_rel, top_k)
    grads_a, grads_b = _float64(grads_a), _float64(grads_b)
    ga, gb = grads_a.tensors, grads_b.tensors
    check_same_parameters(ga, gb)
    heads = {la.num_heads for la in layout.layers}
    if len(heads) != 1:
        raise ValueError(f"layout: expected the same number of heads in every layer for "
                         f"[N_A, N_B, L, H] scores, got {sorted(heads)}.")
    sliced = {name for la in layout.layers for name in axis_roles(la, include_bias=include_bias)}
    missing = sorted(sliced - set(ga))
    if missing:
        raise ValueError(f"gradients: expected every attention tensor the slices use, got none "
                         f"for {missing[:5]} (frozen?).")
    f_hat = _fisher_hat(fisher, grads_a, grads_b)
    shapes = {n: g.shape[1:] for n, g in ga.items()}
    L, H = layout.num_layers, heads.pop()
    scores = {}
    for block in BLOCKS:
        m = torch.zeros(len(grads_a.ids), len(grads_b.ids), L, H, dtype=torch.float64)
        for la in layout.layers:
            for h in range(H):
                masks = slice_masks(la, h, block, shapes, include_bias)
                absent = [n for n in masks if n not in f_hat]
                if absent:
                    raise ValueError(f"fisher: expected a tensor for {absent[0]!r}, got none.")
                c_a = torch.cat([ga[n][:, k].square() for n, k in masks.items()], dim=1)
                f = torch.cat([f_hat[n][k] for n, k in masks.items()])
                g_b = torch.cat([gb[n][:, k] for n, k in masks.items()], dim=1)
                phi_b = g_b if signed else g_b.abs()
                m[:, :, la.index, h] = slice_score(c_a, f, phi_b, eps, ridge_rel)
        scores[block] = m
    return InterferenceResult(scores, ids_a=grads_a.ids, ids_b=grads_b.ids, signed=signed, top_k=top_k)


def interference(model: torch.nn.Module, batch_a: Batch, batch_b: Batch, *,
                 fisher: str | Mapping[str, torch.Tensor] = "a", signed: bool = False,
                 eps: float = 1e-12, ridge_rel: float = 0.0, top_k: int = 100,
                 layout: AttentionLayout | dict | None = None, loss_fn: LossFn | None = None,
                 unit: str = "sample", weighting: str = "sample", include_bias: bool = False,
                 sample_ids_a: Sequence[SampleId] | None = None,
                 sample_ids_b: Sequence[SampleId] | None = None) -> InterferenceResult:
    r"""QK-OV interference of task A's units on task B's (SPEC §6; see the module docstring).

    Args:
        model: the model (copied to float64; never modified).
        batch_a: task A's batch (may carry ``sample_ids``).
        batch_b: task B's batch (may carry ``sample_ids``).
        fisher: :math:`\hat F`: ``"a"`` (default), ``"b"``, ``"pooled"`` (A ∪ B, weighted)
            or a dict name -> ``Tensor[*param_shape]``.
        signed: φ = identity instead of |·|.
        eps: the absolute ε (>= 0).
        ridge_rel: adds ``ridge_rel * median(F̂ over the slice)`` to ε.
        top_k: the number of entries to report.
        layout: declared layout (None: detect).
        loss_fn: as :func:`fisher_ref.units.per_sample_gradients`.
        unit: as :func:`fisher_ref.units.per_sample_gradients`.
        weighting: as :func:`fisher_ref.units.per_sample_gradients`.
        include_bias: the slices include the Q/K/V bias entries.
        sample_ids_a: task A's row ids, unless ``batch_a`` carries them.
        sample_ids_b: task B's row ids, unless ``batch_b`` carries them.

    Returns:
        InterferenceResult: block -> ``Tensor[N_A, N_B, L, H]``, with ``means``
        (block -> ``[L, H]``), ``top_k`` and the units' ids.
    """
    lay = layout if isinstance(layout, AttentionLayout) else attention_layout(model, layout)
    kw = dict(loss_fn=loss_fn, unit=unit, weighting=weighting)
    ga = per_sample_gradients(model, batch_a, sample_ids=sample_ids_a, **kw)
    gb = per_sample_gradients(model, batch_b, sample_ids=sample_ids_b, **kw)
    return interference_from_gradients(ga, gb, lay, fisher=fisher, signed=signed, eps=eps,
                                       ridge_rel=ridge_rel, top_k=top_k, include_bias=include_bias)
