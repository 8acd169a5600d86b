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

import torch

import fisher_fast
from fisher_ref.losses import CausalLMLoss as RefCausalLMLoss
from fisher_ref.losses import ClassifierLoss as RefClassifierLoss
from fisher_ref.testing.batches import concat_batches


def fast_loss(loss_fn):
    """fisher_fast's own built-in for fisher_ref's causal-LM and classifier losses; other
    callables as they are.
    """
    if isinstance(loss_fn, RefCausalLMLoss):
        return fisher_fast.CausalLMLoss(loss_fn.reduction)
    if isinstance(loss_fn, RefClassifierLoss):
        return fisher_fast.ClassifierLoss(loss_fn.reduction, input_key=loss_fn.input_key)
    return loss_fn


def _has_attention(model) -> bool:
    """Whether fisher_fast detects an attention layout (else groups by parameter or role)."""
    try:
        fisher_fast.attention_layout(model)
    except ValueError:
        return False
    return True


class FisherFastAdapter:
    """fisher_fast behind the adapter protocol (float64 accumulation).

    Both model families; of the classifiers, not the ViT: fisher_fast's per-sample capture
    does not take ``nn.MultiheadAttention`` yet (its forward returns a tuple and never calls
    its ``out_proj`` module).
    """

    name = "fisher_fast"
    families = ("causal_lm", "classifier")
    architectures = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox", "mlp", "cnn",
                     "ln_gelu")
    units = ("sample", "token")
    weightings = ("sample", "token")
    row_reductions = ("mean", "sum")
    dtype = torch.float64

    def _accumulate(self, model, batches, loss_fn, **options):
        acc = fisher_fast.FisherAccumulator(model, loss_fn=fast_loss(loss_fn), dtype=self.dtype,
                                            **options)
        for batch in batches:
            acc.update(batch)
        return acc

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """F = Σ w_u g_u² / W per parameter (the adapter protocol's empirical_fisher)."""
        # the lean E[g²]-only states, what a researcher streaming F uses
        return self._accumulate(model, batches, loss_fn, unit=unit, weighting=weighting,
                                statistics="fisher").empirical_fisher()

    def squared_mean_gradient(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """S = (Σ w_u g_u / W)² per parameter."""
        acc = self._accumulate(model, batches, loss_fn, unit=unit, weighting=weighting)
        return acc.squared_mean_gradient()

    def group_fisher(self, model, batches, *, loss_fn):
        """Per-parameter group means R(F) (heads where the model has attention, else roles)."""
        groups = "heads" if _has_attention(model) else "generic"
        return self._accumulate(model, batches, loss_fn, groups=groups).group_fisher()

    def per_sample_contributions(self, model, batches, *, loss_fn):
        """``(ids, {name: Tensor[U, *shape]})``: each unit's g_u²."""
        pu = fisher_fast.per_sample_contributions(model, concat_batches(batches),
                                              loss_fn=fast_loss(loss_fn), dtype=self.dtype)
        return pu.ids, pu.tensors

    def qkov_mask(self, model, layer, head, block):
        """The weight entries of the slice I(layer, head, block), biases excluded."""
        return fisher_fast.qkov_mask(model, layer, head, block, include_bias=False)

    def interference(self, model, batches_a, batches_b, *, loss_fn, signed=False, eps=1e-12):
        """M^B[i, j, l, h] per block with F̂ = task A's Fisher."""
        return fisher_fast.interference(model, concat_batches(batches_a), concat_batches(batches_b),
                                    loss_fn=fast_loss(loss_fn), fisher="a", signed=signed,
                                    eps=eps, dtype=self.dtype)

    def conflict_pvalues(self, model, batches_a, batches_b, *, loss_fn, n_permutations, seed):
        """``{group: p}``: one-sided permutation p-values of the mean between-task cosine."""
        result = fisher_fast.conflicts(model, concat_batches(batches_a), concat_batches(batches_b),
                                   loss_fn=fast_loss(loss_fn), n_permutations=n_permutations,
                                   seed=seed, n_bootstrap=10, dtype=self.dtype,
                                   groups="heads" if _has_attention(model) else "parameters")
        return {str(g): float(rec["p"]) for g, rec in result.items()}

    def exact_fisher(self, model, batches, *, loss_fn, unit="token"):
        """The true Fisher with the expectation over the classes taken exactly."""
        return fisher_fast.exact_fisher(model, concat_batches(batches), loss_fn=fast_loss(loss_fn),
                                        unit="token", dtype=self.dtype)

    def mc_fisher(self, model, batches, *, loss_fn, unit="token", n_samples=1, seed=0):
        """The Monte-Carlo true Fisher: labels drawn from the model, ``n_samples`` draws."""
        return fisher_fast.mc_fisher(model, concat_batches(batches), loss_fn=fast_loss(loss_fn),
                                     unit=unit, n_samples=n_samples, seed=seed, dtype=self.dtype)

    def fdr_qvalues(self, pvalues, *, method="bh"):
        """BH (or BY) q-values in the order of ``pvalues``."""
        if method not in ("bh", "by"):
            raise ValueError(f"method: expected 'bh' or 'by', got {method!r}.")
        return (fisher_fast.bh_qvalues if method == "bh" else fisher_fast.by_qvalues)(pvalues)


class FisherFast32Adapter(FisherFastAdapter):
    """fisher_fast's default float32 path, compared at the float32 tolerance."""

    name = "fisher_fast (float32)"
    dtype = torch.float32


def _to(x, device):
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
                           "per_sample_contributions", "interference", "conflict_pvalues",
                           "exact_fisher", "mc_fisher"):
            method = getattr(self, capability)
            if method is not None:
                setattr(self, capability, self._on_cuda(method))

    @staticmethod
    def _on_cuda(method):
        def call(model, *batch_lists, **options):
            cuda_model = copy.deepcopy(model).to("cuda")
            return method(cuda_model, *[_to(b, "cuda") for b in batch_lists], **options)
        return call
