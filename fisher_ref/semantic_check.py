r"""The semantic check of a QK-OV slicing against the model's own forward pass (SPEC §4).

In a float64 copy of the model, the entries of I(l, h, B) are perturbed (seeded Gaussian
noise, every other entry untouched) and two things of layer l are observed with hooks:

- the attention probabilities ``P[b, h', t, s]`` (the attention module's second output;
  models run with eager attention and ``output_attentions=True``);
- the per-head input of the output projection, ``Z[b, t, h', :]`` (a forward pre-hook on
  ``o_module``, its input split as ``[H, dh]``).

torch's ``nn.MultiheadAttention`` never calls its ``out_proj`` module (its forward hands
the tensors to ``F.multi_head_attention_forward``) and averages the probabilities over
heads by default. A forward hook on it therefore calls the module again with the same
arguments: once with ``need_weights=True, average_attn_weights=False`` for ``P``, and once
with ``out_proj`` set to the identity (weight ``I``, bias 0) for ``Z``: both are the
module's own computation.

A slice passes when exactly the right heads move (r = H / H_kv, G(h) the query heads
sharing kv(h)):

=====  =====================  =====================
block  P changes for heads    Z changes for heads
=====  =====================  =====================
Q      {h}                    {h}
K      G(h)                   G(h)
V      none                   G(h)
O      none                   none
=====  =====================  =====================

Where the Q slice has bias entries, perturbing them alone must move head h's pattern: a
query bias shifts the scores q_t·k_s by δ·k_s, which varies over s, while a key bias shifts
them by q_t·δ, constant over s, which softmax ignores (without rotary embeddings; ALiBi,
as in Bloom and Falcon-RW, adds a term of (t, s) alone and keeps it so). This
tells Q from K in fused layouts without GQA (GPT-2), where the table above cannot: it is
symmetric in Q and K when r = 1. Under partial rotary embeddings (GPT-NeoX) the key bias
is invariant only in the pass-through dimensions, so the slice's last bias entry is also
perturbed alone. Fused layouts with r = 1 and no bias (Phi-3 without GQA) or a fully rotary
bias keep that blind spot; their Q/K index ranges are pinned by hand-derived tests instead.

And, for O, writing :math:`\Delta(z) = o_{\theta + \delta}(z) - o_\theta(z)` for the
output projection: :math:`\Delta(z \text{ with other heads zeroed}) = \Delta(z)` and
:math:`\Delta(z \text{ with head } h \text{ zeroed}) = 0`, with :math:`\Delta(z) \ne 0`.

Completeness is checked the other way round: perturbing every entry of the touched
tensors *outside* :math:`I(Q,h) \cup I(K,h)` leaves head h's pattern unchanged, outside
:math:`I(Q,h) \cup I(K,h) \cup I(V,h)` leaves head h's output unchanged, and outside
:math:`I(O,h)` leaves :math:`\Delta(z \text{ with other heads zeroed}) = 0`.

"Unchanged" means a largest absolute difference of at most the ``semantic-check``
tolerance (float64 rounding); "changed" anything above it.

Some inputs cannot show a head move at all: when head h's keys coincide at every position,
no query or key perturbation moves its pattern; when its values coincide, no pattern change
moves its output; when its output is zero, no O perturbation shows. (A LayerNorm over
d = 2 maps every token to ±(1, −1) times its weight, so a later layer of such a model can
be blind this way.) Each layer is therefore probed first, with the layout's own slices of
every head perturbed at once (``_Probe``): an expectation that the probe shows these inputs
cannot test is reported as *inconclusive*, with the reason, instead of failed. A head that
moves where it must not is a failure whatever the probe says.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fisher_ref._types import Batch, Masks
from fisher_ref.layouts import AttentionLayout, attention_layout
from fisher_ref.slicing import BLOCKS, slice_masks
from fisher_ref.testing.tolerances import tolerance

_SCALE = 0.5  # perturbation standard deviation


@dataclass
class SliceCheck:
    """One test of one (layer, head, block).

    Attributes:
        layer, head, block: the slice. test: ``"perturb"`` (the slice moves the right
            heads) or ``"complement"`` (everything outside it leaves head h alone).
        problems: what went wrong, in words. inconclusive: the expectations these inputs
            cannot test, in words. ``status`` and ``passed`` follow from the two.
        pattern_changed, output_changed: heads whose P or Z moved (``"perturb"``).
        max_change: largest absolute change of P and Z over all heads of the layer.
    """

    layer: int
    head: int
    block: str
    test: str
    problems: list[str] = field(default_factory=list)
    inconclusive: list[str] = field(default_factory=list)
    pattern_changed: list[int] = field(default_factory=list)
    output_changed: list[int] = field(default_factory=list)
    max_change: float = 0.0

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` (a problem) or ``"inconclusive"`` (none, but an
        expectation these inputs cannot test).
        """
        return "failed" if self.problems else "inconclusive" if self.inconclusive else "passed"

    @property
    def passed(self) -> bool:
        """Held, with every expectation tested."""
        return self.status == "passed"

    def __str__(self) -> str:
        status = {"passed": "ok", "failed": "FAIL: " + "; ".join(self.problems),
                  "inconclusive": "INCONCLUSIVE: " + "; ".join(self.inconclusive)}[self.status]
        return f"L{self.layer}.H{self.head}.{self.block} [{self.test}] {status}"


@dataclass
class SemanticReport:
    """All checks; ``passed`` when every one held, none failed or was inconclusive."""

    checks: list[SliceCheck]

    @property
    def passed(self) -> bool:
        """Every check passed (none failed, none inconclusive)."""
        return all(c.passed for c in self.checks)

    def failures(self) -> list[SliceCheck]:
        """The checks that failed (a head moved wrongly, or did not move though it could)."""
        return [c for c in self.checks if c.status == "failed"]

    def inconclusive(self) -> list[SliceCheck]:
        """The checks that found no problem but could not test every expectation on these
        inputs (another ``batch`` or ``seed`` may decide them).
        """
        return [c for c in self.checks if c.status == "inconclusive"]

    def __str__(self) -> str:
        bad, unsure = self.failures(), self.inconclusive()
        n_ok = len(self.checks) - len(bad) - len(unsure)
        head = f"semantic check: {n_ok}/{len(self.checks)} passed"
        if unsure:
            head += f", {len(unsure)} inconclusive"
        return "\n  ".join([head] + [str(c) for c in (bad + unsure)[:20]])


class _Observer:
    """Hooks capturing each layer's attention probabilities and O-projection input."""

    def __init__(self, model, layout: AttentionLayout):
        modules = dict(model.named_modules())
        self.layout, self.P, self.Z, self.handles = layout, {}, {}, []
        for la in layout.layers:
            module = modules[la.module]
            if isinstance(module, torch.nn.MultiheadAttention):
                self.handles.append(module.register_forward_hook(self._mha(la), with_kwargs=True))
                continue
            self.handles.append(module.register_forward_hook(self._probs(la)))
            self.handles.append(modules[la.o_module].register_forward_pre_hook(self._z(la)))

    def _probs(self, la):
        def hook(module, args, output):
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or probs.shape[1] != la.num_heads:
                got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
                raise ValueError(f"{la.module}: expected the attention module to return "
                                 f"(output, probabilities [B, {la.num_heads}, T, T]) with eager "
                                 f"attention, got {got}.")
            self.P[la.index] = probs.detach().clone()
        return hook

    def _z(self, la):
        def hook(module, args):
            z = args[0].detach().clone()
            if z.shape[-1] != la.num_heads * la.head_dim:
                raise ValueError(f"{la.o_module}: expected an input with {la.num_heads} x "
                                 f"{la.head_dim} features, got {tuple(z.shape)}.")
            self.Z[la.index] = z
        return hook

    def _mha(self, la):
        """P and Z of an ``nn.MultiheadAttention`` from two more calls of the module itself."""
        inside = []

        def hook(module, args, kwargs, output):
            if inside:  # the calls below run this hook too
                return
            inside.append(True)
            try:
                call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
                call = dict(call, need_weights=True, average_attn_weights=False)
                _, probs = module(**call)
                z, _ = _with_identity_out_proj(module, dict(call, need_weights=False))
            finally:
                inside.clear()
            if probs.dim() == 3:  # unbatched input: [H, T, S], output [T, E]
                probs, z = probs.unsqueeze(0), z.unsqueeze(0)
            elif not module.batch_first:
                z = z.transpose(0, 1)
            self.P[la.index] = probs.detach().clone()
            self.Z[la.index] = z.detach().clone()
        return hook

    def remove(self):
        """Remove every hook."""
        for h in self.handles:
            h.remove()


def _with_identity_out_proj(module: torch.nn.MultiheadAttention, call: dict):
    """``module(**call)`` with ``out_proj`` the identity: the output is the concatenated
    per-head attention output ``Z`` (``[..., H * dh]``). ``out_proj`` is restored after.
    """
    o = module.out_proj
    saved = o.weight.detach().clone(), None if o.bias is None else o.bias.detach().clone()
    with torch.no_grad():
        o.weight.copy_(torch.eye(o.weight.shape[0], dtype=o.weight.dtype))
        if o.bias is not None:
            o.bias.zero_()
        try:
            return module(**call)
        finally:
            o.weight.copy_(saved[0])
            if o.bias is not None:
                o.bias.copy_(saved[1])


def _forward(model, inputs: dict, obs: _Observer):
    obs.P.clear()
    obs.Z.clear()
    with torch.no_grad():
        try:
            model(**inputs, output_attentions=True)
        except TypeError:
            model(**inputs)
    return dict(obs.P), dict(obs.Z)


def _default_inputs(model, seed: int) -> dict:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError("check_masks: expected a model config with vocab_size to build inputs, "
                         "got none; pass batch={...}.")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 5), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _per_head(la, P, Z):
    """Per-head P [B, H, T, T] -> [H, ...] and Z [B, T, H*dh] -> [H, ...]."""
    p = P[la.index].transpose(0, 1)
    z = Z[la.index].unflatten(-1, (la.num_heads, la.head_dim)).movedim(-2, 0)
    return p, z


def _max_by_head(a, b):
    return (a - b).abs().flatten(1).max(dim=1).values


class _Perturber:
    """Adds seeded noise to masked entries of the float64 model and restores them."""

    def __init__(self, model, seed: int):
        self.params = dict(model.named_parameters())
        self.gen = torch.Generator().manual_seed(seed)
        self.saved = {}

    def apply(self, masks: dict):
        with torch.no_grad():
            for name, mask in masks.items():
                p = self.params[name]
                self.saved[name] = p.detach().clone()
                noise = torch.randn(p.shape, generator=self.gen, dtype=p.dtype)
                p.add_(_SCALE * noise * mask)

    def restore(self):
        with torch.no_grad():
            for name, value in self.saved.items():
                self.params[name].copy_(value)
        self.saved = {}


def _check_mask_dict(masks, params, layer, head, block) -> dict:
    if not isinstance(masks, dict):
        raise ValueError(f"mask_fn({layer}, {head}, {block!r}): expected a dict name -> bool "
                         f"mask, got {type(masks).__name__}.")
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"mask_fn({layer}, {head}, {block!r}): expected parameter names "
                             f"of the model, got {name!r}.")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != params[name].shape:
            got = (f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__)
            raise ValueError(f"mask_fn({layer}, {head}, {block!r})[{name!r}]: expected a bool "
                             f"mask of shape {tuple(params[name].shape)}, got {got}.")
    return masks


def _allowed(la, block) -> set:
    names = {la.weight(block), la.bias(block)} - {None}
    if block != "O" and la.packing != "separate":
        names = {la.q, la.q_bias} - {None}
    return names


def _eager(model):
    """Switch an HF model copy to eager attention, so that probabilities are returned."""
    config = getattr(model, "config", None)
    if (getattr(config, "_attn_implementation", "eager") != "eager"
            and hasattr(model, "set_attn_implementation")):
        model.set_attn_implementation("eager")
    return model


class _Session:
    """One float64 model copy, its hooks, the base observation, and the checks."""

    def __init__(self, model, layout, inputs, seed, atol):
        self.model = _eager(copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval())
        self.layout, self.atol = layout, atol
        self.modules = dict(self.model.named_modules())
        self.params = dict(self.model.named_parameters())
        self.inputs = {k: (v.to(torch.float64) if v.is_floating_point() else v).cpu()
                       for k, v in inputs.items() if k not in ("sample_ids", "labels")}
        self.obs = _Observer(self.model, layout)
        self.base_P, self.base_Z = _forward(self.model, self.inputs, self.obs)
        self.perturber = _Perturber(self.model, seed)
        self._probes = {}

    def probe(self, la) -> _Probe:
        """The layer's sensitivity probe (computed once per layer)."""
        if la.index not in self._probes:
            self._probes[la.index] = _Probe.of(self, la)
        return self._probes[la.index]

    def moved(self, la, masks):
        """Per-head max |ΔP| and max |ΔZ| of layer la after perturbing ``masks``."""
        self.perturber.apply(masks)
        try:
            P, Z = _forward(self.model, self.inputs, self.obs)
        finally:
            self.perturber.restore()
        p0, z0 = _per_head(la, self.base_P, self.base_Z)
        p1, z1 = _per_head(la, P, Z)
        return _max_by_head(p1, p0), _max_by_head(z1, z0)

    def o_effects(self, la, head, masks):
        """Max |Δ(z)|, |Δ(z_h only) − Δ(z)|, |Δ(z without h)| for the O projection."""
        o_mod = self.modules[la.o_module]
        z = self.base_Z[la.index].unflatten(-1, (la.num_heads, la.head_dim))
        only = torch.zeros_like(z)
        only[..., head, :] = z[..., head, :]
        without = z.clone()
        without[..., head, :] = 0
        variants = [v.flatten(-2) for v in (z, only, without)]
        with torch.no_grad():
            before = [o_mod(v) for v in variants]
            self.perturber.apply(masks)
            try:
                after = [o_mod(v) for v in variants]
            finally:
                self.perturber.restore()
        d_full, d_only, d_without = (a - b for a, b in zip(after, before, strict=True))
        return (float(d_full.abs().max()), float((d_only - d_full).abs().max()),
                float(d_without.abs().max()), float(d_only.abs().max()))

    def close(self):
        self.obs.remove()


def _union(la, blocks, shapes, pick=None) -> dict:
    """The layout's own slices of every head for ``blocks``, united per tensor (``pick``
    maps a head's masks to a subset of them).
    """
    out = {}
    for h in range(la.num_heads):
        for b in blocks:
            masks = slice_masks(la, h, b, shapes, include_bias=True)
            for name, m in (pick(masks) if pick else masks).items():
                out[name] = out.get(name, torch.zeros_like(m)) | m
    return out


def _q_bias_parts(la, masks: dict) -> dict:
    """``{"bias entries": m, "last bias entry": m_last}``: a Q slice's query-bias entries and
    its last one alone (empty when the slice has none).
    """
    m = masks.get(la.q_bias) if la.q_bias is not None else None
    if m is None or not bool(m.any()):
        return {}
    last = torch.zeros(m.numel(), dtype=torch.bool)
    last[int(m.reshape(-1).nonzero()[-1])] = True
    return {"bias entries": m, "last bias entry": last.reshape(m.shape)}


@dataclass
class _Probe:
    """What these inputs can show of layer l, per head (bool tensors [H]).

    A head counts as able to move only when the probe moves it by ``MARGIN`` times the
    tolerance, so that a head at the edge of the tolerance is inconclusive rather than a
    coin toss. Built from the layout's own slices (the trusted layout: the one ``check_layout`` tests,
    or the one a third-party ``mask_fn`` is checked against), all heads perturbed at once:

    - ``pattern_qk`` / ``output_qk``: the head's pattern / O-projection input moves when
      every Q and K slice is perturbed (no: its keys, or its values, coincide over
      positions);
    - ``output_v``: its O-projection input moves when every V slice is perturbed;
    - ``pattern_qbias`` / ``pattern_qbias_last``: its pattern moves when every Q slice's
      bias entries / last bias entry are perturbed (None without a query bias);
    - ``o_input``: its O-projection input is not zero.
    """

    MARGIN = 100.0  # a head "can move" when the probe moves it by MARGIN x the tolerance

    pattern_qk: torch.Tensor
    output_qk: torch.Tensor
    output_v: torch.Tensor
    pattern_qbias: torch.Tensor | None
    pattern_qbias_last: torch.Tensor | None
    o_input: torch.Tensor

    @classmethod
    def of(cls, s: _Session, la) -> _Probe:
        shapes = {n: p.shape for n, p in s.params.items()}
        dp, dz = s.moved(la, _union(la, ("Q", "K"), shapes))
        _, dv = s.moved(la, _union(la, ("V",), shapes))
        qbias = [None, None]
        bias_atol = tolerance("semantic-check-bias")[1]
        for i, part in enumerate(("bias entries", "last bias entry")):
            def pick(masks, part=part):
                parts = _q_bias_parts(la, masks)
                return {la.q_bias: parts[part]} if parts else {}

            masks = _union(la, ("Q",), shapes, pick)
            if masks:
                qbias[i] = s.moved(la, masks)[0] > cls.MARGIN * bias_atol
        z = _per_head(la, s.base_P, s.base_Z)[1]
        clear = cls.MARGIN * s.atol
        return cls(dp > clear, dz > clear, dv > clear, qbias[0], qbias[1],
                   z.abs().flatten(1).max(dim=1).values > clear)


def _blind(sensitive, heads) -> list:
    return [g for g in heads if sensitive is not None and not bool(sensitive[g])]


def _compare(c: SliceCheck, changed, want, blind, problem: str, subject: str, why: str):
    """Record ``"{problem} for heads {changed}, expected {want}"`` when the heads differ
    other than by heads the probe shows cannot move (``blind``); those alone make the check
    inconclusive instead (``"{subject} of heads ... cannot move on these inputs (why)"``).
    """
    missing = [g for g in want if g not in changed]
    unseen = [g for g in missing if g in blind]
    if [g for g in changed if g not in want] or len(unseen) < len(missing):
        c.problems.append(f"{problem} for heads {changed}, expected {want}")
    elif unseen:
        c.inconclusive.append(f"{subject} of heads {unseen} cannot move on these inputs ({why})")


def _expected(la, head, block):
    group = [g for g in range(la.num_heads) if la.kv_head(g) == la.kv_head(head)]
    return {"Q": ([head], [head]), "K": (group, group), "V": ([], group), "O": ([], [])}[block]


def _heads_over(values, atol) -> list:
    return [int(i) for i in torch.nonzero(values > atol).flatten()]


def _query_bias_check(s: _Session, la, head: int, masks: dict, c: SliceCheck) -> None:
    """A query bias moves its head's pattern; a key bias (without rotary) moves none.

    Perturbs the Q slice's bias entries, then its last bias entry alone (a pass-through,
    non-rotary dimension under partial rotary embeddings, as in GPT-NeoX); each must move
    exactly head h's attention pattern, by more than the ``semantic-check-bias`` tolerance.
    Tells Q from K where the block table cannot.
    """
    parts = _q_bias_parts(la, masks)
    atol = tolerance("semantic-check-bias")[1]  # float32 softmax rounding is not a move
    probe = s.probe(la)
    # parts: two entries, or none without query-bias entries (strict=False: then nothing to check)
    sensitivities = (probe.pattern_qbias, probe.pattern_qbias_last)
    for (what, sub), sensitive in zip(parts.items(), sensitivities, strict=False):
        moved = _heads_over(s.moved(la, {la.q_bias: sub})[0], atol)
        _compare(c, moved, [head], _blind(sensitive, [head]),
                 f"perturbing the Q slice's {what} alone changed attention patterns",
                 f"with the Q slice's {what} alone perturbed, the attention patterns",
                 "their keys coincide over positions")


def _perturb_check(s: _Session, la, head, block, masks) -> SliceCheck:
    c = SliceCheck(la.index, head, block, "perturb")
    outside = sorted(set(masks) - _allowed(la, block))
    if outside:
        c.problems.append(f"touches tensors outside layer {la.index}'s {block} tensors: {outside}")
    if not any(bool(m.any()) for m in masks.values()):
        c.problems.append("the slice is empty")
    dp, dz = s.moved(la, masks)
    c.pattern_changed, c.output_changed = _heads_over(dp, s.atol), _heads_over(dz, s.atol)
    c.max_change = float(max(dp.max(), dz.max()))
    want_p, want_z = _expected(la, head, block)
    probe = s.probe(la)
    sens_z = probe.output_v if block == "V" else probe.output_qk
    _compare(c, c.pattern_changed, want_p, _blind(probe.pattern_qk, want_p),
             "attention patterns changed", "the attention patterns",
             "their keys coincide over positions")
    _compare(c, c.output_changed, want_z, _blind(sens_z, want_z),
             "O-projection inputs changed", "the O-projection inputs",
             "no V slice moves them" if block == "V" else "their values coincide over positions")
    if block == "Q":
        _query_bias_check(s, la, head, masks, c)
    if block == "O":
        full, only_gap, without, _ = s.o_effects(la, head, masks)
        if full <= s.atol and not bool(probe.o_input[head]):
            c.inconclusive.append(f"head {head}'s O-projection input is zero on these inputs")
        elif full <= s.atol:
            c.problems.append("perturbing the O slice did not change the attention output")
        if only_gap > s.atol:
            c.problems.append(f"with other heads zeroed the effect differs from the full effect "
                              f"by {only_gap:.3g}")
        if without > s.atol:
            c.problems.append(f"with head {head} zeroed the effect is still {without:.3g}")
    return c


def _complement(masks_list, params) -> dict:
    """Entries of the touched tensors outside the union of the given slices."""
    out = {}
    for masks in masks_list:
        for name in masks:
            out.setdefault(name, torch.ones_like(params[name], dtype=torch.bool))
    for masks in masks_list:
        for name, m in masks.items():
            out[name] = out[name] & ~m
    return out


def _complement_checks(s: _Session, la, head, slices: dict) -> list:
    """Unchanged outside the union can only prove completeness where the head can move:
    otherwise the check is inconclusive.
    """
    checks = []
    probe = s.probe(la)
    for block, union in (("Q", ("Q", "K")), ("V", ("Q", "K", "V"))):
        if not all(b in slices for b in union):
            continue
        dp, dz = s.moved(la, _complement([slices[b] for b in union], s.params))
        value = float(dp[head]) if block == "Q" else float(dz[head])
        c = SliceCheck(la.index, head, "+".join(union), "complement", max_change=value)
        what = "attention pattern" if block == "Q" else "O-projection input"
        can_move = bool(probe.pattern_qk[head]) if block == "Q" else \
            bool(probe.output_qk[head] and probe.output_v[head])
        if value > s.atol:
            c.problems.append(f"perturbing outside {'∪'.join(union)} changed head {head}'s "
                              f"{what} by {value:.3g}: the slices miss entries of head {head}")
        elif not can_move:
            c.inconclusive.append(f"head {head}'s {what} cannot move on these inputs, so "
                                  f"entries missing from its slices would not show")
        checks.append(c)
    if "O" in slices:
        comp = _complement([slices["O"]], s.params)
        _, _, _, only = s.o_effects(la, head, comp)
        c = SliceCheck(la.index, head, "O", "complement", max_change=only)
        if only > s.atol:
            c.problems.append(f"perturbing outside the O slice changed head {head}'s share of "
                              f"the output by {only:.3g}: the slice misses entries of head {head}")
        elif not bool(probe.o_input[head]):
            c.inconclusive.append(f"head {head}'s O-projection input is zero on these inputs")
        checks.append(c)
    return checks


def _selection(layout, layers, heads):
    chosen = range(layout.num_layers) if layers is None else layers
    out = []
    for layer in chosen:
        la = layout.layer(layer)
        hs = range(la.num_heads) if heads is None else heads
        for h in hs:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < la.num_heads:
                raise ValueError(f"heads: expected integers in [0, {la.num_heads}) for layer {layer}, "
                                 f"got {h!r}.")
            out.append((la, h))
    return out


def check_masks(model: torch.nn.Module, mask_fn: Callable[[int, int, str], Masks],
                layout: AttentionLayout | dict | None = None, *, layers: Sequence[int] | None = None,
                heads: Sequence[int] | None = None, blocks: Sequence[str] = BLOCKS, seed: int = 0,
                batch: Batch | None = None) -> SemanticReport:
    """Check any slicing ``mask_fn(layer, head, block) -> {name: bool mask}`` semantically.

    Args:
        model: the model (copied to float64; never modified).
        mask_fn: the slicing under test, e.g. a third-party implementation:
            ``{parameter name: BoolTensor[*param_shape]}`` for one (layer, head, block).
        layout: the layout giving modules and head counts (None: detect).
        layers: the layers to check (default: all).
        heads: the heads to check in each layer (default: all).
        blocks: the blocks to check, a subset of ``("Q", "K", "V", "O")``.
        seed: seeds the inputs and the perturbations.
        batch: model inputs, passed as keyword arguments (``labels`` and ``sample_ids``
            are dropped; e.g. ``input_ids: LongTensor[batch, pos]``, or ``{"input": X}`` for a
            model whose ``forward(input)`` is a classifier's); default: two random rows of
            five tokens of ``config.vocab_size``.

    Returns:
        SemanticReport: per (layer, head, block) whether it passed and what changed.
    """
    lay = layout if isinstance(layout, AttentionLayout) else attention_layout(model, layout)
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"blocks: expected a subset of {BLOCKS}, got {unknown}.")
    selected = _selection(lay, layers, heads)
    inputs = _default_inputs(model, seed) if batch is None else batch
    s = _Session(model, lay, inputs, seed, tolerance("semantic-check")[1])
    checks = []
    try:
        for la, h in selected:
            slices = {b: _check_mask_dict(mask_fn(la.index, h, b), s.params, la.index, h, b)
                      for b in blocks}
            checks += [_perturb_check(s, la, h, b, m) for b, m in slices.items()]
            checks += _complement_checks(s, la, h, slices)
    finally:
        s.close()
    return SemanticReport(checks)


def check_layout(model: torch.nn.Module, layout: AttentionLayout | dict | None = None, *,
                 layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                 seed: int = 0, batch: Batch | None = None) -> SemanticReport:
    """Semantic check (SPEC §4) of :func:`~fisher_ref.slicing.qkov_mask` under a layout.

    Uses I(l, h, B) with biases (``include_bias=True``), so that bias entries are checked
    too. See the module docstring for what is perturbed and observed.

    Args:
        model: the model (copied to float64; never modified).
        layout: the layout under test (None: detect).
        layers: the layers to check (default: all).
        heads: the heads to check in each layer (default: all).
        seed: seeds the inputs and the perturbations.
        batch: model inputs (default: two random rows of five tokens).

    Returns:
        SemanticReport: per layer, head and block: passed, heads whose pattern or output
        changed, and problems in words.
    """
    lay = layout if isinstance(layout, AttentionLayout) else attention_layout(model, layout)
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def mask_fn(layer, head, block):
        return slice_masks(lay.layer(layer), head, block, shapes, include_bias=True)

    return check_masks(model, mask_fn, lay, layers=layers, heads=heads, seed=seed, batch=batch)


def validate_layout(model: torch.nn.Module, layout: AttentionLayout | dict | None = None,
                    **kwargs: object) -> AttentionLayout:
    """:func:`check_layout`, raising ``ValueError`` with the failures (or, where nothing
    failed, the inconclusive checks: pass another ``batch`` or ``seed``); returns the layout.

    Args:
        model: the model.
        layout: the layout under test (None: detect).
        **kwargs: ``layers``, ``heads``, ``seed``, ``batch`` of :func:`check_layout`.
    """
    lay = layout if isinstance(layout, AttentionLayout) else attention_layout(model, layout)
    report = check_layout(model, lay, **kwargs)
    if report.failures():
        raise ValueError(f"layout: expected every QK-OV slice to pass the semantic check, got "
                         f"{len(report.failures())} failures.\n  {report}")
    if not report.passed:
        raise ValueError(f"layout: expected every QK-OV slice to pass the semantic check, got "
                         f"{len(report.inconclusive())} checks these inputs cannot decide "
                         f"(pass another batch= or seed=).\n  {report}")
    return lay
