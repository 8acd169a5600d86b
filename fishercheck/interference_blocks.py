r"""QK-OV interference of task A on task B (SPEC §6) scored a tile at a time, for any N.

The main job scores chunks of task A's contributions :math:`C^A_i = (g^A_i)^2` (kept in
memory, read back from a ContributionStore, or computed again) against blocks of task B's
gradients, with F̂ the empirical Fisher of all of task A (given: the main job's accumulator):

.. math::

    M^B[i, j, l, h] = \sum_{p \in I(l, h, B)} \frac{C^A_i[p]}{\hat F[p] + \varepsilon}\,
                      \lvert g^B_j[p] \rvert,

the same sum ``fisher_fast.interference`` computes (``fisher=`` F̂, ``signed=False``,
``ridge_rel=0``, weight entries only), on fisher_fast's own per-head views
(``fisher_fast.attention.slicing.slice_matrix``): per layer and block one batched matmul
``[heads, n_A, m] @ [heads, m, n_B]``, K/V repeated for the query heads that share them.
Nothing of size ``[N_A, N_B, L, H]`` is ever kept: each tile adds to the float64 sums of the
per-(l, h) means and hands on its largest entries, so the report's top pairs are those of
the whole matrix (ties in (block, layer, head, i, j) order, nan last, as fisher_fast orders
them). A block's result is plain data (:meth:`Scores.to_data`), which ``--store`` saves so
that an interrupted run skips the blocks it finished.
"""

from __future__ import annotations

import math

import torch

from fisher_fast.attention.slicing import BLOCKS, kv_index, slice_matrix

TOP = 10  # the largest entries the report lists


def slice_names(layout) -> list[str]:
    """The attention weights the scores read, each once, in layer and block order."""
    names = [la_name for la in layout.layers for la_name in (la.q, la.k, la.v, la.o)]
    return list(dict.fromkeys(names))


def inverse_fisher(fhat: dict, layout, eps: float = 1e-12) -> dict:
    """``{(l, B): Tensor[heads, m]}``: 1 / (F̂ + ε) on each block's per-head view."""
    return {(la.index, B): 1.0 / (slice_matrix(fhat, la, B) + eps)
            for la in layout.layers for B in BLOCKS}


def task_b_views(gb: dict, layout) -> dict:
    """``{(l, B): Tensor[heads, m, n_B]}``: |g_B| of a block of task B, on each block's view."""
    phi = {n: t.abs() for n, t in gb.items()}
    return {(la.index, B): slice_matrix(phi, la, B).permute(1, 2, 0).contiguous()
            for la in layout.layers for B in BLOCKS}


def score_tile(ca: dict, inv: dict, views_b: dict, layout) -> torch.Tensor:
    """``Tensor[4, L, H, n_A, n_B]``: M^B[i, j, l, h] of a chunk of A against a block of B.

    Args:
        ca: ``{name: Tensor[n_A, *param_shape]}``, the chunk's contributions.
        inv: from :func:`inverse_fisher`.
        views_b: from :func:`task_b_views`.
        layout: the attention layout.
    """
    first = views_b[(layout.layers[0].index, BLOCKS[0])]
    n_a = next(iter(ca.values())).shape[0]
    H = layout.layers[0].num_heads
    out = torch.empty(len(BLOCKS), len(layout.layers), H, n_a, first.shape[-1],
                      dtype=first.dtype, device=first.device)
    for la in layout.layers:
        for b, B in enumerate(BLOCKS):
            c = slice_matrix(ca, la, B).to(first.dtype)                     # [n_A, heads, m]
            w = inv[(la.index, B)]
            x = torch.where(c == 0, torch.zeros_like(c), c * w)              # 0 · inf := 0
            m = torch.bmm(x.permute(1, 0, 2), views_b[(la.index, B)])       # [heads, n_A, n_B]
            if B in ("K", "V"):
                m = m.index_select(0, kv_index(la, m.device))
            out[b, la.index] = m
    return out


class Scores:
    """Running sums and largest entries of M over the tiles seen so far.

    Args:
        layers: L.
        heads: H.
        top: how many of the largest entries to keep.
    """

    def __init__(self, layers: int, heads: int, top: int = TOP):
        self.sums = torch.zeros(len(BLOCKS), layers, heads, dtype=torch.float64)
        self.top_k = top
        self.top: list[tuple] = []  # (score, block, layer, head, i, j), i and j global

    def add(self, tile: torch.Tensor, i0: int, j0: int) -> None:
        """Add a tile ``[4, L, H, n_A, n_B]`` whose first entry is (i0, j0) of the matrix.

        The tile's largest entries are found without sorting it: ``topk`` gives the k-th
        largest value, and only the entries at or above it (ties included) are sorted, stably,
        so that ties keep their (block, layer, head, i, j) order.
        """
        self.sums += tile.sum(dim=(3, 4), dtype=torch.float64).cpu()
        flat = tile.reshape(-1)
        key = torch.nan_to_num(flat, nan=-math.inf) if bool(flat.isnan().any()) else flat
        k = min(self.top_k, key.numel())
        if k == 0:
            return
        threshold = torch.topk(key, k).values[-1]
        candidates = (key >= threshold).nonzero().flatten()                # in flat order
        order = candidates[torch.sort(key[candidates], descending=True, stable=True).indices[:k]]
        shape = tile.shape
        for f, score in zip(order.tolist(), flat[order].tolist(), strict=True):
            b, rest = divmod(f, shape[1] * shape[2] * shape[3] * shape[4])
            layer, rest = divmod(rest, shape[2] * shape[3] * shape[4])
            head, rest = divmod(rest, shape[3] * shape[4])
            i, j = divmod(rest, shape[4])
            self.top.append((score, b, layer, head, i0 + i, j0 + j))
        self._trim()

    def merge(self, other: Scores) -> None:
        """Add another set of tiles' sums and entries (e.g. a finished block's)."""
        self.sums += other.sums
        self.top += other.top
        self._trim()

    def _trim(self) -> None:
        def order(t: tuple) -> tuple:  # descending score, nan last, then (B, l, h, i, j)
            return (-t[0] if not math.isnan(t[0]) else math.inf, *t[1:])

        self.top = sorted(self.top, key=order)[:self.top_k]

    def summary(self, ids_a: list, ids_b: list) -> dict:
        """``{"means": {block: [L][H]}, "top": [...]}`` (the report's ``interference``)."""
        count = len(ids_a) * len(ids_b)
        means = (self.sums / count).tolist()
        return {"means": {B: means[b] for b, B in enumerate(BLOCKS)},
                "top": [{"score": s, "id_a": ids_a[i], "id_b": ids_b[j], "layer": layer,
                         "head": head, "block": BLOCKS[b]}
                        for s, b, layer, head, i, j in self.top]}

    def to_data(self) -> dict:
        """JSON-able (every float exactly: Python's repr round-trips)."""
        return {"sums": self.sums.tolist(), "top": [list(t) for t in self.top],
                "top_k": self.top_k}

    @classmethod
    def from_data(cls, data: dict) -> Scores:
        """The inverse of :meth:`to_data`."""
        sums = torch.tensor(data["sums"], dtype=torch.float64)
        out = cls(sums.shape[1], sums.shape[2], int(data["top_k"]))
        out.sums = sums
        out.top = [(float(s), int(b), int(la), int(h), int(i), int(j))
                   for s, b, la, h, i, j in data["top"]]
        return out
