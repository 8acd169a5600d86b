"""fisher_fast behind the conformance adapter protocol.

``FisherFastAdapter`` drives fisher_fast the way a user would: the per-parameter
estimators stream the batches through one ``FisherAccumulator`` (so the harness's split and
micro-batch properties test the real streaming path), everything else calls fisher_fast's
functions on the joined batches. ``dtype=float64`` (the default adapter) compares at
float64 tolerance; ``FisherFast32Adapter`` checks the default float32 path at the float32
tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

import fisher_fast
from fisher_ref.losses import CausalLMLoss as RefCausalLMLoss
from fisher_ref.testing.batches import concat_batches


def fast_loss(loss_fn: Callable) -> Callable:
    """fisher_fast's own built-in for fisher_ref's causal-LM loss; other callables as they are."""
    if isinstance(loss_fn, RefCausalLMLoss):
        return fisher_fast.CausalLMLoss(loss_fn.reduction)
    return loss_fn


class FisherFastAdapter:
    """fisher_fast behind the adapter protocol (float64 accumulation)."""

    name = "fisher_fast"
    units = ("sample", "token")
    weightings = ("sample", "token")
    dtype = torch.float64

    def _accumulate(self, model: torch.nn.Module, batches: list[dict], loss_fn: Callable,
                    **options) -> fisher_fast.FisherAccumulator:
        """One accumulator of ``self.dtype`` fed every batch in order."""
        acc = fisher_fast.FisherAccumulator(model, loss_fn=fast_loss(loss_fn), dtype=self.dtype,
                                            **options)
        for batch in batches:
            acc.update(batch)
        return acc

    def empirical_fisher(self, model: torch.nn.Module, batches: list[dict], *, loss_fn: Callable,
                         unit: str = "sample", weighting: str = "sample") -> dict:
        """E[g²] per parameter, streamed through the lean ``statistics="fisher"`` states."""
        # the lean E[g²]-only states, what a researcher streaming F uses
        return self._accumulate(model, batches, loss_fn, unit=unit, weighting=weighting,
                                statistics="fisher").empirical_fisher()

    def squared_mean_gradient(self, model: torch.nn.Module, batches: list[dict], *,
                              loss_fn: Callable, unit: str = "sample",
                              weighting: str = "sample") -> dict:
        """(E[g])² per parameter, streamed through one accumulator."""
        acc = self._accumulate(model, batches, loss_fn, unit=unit, weighting=weighting)
        return acc.squared_mean_gradient()

    def group_fisher(self, model: torch.nn.Module, batches: list[dict], *, loss_fn: Callable) -> dict:
        """Per-head group statistics (``groups="heads"``), streamed."""
        return self._accumulate(model, batches, loss_fn, groups="heads").group_fisher()

    def per_sample_contributions(self, model: torch.nn.Module, batches: list[dict], *,
                                 loss_fn: Callable) -> tuple[list, dict]:
        """``(ids, {name: Tensor[units, *param_shape]})``: each unit's g² on the joined batches."""
        pu = fisher_fast.per_sample_contributions(model, concat_batches(batches),
                                              loss_fn=fast_loss(loss_fn), dtype=self.dtype)
        return pu.ids, pu.tensors

    def qkov_mask(self, model: torch.nn.Module, layer: int, head: int, block: str) -> dict:
        """fisher_fast's mask of the weight slice I(layer, head, block)."""
        return fisher_fast.qkov_mask(model, layer, head, block, include_bias=False)

    def interference(self, model: torch.nn.Module, batches_a: list[dict], batches_b: list[dict], *,
                     loss_fn: Callable, signed: bool = False,
                     eps: float = 1e-12) -> fisher_fast.InterferenceResult:
        """QK-OV interference of the joined task-A batches on the joined task-B batches."""
        return fisher_fast.interference(model, concat_batches(batches_a), concat_batches(batches_b),
                                    loss_fn=fast_loss(loss_fn), fisher="a", signed=signed,
                                    eps=eps, dtype=self.dtype)

    def conflict_pvalues(self, model: torch.nn.Module, batches_a: list[dict], batches_b: list[dict],
                         *, loss_fn: Callable, n_permutations: int, seed: int) -> dict[str, float]:
        """``{group: permutation p-value}`` of the per-head conflict test."""
        result = fisher_fast.conflicts(model, concat_batches(batches_a), concat_batches(batches_b),
                                   loss_fn=fast_loss(loss_fn), n_permutations=n_permutations,
                                   seed=seed, n_bootstrap=10, dtype=self.dtype)
        return {str(g): float(rec["p"]) for g, rec in result.items()}

    def fdr_qvalues(self, pvalues: Sequence[float], *, method: str = "bh") -> Sequence[float]:
        """Benjamini–Hochberg (``"bh"``) or Benjamini–Yekutieli (``"by"``) q-values."""
        if method not in ("bh", "by"):
            raise ValueError(f"method: expected 'bh' or 'by', got {method!r}.")
        return (fisher_fast.bh_qvalues if method == "bh" else fisher_fast.by_qvalues)(pvalues)


class FisherFast32Adapter(FisherFastAdapter):
    """fisher_fast's default float32 path, compared at the float32 tolerance."""

    name = "fisher_fast (float32)"
    dtype = torch.float32


def _to(x: object, device: str) -> object:
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    return x.to(device) if isinstance(x, torch.Tensor) else x


class FisherFastCudaAdapter(FisherFastAdapter):
    """fisher_fast on a CUDA device (float64): each call runs on a CUDA copy of the model and
    batches, so the harness checks the GPU path against the CPU oracle.
    """

    name = "fisher_fast (cuda, float64)"

    def __init__(self):
        if not torch.cuda.is_available():
            raise ValueError("fisher_fast_cuda: expected a CUDA device, got none.")
        super().__init__()
        for capability in ("empirical_fisher", "squared_mean_gradient", "group_fisher",
                           "per_sample_contributions", "interference", "conflict_pvalues"):
            method = getattr(self, capability)
            if method is not None:
                setattr(self, capability, self._on_cuda(method))

    @staticmethod
    def _on_cuda(method: Callable) -> Callable:
        def call(model: torch.nn.Module, *batch_lists: list[dict], **options) -> object:
            cuda_model = copy.deepcopy(model).to("cuda")
            return method(cuda_model, *[_to(b, "cuda") for b in batch_lists], **options)
        return call
