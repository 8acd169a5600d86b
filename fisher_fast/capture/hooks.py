"""Hooks that turn one batched backward pass into per-row parameter gradients.

``capture_backward(plan, losses, sink, ...)`` must be entered *before* the forward pass (it
installs the forward hooks). For every call of a hooked module the forward hook keeps the
input activation and registers a hook on the output; when the gradient δ of that output
arrives during ``autograd.grad(losses.sum(), roots)`` the module's rule turns it into
per-row gradients, in slices of rows that fit ``slice_bytes``. Because the loss is a sum of
row losses and rows do not interact, δ's row n is ∂ℓ_n/∂y_n, so the rule's output is row n's
own gradient.

Parameters used once stream straight to the sink (nothing per-row is kept); parameters used
several times (tied weights, shared modules) are summed per row over the uses first, then
handed over. The backward computes gradients with respect to the *roots* (outputs of hooked
modules none of whose inputs need a gradient, e.g. the embeddings) rather than the
parameters, so autograd never builds the batch weight gradients it would throw away.
"""

from __future__ import annotations

import torch

from ..batching.row_coupling import stateful_forward_error
from ..capture import costs
from ..capture.rules import FUNCTORCH
from ..stats.groups import axis_map
from .outputs import tensor_leaves, with_leaves


def _tensors(args, kwargs):
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            yield v


def _expand(values, n):
    return tuple(v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.dim() > 0
                 and v.shape[0] == 1 else v for v in values)


#: CPU bytes of one block of a weight's per-row gradients (``Capture._parts``): small
#: enough for the shift, square and sums to run in cache, large enough for the products.
PART_BYTES = 4 << 20


def cache_blocks(device: torch.device) -> bool:
    """Whether weights are formed in cache-sized blocks on ``device`` (the CPU); elsewhere a
    weight is one block and a tied weight keeps the whole-slice path (the GPU's choice,
    made without measurement; tests switch this off to run those paths on the CPU).
    """
    return device.type == "cpu"


class Capture:
    """Context manager: hooks installed on enter, removed on exit.

    Args:
        plan: from ``capture_plan.build_plan``.
        n_rows: rows of the forward batch (every hooked tensor must lead with it).
        dtype: statistics dtype of the per-row gradients.
        sink: object with ``wants(name) -> (full: bool, groups)`` and ``add(name, G, start)``
            / ``add_groups(name, f, start)``; see ``stats/sinks.py``.
        slice_bytes: memory allowed for one slice of per-row gradients.
    """

    def __init__(self, plan, n_rows: int, dtype: torch.dtype, sink, slice_bytes: int):
        self.plan, self.n, self.dtype, self.sink = plan, n_rows, dtype, sink
        self.slice_bytes = max(int(slice_bytes), 1)
        self.handles, self.roots, self.uses, self.buffers = [], [], {}, {}
        self.tensor_handles = []  # hooks on the forward's output tensors
        self.right_factors = {}  # id(saved input) -> (input, x² factor): kept over passes
        self.paused = False

    def __enter__(self):
        for entry in self.plan.entries:
            h = entry.module.register_forward_hook(self._forward_hook(entry), with_kwargs=True)
            self.handles.append(h)
        return self

    def __exit__(self, *exc):
        """Remove every hook and drop every reference the capture took: the tensor hooks'
        closures hold the capture and the saved activations, and a tensor's hooks live in
        autograd's C++ graph, where Python's garbage collector cannot see the cycle
        (capture -> roots -> tensor -> hook -> capture). Runs on success, on an exception
        and on ``KeyboardInterrupt`` alike.
        """
        for h in self.handles + self.tensor_handles:
            h.remove()
        self.handles, self.tensor_handles = [], []
        self.roots, self.uses, self.buffers = [], {}, {}
        self.right_factors = {}
        self.sink = None
        return False

    # forward -----------------------------------------------------------------------------
    def _forward_hook(self, entry):
        def hook(module, args, kwargs, output):
            if self.paused:
                return None
            leaves = tensor_leaves(output)
            grad_leaves = [i for i, t in enumerate(leaves) if t.requires_grad]
            structured = not isinstance(output, torch.Tensor)
            if structured and not leaves:
                raise ValueError(f"per-sample capture: expected {entry.module_name} "
                                 f"({type(module).__name__}) to return tensors, got "
                                 f"{type(output).__name__} without any.")
            first = leaves[0]
            replaced = None
            if not structured and first.dim() > 0 and first.shape[0] == 1 and self.n > 1:
                # a row-independent input broadcast over the batch (e.g. position ids
                # [1, T]): give every row its own copy so that its gradient stays per row
                output = first = replaced = first.expand(self.n, *first.shape[1:])
                args = _expand(args, self.n)
                kwargs = dict(zip(kwargs, _expand(kwargs.values(), self.n), strict=True))
            merged = self._merged_rows(entry, first, args, kwargs)
            rule = entry.rule
            if structured or merged:
                # a module returning several tensors (an MoE router, experts), or one whose
                # rows were flattened with their positions ([n * k, ...]): functorch sees a
                # row's own positions and takes one output at a time
                if rule is not FUNCTORCH:
                    self.plan.fallbacks.add(entry.module_name)
                rule = FUNCTORCH
            saved = rule.save(module, args, kwargs, first)
            if saved is None:  # an RMS-like norm that is not x/rms*w: use functorch
                self.plan.fallbacks.add(entry.module_name)
                rule, saved = FUNCTORCH, FUNCTORCH.save(module, args, kwargs, first)
            for name in entry.names.values():
                self.uses[name] = self.uses.get(name, 0) + max(len(grad_leaves), 1)
            if not grad_leaves:
                return replaced
            is_root = not any(t.requires_grad for t in _tensors(args, kwargs))
            if structured:
                # each output leaves the module through its own view, so that its hook sees
                # the gradient its consumers send, not what flows back from another output
                # computed from it inside the module (router logits -> scores)
                leaves = [t.view_as(t) if i in grad_leaves else t for i, t in enumerate(leaves)]
                output = replaced = with_leaves(output, iter(leaves))
            for i in grad_leaves:
                leaf = output if not structured else leaves[i]
                one = saved if not (structured or merged) else \
                    FUNCTORCH.for_leaf(saved, i if structured else None, merged)
                if is_root:
                    self.roots.append(leaf)
                self.tensor_handles.append(leaf.register_hook(
                    lambda dy, one=one: self._on_grad(entry, rule, one, self._unmerge(dy, merged))))
            return replaced
        return hook

    def _merged_rows(self, entry, first: torch.Tensor, args, kwargs) -> int:
        """``k`` when the output leads with ``n * k`` (rows flattened with their positions,
        row-major, as ``hidden.reshape(-1, d)`` does), else 0; an output that leads with
        neither ``n`` nor a multiple of it is an error.
        """
        if first.dim() > 0 and first.shape[0] == self.n:
            return 0
        lead = first.shape[0] if first.dim() > 0 else 0
        inputs = list(_tensors(args, kwargs))
        # flattened rows come from the batch: an input of that length carries a gradient
        # (a table looked up at arange(T), which has none, is not the batch's rows)
        if lead and lead % self.n == 0 and \
                any(t.requires_grad and t.dim() > 0 and t.shape[0] == lead for t in inputs) and \
                all(t.dim() > 0 and t.shape[0] in (lead, self.n) for t in inputs):
            return lead // self.n
        raise ValueError(
            f"per-sample capture: expected the output of {entry.module_name} to lead with the "
            f"batch axis ({self.n} rows, or rows × positions flattened), got shape "
            f"{tuple(first.shape)}. Rows must not be merged or mixed (SPEC §0).")

    def _unmerge(self, dy: torch.Tensor, merged: int) -> torch.Tensor:
        return dy.reshape(self.n, merged, *dy.shape[1:]) if merged else dy

    # backward ----------------------------------------------------------------------------
    def _slices(self, entry):
        numel = sum(getattr(entry.module, a).numel() for a in entry.names)
        per_row = numel * torch.finfo(self.dtype).bits // 8 * 3
        step = max(1, min(self.n, self.slice_bytes // max(per_row, 1)))
        return [slice(s, min(s + step, self.n)) for s in range(0, self.n, step)]

    def _wanted(self, name) -> bool:
        full, spec = self.sink.wants(name)
        return bool(full) or spec is not None

    def _on_grad(self, entry, rule, saved, dy):
        module = entry.module
        attrs = tuple(a for a in entry.names if self._wanted(entry.names[a]))
        if not attrs:  # nothing the sink wants: no per-row work for this module
            return None
        name = entry.names.get("weight")
        if "weight" in attrs and hasattr(rule, "add_into") and self.uses.get(name, 0) > 1:
            # a tied embedding: scatter each row's share straight into the per-row buffer
            rule.add_into(self._buffer(name, tuple(module.weight.shape), self.dtype, dy.device),
                          module, saved, dy)
            return None
        if "weight" in attrs and self._sparse(entry, rule):
            rows, tokens, values = rule.pairs(module, saved, dy, self.dtype)
            self.sink.add_pairs(entry.names["weight"], rows, tokens, values,
                                tuple(module.weight.shape))
            return None
        route = self._route(entry, rule, saved, dy) if "weight" in attrs else None
        gram = self._gram_map(entry, rule) if route and route.groups == "gram" else None
        if route and route.elements == "separable":
            self._add_separable(entry, rule, saved, dy)
        weight_done = route is not None and not route.materialises
        parts = None if weight_done else self._parts(entry, rule, dy)
        full_attrs = tuple(a for a in attrs if not ((weight_done or parts) and a == "weight"))
        was = self.paused
        self.paused = True  # functorch re-runs the module: its children must not be captured
        try:
            for sl in self._slices(entry):
                if gram:
                    axis, groups, n_groups = gram
                    norms = rule.gram_norms(module, saved, dy, sl, self.dtype, axis)
                    f = torch.zeros((norms.shape[0], n_groups), dtype=norms.dtype,
                                    device=norms.device)
                    f.index_add_(1, groups, norms)
                    self.sink.add_groups(entry.names["weight"], f, sl.start)
                if parts:
                    self._deliver_parts(entry, rule, saved, dy, sl, parts)
                if full_attrs:
                    into = self._rows_into(entry, rule, full_attrs, sl)
                    try:
                        grads = rule.grads(module, saved, dy, sl, self.dtype, full_attrs,
                                           **({"into": into} if into else {}))
                    except RuntimeError as e:  # a forward that mutates state, under torch.func
                        explained = stateful_forward_error(e, entry.module_name, module)
                        if explained is None:
                            raise
                        raise explained from e
                    for a, g in grads.items():
                        self._deliver(entry.names[a], g, sl)
        finally:
            self.paused = was
        return None

    def _parts(self, entry, rule, dy) -> int | None:
        """Rows of the weight's first axis per block when its per-row gradient is formed
        block by block; ``None`` otherwise. A weight used once goes to the sink block by
        block when the sink wants only its per-element moments; on the CPU a reused (tied)
        weight is also formed block by block, into its per-row buffer. On the CPU a block of
        a slice holds about ``PART_BYTES``, so that forming it, shifting, squaring and
        summing it stay in cache (the head of a 50257-token vocabulary: 2.5x faster than
        whole slices); elsewhere one block is the whole weight.
        """
        name = entry.names.get("weight")
        if name is None or not getattr(rule, "blocks", False) or not self._wanted(name):
            return None
        cpu = cache_blocks(dy.device)
        if self.uses.get(name, 0) == 1:
            takes = getattr(self.sink, "takes_parts", None)
            if takes is None or not takes(name):
                return None
        elif not cpu:
            return None
        weight = entry.module.weight
        if not cpu:
            return weight.shape[0]
        rows = self._slices(entry)[0]
        per_block_row = (rows.stop - rows.start) * weight[0].numel() * \
            torch.finfo(self.dtype).bits // 8
        return max(1, min(weight.shape[0], PART_BYTES // max(per_block_row, 1)))

    def _deliver_parts(self, entry, rule, saved, dy, sl, rows_per_part):
        module, name = entry.module, entry.names["weight"]
        shape = tuple(module.weight.shape)
        for a in range(0, shape[0], rows_per_part):
            part = slice(a, min(a + rows_per_part, shape[0]))
            g = rule.weight_part(module, saved, dy, sl, self.dtype, part)
            if self.uses.get(name, 0) == 1:
                self.sink.add_part(name, g, sl.start, part, shape)
            else:
                self._buffer(name, shape, g.dtype, g.device)[sl, part] += g

    def _sparse(self, entry, rule) -> bool:
        """Embedding statistics from (row, token) pairs when the weight has this one use (a
        tied use, e.g. an lm_head, makes its per-row gradient dense anyway) and the sink
        takes pairs for it.
        """
        name = entry.names.get("weight")
        takes = getattr(self.sink, "takes_pairs", None)
        return (name is not None and hasattr(rule, "pairs") and self.uses.get(name, 0) == 1
                and takes is not None and takes(name))

    def _route(self, entry, rule, saved, dy) -> costs.Route | None:
        """How the weight of a Linear-like module (Linear, Conv1D, Conv2d) used once reaches
        the sink in this chunk (``capture/costs.py``), or ``None`` for any other weight (tied
        weights, embeddings, norms: materialised, or the pair path). Recorded in
        ``plan.routes[module name]``.
        """
        name = entry.names.get("weight")
        if name is None or not hasattr(rule, "separable") or self.uses.get(name, 0) != 1:
            return None
        full, spec = self.sink.wants(name)
        takes = getattr(self.sink, "takes_separable", None)
        elements = "second" if takes is not None and takes(name) else ("rows" if full else None)
        gram_ok = spec is not None and self._gram_map(entry, rule) is not None
        T, d_in, d_out = rule.dims(entry.module, saved, dy)
        chosen = costs.route(self.n, T, d_in, d_out, elements=elements,
                             groups=spec is not None, gram_ok=gram_ok)
        self.plan.routes[entry.module_name] = chosen
        return chosen

    def _add_separable(self, entry, rule, saved, dy) -> None:
        """The chunk's E[g²] of a weight with one position per row, as two factors (one GEMM
        in the sink). The input's factor x² is the same in every backward pass of the chunk
        (MC draws, classes), so it is formed once and the sink folds the passes into one
        product.
        """
        key = id(saved)
        hit = self.right_factors.get(key)
        right = hit[1] if hit is not None and hit[0] is saved else None
        left, right = rule.separable(entry.module, saved, dy, self.dtype, right)
        self.right_factors[key] = (saved, right)
        self.sink.add_separable(entry.names["weight"], left, right,
                                tuple(entry.module.weight.shape), out_axis=rule.out_axis)

    def _gram_map(self, entry, rule):
        """``(axis, group of each unit along it, number of groups)`` when the weight's
        groups follow one of its axes (output units, heads of Q/K/V, heads of an O
        projection's inputs, ...) or are one group for the whole tensor (``"all"``); else
        ``None``. Computed once per plan and group spec.
        """
        name = entry.names.get("weight")
        _, spec = self.sink.wants(name)
        if spec is None or not hasattr(rule, "gram_norms"):
            return None
        device = entry.module.weight.device
        hit = self.plan.gram_maps.get((name, id(spec)))
        if hit is None or hit[0] is not spec or hit[2] != device:  # once per plan and spec
            if spec.kind == "single":
                mapped = ("all", torch.zeros(1, dtype=torch.long))
            else:
                mapped = axis_map(spec, tuple(entry.module.weight.shape), rule.out_axis)
            if mapped is not None:
                mapped = (mapped[0], mapped[1].to(device))
            hit = self.plan.gram_maps[(name, id(spec))] = (spec, mapped, device)
        return None if hit[1] is None else (*hit[1], spec.n_groups)

    def _rows_into(self, entry, rule, attrs, sl) -> dict:
        """``{attr: the sink's own rows}`` for the attributes used once that a row-storing
        sink (``per_sample_gradients``) keeps, when the rule can write there: the per-row
        gradients are then formed in place, not copied.
        """
        view = getattr(self.sink, "rows_view", None)
        if view is None or not getattr(rule, "writes_rows", False):
            return {}
        out = {}
        for a in attrs:
            name = entry.names[a]
            if self.uses.get(name, 0) == 1:
                v = view(name, sl.start, sl.stop - sl.start)
                if v is not None and v.dtype == self.dtype:
                    out[a] = v
        return out

    def _deliver(self, name, g, sl):
        if self.uses.get(name, 0) == 1:
            self.sink.add(name, g, sl.start)
            return
        self._buffer(name, g.shape[1:], g.dtype, g.device)[sl] += g

    def _buffer(self, name, shape, dtype, device) -> torch.Tensor:
        """The per-row buffer ``[n, *shape]`` of a reused parameter (zeros at first)."""
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.zeros((self.n, *shape), dtype=dtype, device=device)
        return buf

    def _flush(self, name, buf):
        """A reused parameter's per-row gradients, summed over its uses, to the sink: on the
        CPU block by block of its first axis when the sink takes blocks (a tied
        ``[n, V, d]`` head at once would run every pass from main memory).
        """
        takes = getattr(self.sink, "takes_parts", None)
        if not cache_blocks(buf.device) or buf.dim() < 2 or takes is None or not takes(name):
            self.sink.add(name, buf, 0)
            return
        per_block_row = buf.shape[0] * buf[0, 0].numel() * buf.element_size()
        step = max(1, PART_BYTES // max(per_block_row, 1))
        shape = tuple(buf.shape[1:])
        for a in range(0, shape[0], step):
            part = slice(a, min(a + step, shape[0]))
            self.sink.add_part(name, buf[:, part], 0, part, shape)  # the buffer is ours

    def backward(self, losses: torch.Tensor, retain_graph: bool = False) -> None:
        """Back-propagate ``losses.sum()`` to the roots, then flush tied parameters and give
        zero gradients to parameters the loss does not reach. ``retain_graph`` keeps the
        forward's graph for another backward (the next label draw).
        """
        roots = [r for r in self.roots if r.requires_grad] or None
        if roots is None:
            raise ValueError("per-sample capture: expected the loss to depend on a hooked "
                             "module's output, got no trainable module in the graph.")
        # parameters whose module never ran: the loss must not reach them (a parameter read
        # directly, outside its module's forward, has per-row gradients no hook sees)
        unseen = {n: p for n, p in self.plan.params.items()
                  if not self.uses.get(n) and self._wanted(n)}
        grads = torch.autograd.grad(losses.sum(), roots + list(unseen.values()),
                                    allow_unused=True, retain_graph=retain_graph)
        for (name, _), g in zip(unseen.items(), grads[len(roots):], strict=True):
            if g is not None and bool(g.ne(0).any()):
                owner = next((e.module_name for e in self.plan.entries
                              if name in e.names.values()), "?")
                raise ValueError(
                    f"per-sample capture: expected {name!r} to reach the loss through its "
                    f"module {owner!r}, got a gradient while that module never ran: the model "
                    "reads the parameter directly (outside the module's forward), which "
                    "per-row hooks cannot see. Its per-sample gradients are not available "
                    "from fisher_fast for this model; fisher_ref computes them.")
        for name, buf in self.buffers.items():
            self._flush(name, buf)
        self.buffers.clear()
        for name, p in self.plan.params.items():
            if not self.sink.received(name) and self._wanted(name):
                self.sink.add_zero(name, p, self.n)
