"""nngeometry behind the conformance protocol: an optional peer.

``nngeometry.metrics.FIM(..., variant="classif_logits")`` is the true Fisher of a softmax
classifier with the expectation over the classes in closed form (Pascanu and Bengio), its
mean over the examples; ``FIM_MonteCarlo`` samples the labels instead. In ``PMatDiag``
form the diagonal is a flat vector, layer by layer (weight, then bias). It takes only the
model and a data loader (``custom_loss = False``) and supports Linear, Conv2d and LayerNorm
layers. Its closed form builds a helper matrix in torch's default dtype, so a float64 model
needs ``torch.set_default_dtype(torch.float64)`` around the call (done here, and restored).
It hooks the model it is given: the adapter hands it a private copy. Needs the ``peers``
extra.
"""

from __future__ import annotations

import contextlib

import torch

from ._peers import private_copy, trainable, xy_batches


@contextlib.contextmanager
def _default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _loader(batches):
    from torch.utils.data import DataLoader, TensorDataset

    parts = xy_batches(batches)
    X = torch.cat([x for x, _, _ in parts])
    y = torch.cat([t for _, t, _ in parts])
    return DataLoader(TensorDataset(X, y), batch_size=len(y))


def _unflatten(model, diag: torch.Tensor) -> dict:
    """The flat ``PMatDiag`` diagonal as ``{parameter name: tensor}``."""
    from nngeometry.layercollection import LayerCollection

    lc = LayerCollection.from_model(model)
    params = trainable(model)
    out = {}
    for layer, start in lc.p_pos.items():
        for local in ("weight", "bias"):
            name = f"{layer}.{local}" if layer else local
            if name in params:
                n = params[name].numel()
                out[name] = diag[start:start + n].reshape(params[name].shape)
                start += n
    return out


class NNGeometryAdapter:
    """``FIM`` (exact expectation) and ``FIM_MonteCarlo`` as the true Fisher, diagonal."""

    name = "nngeometry"
    families = ("classifier",)
    architectures = ("mlp", "cnn", "ln_gelu")
    custom_loss = False

    def exact_fisher(self, model, batches, *, loss_fn, unit="sample"):
        """The true Fisher with the expectation over the classes taken exactly."""
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag

        net = private_copy(model)
        with _default_dtype(next(net.parameters()).dtype):
            fim = FIM(net, _loader(batches), PMatDiag, variant="classif_logits")
            return _unflatten(net, fim.get_diag().detach())

    def mc_fisher(self, model, batches, *, loss_fn, unit="sample", n_samples=1, seed=0):
        """The Monte-Carlo true Fisher: labels drawn from the model, ``n_samples`` draws."""
        from nngeometry.metrics import FIM_MonteCarlo
        from nngeometry.object import PMatDiag

        net = private_copy(model)
        with torch.random.fork_rng(devices=[]), _default_dtype(next(net.parameters()).dtype):
            torch.manual_seed(seed)
            fim = FIM_MonteCarlo(net, _loader(batches), PMatDiag, variant="classif_logits",
                                 trials=n_samples)
            return _unflatten(net, fim.get_diag().detach())
