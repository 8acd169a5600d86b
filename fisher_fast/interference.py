r"""QK-OV interference between two tasks (SPEC §6), as one batched matmul per (layer, block).

For task-A units i, task-B units j, layer l, query head h and block B,

.. math::

    M^B[i, j, l, h] = \sum_{p \in I(l, h, B)} \frac{C^A_i[p]}{\hat F[p] + \varepsilon_{l,h,B}}
                      \, \varphi(g^B_j[p]),
    \qquad \varepsilon_{l,h,B} = \mathrm{eps} + \mathrm{ridge\_rel} \cdot
            \operatorname{median}_{p \in I(l,h,B)} \hat F[p],

with :math:`C^A_i = (g^A_i)^2`, φ = abs (default) or identity (``signed=True``). With the
per-head views of :mod:`fisher_fast.attention.slicing` (``[units, heads, m]``) this is, per block,

``M = bmm((C_A * 1/(F̂+ε)).permute(1, 0, 2), φ(g_B).permute(1, 2, 0))``  →  ``[heads, N_A, N_B]``,

costing :math:`O(N_A N_B \cdot |\text{slice}|)` flops and no Python loop over units or heads.
K/V results are computed once per kv head and repeated for the query heads that share it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable

import torch

from .attention.layouts import AttentionLayout, attention_layout
from .attention.slicing import BLOCKS, block_params, kv_index, slice_matrix
from .batching.checks import check_positive_int
from .per_sample import unit_gradient_chunks, unit_gradients
from .results import LossFn, SampleIds
from .run.options import Options
from .store.contribution_store import ContributionStore

FISHER_CHOICES = ("a", "b", "pooled")


class InterferenceResult(dict):
    """``{"Q"|"K"|"V"|"O": Tensor[N_A, N_B, L, H]}`` with the means, top-k and ids.

    Attributes:
        means: ``{block: Tensor[L, H]}``, the mean of each block's scores over (i, j).
        top_k: the ``top_k`` largest scores (signed mode: largest |M|; ``score`` keeps the
            sign) as dicts ``{"score", "id_a", "id_b", "layer", "head", "block"}``, ties in
            (block, layer, head, i, j) order; nan scores come last.
        ids_a, ids_b: the units' ids (the callers' sample ids) along axes 0 and 1.
        signed: whether φ is the identity.
        eps: ``{block: Tensor[L, H]}``, the per-slice ε that was used.
    """

    def __init__(self, scores: dict, *, ids_a: list, ids_b: list, signed: bool, top_k: int,
                 eps: dict) -> None:
        super().__init__(scores)
        self.ids_a, self.ids_b, self.signed, self.eps = list(ids_a), list(ids_b), bool(signed), eps
        self.means = {b: m.mean(dim=(0, 1)) for b, m in scores.items()}
        self.top_k = _top_entries(scores, self.ids_a, self.ids_b, top_k, signed)

    def pair(self, id_a: Hashable, id_b: Hashable) -> dict:
        """``{block: Tensor[L, H]}`` for one (task-A id, task-B id) pair."""
        i, j = _position(self.ids_a, id_a, "id_a"), _position(self.ids_b, id_b, "id_b")
        return {b: m[i, j] for b, m in self.items()}


def _position(ids: list, uid, what: str) -> int:
    for k, x in enumerate(ids):
        if x == uid:
            return k
    raise ValueError(f"{what}: expected one of the units' ids, got unknown id {uid!r}.")


def interference(model: torch.nn.Module, batch_a: dict, batch_b: dict, *,
                 fisher: str | dict = "a", signed: bool = False, eps: float = 1e-12,
                 ridge_rel: float = 0.0, top_k: int = 100,
                 layout: AttentionLayout | dict | None = None, loss_fn: LossFn | None = None,
                 unit: str = "sample", weighting: str = "sample",
                 store: ContributionStore | None = None, include_bias: bool = False,
                 dtype: torch.dtype | None = None, task_a: Hashable = "a",
                 chunk_size: int | None = None, sample_ids_a: SampleIds | None = None,
                 sample_ids_b: SampleIds | None = None,
                 score_rows: int | None = None) -> InterferenceResult:
    """QK-OV interference M^B[i, j, l, h] of task A (``batch_a``) on task B (``batch_b``).

    Args:
        model: the model; its attention layout is detected unless ``layout`` is given.
        batch_a: task A's batch (sample ids from ``batch["sample_ids"]``).
        batch_b: task B's batch.
        fisher: F̂ = empirical Fisher of ``"a"`` (default), ``"b"``, ``"pooled"`` (the units
            of both tasks), or a dict ``{parameter name: tensor}``.
        signed: φ = identity instead of abs.
        eps: ε_slice = eps + ridge_rel · median(F̂ over the slice).
        ridge_rel: see ``eps``.
        top_k: how many of the largest entries to list.
        layout: a declared attention layout (default: detected).
        loss_fn: per-row loss, as for every estimator (docs/architecture.md).
        unit: as for every estimator.
        weighting: as for every estimator.
        store: a ``ContributionStore``: A's contributions C_A are computed ``chunk_size``
            rows at a time, written to it under task ``task_a`` and read back ``score_rows``
            units at a time, so only a chunk of them is on the device at once.
        include_bias: also count the Q/K/V bias entries of each slice.
        dtype: dtype of the per-sample gradients (default: the core's, float32).
        task_a: see ``store``.
        chunk_size: forward rows per chunk (as for every estimator; default from memory).
        score_rows: A's units scored against B at a time (default: all of them without a
            store; with one, ``chunk_size`` when given, else all).
        sample_ids_a: task A's sample ids, if not in ``batch_a``.
        sample_ids_b: task B's sample ids, if not in ``batch_b``.

    Returns:
        InterferenceResult.
    """
    lay = attention_layout(model, layout)
    _check_options(fisher, signed, eps, ridge_rel, top_k)
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size)
    if score_rows is None:
        score_rows = chunk_size if store is not None else None
    names = _layout_names(lay, include_bias)
    scoring = dict(fisher=fisher, signed=signed, eps=eps, ridge_rel=ridge_rel, top_k=top_k,
                   include_bias=include_bias, names=names, score_rows=score_rows)
    gb = unit_gradients(model, batch_b, sample_ids_b, opts, names)
    if store is None:
        ga = unit_gradients(model, batch_a, sample_ids_a, opts, names)
        return interference_from_units(lay, ga, gb, **scoring)
    with store.transaction():  # A's records stay only if the whole computation succeeds
        a = _file_task_a(model, batch_a, sample_ids_a, opts, store, task_a, names)
        return _scores(lay, a, gb, **scoring)


class _TaskA:
    """What the scores need of task A: ids, W = Σ w, Σ_u w_u C_u per parameter (for F̂) and
    ``read(ids) -> {name: C[ids]}``.
    """

    def __init__(self, ids, W, sum_wc, read):
        self.ids, self.W, self.sum_wc, self.read = list(ids), W, sum_wc, read


def _weighted_sums(c: dict, w: torch.Tensor, names) -> dict:
    return {n: torch.tensordot(w.to(c[n].dtype).to(c[n].device), c[n], dims=1) for n in names}


def _file_task_a(model, batch_a, sample_ids_a, opts: Options, store, task_a, names) -> _TaskA:
    """A's contributions computed a chunk at a time (``unit_gradient_chunks``), filed in the
    store and summed into Σ w C as they go: only one chunk of A's gradients is in memory.
    """
    ids, W, sums = [], None, {}
    chunks = unit_gradient_chunks(model, batch_a, sample_ids_a, opts, names)
    with contextlib.closing(chunks):
        for g in chunks:
            c = {n: g.tensors[n].square_() for n in names}  # the chunk's own tensors
            for n, t in _weighted_sums(c, g.weights, names).items():
                sums[n] = t if n not in sums else sums[n] + t
            w = g.weights.sum()
            W = w if W is None else W + w
            store.add(task_a, g.ids, c)
            ids += g.ids
    return _TaskA(ids, W, sums,
                  lambda rows, dev: store.get_stacked(task_a, ids[rows], device=dev))


def interference_from_units(lay: AttentionLayout, ga, gb, *, fisher="a", signed=False, eps=1e-12,
                            ridge_rel=0.0, top_k=100, include_bias=False, names=None,
                            store=None, task_a="a", score_rows=None) -> InterferenceResult:
    """Interference from per-unit gradients (``PerUnit``-like: ``tensors``, ``ids``, ``weights``).
    With ``store``, A's contributions are filed there and read back ``score_rows`` at a time.
    """
    _check_options(fisher, signed, eps, ridge_rel, top_k)
    check_same_parameters(ga.tensors, gb.tensors)
    names = names or _layout_names(lay, include_bias)
    missing = [n for n in names if n not in ga.tensors]
    if missing:
        raise ValueError(f"gradients: expected every attention tensor of the layout, got none "
                         f"for {missing[:5]}.")
    ca = {n: ga.tensors[n].square() for n in names}
    w = ga.weights
    W = w.to(ca[names[0]].dtype).to(ca[names[0]].device).sum()
    scoring = dict(fisher=fisher, signed=signed, eps=eps, ridge_rel=ridge_rel, top_k=top_k,
                   include_bias=include_bias, names=names, score_rows=score_rows)
    if store is None:
        a = _TaskA(ga.ids, W, _weighted_sums(ca, w, names),
                   lambda rows, dev: {n: t[rows] for n, t in ca.items()})
        return _scores(lay, a, gb, **scoring)
    a = _TaskA(ga.ids, W, _weighted_sums(ca, w, names),
               lambda rows, dev: store.get_stacked(task_a, ga.ids[rows], device=dev))

    def file_them():  # after the checks, before the first read; then C_A lives in the store
        store.add(task_a, ga.ids, ca)
        ca.clear()

    with store.transaction():
        return _scores(lay, a, gb, **scoring, before_reads=file_them)


def _scores(lay: AttentionLayout, a: _TaskA, gb, *, fisher, signed, eps, ridge_rel, top_k,
            include_bias, names, score_rows, before_reads=None) -> InterferenceResult:
    heads = {la.num_heads for la in lay.layers}
    if len(heads) != 1:
        raise ValueError(f"interference: expected the same number of heads in every layer, "
                         f"got {sorted(heads)}.")
    H, L = heads.pop(), lay.num_layers
    n_a, n_b = len(a.ids), len(gb.ids)
    fhat = _fisher_hat(fisher, a, gb, names)
    phi_b = {n: gb.tensors[n] if signed else gb.tensors[n].abs() for n in names}
    ref = phi_b[names[0]]
    inv, eps_out = {}, {}
    for B in BLOCKS:
        eps_out[B] = torch.empty(L, H, dtype=ref.dtype, device=ref.device)
        for la in lay.layers:
            f = slice_matrix(fhat, la, B, include_bias)                    # [heads, m]
            e = eps + ridge_rel * _median_rows(f) if ridge_rel else torch.full(
                (f.shape[0],), float(eps), dtype=f.dtype, device=f.device)
            inv[(la.index, B)] = 1.0 / (f + e[:, None])     # inf where F̂ + ε = 0
            eps_out[B][la.index] = e[kv_index(la, e.device)] if B in ("K", "V") else e
    chunk = n_a if score_rows is None else check_positive_int("score_rows", score_rows)
    if before_reads is not None:
        before_reads()
    phi = {(la.index, B): slice_matrix(phi_b, la, B, include_bias).permute(1, 2, 0)   # [heads, m, N_B]
           for la in lay.layers for B in BLOCKS}
    del phi_b
    blocks = {B: torch.empty(n_a, n_b, L, H, dtype=ref.dtype, device=ref.device) for B in BLOCKS}
    for start in range(0, n_a, chunk):
        rows = slice(start, min(start + chunk, n_a))
        part = a.read(rows, ref.device)                                     # C_A of the chunk
        for la in lay.layers:
            for B in BLOCKS:
                c = slice_matrix(part, la, B, include_bias)                        # [n, heads, m]
                x = torch.where(c == 0, torch.zeros_like(c), c * inv[(la.index, B)])  # 0 · inf := 0
                m = torch.bmm(x.permute(1, 0, 2), phi[(la.index, B)])              # [heads, n, N_B]
                if B in ("K", "V"):
                    m = m.index_select(0, kv_index(la, m.device))
                blocks[B][rows, :, la.index, :] = m.permute(1, 2, 0)
    return InterferenceResult(blocks, ids_a=a.ids, ids_b=gb.ids, signed=signed, top_k=top_k,
                              eps=eps_out)


def check_same_parameters(a: dict, b: dict) -> None:
    """Both tasks' per-unit tensors have the same names and shapes, else ValueError."""
    if set(a) != set(b):
        raise ValueError(f"tasks measured on different models: expected the same parameters, got "
                         f"{sorted(set(a) - set(b))[:5]} only in task A and "
                         f"{sorted(set(b) - set(a))[:5]} only in task B.")
    for n in a:
        if a[n].shape[1:] != b[n].shape[1:]:
            raise ValueError(f"tasks measured on different models: expected {n!r} of shape "
                             f"{tuple(a[n].shape[1:])} in both, got {tuple(b[n].shape[1:])} in task B.")


def _layout_names(lay: AttentionLayout, include_bias: bool) -> list[str]:
    names = []
    for la in lay.layers:
        for B in BLOCKS:
            names += [n for n, _ in block_params(la, B, include_bias) if n not in names]
    return names


def _check_options(fisher, signed, eps, ridge_rel, top_k) -> None:
    if not isinstance(fisher, dict) and fisher not in FISHER_CHOICES:
        raise ValueError(f"fisher: expected one of {FISHER_CHOICES} or a dict of tensors, got {fisher!r}.")
    if not isinstance(signed, bool):
        raise ValueError(f"signed: expected a bool, got {signed!r}.")
    for name, v in (("eps", eps), ("ridge_rel", ridge_rel)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}.")


def _fisher_hat(fisher, a: _TaskA, gb, names) -> dict:
    """F̂ per parameter: a given dict, or Σ w C / Σ w over A's units, B's, or both."""
    if isinstance(fisher, dict):
        out = {}
        for n in names:
            if n not in fisher:
                raise ValueError(f"fisher: expected a tensor for every slice parameter, got none for {n!r}.")
            t = torch.as_tensor(fisher[n])
            want = gb.tensors[n]
            if tuple(t.shape) != tuple(want.shape[1:]):
                raise ValueError(f"fisher[{n!r}]: shape mismatch: expected {tuple(want.shape[1:])}, "
                                 f"got {tuple(t.shape)}.")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"fisher[{n!r}]: expected finite, non-negative values (a "
                                 f"diagonal Fisher), got min {float(t.min())}, max {float(t.max())}.")
            out[n] = t.to(want.dtype).to(want.device)
        return out
    if fisher == "a":
        return {n: a.sum_wc[n] / a.W for n in names}
    cb = {n: gb.tensors[n].square() for n in names}
    wb = gb.weights.to(cb[names[0]].dtype).to(cb[names[0]].device)
    sum_b = _weighted_sums(cb, wb, names)
    if fisher == "b":
        return {n: sum_b[n] / wb.sum() for n in names}
    return {n: (a.sum_wc[n] + sum_b[n]) / (a.W + wb.sum()) for n in names}   # pooled


def _median_rows(x: torch.Tensor) -> torch.Tensor:
    """Row medians with the usual convention (mean of the two middle values for even m)."""
    s = x.sort(dim=-1).values
    m = s.shape[-1]
    return 0.5 * (s[..., (m - 1) // 2] + s[..., m // 2])


def _top_entries(blocks: dict, ids_a: list, ids_b: list, k: int, signed: bool) -> list[dict]:
    """The k largest scores; a stable sort keeps ties in (block, layer, head, i, j) order."""
    if k == 0:
        return []
    stacked = torch.stack([blocks[B].permute(2, 3, 0, 1) for B in BLOCKS])   # [4, L, H, N_A, N_B]
    key = (stacked.abs() if signed else stacked).reshape(-1)
    key = torch.where(torch.isnan(key), torch.full_like(key, -float("inf")), key)
    flat = stacked.reshape(-1)
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    shape = stacked.shape
    out = []
    scores = flat[order].tolist()  # one host transfer, not one per entry
    for f, score in zip(order.tolist(), scores, strict=True):
        b, rem = divmod(f, shape[1] * shape[2] * shape[3] * shape[4])
        layer, rem = divmod(rem, shape[2] * shape[3] * shape[4])
        head, rem = divmod(rem, shape[3] * shape[4])
        i, j = divmod(rem, shape[4])
        out.append({"score": score, "id_a": ids_a[i], "id_b": ids_b[j],
                    "layer": layer, "head": head, "block": BLOCKS[b]})
    return out
