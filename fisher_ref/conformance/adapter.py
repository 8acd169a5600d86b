"""The adapter protocol: how an implementation under test exposes what it computes.

An *adapter* is any object (a class instance, a class, or a module) whose optional
capabilities are methods with the names and signatures below. The harness calls only the
capabilities an adapter has; a missing one is reported as "not provided", never as passed.

Conventions shared by every capability (../shared/SPEC.md §0–§1):

- ``model``: a tiny Hugging Face model in eval mode (``float64`` unless the adapter sets
  ``dtype``), built by the harness. Adapters must not change its parameters.
- ``batches``: the data split as the implementation would see it, a ``list[dict]``. Each
  batch is HF-style (``input_ids``, ``attention_mask``, ``labels`` with ignore index -100)
  plus ``sample_ids``: a list with one id per row, unique across the whole split, ``str`` or
  ``int``, opaque (``"doc_1_a"`` is one id; never parse it). Every key except
  ``sample_ids`` is what the model takes.
- ``loss_fn``: ``loss_fn(model, batch) -> Tensor[B]``, each row's loss from one batched
  forward. By default it is the SPEC causal-LM loss with ``reduction="mean"`` (HF shift: the
  logits at t predict the label at t + 1; a row's loss is the mean NLL over its active label
  tokens), an object that also has ``reduction``, ``token_counts(batch)`` and
  ``logits_and_targets(model, batch)``. The harness passes other callables (for instance the
  same loss times a constant c) to test scaling, so an adapter should use it.
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
    rest by role). A value may also be a dict
    with a ``"mean"`` entry.
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
    -> ``dict[str, float]``: per group (any grouping: parameters or QK-OV slices), the
    one-sided permutation p-value of the mean between-task cosine (SPEC §7).
``fdr_qvalues(pvalues, *, method="bh")``
    -> a sequence of q-values in the order of ``pvalues`` (``method`` "bh" or "by").

Optional attributes: ``name`` (shown in reports), ``units`` and ``weightings`` (the values
of ``unit`` / ``weighting`` the estimators support, default ``("sample",)``), ``dtype``
(``torch.float64``, the default, or ``torch.float32``: the harness builds its models in
that dtype and compares at the matching row of the tolerance table) and ``architectures``
(HF ``model_type`` values the adapter supports; the harness draws only those).
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
)

ALL_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox")


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
    dtype = adapter_option(adapter, "dtype", torch.float64)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"adapter dtype: expected torch.float64 or torch.float32, got {dtype!r}.")
    return dtype


def adapter_architectures(adapter) -> tuple[str, ...]:
    archs = tuple(adapter_option(adapter, "architectures", ALL_ARCHITECTURES))
    unknown = [a for a in archs if a not in ALL_ARCHITECTURES]
    if unknown or not archs:
        raise ValueError(
            f"adapter architectures: expected a non-empty subset of {ALL_ARCHITECTURES}, got {archs}."
        )
    return archs


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
