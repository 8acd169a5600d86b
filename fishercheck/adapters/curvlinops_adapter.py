"""curvlinops behind the conformance protocol: an optional peer.

``curvlinops.EFLinearOperator`` is the empirical Fisher of a torch loss module as a linear
operator over the flattened parameters; with ``CrossEntropyLoss(reduction="mean")`` it is
(1/N) Σ_n g_n g_nᵀ, the SPEC's mean convention. Its diagonal is read off by multiplying it
onto the identity (the harness's models have a few hundred parameters). It takes only its
own loss modules (``custom_loss = False``) and models that forward-mode AD differentiates:
not torch's ``nn.MultiheadAttention`` (its fused kernel ``_native_multi_head_attention`` has
no forward AD), so not the ViT. Needs the ``peers`` extra.
"""

from __future__ import annotations

import torch

from ._peers import private_copy, trainable, xy_batches


class CurvlinopsAdapter:
    """The diagonal of ``EFLinearOperator``."""

    name = "curvlinops"
    families = ("classifier",)
    architectures = ("mlp", "cnn", "ln_gelu")
    custom_loss = False

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """F = Σ w_u g_u² / W per parameter (the adapter protocol's empirical_fisher)."""
        from curvlinops import EFLinearOperator

        model = private_copy(model)
        params = trainable(model)
        data = [(X, y) for X, y, _ in xy_batches(batches)]
        op = EFLinearOperator(model, torch.nn.CrossEntropyLoss(reduction="mean"),
                              list(params.values()), data, check_deterministic=False)
        dim = sum(p.numel() for p in params.values())
        eye = torch.eye(dim, dtype=next(iter(params.values())).dtype)
        diag = (op @ eye).diagonal()
        out, start = {}, 0
        for n, p in params.items():
            out[n] = diag[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out
