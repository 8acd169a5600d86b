r"""Cross-task gradient conflicts per group, with a permutation test (SPEC §7).

For a group k (a parameter tensor, or a QK-OV slice I(l, h, B)) let :math:`a_i`,
:math:`b_j` be the task-A and task-B unit gradients restricted to k and
:math:`\cos(x, y) = x \cdot y / (\lVert x\rVert \lVert y\rVert)` (0 when a norm is 0).
The statistic is the mean between-task cosine

.. math::

    \bar c_k = \frac{1}{N_A N_B} \sum_{i, j} \cos(a_i, b_j).

Null: task labels are exchangeable. The pooled units ``[A..., B...]`` are relabelled by P
permutations, ``perm = rng.permutation(N_A + N_B)`` from
``np.random.Generator(np.random.PCG64(seed))`` restarted for every group, the first
:math:`N_A` entries forming pseudo-task A. One-sided (conflict = small cosine):

.. math::

    p_k = \frac{1 + \#\{\bar c^{\,\pi} \le \bar c_k\}}{P + 1} \in (0, 1],
    \qquad \text{effect}_k = \frac{\bar c_k - \mathrm{mean}(\bar c^{\,\pi})}{\mathrm{sd}(\bar c^{\,\pi})}
    \ (\text{ddof} = 1;\ \text{nan when sd} = 0).

The interval is the 2.5 and 97.5 percentiles of :math:`\bar c` over bootstrap resamples
(``PCG64(seed + 1)`` per group; each resample draws ``ia = rng.integers(0, N_A, N_A)`` then
``ib = rng.integers(0, N_B, N_B)``). q-values are Benjamini–Hochberg (or –Yekutieli) across
the *distinct* groups: under GQA, query heads sharing a key-value head share one K (and one
V) slice; that slice is one hypothesis, reported under each head's name with the same p
and q.

Every :math:`\bar c` (observed, permuted, bootstrapped) is computed the same way from the
pooled cosine matrix :math:`S`, as :math:`(\sum S[A, B] + \sum S[B, A]) / (2 N_A N_B)`
with sorted index sets, so a permutation that reproduces the task split (or its mirror
image when :math:`N_A = N_B`) ties the observed value exactly; a permuted value within
``TIE_ATOL`` = 1e-12 above the observed one also counts as a tie.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from fisher_ref._types import Batch, LossFn, Masks, SampleId, UnitId
from fisher_ref.fdr import bh_qvalues, by_qvalues
from fisher_ref.interference import check_same_parameters
from fisher_ref.layouts import AttentionLayout, attention_layout
from fisher_ref.results import PerUnit
from fisher_ref.slicing import BLOCKS, slice_masks
from fisher_ref.units import per_sample_gradients

# A permuted statistic within TIE_ATOL above the observed one counts as a tie (<=): mean
# cosines in [-1, 1] of different pair sets of float64 data do not come that close except
# by rounding (e.g. two units with identical gradients swapped). Shared with fisher_fast.
TIE_ATOL = 1e-12


class ConflictResult(dict):
    """``{group name: {"mean_cosine", "p", "q", "effect", "interval", "null_mean", "null_sd",
    "n_a", "n_b"}}``, with the null distributions and the test's settings.

    Attributes:
        nulls: group name -> the permutation statistics, ``ndarray[n_permutations]``.
        fdr: ``"bh"`` or ``"by"``, how the q-values were computed.
        n_permutations: P.
        seed: the seed of the permutations (``seed + 1`` seeds the bootstrap).
        ids_a: the task-A units' ids, in order.
        ids_b: the task-B units' ids, in order.
    """

    def __init__(self, data: Mapping[str, dict], *, nulls: Mapping[str, np.ndarray], fdr: str,
                 n_permutations: int, seed: int, ids_a: Sequence[UnitId],
                 ids_b: Sequence[UnitId]) -> None:
        super().__init__(data)
        self.nulls, self.fdr = nulls, fdr
        self.n_permutations, self.seed = n_permutations, seed
        self.ids_a, self.ids_b = list(ids_a), list(ids_b)


def head_groups(layout: AttentionLayout, shapes: Mapping[str, Sequence[int]],
                include_bias: bool = False) -> dict[str, Masks]:
    """QK-OV groups ``"L{l}.H{h}.{B}" -> {param name: mask}``, layers, then heads, then blocks.

    Args:
        layout: the attention layout.
        shapes: parameter name -> ``param_shape`` of the attention tensors.
        include_bias: the Q/K/V slices include their bias entries.

    Returns:
        Group name -> ``{param name: BoolTensor[*param_shape]}`` (:func:`slice_masks`).
    """
    out = {}
    for la in layout.layers:
        for h in range(la.num_heads):
            for block in BLOCKS:
                out[f"L{la.index}.H{h}.{block}"] = slice_masks(la, h, block, shapes, include_bias)
    return out


def parameter_groups(names: Iterable[str]) -> dict[str, dict[str, None]]:
    """One group per parameter tensor: ``name -> {name: None}`` (None = every entry)."""
    return {n: {n: None} for n in names}


def _restrict(grads: dict, group: dict) -> np.ndarray:
    cols = [grads[n].flatten(1) if m is None else grads[n][:, m.cpu()] for n, m in group.items()]
    return torch.cat(cols, dim=1).numpy()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _mean_cross(G: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """``(sum G[ia_r][:, ib_r] + sum G[ib_r][:, ia_r]) / (2 N_A N_B)`` for each row r.

    Symmetric in the two index sets, so a split and its mirror image (when N_A = N_B) give
    bit-identical values.
    """
    ab = G[ia[:, :, None], ib[:, None, :]]
    ba = G[ib[:, :, None], ia[:, None, :]]
    total = ab.reshape(ab.shape[0], -1).sum(axis=1) + ba.reshape(ba.shape[0], -1).sum(axis=1)
    return total / (2 * ia.shape[1] * ib.shape[1])


def group_statistics(xa: np.ndarray, xb: np.ndarray, *, n_permutations: int, seed: int,
                     n_bootstrap: int) -> tuple[dict, np.ndarray]:
    """Mean cosine, permutation p, effect and bootstrap interval of one group; and the null.

    Args:
        xa: task A's unit gradients restricted to the group, ``ndarray[units_a, entries]``.
        xb: task B's, ``ndarray[units_b, entries]``.
        n_permutations: P.
        seed: seeds the permutations (``seed``) and the bootstrap (``seed + 1``).
        n_bootstrap: bootstrap resamples.

    Returns:
        ``({"mean_cosine", "p", "effect", "interval", "null_mean", "null_sd", "n_a", "n_b"},
        null)``, ``null`` the permuted statistics, ``ndarray[n_permutations]``.
    """
    na, nb = xa.shape[0], xb.shape[0]
    pooled = _unit_rows(np.concatenate([xa, xb]))
    G = pooled @ pooled.T
    rng = np.random.Generator(np.random.PCG64(seed))
    perms = np.stack([rng.permutation(na + nb) for _ in range(n_permutations)])
    ia = np.concatenate([np.arange(na)[None], np.sort(perms[:, :na], axis=1)])
    ib = np.concatenate([np.arange(na, na + nb)[None], np.sort(perms[:, na:], axis=1)])
    stats = _mean_cross(G, ia, ib)
    obs, null = float(stats[0]), stats[1:]
    boot = np.random.Generator(np.random.PCG64(seed + 1))
    draws = [(boot.integers(0, na, na), boot.integers(0, nb, nb)) for _ in range(n_bootstrap)]
    bstats = _mean_cross(G, np.stack([a for a, _ in draws]), na + np.stack([b for _, b in draws]))
    sd = float(np.std(null, ddof=1)) if n_permutations > 1 else float("nan")
    mean = float(np.mean(null))
    effect = (obs - mean) / sd if sd > 0 else float("nan")
    lo, hi = np.percentile(bstats, [2.5, 97.5])
    return {"mean_cosine": obs, "p": (1 + int(np.sum(null <= obs + TIE_ATOL))) / (n_permutations + 1),
            "effect": effect, "interval": (float(lo), float(hi)), "null_mean": mean,
            "null_sd": sd, "n_a": na, "n_b": nb}, null


def _signature(group: dict):
    return tuple((n, None if m is None else m.numpy().tobytes()) for n, m in sorted(group.items()))


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}.")


def conflicts_from_gradients(grads_a: PerUnit | Mapping[str, torch.Tensor],
                             grads_b: PerUnit | Mapping[str, torch.Tensor],
                             groups: Mapping[str, Mapping[str, torch.Tensor | None]], *,
                             n_permutations: int = 1000, seed: int = 0, n_bootstrap: int = 1000,
                             fdr: str = "bh", ids_a: Sequence[UnitId] | None = None,
                             ids_b: Sequence[UnitId] | None = None) -> ConflictResult:
    """:func:`conflicts` on given per-unit gradients.

    Args:
        grads_a: task A's per-unit gradients: a ``PerUnit`` or a dict name ->
            ``Tensor[units_a, *param_shape]`` (any dtype; computed in float64).
        grads_b: task B's, ``Tensor[units_b, *param_shape]``, the same names and shapes.
        groups: group name -> ``{param name: BoolTensor[*param_shape] or None (the whole
            tensor)}``.
        n_permutations: P, see :func:`conflicts`.
        seed: see :func:`conflicts`.
        n_bootstrap: see :func:`conflicts`.
        fdr: see :func:`conflicts`.
        ids_a: task A's unit ids (default: the ``PerUnit``'s, else ``0..units_a-1``).
        ids_b: task B's unit ids (default: the ``PerUnit``'s, else ``0..units_b-1``).

    Returns:
        ConflictResult: as :func:`conflicts`.

    Raises:
        ValueError: the tasks' parameters differ, a group names an unknown parameter or a
            mask of the wrong shape, or an option is out of range.
    """
    if isinstance(grads_a, PerUnit):
        ids_a, grads_a = grads_a.ids if ids_a is None else ids_a, grads_a.tensors
    if isinstance(grads_b, PerUnit):
        ids_b, grads_b = grads_b.ids if ids_b is None else ids_b, grads_b.tensors
    check_same_parameters(grads_a, grads_b)
    grads_a, grads_b = ({n: t.detach().to("cpu", torch.float64) for n, t in g.items()}
                        for g in (grads_a, grads_b))  # float64 whatever dtype comes in
    _check_int("n_permutations", n_permutations, 1)
    _check_int("n_bootstrap", n_bootstrap, 1)
    _check_int("seed", seed, 0)
    if fdr not in ("bh", "by"):
        raise ValueError(f"fdr: expected 'bh' or 'by', got {fdr!r}.")
    if not groups:
        raise ValueError("groups: expected at least one group, got none.")
    n_a, n_b = (next(iter(g.values())).shape[0] for g in (grads_a, grads_b))
    for name, group in groups.items():
        for n, m in group.items():
            if n not in grads_a:
                raise ValueError(f"group {name!r}: expected parameter names of the gradients, got {n!r}.")
            if m is not None and m.shape != grads_a[n].shape[1:]:
                raise ValueError(f"group {name!r}: expected a mask of shape "
                                 f"{tuple(grads_a[n].shape[1:])} for {n!r}, got {tuple(m.shape)}.")
    distinct, rows, nulls = {}, {}, {}
    for name, group in groups.items():
        sig = _signature(group)
        if sig not in distinct:
            distinct[sig] = group_statistics(_restrict(grads_a, group), _restrict(grads_b, group),
                                             n_permutations=n_permutations, seed=seed,
                                             n_bootstrap=n_bootstrap)
        stats, null = distinct[sig]
        rows[name], nulls[name] = dict(stats), null
    sigs = list(distinct)
    qvalues = (bh_qvalues if fdr == "bh" else by_qvalues)([distinct[s][0]["p"] for s in sigs])
    q_of = dict(zip(sigs, qvalues, strict=True))
    for name, group in groups.items():
        rows[name]["q"] = float(q_of[_signature(group)])
    return ConflictResult(rows, nulls=nulls, fdr=fdr, n_permutations=n_permutations, seed=seed,
                          ids_a=list(range(n_a)) if ids_a is None else ids_a,
                          ids_b=list(range(n_b)) if ids_b is None else ids_b)


def conflicts(model: torch.nn.Module, batch_a: Batch, batch_b: Batch, *, groups: str = "heads",
              n_permutations: int = 1000, seed: int = 0, n_bootstrap: int = 1000, fdr: str = "bh",
              layout: AttentionLayout | dict | None = None, loss_fn: LossFn | None = None,
              unit: str = "sample", weighting: str = "sample", include_bias: bool = False,
              sample_ids_a: Sequence[SampleId] | None = None,
              sample_ids_b: Sequence[SampleId] | None = None) -> ConflictResult:
    r"""Per-group mean between-task cosine with a permutation test (see the module docstring).

    Args:
        model: the model (copied to float64; never modified).
        batch_a: task A's batch (may carry ``sample_ids``).
        batch_b: task B's batch (may carry ``sample_ids``).
        groups: ``"heads"`` (QK-OV slices ``"L{l}.H{h}.{B}"``) or ``"parameters"``
            (one group per parameter tensor, named by the parameter).
        n_permutations: P, the label permutations of the null.
        seed: seeds the permutations (``seed``) and the bootstrap (``seed + 1``).
        n_bootstrap: bootstrap resamples of the interval.
        fdr: ``"bh"`` (Benjamini–Hochberg) or ``"by"`` (Benjamini–Yekutieli) q-values.
        layout: declared layout for ``groups="heads"`` (None: detected).
        loss_fn: as :func:`fisher_ref.units.per_sample_gradients`.
        unit: as :func:`fisher_ref.units.per_sample_gradients`.
        weighting: as :func:`fisher_ref.units.per_sample_gradients`.
        include_bias: the QK-OV slices include their Q/K/V bias entries.
        sample_ids_a: task A's row ids, unless ``batch_a`` carries them.
        sample_ids_b: task B's row ids, unless ``batch_b`` carries them.

    Returns:
        ConflictResult: group -> ``mean_cosine``, ``p``, ``q``, ``effect``, ``interval``,
        ``null_mean``, ``null_sd``, ``n_a``, ``n_b``; the null statistics in ``nulls``.
    """
    if groups not in ("heads", "parameters"):
        raise ValueError(f"groups: expected 'heads' or 'parameters', got {groups!r}.")
    kw = dict(loss_fn=loss_fn, unit=unit, weighting=weighting)
    ga = per_sample_gradients(model, batch_a, sample_ids=sample_ids_a, **kw)
    gb = per_sample_gradients(model, batch_b, sample_ids=sample_ids_b, **kw)
    if groups == "heads":
        lay = layout if isinstance(layout, AttentionLayout) else attention_layout(model, layout)
        defs = head_groups(lay, {n: g.shape[1:] for n, g in ga.tensors.items()}, include_bias)
    else:
        defs = parameter_groups(ga.tensors)
    return conflicts_from_gradients(ga, gb, defs, n_permutations=n_permutations, seed=seed,
                                    n_bootstrap=n_bootstrap, fdr=fdr)
