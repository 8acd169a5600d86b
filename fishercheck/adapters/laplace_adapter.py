"""laplace-torch behind the conformance protocol: an optional peer.

``laplace.Laplace(model, "classification", hessian_structure="diag", backend=CurvlinopsEF)``
fits the diagonal of the empirical Fisher of the summed cross-entropy over the data,
Σ_n g_n² (``la.H``, before the prior): the summed convention this adapter declares
(``unit_reduction = "sum"``). It takes only its own likelihood (``custom_loss = False``).
Needs the ``peers`` extra.
"""

from __future__ import annotations

import torch

from ._peers import private_copy, trainable, xy_batches


class LaplaceAdapter:
    """``Laplace(...).fit(loader).H`` (diagonal EF, summed over the data) as F."""

    name = "laplace-torch"
    families = ("classifier",)
    architectures = ("mlp", "cnn", "ln_gelu")
    custom_loss = False
    unit_reduction = "sum"

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """F = Σ w_u g_u² / W per parameter (the adapter protocol's empirical_fisher)."""
        from laplace import Laplace
        from laplace.curvature import CurvlinopsEF
        from torch.utils.data import DataLoader, TensorDataset

        parts = xy_batches(batches)
        data = TensorDataset(torch.cat([x for x, _, _ in parts]), torch.cat([y for _, y, _ in parts]))
        model = private_copy(model)  # Laplace hooks and wraps the model it is given
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                     backend=CurvlinopsEF)
        la.fit(DataLoader(data, batch_size=max(len(y) for _, y, _ in parts)))
        diag, out, start = la.H.detach(), {}, 0
        for n, p in trainable(model).items():
            out[n] = diag[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out
