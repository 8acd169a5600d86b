"""The reference adapter: a thin wrapper over fisher_ref's slow path (the oracle).

``fishercheck conform --impl fisher_ref.conformance.builtin_adapters:ReferenceAdapter``
checks the oracle against itself and against the identities (a sanity check of the
harness); the properties also use it as the oracle for every other adapter. The adapter
for ``fisher_fast`` lives in ``fishercheck.adapters`` (fisher_ref never imports fisher_fast).
"""

from __future__ import annotations

import importlib
import types

import torch

from fisher_ref.conformance.cases import join

_MODULES = ("fisher_ref", "fisher_ref.gradient_moments", "fisher_ref.units",
            "fisher_ref.contributions", "fisher_ref.groups", "fisher_ref.slicing",
            "fisher_ref.layouts", "fisher_ref.interference", "fisher_ref.conflicts",
            "fisher_ref.fdr", "fisher_ref.semantic_check")


def ref(name: str):
    """The fisher_ref function ``name`` (from the package, or the module that defines it)."""
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        obj = getattr(module, name, None)
        if callable(obj) and not isinstance(obj, types.ModuleType):
            return obj
    raise ValueError(f"fisher_ref: expected a public function {name!r}, found none in {_MODULES}.")


def has_attention(model) -> bool:
    """Whether fisher_ref detects an attention layout in ``model``."""
    try:
        ref("attention_layout")(model)
    except ValueError:
        return False
    return True


class ReferenceAdapter:
    """fisher_ref behind the adapter protocol: every capability, float64, one unit at a time.

    Each capability joins the batches into one (the oracle's result does not depend on the
    split) and calls the fisher_ref function of the same meaning. Conflicts are grouped by
    QK-OV slice on models with an attention layout, by parameter otherwise.
    """

    name = "fisher_ref"
    families = ("causal_lm", "classifier")
    units = ("sample", "token")
    weightings = ("sample", "token")
    row_reductions = ("mean", "sum")
    dtype = torch.float64

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """F = Σ w_u g_u² / W per parameter (the adapter protocol's empirical_fisher)."""
        return dict(ref("empirical_fisher")(model, join(batches), loss_fn=loss_fn, unit=unit,
                                             weighting=weighting))

    def squared_mean_gradient(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """S = (Σ w_u g_u / W)² per parameter."""
        return dict(ref("squared_mean_gradient")(model, join(batches), loss_fn=loss_fn,
                                                  unit=unit, weighting=weighting))

    def group_fisher(self, model, batches, *, loss_fn):
        """Per-parameter group means R(F) (heads where the model has attention, else roles)."""
        groups = "heads" if has_attention(model) else "generic"
        return ref("group_fisher")(model, join(batches), loss_fn=loss_fn, groups=groups)

    def per_sample_contributions(self, model, batches, *, loss_fn):
        """``(ids, {name: Tensor[U, *shape]})``: each unit's g_u²."""
        try:
            pu = ref("per_sample_contributions")(model, join(batches), loss_fn=loss_fn)
        except ValueError as exc:
            if "expected a public function" not in str(exc):
                raise
            pu = ref("per_sample_gradients")(model, join(batches), loss_fn=loss_fn)
            return pu.ids, {k: g.square() for k, g in pu.tensors.items()}
        return pu.ids, pu.tensors

    def per_sample_gradients(self, model, batches, *, loss_fn):
        """Not a capability: the oracle's per-sample gradients, used by identity checks."""
        pu = ref("per_sample_gradients")(model, join(batches), loss_fn=loss_fn)
        return pu.ids, pu.tensors

    def per_unit(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        """Not a capability: the oracle's ``PerUnit`` gradients (diagnoses and weights)."""
        return ref("per_sample_gradients")(model, join(batches), loss_fn=loss_fn, unit=unit,
                                           weighting=weighting)

    def exact_fisher(self, model, batches, *, loss_fn, unit="token"):
        """The true Fisher with the expectation over the classes taken exactly."""
        return dict(ref("exact_fisher")(model, join(batches), loss_fn=loss_fn, unit="token"))

    def mc_fisher(self, model, batches, *, loss_fn, unit="token", n_samples=1, seed=0):
        """The Monte-Carlo true Fisher: labels drawn from the model, ``n_samples`` draws."""
        return dict(ref("mc_fisher")(model, join(batches), loss_fn=loss_fn, unit=unit,
                                     n_samples=n_samples, seed=seed))

    def attention_layout(self, model):
        """Not a capability: the oracle's detected layout, used by the slicing properties."""
        return ref("attention_layout")(model)

    def qkov_mask(self, model, layer, head, block):
        """The weight entries of the slice I(layer, head, block), biases excluded."""
        return ref("qkov_mask")(model, layer, head, block, include_bias=False)

    def interference(self, model, batches_a, batches_b, *, loss_fn, signed=False, eps=1e-12):
        """M^B[i, j, l, h] per block with F̂ = task A's Fisher."""
        return ref("interference")(model, join(batches_a), join(batches_b), loss_fn=loss_fn,
                                   fisher="a", signed=signed, eps=eps)

    def conflict_pvalues(self, model, batches_a, batches_b, *, loss_fn, n_permutations, seed):
        """``{group: p}``: one-sided permutation p-values of the mean between-task cosine."""
        groups = "heads" if has_attention(model) else "parameters"
        result = ref("conflicts")(model, join(batches_a), join(batches_b), loss_fn=loss_fn,
                                  groups=groups, n_permutations=n_permutations, seed=seed,
                                  n_bootstrap=10)
        return _pvalues(result)

    def fdr_qvalues(self, pvalues, *, method="bh"):
        """BH (or BY) q-values in the order of ``pvalues``."""
        if method not in ("bh", "by"):
            raise ValueError(f"method: expected 'bh' or 'by', got {method!r}.")
        return ref(f"{method}_qvalues")(pvalues)


def _pvalues(result) -> dict:
    """``{group: p}`` from a conflicts result: a mapping group -> record with a ``p`` entry,
    or an object/mapping whose ``groups`` and ``p`` fields align.
    """
    groups = result.get("groups") if isinstance(result, dict) else getattr(result, "groups", None)
    if groups is not None and not hasattr(groups, "items"):
        p = result["p"] if isinstance(result, dict) else result.p
        return {str(g): float(v) for g, v in zip(groups, list(p), strict=False)}
    source = groups if groups is not None else result
    out = {}
    for g, rec in source.items():
        p = rec["p"] if isinstance(rec, dict) else rec.p
        out[str(g)] = float(p)
    return out
