"""Which capture path each trainable parameter takes (``capture_plan``).

A parameter held by a module of a known kind (Linear, Conv1D, Embedding, LayerNorm, RMS
norm) takes that module's rule; a tied parameter held by several such modules takes all of
them and its per-row gradients are summed over the uses. A parameter held only by modules of
unknown kind is covered by ``functorch`` on its first owner. RMS norms whose output turns out
not to be ``weight * x / rms(x)`` switch to ``functorch`` at run time (``Plan.fallbacks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..capture.rules import FUNCTORCH, rule_for


@dataclass
class Entry:
    """One hooked module: its rule and ``{attribute: parameter name}`` for the parameters it covers."""

    module_name: str
    module: torch.nn.Module
    rule: object
    names: dict[str, str]


@dataclass(frozen=True)
class Role:
    """What holds a parameter first (in ``named_modules`` order): the capture rule's name
    (``"linear"``, ``"conv1d"``, ``"embedding"``, ``"layernorm"``, ``"rmsnorm"``, or ``None`` for
    a module of no known kind), the attribute, and the module's class name. The group specs
    of ``stats.groups`` read a parameter's default groups from it.
    """

    rule: str | None
    attr: str
    module_type: str


@dataclass
class Plan:
    """Every hooked module (``entries``) and the trainable parameters they cover."""

    entries: list[Entry]
    params: dict[str, torch.nn.Parameter]  # trainable, named_parameters() order, tied once
    roles: dict[str, Role] = field(default_factory=dict)  # parameter name -> first owner
    fallbacks: set = field(default_factory=set)  # module names switched to functorch at run time
    # (name, id(spec)) -> (spec, Gram-path axis map, its device), filled on first use
    gram_maps: dict = field(default_factory=dict)
    # module name -> the costs.Route its weight took in the last chunk (for reports, tests)
    routes: dict = field(default_factory=dict)

    def describe(self) -> dict[str, list[str]]:
        """``{parameter name: ["module_name:path", ...]}`` (several entries for tied parameters)."""
        out: dict[str, list[str]] = {n: [] for n in self.params}
        for e in self.entries:
            path = "functorch" if e.module_name in self.fallbacks else e.rule.name
            for n in e.names.values():
                out[n].append(f"{e.module_name}:{path}")
        return out


def build_plan(model: torch.nn.Module) -> Plan:
    """The capture plan of every trainable parameter of ``model``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in params.items()}
    known, owners = [], {}
    for mname, module in model.named_modules(remove_duplicate=True):
        direct = {a: p for a, p in module._parameters.items()
                  if p is not None and id(p) in name_of}
        if not direct:
            continue
        rule = rule_for(module)
        if rule is not None:
            names = {a: name_of[id(p)] for a, p in direct.items() if a in rule.attrs}
            if names:
                known.append(Entry(mname, module, rule, names))
        for a, p in direct.items():
            owners.setdefault(id(p), []).append((mname, module, a, rule))
    # every use no known rule covers takes functorch on its module: a parameter shared by a
    # known module and another (a tied head and a scaled embedding), or by two unknown
    # ones, is then captured in each of its uses, and the uses are summed per row
    # (an owner that is an ancestor of a module covering the parameter holds it as an alias,
    # BERT's head bias: its use is the child's, and counting it again would double it)
    fallback: dict[str, Entry] = {}
    for pid, uses in owners.items():
        covering = [m for m, _, a, r in uses if r is not None and a in r.attrs]
        for mname, module, attr, rule in uses:
            if rule is not None and attr in rule.attrs:
                continue
            if any(c.startswith(mname + ".") or not mname for c in covering):
                continue
            fallback.setdefault(mname, Entry(mname, module, FUNCTORCH, {})).names[attr] = \
                name_of[pid]
    roles = {}
    for pid, uses in owners.items():
        _, module, attr, rule = uses[0]
        roles[name_of[pid]] = Role(getattr(rule, "name", None), attr, type(module).__name__)
    return Plan(known + list(fallback.values()), params, roles)


def capture_plan(model: torch.nn.Module) -> dict[str, list[str]]:
    """Report, per trainable parameter, the module(s) and capture path that compute its
    per-row gradients: ``linear``, ``conv1d``, ``embedding``, ``layernorm``, ``rmsnorm`` or
    ``functorch``. RMS norms are verified on the first forward; see ``Plan.fallbacks``.
    """
    return build_plan(model).describe()
