r"""Cross-task gradient conflicts per group with a permutation test (SPEC §7), vectorised.

For a group k (a QK-OV slice ``"L{l}.H{h}.{B}"`` or a parameter tensor) and the pooled units
``[A units…, B units…]`` (N = N_A + N_B), the cosine matrix

.. math:: S_k[u, v] = \frac{\langle g_u|_k, g_v|_k \rangle}{\lVert g_u|_k\rVert\,\lVert g_v|_k\rVert}
          \quad (0 \text{ when a norm is } 0)

is computed once per group from one Gram matrix (a batched matmul over heads). A labelling
with indicator a ∈ {0,1}^N of pseudo-A (b = 1 − a) has the statistic

.. math:: \bar c_k(a) = \frac{a^\top S_k b + b^\top S_k a}{2\, N_A N_B},

the mean between-task cosine (both terms are equal in exact arithmetic). All P permutations
are ``[K, P, N]`` products (in chunks): no gradient is recomputed. A permutation that
reproduces the observed split (or, when N_A = N_B, its mirror image, which has the same
pairs) is given the observed value exactly, so that tie never depends on rounding; other
statistics within ``TIE_ATOL`` = 1e-12 above the observed one count as ties too, and a null
sd at or below it gives effect nan. Query
heads that share a kv head share one K (and one V) slice: it is computed once and counts as
one hypothesis for the q-values. Costs: Gram O(N² · |θ|), permutations O(K · P · N²),
bootstrap O(K · n_boot · N_A · N_B).

Conventions (docs/architecture.md): permutations from ``Generator(PCG64(seed))`` restarted
per group (so one set serves every group), pseudo-A = ``perm[:N_A]``;
``p = (1 + #{c̄_perm ≤ c̄_obs}) / (P + 1)`` (ties as above); effect = (c̄_obs − mean null) / sd(null, ddof=1);
bootstrap ``Generator(PCG64(seed + 1))``, each resample ``ia`` then ``ib``, interval =
``np.percentile(stats, [2.5, 97.5])``; q-values across the distinct groups of the call.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .attention.layouts import AttentionLayout, attention_layout
from .attention.slicing import BLOCKS, block_params, slice_matrix
from .fdr import bh_qvalues, by_qvalues
from .interference import check_same_parameters
from .per_sample import unit_gradients
from .results import LossFn, SampleIds
from .run.options import Options

GROUPINGS = ("heads", "parameters")
_CHUNK_ELEMENTS = 1 << 24   # float64 entries per temporary in the permutation products
# A permuted statistic within TIE_ATOL above the observed one counts as a tie (≤): it can only
# come from rounding (e.g. two units with identical gradients swapped), as mean cosines of
# distinct pair sets of float64 data never lie that close; the p-value stays valid. A null
# whose sd is no larger has no spread beyond rounding: its effect is nan.
TIE_ATOL = 1e-12


# The null hypothesis of every group's permutation test, in words (ConflictResult.hypothesis).
HYPOTHESIS = ("H0: the two tasks' per-sample gradients restricted to the group are exchangeable "
              "(the task labels carry no information), i.e. the mean between-task cosine is "
              "distributed as under a random relabelling of the pooled units; p is one-sided, "
              "small when the observed mean between-task cosine is lower than under "
              "relabelling. Rejecting H0 says the two tasks' gradients differ on the group, not "
              "that they point against each other (a negative mean cosine).")


def min_attainable_p(n_a: int, n_b: int, n_permutations: int) -> float:
    r"""The smallest p-value the permutation test can reach with these sizes.

    The exact test's smallest p is m / C(N_A + N_B, N_A): the observed split (and, when
    N_A = N_B, its mirror image, which has the same pairs: m = 2; else m = 1) among all
    labellings of the pooled units. With P permutations p is also never below 1/(P + 1).
    The Monte Carlo p-value scatters around the exact one, so when this is at or above a
    threshold no group can be called significant at it, whatever the gradients.

    .. math:: p_{\min} = \max\left(\frac{1}{P + 1},\; \frac{m}{\binom{N_A + N_B}{N_A}}\right)
    """
    m = 2 if n_a == n_b else 1
    return max(1.0 / (n_permutations + 1), m / math.comb(n_a + n_b, n_a))


class ConflictResult(dict):
    """``{group name: {"mean_cosine", "p", "q", "effect", "interval", "null_mean", "null_sd",
    "n_a", "n_b"}}`` with ``nulls`` (group -> permutation statistics, ``ndarray[P]``),
    ``fdr``, ``n_permutations``, ``seed``, ``ids_a`` and ``ids_b``.

    Groups are ordered layers, then heads, then blocks (``"L0.H0.Q"``, ``"L0.H0.K"``, …) or
    in parameter order.

    Attributes:
        hypothesis: the null hypothesis tested for each group, in words (:data:`HYPOTHESIS`).
        min_attainable_p: the smallest p-value the test can reach with these numbers of units
            and permutations (:func:`min_attainable_p`).
    """

    hypothesis = HYPOTHESIS

    def __init__(self, data: dict, *, nulls: dict, fdr: str, n_permutations: int, seed: int,
                 ids_a: list, ids_b: list) -> None:
        super().__init__(data)
        self.nulls, self.fdr = nulls, fdr
        self.n_permutations, self.seed = n_permutations, seed
        self.ids_a, self.ids_b = list(ids_a), list(ids_b)
        self.min_attainable_p = min_attainable_p(len(self.ids_a), len(self.ids_b), n_permutations)


def conflicts(model: torch.nn.Module, batch_a: dict, batch_b: dict, *, groups: str = "heads",
              n_permutations: int = 1000, seed: int = 0, n_bootstrap: int = 1000,
              layout: AttentionLayout | dict | None = None, loss_fn: LossFn | None = None,
              unit: str = "sample", weighting: str = "sample", include_bias: bool = False,
              fdr: str = "bh", dtype: torch.dtype | None = None,
              sample_ids_a: SampleIds | None = None,
              sample_ids_b: SampleIds | None = None) -> ConflictResult:
    """Mean between-task gradient cosine per group, its permutation p-value, effect, interval, q.

    Args:
        model: the model.
        batch_a: task A's batch.
        batch_b: task B's batch.
        groups: ``"heads"`` (QK-OV slices ``L{l}.H{h}.{B}``) or ``"parameters"``.
        n_permutations: P label permutations.
        seed: the permutations' seed (the bootstrap uses seed + 1).
        n_bootstrap: resamples for the percentile interval.
        layout: a declared attention layout (``groups="heads"``).
        loss_fn: per-row loss, as for every estimator.
        unit: as for every estimator.
        weighting: as for every estimator (the cosines themselves are unweighted).
        dtype: the per-sample gradients' dtype, as for every estimator.
        include_bias: slices also hold the Q/K/V bias entries.
        fdr: ``"bh"`` (Benjamini–Hochberg) or ``"by"`` (Benjamini–Yekutieli) for ``q``,
            across the distinct groups (under GQA a shared K or V slice is one hypothesis).
        sample_ids_a: task A's sample ids, if not in ``batch_a``.
        sample_ids_b: task B's sample ids, if not in ``batch_b``.

    Returns:
        ConflictResult.
    """
    n_permutations, seed, n_bootstrap = _check_options(groups, n_permutations, seed, n_bootstrap, fdr)
    lay = attention_layout(model, layout) if groups == "heads" else None
    opts = Options.of(loss_fn, unit, weighting, dtype)
    params = _slice_names(lay, include_bias) if groups == "heads" else None
    ga = unit_gradients(model, batch_a, sample_ids_a, opts, params)
    gb = unit_gradients(model, batch_b, sample_ids_b, opts, params)
    return conflicts_from_units(ga, gb, groups=groups, layout=lay, n_permutations=n_permutations,
                                seed=seed, n_bootstrap=n_bootstrap, include_bias=include_bias, fdr=fdr)


def conflicts_from_units(ga, gb, *, groups="heads", layout: AttentionLayout | None = None,
                         n_permutations=1000, seed=0, n_bootstrap=1000, include_bias=False,
                         fdr="bh") -> ConflictResult:
    """Conflicts from per-unit gradients (``PerUnit``-like: ``tensors``, ``ids``)."""
    n_permutations, seed, n_bootstrap = _check_options(groups, n_permutations, seed, n_bootstrap, fdr)
    check_same_parameters(ga.tensors, gb.tensors)
    n_a, n_b = len(ga.ids), len(gb.ids)
    if n_a < 1 or n_b < 1:
        raise ValueError(f"conflicts: expected at least one unit per task, got {n_a} and {n_b}.")
    if groups == "heads" and layout is None:
        raise ValueError("conflicts: groups='heads' expected an attention layout, got None.")
    keep = ga.tensors if groups == "parameters" else _slice_names(layout, include_bias)
    missing = [n for n in keep if n not in ga.tensors]
    if missing:
        raise ValueError(f"gradients: expected every attention tensor of the layout, got none "
                         f"for {missing[:5]}.")
    pooled = {n: torch.cat([ga.tensors[n], gb.tensors[n]]) for n in keep}
    names, shared, grams = _group_grams(pooled, groups, layout, include_bias)
    cos = _cosines(grams)                                                  # [K, N, N] float64
    perms = permutation_indicators(n_a, n_b, n_permutations, seed, cos.device)
    obs_ind = torch.zeros(1, n_a + n_b, dtype=cos.dtype, device=cos.device)
    obs_ind[0, :n_a] = 1
    stats = _labelling_stats(cos, torch.cat([obs_ind, perms]), n_a, n_b)  # [K, 1 + P]
    obs, null = stats[:, 0], stats[:, 1:]
    # A permutation that reproduces the split (or, when N_A = N_B, its mirror image) has the
    # observed statistic exactly: make that tie exact rather than leave it to rounding.
    same = (perms == obs_ind).all(1) | ((perms == 1 - obs_ind).all(1) if n_a == n_b else False)
    null = torch.where(same[None, :], obs[:, None].expand_as(null), null)
    ties = null <= obs[:, None] + TIE_ATOL          # equal pair sets of duplicated units
    p = (1.0 + ties.sum(1).to(torch.float64)) / (n_permutations + 1)
    sd = null.std(dim=1, unbiased=True) if n_permutations > 1 else torch.full_like(obs, float("nan"))
    mean = null.mean(1)
    effect = torch.where(sd > TIE_ATOL, (obs - mean) / sd, torch.full_like(obs, float("nan")))
    boot = _bootstrap_stats(cos, n_a, n_b, n_bootstrap, seed).cpu().numpy()
    lo_hi = np.percentile(boot, [2.5, 97.5], axis=1)                      # [2, K]
    q = (bh_qvalues if fdr == "bh" else by_qvalues)(p.cpu().numpy())    # one per distinct slice
    obs, p, sd, mean, effect = (t.cpu().tolist() for t in (obs, p, sd, mean, effect))
    out, nulls = {}, {}
    null_np = null.cpu().numpy()
    for name, k in zip(names, shared, strict=True):
        out[name] = {"mean_cosine": obs[k], "p": p[k], "q": float(q[k]),
                     "effect": effect[k], "interval": (float(lo_hi[0, k]), float(lo_hi[1, k])),
                     "null_mean": mean[k], "null_sd": sd[k], "n_a": n_a, "n_b": n_b}
        nulls[name] = null_np[k]
    return ConflictResult(out, nulls=nulls, fdr=fdr, n_permutations=n_permutations, seed=seed,
                          ids_a=ga.ids, ids_b=gb.ids)


def _check_options(groups, n_permutations, seed, n_bootstrap, fdr) -> tuple[int, int, int]:
    """Checks the options; returns ``(n_permutations, seed, n_bootstrap)`` as Python ints
    (numpy integers are accepted).
    """
    if groups not in GROUPINGS:
        raise ValueError(f"groups: expected one of {GROUPINGS}, got {groups!r}.")
    for name, v in (("n_permutations", n_permutations), ("n_bootstrap", n_bootstrap)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}.")
    if fdr not in ("bh", "by"):
        raise ValueError(f"fdr: expected 'bh' or 'by', got {fdr!r}.")
    return int(n_permutations), int(seed), int(n_bootstrap)


def _group_grams(pooled: dict, groups: str, layout, include_bias):
    """Group names, each group's index into the distinct slices (query heads sharing a kv head
    share its K and V slice), and the distinct slices' Gram matrices ``[K, N, N]``.
    """
    if groups == "parameters":
        grams = []
        for t in pooled.values():
            x = t.reshape(t.shape[0], -1)
            grams.append(x @ x.T)
        return list(pooled), list(range(len(pooled))), torch.stack(grams)
    names, shared, grams = [], [], []
    for la in layout.layers:
        per_block = {}
        for B in BLOCKS:
            x = slice_matrix(pooled, la, B, include_bias).permute(1, 0, 2)    # [heads, N, m]
            per_block[B] = torch.bmm(x, x.transpose(1, 2))                   # [heads, N, N]
        r = la.group_size
        first = {}
        for h in range(la.num_heads):
            for B in BLOCKS:
                hb = h // r if B in ("K", "V") else h
                if (B, hb) not in first:
                    first[(B, hb)] = len(grams)
                    grams.append(per_block[B][hb])
                shared.append(first[(B, hb)])
                names.append(f"L{la.index}.H{h}.{B}")
    return names, shared, torch.stack(grams)


def _slice_names(layout: AttentionLayout, include_bias: bool) -> list[str]:
    return list(dict.fromkeys(n for la in layout.layers for B in BLOCKS
                              for n, _ in block_params(la, B, include_bias)))


def _cosines(grams: torch.Tensor) -> torch.Tensor:
    """Cosine matrices from Gram matrices, symmetrised, 0 where a norm is 0, in float64."""
    g = grams.to(torch.float64)
    g = 0.5 * (g + g.transpose(1, 2))
    norm = g.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()                  # [K, N]
    denom = norm[:, :, None] * norm[:, None, :]
    return torch.where(denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.zeros_like(g))


def permutation_indicators(n_a: int, n_b: int, n_permutations: int, seed: int,
                           device=None) -> torch.Tensor:
    """``[P, N]`` float64 indicators of pseudo-A: ``perm[:N_A]`` of each permutation in order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n = n_a + n_b
    ind = np.zeros((n_permutations, n), dtype=np.float64)
    for p in range(n_permutations):
        ind[p, rng.permutation(n)[:n_a]] = 1.0
    return torch.from_numpy(ind).to(device)


def _labelling_stats(cos: torch.Tensor, a: torch.Tensor, n_a: int, n_b: int) -> torch.Tensor:
    """``[K, P]``: (aᵀ S b + bᵀ S a) / (2 N_A N_B) for every group and labelling row of ``a``."""
    k, n = cos.shape[0], cos.shape[-1]
    rows = max(1, _CHUNK_ELEMENTS // max(1, k * n))     # bound the [K, rows, N] temporaries
    out = []
    for start in range(0, a.shape[0], rows):
        ac = a[start:start + rows]
        bc = 1.0 - ac
        sa = torch.matmul(ac, cos)                                         # [K, rows, N]
        sb = torch.matmul(bc, cos)
        out.append(((sa * bc).sum(-1) + (sb * ac).sum(-1)) / (2.0 * n_a * n_b))
    return torch.cat(out, dim=1)


def _bootstrap_stats(cos: torch.Tensor, n_a: int, n_b: int, n_bootstrap: int, seed: int) -> torch.Tensor:
    """``[K, n_boot]`` mean between-task cosine of resampled (with replacement) units."""
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    ca = np.zeros((n_bootstrap, n_a))
    cb = np.zeros((n_bootstrap, n_b))
    for r in range(n_bootstrap):
        np.add.at(ca[r], rng.integers(0, n_a, n_a), 1.0)
        np.add.at(cb[r], rng.integers(0, n_b, n_b), 1.0)
    ca_t = torch.from_numpy(ca).to(cos.device)
    cb_t = torch.from_numpy(cb).to(cos.device)
    s_ab = cos[:, :n_a, n_a:]                                              # [K, N_A, N_B]
    return (torch.matmul(ca_t, s_ab) * cb_t).sum(-1) / (n_a * n_b)
