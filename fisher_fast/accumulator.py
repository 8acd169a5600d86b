"""``FisherAccumulator``: streaming per-task Fisher statistics on the device (SPEC §8, §10).

Each ``update`` computes the batch's whole contribution first (every chunk), then commits it
with one Chan merge per state, so a failed update leaves the accumulator exactly as it was,
and any split of the data into updates, and any chunk size, gives the same result up to
rounding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from .attention.layouts import AttentionLayout
from .batching.checks import (
    check_choice,
    check_model,
    check_positive_int,
    check_seed,
    check_unseen_ids,
    id_hashes,
    split_batch,
)
from .batching.label_draws import row_uniforms
from .batching.units import aligned_targets, with_shared_draws
from .capture.plan import build_plan
from .file_integrity import PathLike, readable_file, writable_path
from .losses import has_token_protocol
from .results import FisherResult, LossFn, SampleIds
from .run.batch_statistics import Keep, accumulate_batch
from .run.chunks import model_device
from .run.options import Options, check_device, check_flag
from .stats import readout
from .stats.groups import resolve_groups
from .stats.task_state import TaskState

LABELS = ("true", "mc")
STATISTICS = ("all", "fisher")


class FisherAccumulator:
    r"""Streaming diagonal Fisher statistics, per task.

    .. math::

        W = \sum_u w_u, \quad \bar g = \frac{1}{W}\sum_u w_u g_u, \quad
        F = \frac{1}{W}\sum_u w_u g_u^2, \quad S = \bar g^2, \quad V = F - S

    kept as Welford/Chan states (W, mean, M2) per parameter element (and per group with
    ``groups``). In float32, |F̂ − F| / F ≤ 2 ε_g + (s + m + 4) · 2⁻²⁴ for per-unit gradients
    of relative error ε_g, chunks of s units and m chunk merges (docs/fisher_fast.md); ask
    for ``dtype=torch.float64`` (and a float64 model) for the float64 path.

    Args:
        model: the model (eval mode, rows independent; SPEC §0): layers that couple rows or
            draw at random are refused before each update's forward (``batching/row_coupling.py``).
        loss_fn: per-row loss (default ``causal_lm_loss``).
        device: where the states live (default: the model's device).
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        unit, weighting: as in SPEC §1.
        chunk_size: forward rows per chunk (default from ``memory_budget``).
        memory_budget: bytes (default a fraction of free device memory / available RAM).
        groups: ``None`` (no group statistics), ``"generic"``, ``"heads"`` or a dict of ids.
        layout: attention layout for ``groups="heads"``.
        micro_batch_sizes: micro-batch sizes b for which ``batch_squared_gradient(b)`` is kept.
        elements: keep per-element moments (set False to keep only group statistics, which
            lets Linear/Conv1D weights use Gram products instead of per-row gradients).
        allow_tf32: allow TF32 CUDA matmuls (off by default).
        autocast: ``None`` (default) or ``torch.bfloat16``: the bf16 fast path, each chunk's
            forward under ``torch.autocast``. Per-row products and statistics stay in
            ``dtype``, but the gradients themselves come from bf16 matmuls (8-bit mantissa):
            expect ~1e-2 relative error in F (docs/fisher_fast.md), and MC labels drawn from
            the bf16 logits. Never the default.
        labels: ``"true"`` (default: the batch's labels) or ``"mc"``: every unit's labels
            drawn ``n_samples`` times from the model's own predictive distribution, seeded
            per sample id exactly as ``mc_fisher`` (docs/architecture.md), so that
            ``empirical_fisher(task)`` is the MC Fisher
            :math:`\frac{1}{n}\sum_k \frac{1}{W}\sum_u w_u (\nabla\ell_u(\tilde y^{(k)}))^2`
            of all the units seen, for any split into updates and any chunk size.
            Only ``empirical_fisher`` and ``group_fisher`` are offered then (the other
            estimators are defined for the true labels), and no ``micro_batch_sizes``.
        n_samples, seed: label draws per unit and their seed (``labels="mc"`` only).
        statistics: ``"all"`` (default): per-element Welford states (W, mean, M2), from which
            every estimator follows; ``"fisher"``: E[g²] alone (``moments.SecondMoment``: one
            array per parameter instead of two, cheaper updates), for streaming F over many
            batches (EWC, pruning, merging); then only ``empirical_fisher`` (and
            ``group_fisher``, ``batch_squared_gradient``) are offered.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None = None, *,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 unit: str = "sample", weighting: str = "sample", chunk_size: int | None = None,
                 memory_budget: float | None = None, groups: str | dict | None = None,
                 layout: AttentionLayout | dict | None = None, micro_batch_sizes: tuple = (),
                 elements: bool = True, allow_tf32: bool = False,
                 autocast: torch.dtype | None = None, labels: str = "true", n_samples: int = 1,
                 seed: int = 0, statistics: str = "all") -> None:
        check_model(model)
        self.model = model
        check_choice("labels", labels, LABELS)
        check_choice("statistics", statistics, STATISTICS)
        self.labels, self.statistics = labels, statistics
        self.options = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget,
                                  allow_tf32, autocast,
                                  needs_protocol="labels='mc'" if labels == "mc" else None)
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.seed = check_seed(seed)
        if labels == "mc" and micro_batch_sizes:
            raise ValueError(f"labels='mc': expected no micro_batch_sizes, got "
                             f"{tuple(micro_batch_sizes)}.")
        self.device = check_device(device) if device is not None else model_device(model)
        for b in micro_batch_sizes:
            check_positive_int("micro_batch_sizes", b)
        if not elements and groups is None:
            raise ValueError("elements=False: expected groups to be given, got None.")
        self.groups = groups
        self.plan = build_plan(model)
        specs = {} if groups is None else resolve_groups(model, groups, layout, roles=self.plan.roles)
        self.keep = Keep(elements, specs, tuple(sorted(set(micro_batch_sizes))),
                         second_only=statistics == "fisher")
        self._tasks: dict[str, TaskState] = {}
        self._seen: dict[str, torch.Tensor] = {}  # task -> sorted hashes of its sample ids

    @property
    def loss(self) -> Callable:
        """The per-row loss the accumulator uses."""
        return self.options.loss

    @property
    def dtype(self) -> torch.dtype:
        """The statistics dtype."""
        return self.options.dtype

    # updating ----------------------------------------------------------------------------
    def update(self, batch: dict, task: str = "default",
               sample_ids: SampleIds | None = None) -> int:
        """Add a batch's units to ``task``; returns how many units were added.

        Default sample ids continue from the rows the task has seen. Every id counts once
        per task: an id given in an earlier update of the same task is a ``ValueError``
        (give each pass over the data its own ids, or use another task). A batch of empty
        rows only is recorded (its ids in ``empty_ids``). Raises ``ValueError`` (leaving
        every state untouched) on a bad batch, a model whose rows interact
        (``batching/row_coupling.py``), or a non-finite loss or gradient.
        """
        if not isinstance(task, str):
            raise ValueError(f"task: expected a str, got {type(task).__name__}.")
        prior = self._tasks.get(task, TaskState())
        tensors, ids = split_batch(batch, sample_ids, id_offset=prior.n_rows,
                                   model=self.model)
        hashes = id_hashes(ids)
        seen = self._seen.get(task)
        check_unseen_ids(ids, hashes, seen, task)
        extra = {}
        if self.labels == "mc":
            T = aligned_targets(self.loss, self.model, tensors).shape[1]
            extra = dict(uniforms=row_uniforms(self.seed, ids, T, self.n_samples),
                         expand=lambda units: with_shared_draws(units, self.n_samples))
        delta = accumulate_batch(self.model, self.plan, tensors, ids, self.options, self.keep,
                                 prior, allow_empty=True, **extra).to(self.device)
        seen = hashes if seen is None else torch.cat([seen, hashes])
        seen = seen.sort().values
        self._tasks[task] = prior.merged(delta)  # commit: nothing above changed any state
        self._seen[task] = seen
        return delta.n_units

    def tasks(self) -> list[str]:
        """The tasks updated so far, in the order of their first update."""
        return list(self._tasks)

    def _all_statistics(self, what: str) -> None:
        if self.statistics != "all":
            raise ValueError(f"{what}: expected an accumulator with statistics='all', got "
                             f"statistics={self.statistics!r} (it keeps E[g²] only).")

    def _true_labels(self, what: str) -> None:
        if self.labels != "true":
            raise ValueError(f"{what}: expected an accumulator with labels='true', got "
                             f"labels={self.labels!r} (only empirical_fisher and group_fisher "
                             "are defined for drawn labels).")

    def _state(self, task) -> TaskState:
        if task not in self._tasks:
            raise ValueError(f"task: expected one of {self.tasks()}, got {task!r}.")
        state = self._tasks[task]
        if state.n_units == 0:
            raise ValueError(f"task {task!r}: expected at least one unit, got only empty rows "
                             f"(ids {state.empty_ids}).")
        return state

    # estimators --------------------------------------------------------------------------
    def mean_gradient(self, task: str = "default") -> FisherResult:
        """ḡ = Σ w_u g_u / W."""
        self._true_labels("mean_gradient")
        self._all_statistics("mean_gradient")
        return readout.mean_gradient(self._state(task))

    def empirical_fisher(self, task: str = "default") -> FisherResult:
        """F = Σ w_u g_u² / W (E[g²]); with ``labels="mc"``, the MC Fisher (mean over the
        draws).
        """
        return readout.empirical_fisher(self._state(task))

    def squared_mean_gradient(self, task: str = "default") -> FisherResult:
        """S = ḡ² ((E[g])²)."""
        self._true_labels("squared_mean_gradient")
        self._all_statistics("squared_mean_gradient")
        return readout.squared_mean_gradient(self._state(task))

    def gradient_variance(self, task: str = "default", unbiased: bool = False) -> FisherResult:
        """V = F − S (population, weighted); ``unbiased`` multiplies by W²/(W² − Σw²)."""
        self._true_labels("gradient_variance")
        self._all_statistics("gradient_variance")
        return readout.gradient_variance(self._state(task), unbiased)

    def batch_squared_gradient(self, micro_batch_size: int, task: str = "default") -> FisherResult:
        """Σ_m W_m ḡ_m² / W over micro-batches of ``micro_batch_size`` consecutive units
        (a size given in ``micro_batch_sizes``).
        """
        self._true_labels("batch_squared_gradient")
        return readout.batch_squared_gradient(self._state(task), micro_batch_size)

    def group_fisher(self, task: str = "default") -> FisherResult:
        """Per-group mean (= R(F)), variance, stderr, snr and n of f_u = R(g_u²)."""
        return readout.group_fisher(self._state(task))

    def n_units(self, task: str = "default") -> int:
        """The number of units ``task`` has accumulated."""
        return self._state(task).n_units

    # persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: per task its counts, moment tensors and the hashes of
        the sample ids seen, with the configuration and the model's fingerprint (its class,
        parameter names, shapes and dtypes, and a sha256 of each parameter's values;
        hashing reads every weight once).
        """
        from .stats.state_file import model_fingerprint, task_states_to_dict
        return task_states_to_dict(self._tasks, self.config_summary(),
                                   model_fingerprint(self.model), self._seen)

    def load_state_dict(self, state: dict, allow_weights_change: bool = False) -> None:
        """Replace the states by ``state`` (from ``state_dict``).

        Args:
            state: a state dict of this configuration, saved for this model.
            allow_weights_change: accept a state saved for different weights of the same
                parameters (names, shapes, dtypes): e.g. to continue after fine-tuning,
                knowing that the statistics of both models then mix.

        Raises:
            ValueError: a state of another format, configuration, model class or parameter
                set, or (unless ``allow_weights_change``) of other weights; nothing changes.
        """
        from .stats.state_file import model_fingerprint, task_states_from_dict
        check_flag("allow_weights_change", allow_weights_change)
        tasks, seen = task_states_from_dict(state, self.config_summary(),
                                            model_fingerprint(self.model), self.device,
                                            allow_weights_change=allow_weights_change)
        self._tasks, self._seen = tasks, seen

    def save(self, path: PathLike) -> None:
        """Write the states to ``path``: one safetensors file, a JSON metadata header, a
        sha256 of every tensor; written to a temporary file beside it and renamed, so
        ``path`` holds the old file or the new one, never a part.

        Raises:
            ValueError: ``path`` names a directory or lies in a missing directory (checked
                before anything is computed).
        """
        from .stats.state_file import save_file
        writable_path(path)
        save_file(self.state_dict(), path)

    def load(self, path: PathLike, allow_weights_change: bool = False) -> FisherAccumulator:
        """Replace the states by those saved at ``path`` (same configuration and model
        required; see ``load_state_dict``); every checksum is verified.

        Raises:
            ValueError: no such file, not an accumulator file, a corrupted header or tensor
                (naming the file and the tensor), or a state ``load_state_dict`` refuses.
        """
        from .stats.state_file import load_file
        readable_file(path)
        check_flag("allow_weights_change", allow_weights_change)
        self.load_state_dict(load_file(path), allow_weights_change=allow_weights_change)
        return self

    def config_summary(self) -> dict:
        """What a saved state must agree on to be loaded (JSON-able)."""
        c, k = self.options, self.keep
        mc = {"labels": "mc", "n_samples": self.n_samples, "seed": self.seed} \
            if self.labels == "mc" else {}
        stats = {"statistics": self.statistics} if self.statistics != "all" else {}
        return {**mc, **stats, "dtype": str(c.dtype).replace("torch.", ""), "unit": c.unit,
                "weighting": c.weighting, "elements": k.elements,
                "groups": {n: _describe_group(g) for n, g in sorted(k.groups.items())},
                "micro_batch_sizes": list(k.micro_batch_sizes),
                "loss": _describe_loss(self.loss),
                "autocast": None if c.autocast is None else str(c.autocast).replace("torch.", ""),
                "params": {n: list(p.shape) for n, p in self.plan.params.items()}}


def _describe_group(spec) -> list:
    """``[kind, n_groups, digest of the ids]``: equal for the same grouping of a parameter."""
    digest = None
    if spec.ids is not None:
        ids = spec.ids.detach().to("cpu", torch.int64).contiguous()
        digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return [spec.kind, int(spec.n_groups), digest]


def _describe_loss(loss) -> str:
    """The loss as far as it can be named: a built-in's repr (class and reduction), else
    the qualified name of its function or class (two lambdas of one module look alike).
    """
    if has_token_protocol(loss) and type(loss).__module__.startswith("fisher_fast."):
        return repr(loss)
    named = loss if hasattr(loss, "__qualname__") else type(loss)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', '?')}"
