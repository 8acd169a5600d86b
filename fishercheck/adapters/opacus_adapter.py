"""Opacus behind the conformance protocol: an optional peer.

Opacus' ``GradSampleModule`` computes per-sample gradients (``p.grad_sample``) during a
backward pass of a summed loss; this adapter backpropagates the caller's own
``loss_fn(model, batch)`` summed over rows (``custom_loss``), so any per-row loss works.
Supports Linear, Conv2d, LayerNorm and parameter-free activations; not torch's
``nn.MultiheadAttention`` (Opacus swaps in its own ``DPMultiheadAttention``). It records
activations only in training mode, so its private copy of the model is switched to
``train()`` (the harness's models have no dropout or batch statistics). Needs the ``peers``
extra.
"""

from __future__ import annotations

import torch

from ._peers import private_copy, trainable


class OpacusAdapter:
    """F, S and contributions from Opacus' per-sample gradients of the caller's loss."""

    name = "Opacus"
    families = ("classifier",)
    architectures = ("mlp", "cnn", "ln_gelu")
    row_reductions = ("mean", "sum")

    def _per_sample(self, model, batches, loss_fn):
        from opacus import GradSampleModule

        # Opacus records activations only in training mode; the harness's models have no
        # dropout or batch statistics, so train mode computes the same function
        net = GradSampleModule(private_copy(model).train(), loss_reduction="sum")
        params = trainable(net._module)
        ids, grads = [], {n: [] for n in params}
        for b in batches:
            rows = {k: v for k, v in b.items() if k != "sample_ids"}
            counts = loss_fn.token_counts(rows) if hasattr(loss_fn, "token_counts") else None
            keep = torch.ones(len(b["sample_ids"]), dtype=torch.bool) if counts is None else counts > 0
            if not bool(keep.any()):
                continue
            net.zero_grad()
            for p in params.values():
                p.grad_sample = None
            loss_fn(net, rows).sum().backward()
            ids += [i for i, k in zip(b["sample_ids"], keep.tolist(), strict=True) if k]
            for n, p in params.items():
                grads[n].append(p.grad_sample.detach()[keep].to(torch.float64))
        return ids, {n: torch.cat(v) for n, v in grads.items()}

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """F = Σ w_u g_u² / W per parameter (the adapter protocol's empirical_fisher)."""
        _, g = self._per_sample(model, batches, loss_fn)
        return {n: v.square().mean(0) for n, v in g.items()}

    def squared_mean_gradient(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """S = (Σ w_u g_u / W)² per parameter."""
        _, g = self._per_sample(model, batches, loss_fn)
        return {n: v.mean(0).square() for n, v in g.items()}

    def per_sample_contributions(self, model, batches, *, loss_fn):
        """``(ids, {name: Tensor[U, *shape]})``: each unit's g_u²."""
        ids, g = self._per_sample(model, batches, loss_fn)
        return ids, {n: v.square() for n, v in g.items()}
