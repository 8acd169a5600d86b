"""The adapter protocol: how an implementation under test exposes what it computes.

An *adapter* is any object (a class instance, a class, or a module) whose optional
capabilities are methods with the names and signatures below. The harness calls only the
capabilities an adapter has; a missing one is reported as "not provided", never as passed.

Conventions shared by every capability (../shared/SPEC.md §0–§1):

- ``model``: built by the harness, in eval mode (``float64`` unless the adapter sets
  ``dtype``), of one of two *families*: ``"causal_lm"``, a tiny Hugging Face causal LM, or
  ``"classifier"``, a tiny ``torch.nn`` classifier (MLP, CNN, LayerNorm/GELU net, or a ViT
  with ``nn.MultiheadAttention``; ``fisher_ref.testing.classifiers``) taking one
  positional input. Adapters must not change its parameters.
- ``batches``: the data split as the implementation would see it, a ``list[dict]``. A
  causal-LM batch is HF-style (``input_ids``, ``attention_mask``, ``labels`` with ignore
  index -100; every key except ``sample_ids`` is what the model takes); a classifier batch
  is ``{"input": Tensor[B, ...], "labels": LongTensor[B]}`` (``model(batch["input"])``
  gives logits ``[B, C]``; label -100: an empty row). Both carry ``sample_ids``: a list
  with one id per row, unique across the whole split, ``str`` or ``int`` (never equal to
  the row's position), opaque (``"doc_1_a"`` is one id; never parse it).
- ``loss_fn``: ``loss_fn(model, batch) -> Tensor[B]``, each row's loss from one batched
  forward. By default it is the SPEC causal-LM loss (HF shift: the logits at t predict the
  label at t + 1; a row's loss is the mean, or with ``reduction="sum"`` the sum, of the NLL
  over its active label tokens) or, for a classifier, ``fisher_ref.losses.ClassifierLoss``:
  objects that also have ``reduction``, ``token_counts(batch)`` and
  ``logits_and_targets(model, batch)``. The harness passes other callables (the same loss
  times a constant c; a loss on other labels) to check that the adapter uses the one given.
- Rows whose labels are all -100 (empty rows) are excluded from every statistic.

Capabilities (all optional; ``Tensor`` values keyed by ``model.named_parameters()`` names,
trainable parameters only, a tied parameter once):

``empirical_fisher(model, batches, *, loss_fn, unit="sample", weighting="sample")``
    -> ``dict[str, Tensor]`` shaped like the parameters: F = Σ w_u g_u² / W.
``squared_mean_gradient(model, batches, *, loss_fn, unit="sample", weighting="sample")``
    -> ``dict[str, Tensor]``: S = (Σ w_u g_u / W)².
``group_fisher(model, batches, *, loss_fn)``
    -> ``dict[str, Tensor]``: per parameter, the 1-D tensor of group means R(F) in the group
    order of docs/architecture.md with ``groups="heads"`` (attention tensors by head, the
    rest by role; a model without an attention layout entirely by role). A value may also
    be a dict with a ``"mean"`` entry.
``per_sample_contributions(model, batches, *, loss_fn)``
    -> ``(ids, tensors)`` or an object with ``.ids`` and ``.tensors``: ``ids`` the callers'
    sample ids of the non-empty rows, ``tensors[name]`` of shape ``[U, *param.shape]`` with
    ``tensors[name][k] = g_{ids[k]}²`` at full parameter shape.
``qkov_mask(model, layer, head, block)``
    -> ``dict[str, BoolTensor]``: for block in "Q", "K", "V", "O", the weight entries of the
    QK-OV slice I(layer, head, block) (SPEC §4, biases excluded), only parameters it touches.
``interference(model, batches_a, batches_b, *, loss_fn, signed=False, eps=1e-12)``
    -> ``dict[str, Tensor[N_A, N_B, L, H]]`` for blocks "Q", "K", "V", "O" (SPEC §6), with
    F̂ = the empirical Fisher of task A, slices without biases.
``conflict_pvalues(model, batches_a, batches_b, *, loss_fn, n_permutations, seed)``
    -> ``dict[str, float]``: per group, the one-sided permutation p-value of the mean
    between-task cosine (SPEC §7). Groups named by parameter (``model.named_parameters()``)
    or by QK-OV slice (``"L{l}.H{h}.{B}"``) are compared with the oracle's p-values;
    ``pvalues_direction`` checks any grouping.
``fdr_qvalues(pvalues, *, method="bh")``
    -> a sequence of q-values in the order of ``pvalues`` (``method`` "bh" or "by").
``exact_fisher(model, batches, *, loss_fn, unit)``
    -> ``dict[str, Tensor]``: the true Fisher with the expectation over the classes taken
    exactly, Σ_c p_c (∇ −log p_c)² averaged over units (SPEC §2). The harness passes
    ``unit="token"`` for causal LMs (needs ``"token"`` in ``units``) and ``unit="sample"``
    for classifiers (one label per row: a sample is a token).
``mc_fisher(model, batches, *, loss_fn, unit, n_samples, seed)``
    -> ``dict[str, Tensor]``: the Monte-Carlo true Fisher, labels drawn from the model's own
    predictive distribution, ``n_samples`` draws averaged (any random stream).

Optional attributes:

- ``name`` (shown in reports);
- ``families``: the model families the adapter supports, default ``("causal_lm",)``;
- ``architectures``: the architectures it supports (HF ``model_type`` values ``gpt2``,
  ``llama``, ``mistral``, ``qwen2``, ``phi3``, ``gpt_neox``; classifiers ``mlp``, ``cnn``,
  ``ln_gelu``, ``vit``), default every architecture of its families; the harness draws
  only those;
- ``units`` and ``weightings``: the values of ``unit`` / ``weighting`` the estimators
  support, default ``("sample",)``;
- ``row_reductions``: the per-row reductions of the loss (``loss_fn.reduction``) the
  adapter handles, default ``("mean",)``; with ``("mean", "sum")`` the harness draws both;
- ``unit_reduction``: ``"mean"`` (default, SPEC: F = Σ w_u g_u² / W, S = ḡ²) or ``"sum"``
  (the convention of a summed loss Σ_u ℓ_u: F = Σ w_u g_u², S = (Σ w_u g_u)², group
  Fisher and the true Fisher summed likewise); the harness scales its expectations;
- ``custom_loss``: True (default) when the adapter computes with the ``loss_fn`` it is
  given; False for a library that takes only its own loss modules (it may read
  ``loss_fn.reduction``): ``uses_callers_loss`` and ``loss_scaling`` are then not provided;
- ``dtype``: ``torch.float64`` (default) or ``torch.float32``: the harness builds its models
  in that dtype and compares at the matching row of the tolerance table.
"""

from __future__ import annotations

import importlib

import torch

CAPABILITIES = (
    "empirical_fisher",
    "squared_mean_gradient",
    "group_fisher",
    "per_sample_contributions",
    "qkov_mask",
    "interference",
    "conflict_pvalues",
    "fdr_qvalues",
    "exact_fisher",
    "mc_fisher",
)

FAMILY_ARCHITECTURES = {
    "causal_lm": ("gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox"),
    "classifier": ("mlp", "cnn", "ln_gelu", "vit"),
}
ALL_ARCHITECTURES = tuple(a for archs in FAMILY_ARCHITECTURES.values() for a in archs)
UNIT_REDUCTIONS = ("mean", "sum")


def provided(adapter) -> tuple[str, ...]:
    """The capabilities ``adapter`` provides, in the order of ``CAPABILITIES``."""
    return tuple(c for c in CAPABILITIES if callable(getattr(adapter, c, None)))


def adapter_name(adapter) -> str:
    """A display name: ``adapter.name``, else the module or class name."""
    name = getattr(adapter, "name", None)
    if isinstance(name, str):
        return name
    if hasattr(adapter, "__name__"):
        return adapter.__name__
    return type(adapter).__name__


def adapter_option(adapter, attr: str, default):
    """An optional attribute of the adapter, or ``default``."""
    value = getattr(adapter, attr, None)
    return default if value is None else value


def adapter_dtype(adapter) -> torch.dtype:
    """The adapter's ``dtype`` (float64 or float32), checked."""
    dtype = adapter_option(adapter, "dtype", torch.float64)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"adapter dtype: expected torch.float64 or torch.float32, got {dtype!r}.")
    return dtype


def adapter_families(adapter) -> tuple[str, ...]:
    """The adapter's model ``families`` (default ``("causal_lm",)``), checked."""
    families = tuple(adapter_option(adapter, "families", ("causal_lm",)))
    if not families or any(f not in FAMILY_ARCHITECTURES for f in families):
        raise ValueError(f"adapter families: expected a non-empty subset of "
                         f"{tuple(FAMILY_ARCHITECTURES)}, got {families}.")
    return families


def adapter_architectures(adapter) -> tuple[str, ...]:
    """The architectures the harness may draw for the adapter: its ``architectures`` (default
    every architecture of its families), each of a declared family.
    """
    families = adapter_families(adapter)
    allowed = tuple(a for f in families for a in FAMILY_ARCHITECTURES[f])
    archs = tuple(adapter_option(adapter, "architectures", allowed))
    unknown = [a for a in archs if a not in ALL_ARCHITECTURES]
    if unknown or not archs:
        raise ValueError(
            f"adapter architectures: expected a non-empty subset of {ALL_ARCHITECTURES}, got {archs}."
        )
    outside = [a for a in archs if a not in allowed]
    if outside:
        raise ValueError(f"adapter architectures: expected architectures of its families "
                         f"{families} ({allowed}), got {outside}: declare the family in "
                         f"`families`.")
    return archs


def adapter_unit_reduction(adapter) -> str:
    """``"mean"`` (SPEC) or ``"sum"``: how the adapter's estimators reduce over units."""
    value = adapter_option(adapter, "unit_reduction", "mean")
    if value not in UNIT_REDUCTIONS:
        raise ValueError(f"adapter unit_reduction: expected one of {UNIT_REDUCTIONS}, got {value!r}.")
    return value


def adapter_row_reductions(adapter) -> tuple[str, ...]:
    """The per-row loss reductions the harness may draw (default ``("mean",)``), checked."""
    value = tuple(adapter_option(adapter, "row_reductions", ("mean",)))
    if not value or any(v not in ("mean", "sum") for v in value):
        raise ValueError(f"adapter row_reductions: expected a non-empty subset of ('mean', 'sum'), "
                         f"got {value}.")
    return value


def load_adapter(spec: str):
    """Resolve ``"package.module:object"`` (or ``"package.module"``) to an adapter.

    A class is instantiated with no arguments; a module or any other object is used as is.
    A module that defines ``conformance_adapter`` (an object or a zero-argument callable
    returning one) is resolved to it, so ``--impl fisher_fast`` can name a package.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"adapter spec: expected 'package.module:object', got {spec!r}.")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"adapter spec {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module itself fails (a SyntaxError, an error at import)
        raise ValueError(f"adapter spec {spec!r}: importing {module_name!r} raised "
                         f"{type(exc).__name__}: {exc}") from exc
    if not attr:
        obj = getattr(module, "conformance_adapter", module)
    else:
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"adapter spec {spec!r}: module {module_name!r} has no {attr!r}.")
            obj = getattr(obj, part)
    try:
        if isinstance(obj, type):
            return obj()
        if callable(obj) and not provided(obj) and not hasattr(obj, "__file__"):
            return obj()  # a zero-argument factory
    except TypeError as exc:
        raise ValueError(f"adapter spec {spec!r}: expected a class or factory callable with no "
                         f"arguments, got {type(exc).__name__}: {exc}") from exc
    return obj
