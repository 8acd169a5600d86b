"""BackPACK (``backpack-for-pytorch``) behind the conformance protocol: an optional peer.

BackPACK extends a ``torch.nn.Sequential`` of supported layers and a torch loss module;
one backward then also gives ``SumGradSquared`` (Σ_n g_n² of the summed loss, the
convention this adapter declares: ``unit_reduction = "sum"``) and ``BatchGrad`` (the
per-sample gradients). It takes only its own loss modules (``custom_loss = False``) and
supports Linear and Conv2d with parameter-free activations (not LayerNorm, GELU or
attention). Needs the ``peers`` extra.
"""

from __future__ import annotations

import torch

from ._peers import private_copy, trainable, xy_batches


def _extended(model):
    from backpack import extend

    return extend(private_copy(model)), extend(torch.nn.CrossEntropyLoss(reduction="sum"))


class BackPACKAdapter:
    """``SumGradSquared`` as F (summed convention) and ``BatchGrad`` per-sample gradients."""

    name = "BackPACK"
    families = ("classifier",)
    architectures = ("mlp", "cnn")
    custom_loss = False
    unit_reduction = "sum"

    def _run(self, model, batches, extension):
        from backpack import backpack

        net, loss = _extended(model)
        params = trainable(net)
        for X, y, ids in xy_batches(batches):
            net.zero_grad()
            with backpack(extension()):
                loss(net(X), y).backward()
            yield ids, params

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """F = Σ w_u g_u² / W per parameter (the adapter protocol's empirical_fisher)."""
        from backpack.extensions import SumGradSquared

        total = {}
        for _, params in self._run(model, batches, SumGradSquared):
            for n, p in params.items():
                total[n] = total.get(n, 0) + p.sum_grad_squared.detach().clone()
        return total

    def squared_mean_gradient(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """S = (Σ w_u g_u / W)² per parameter."""
        from backpack.extensions import BatchGrad

        total = {}
        for _, params in self._run(model, batches, BatchGrad):
            for n, p in params.items():
                total[n] = total.get(n, 0) + p.grad_batch.detach().sum(0)
        return {n: g.square() for n, g in total.items()}  # (Σ g)²: the summed convention

    def per_sample_contributions(self, model, batches, *, loss_fn):
        """``(ids, {name: Tensor[U, *shape]})``: each unit's g_u²."""
        from backpack.extensions import BatchGrad

        ids, parts = [], {}
        for batch_ids, params in self._run(model, batches, BatchGrad):
            ids += batch_ids
            for n, p in params.items():
                parts.setdefault(n, []).append(p.grad_batch.detach().square())
        return ids, {n: torch.cat(v) for n, v in parts.items()}
