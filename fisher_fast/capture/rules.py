r"""Per-sample gradient formulas, one rule per module kind.

A rule keeps what it needs from the forward pass (``save``) and, given the gradient ``dy`` of
the module's output for a slice of rows, returns each row's gradient of the module's own
parameters (``grads``). Rows never interact (SPEC §0), so row n's gradient only involves row
n's activations:

.. math::

    \text{Linear: } g_n(W) = \sum_t \delta_{nt} x_{nt}^\top, \quad g_n(b) = \sum_t \delta_{nt}

(HF ``Conv1D`` stores ``W`` as ``[in, out]``: the transpose; ``Conv2d`` is a Linear layer over
its unfolded input patches), Embedding: ``g_n(E)[v] =
sum_{t: id_nt = v} delta_nt``, norms: ``g_n(w) = sum_t delta_nt * xhat_nt`` with the
normalised input ``xhat``. ``functorch`` covers any other module with ``vmap(grad)``.
Statistics are computed in ``dtype`` (float32 or float64) whatever the model's dtype.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .outputs import tensor_leaves

RMS_CLASS_NAMES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Phi3RMSNorm")


def _rows(t: torch.Tensor, sl: slice, dtype) -> torch.Tensor:
    """Rows ``sl`` of ``t`` as ``[s, T, features]`` in ``dtype`` (a 2-D input gets T = 1)."""
    t = t[sl].to(dtype)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _first_tensor(args, kwargs, key: str = "input"):
    if args:
        return args[0]
    if key in kwargs:
        return kwargs[key]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


class LinearRule:
    """torch ``Linear``: weight ``[out, in]``; groups are rows (output units).

    Every formula works on the view ``rows(...) -> (xs [s, T, in], ds [s, T, out])`` of a
    slice of rows, so that ``Conv1DRule`` (the transpose) and ``Conv2dRule`` (unfolded
    patches as the T positions) share them.
    """

    name = "linear"
    attrs = ("weight", "bias")
    out_axis = 0  # the weight axis of the output units
    blocks = True  # per-row weight gradients may be formed block by block (weight_part)

    def save(self, module, args, kwargs, output):
        """What the backward needs of this call: the module's input, detached."""
        return _first_tensor(args, kwargs).detach()

    def rows(self, module, saved, dy, sl, dtype):
        """``(xs [s, T, in], ds [s, T, out])``: rows ``sl`` of the input and of δ in ``dtype``."""
        return self.inputs(module, saved, sl, dtype), self.deltas(module, dy, sl, dtype)

    def inputs(self, module, saved, sl, dtype):
        """Rows ``sl`` of the input, ``[s, T, in]``."""
        return _rows(saved, sl, dtype)

    def deltas(self, module, dy, sl, dtype):
        """Rows ``sl`` of the output's gradient δ, ``[s, T, out]``."""
        return _rows(dy, sl, dtype)

    def dims(self, module, saved, dy) -> tuple[int, int, int]:
        """``(T, d_in, d_out)``: positions per row and the weight's two flattened axes."""
        return saved[0].numel() // saved.shape[-1], saved.shape[-1], dy.shape[-1]

    writes_rows = True  # ``grads`` can write into the sink's rows (``into``)

    def grads(self, module, x, dy, sl, dtype, attrs, into: dict | None = None):
        """Rows ``sl`` of the per-row gradients ``{attr: [s, *shape]}`` of ``attrs``, in ``dtype``.

        ``into``: ``{attr: Tensor[s, *shape]}`` to write them in (the sink's own rows, so
        that nothing is copied), for the attributes it names.
        """
        xs, ds = self.rows(module, x, dy, sl, dtype)
        into = into or {}
        out = {}
        if "weight" in attrs:
            dest = into.get("weight")
            g = self._weight(xs, ds, None if dest is None else dest.view(dest.shape[0], -1,
                                                                           dest.shape[-1]))
            out["weight"] = g.reshape(g.shape[0], *module.weight.shape)
        if "bias" in attrs:
            out["bias"] = torch.sum(ds, dim=1, out=into.get("bias"))
        return out

    def _weight(self, xs, ds, out=None):
        return torch.bmm(ds.transpose(1, 2), xs, out=out)  # [s, out, in]: Σ_t δ_t x_tᵀ

    def weight_part(self, module, x, dy, sl, dtype, part: slice):
        """Rows ``sl`` of the weight's per-row gradient, block ``part`` of its first axis
        only (``[s, *weight.shape[part]]``): the head of a large vocabulary block by block,
        so that each block stays in cache and no ``[s, V, d]`` tensor is formed.
        """
        xs, ds = self.rows(module, x, dy, sl, dtype)
        g = self._weight_part(xs, ds, part)
        return g.reshape(g.shape[0], *module.weight[part].shape)

    def _weight_part(self, xs, ds, part):
        return self._weight(xs, ds[..., part])

    def separable(self, module, x, dy, dtype, right: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The square-separable factors of a weight whose rows have one position (T = 1).

        They are ``(δ² [n, d_out], x² [n, d_in])``:

        .. math:: g_n(W)^2 = (\delta_n x_n^\top)^2 = \delta_n^2 (x_n^2)^\top
                  \quad\Rightarrow\quad \sum_n w_n g_n(W)^2 = (w \odot \delta^2)^\top x^2,

        one ``[d_out, n] @ [n, d_in]`` product for the whole chunk, no per-row gradient. Every term
        is non-negative, so nothing cancels. Only for T = 1 (``dims``): with several
        positions :math:`(\sum_t \delta_t x_t^\top)^2` has cross terms. ``right``: the
        input's factor from an earlier call on the same input (another backward pass);
        ``out_axis`` says which axis of the weight is d_out.
        """
        n = dy.shape[0]
        d2 = self.deltas(module, dy, slice(None), dtype).reshape(n, -1).square()
        if right is None:
            right = self.inputs(module, x, slice(None), dtype).reshape(n, -1).square()
        return d2, right

    def gram_norms(self, module, x, dy, sl, dtype, axis: str = "out"):
        r"""Per-row squared norms of a weight's units, from T x T Gram products.

        The norms of the output units (``axis="out"``), of the input units (``"in"``) or of
        the whole weight (``"all"``, the "ghost norm"), without forming per-row gradients:

        .. math::

            \|g_n(W)_{o\cdot}\|^2 = \sum_{t,s} \delta_{nto}\delta_{nso}\,
            (x_{nt}\cdot x_{ns}), \qquad
            \|g_n(W)_{\cdot i}\|^2 = \sum_{t,s} x_{nti} x_{nsi}\,
            (\delta_{nt}\cdot\delta_{ns}), \qquad
            \|g_n(W)\|^2 = \sum_{t,s} (x_{nt}\cdot x_{ns})(\delta_{nt}\cdot\delta_{ns})

        Returns ``[s, units along axis]`` (``[s, 1]`` for ``"all"``).
        """
        xs, ds = self.rows(module, x, dy, sl, dtype)
        if axis == "all":
            gx, gd = xs @ xs.transpose(1, 2), ds @ ds.transpose(1, 2)  # [s, T, T]
            return (gx * gd).sum(dim=(1, 2))[:, None]
        if axis == "in":
            xs, ds = ds, xs
        gram = xs @ xs.transpose(1, 2)  # [s, T, T]
        return ((gram @ ds) * ds).sum(dim=1)  # [s, units along axis]


class Conv1DRule(LinearRule):
    """HF ``Conv1D`` (GPT-2): weight ``[in, out]``, groups are columns (output units)."""

    name = "conv1d"
    out_axis = 1

    def _weight(self, xs, ds, out=None):
        return torch.bmm(xs.transpose(1, 2), ds, out=out)  # [s, in, out]: Σ_t x_t δ_tᵀ

    def _weight_part(self, xs, ds, part):
        return self._weight(xs[..., part], ds)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_padding(module) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` zero padding of a ``Conv2d`` (``"same"`` may be
    asymmetric), or ``None`` when it pads otherwise than with zeros.
    """
    if module.padding_mode != "zeros":
        return None
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        (kh, kw), (dh, dw) = _pair(module.kernel_size), _pair(module.dilation)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(module.padding)
    return (pw, pw, ph, ph)


class Conv2dRule(LinearRule):
    r"""``Conv2d`` (zero padding, ``groups=1``): weight ``[out, in, kh, kw]``.

    The input's patches (``F.unfold``, im2col) are the T = H_out W_out positions of a Linear layer
    with ``in * kh * kw`` inputs, so every Linear formula applies:

    .. math:: g_n(W) = \sum_p \delta_{np}\, \mathrm{unfold}(x_n)_p^\top, \qquad
              g_n(b) = \sum_p \delta_{np}

    (Opacus and BackPACK compute conv per-sample gradients the same way). Patches are
    unfolded a slice of rows at a time, from the saved input, for the Gram and separable
    forms; materialised per-row weight gradients come instead from one grouped convolution
    backward (the slice's rows as groups: input ``[1, s C_in, H, W]``, δ
    ``[1, s C_out, H', W']``), which forms no unfolded copy (2-3x faster than unfold and a
    batched product on the CPU at LeNet sizes).
    """

    name = "conv2d"
    blocks = False  # one grouped backward per slice: a block would redo the whole input
    writes_rows = False

    def grads(self, module, x, dy, sl, dtype, attrs):
        """Rows ``sl`` of the per-row gradients ``{attr: [s, *shape]}`` of ``attrs``, in ``dtype``."""
        out = {}
        if "weight" in attrs:
            out["weight"] = self._weight_rows(module, x[sl], dy[sl], dtype)
        if "bias" in attrs:
            out["bias"] = dy[sl].to(dtype).flatten(2).sum(dim=2)
        return out

    def _weight_rows(self, module, x, dy, dtype):
        """``[s, C_out', C_in, kh, kw]``: each row's weight gradient for the output channels
        of ``dy`` (``[s, C_out', H', W']``), by a convolution backward with one group per row.
        """
        s, c_in, o = x.shape[0], x.shape[1], dy.shape[1]
        x, dy = x.to(dtype), dy.to(dtype)
        if any(conv2d_padding(module)):
            x = F.pad(x, conv2d_padding(module))
        kh, kw = _pair(module.kernel_size)
        shape = x.new_empty((s * o, c_in, kh, kw))  # only its shape is read
        g = torch.ops.aten.convolution_backward(
            dy.reshape(1, s * o, *dy.shape[2:]), x.reshape(1, s * c_in, *x.shape[2:]), shape,
            None, list(_pair(module.stride)), [0, 0], list(_pair(module.dilation)), False, [0, 0],
            s, [False, True, False])[1]
        return g.reshape(s, o, c_in, kh, kw)

    def inputs(self, module, saved, sl, dtype):
        """Rows ``sl`` of the input's patches, ``[s, P, in kh kw]`` (zero-padded, unfolded)."""
        x = saved[sl].to(dtype)
        if any(conv2d_padding(module)):
            x = F.pad(x, conv2d_padding(module))
        return F.unfold(x, _pair(module.kernel_size), dilation=_pair(module.dilation),
                        stride=_pair(module.stride)).transpose(1, 2)  # [s, P, in kh kw]

    def deltas(self, module, dy, sl, dtype):
        """Rows ``sl`` of δ with its positions flattened, ``[s, P, out]``."""
        ds = dy[sl].to(dtype)
        return ds.reshape(ds.shape[0], ds.shape[1], -1).transpose(1, 2)  # [s, P, out]

    def dims(self, module, saved, dy) -> tuple[int, int, int]:
        """``(T, d_in, d_out)``: positions per row and the weight's two flattened axes."""
        return dy[0, 0].numel(), module.weight[0].numel(), dy.shape[1]

class EmbeddingRule:
    """``Embedding``: each row's output gradients scattered into the rows of its token ids.

    The ``padding_idx`` row gets no gradient, as in torch.
    """

    name = "embedding"
    attrs = ("weight",)

    def save(self, module, args, kwargs, output):
        """What the backward needs of this call: the module's input, detached."""
        return _first_tensor(args, kwargs).detach()

    writes_rows = True

    def grads(self, module, ids, dy, sl, dtype, attrs, into: dict | None = None):
        """Rows ``sl`` of the dense per-row gradient ``{'weight': [s, V, d]}`` (written
        into ``into["weight"]`` when given).
        """
        s, V, d = ids[sl].shape[0], module.num_embeddings, dy.shape[-1]
        dest = (into or {}).get("weight")
        g = torch.zeros((s, V, d), dtype=dtype, device=dy.device) if dest is None else dest.zero_()
        return {"weight": self.add_into(g, module, ids[sl], dy[sl])}

    def add_into(self, out: torch.Tensor, module, ids, dy) -> torch.Tensor:
        """Add each row's gradient into ``out`` (``[n, V, d]``, e.g. the per-row buffer of a
        tied weight, which already holds the head's share): a scatter of δ, no dense
        per-row tensor of its own.
        """
        n, d, V = dy.shape[0], dy.shape[-1], module.num_embeddings
        idx = ids.reshape(n, -1)
        ds = dy.reshape(n, -1, d).to(out.dtype)
        if module.padding_idx is not None:
            ds = ds * (idx != module.padding_idx).unsqueeze(-1).to(out.dtype)
        flat = (torch.arange(n, device=idx.device)[:, None] * V + idx).reshape(-1)
        out.view(n * V, d).index_add_(0, flat.to(dy.device), ds.reshape(-1, d))
        return out

    def pairs(self, module, ids, dy, dtype):
        r"""Per-row gradients of the embedding rows each row touches, without ``[n, V, d]``.

        One entry per distinct (row n, token v) pair,

        .. math:: g_n(E)[v] = \sum_{t:\ \mathrm{id}_{nt} = v} \delta_{nt}

        (every other row of g_n(E) is 0). Returns ``(rows [P], tokens [P], values [P, d])``
        with P ≤ n T, so memory is O(n T d). ``padding_idx`` pairs carry 0, as in torch.
        ``torch.unique`` sizes its output from the data: one host sync per call.
        """
        n, d, V = dy.shape[0], dy.shape[-1], module.num_embeddings
        idx = ids.reshape(n, -1)
        ds = dy.reshape(n, -1, d).to(dtype)
        if module.padding_idx is not None:
            ds = ds * (idx != module.padding_idx).unsqueeze(-1).to(dtype)
        key = (torch.arange(n, device=idx.device)[:, None] * V + idx).reshape(-1)
        uniq, inv = torch.unique(key, return_inverse=True)
        vals = torch.zeros((uniq.numel(), d), dtype=dtype, device=dy.device)
        vals.index_add_(0, inv.to(dy.device), ds.reshape(-1, d))
        uniq = uniq.to(dy.device)
        return uniq // V, uniq % V, vals


class LayerNormRule:
    """``LayerNorm``: weight and bias gradients from the normalised input x̂ (recomputed per
    slice from the saved input, which autograd keeps anyway).
    """

    name = "layernorm"
    attrs = ("weight", "bias")

    def save(self, module, args, kwargs, output):
        """What the backward needs of this call: the module's input, detached."""
        return _first_tensor(args, kwargs).detach()

    def grads(self, module, x, dy, sl, dtype, attrs):
        """Rows ``sl`` of the per-row gradients ``{attr: [s, *shape]}`` of ``attrs``, in ``dtype``."""
        k = len(module.normalized_shape)
        xhat = F.layer_norm(x[sl], module.normalized_shape, None, None, module.eps)
        shape = (xhat.shape[0], -1, *xhat.shape[xhat.dim() - k:])
        xs, ds = xhat.to(dtype).reshape(shape), dy[sl].to(dtype).reshape(shape)
        out = {}
        if "weight" in attrs:
            out["weight"] = (ds * xs).sum(dim=1)
        if "bias" in attrs:
            out["bias"] = ds.sum(dim=1)
        return out


def rms_eps(module):
    """The module's epsilon (``variance_epsilon`` or ``eps``, a float), or ``None``."""
    for a in ("variance_epsilon", "eps"):
        v = getattr(module, a, None)
        if isinstance(v, float):
            return v
    return None


def rms_normalise(x: torch.Tensor, eps: float, upcast: bool) -> torch.Tensor:
    """X / rms(x), computed as LLaMA-style norms do (in float32 when ``upcast``)."""
    h = x.to(torch.float32) if upcast else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


class RMSNormRule:
    """RMS norms ``y = w * x / rms(x)``; the first forward of each module checks that it
    really computes that, in one of two conventions (float32 upcast or not), bit for bit.

    ``save`` returns ``None`` when neither convention reproduces the module's output; the
    engine then falls back to ``functorch`` for that call.
    """

    name = "rmsnorm"
    attrs = ("weight",)

    def __init__(self):
        self._verified = weakref.WeakKeyDictionary()  # module -> {dtype: upcast}

    def save(self, module, args, kwargs, output):
        """What the backward needs of this call: the module's input, detached."""
        x = _first_tensor(args, kwargs).detach()
        known = self._verified.setdefault(module, {})
        if x.dtype not in known:
            if not isinstance(output, torch.Tensor) or output.shape != x.shape:
                return None
            eps = rms_eps(module)
            with torch.no_grad():
                for upcast in (True, False):
                    y = module.weight * rms_normalise(x, eps, upcast)
                    if y.dtype == output.dtype and torch.equal(y, output.detach()):
                        known[x.dtype] = upcast
                        break
                else:
                    return None
        return x, known[x.dtype]

    def grads(self, module, saved, dy, sl, dtype, attrs):
        """Rows ``sl`` of the per-row gradients ``{attr: [s, *shape]}`` of ``attrs``, in ``dtype``."""
        x, upcast = saved
        xhat = rms_normalise(x[sl], rms_eps(module), upcast)
        xs, ds = _rows(xhat, slice(None), dtype), _rows(dy, sl, dtype)
        return {"weight": (ds * xs).sum(dim=1)}


class FunctorchRule:
    """Any other module: ``vmap(grad)`` of ``<f(x_n; θ), δ_n>`` over rows, with
    ``torch.func.functional_call``. Tensor arguments with the batch's leading size are
    mapped over; everything else is passed unchanged.
    """

    name = "functorch"
    attrs = None  # whatever direct parameters the plan assigns

    def __init__(self):
        # modules whose forward vmap cannot trace (data-dependent control flow, e.g. a loop
        # over the experts a batch routes to): their rows are taken one at a time
        self._loops = weakref.WeakSet()

    def save(self, module, args, kwargs, output):
        """What the backward needs of this call: the module's input, detached."""
        def det(v):
            return v.detach() if isinstance(v, torch.Tensor) else v
        return tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()}, None, 0

    @staticmethod
    def for_leaf(saved, leaf: int | None, merged: int):
        """``saved`` for one tensor of a structured output (``leaf``: its index among
        ``tensor_leaves(output)``) and/or rows flattened with ``merged`` positions each.
        """
        args, kwargs = saved[0], saved[1]
        return args, kwargs, leaf, merged

    def grads(self, module, saved, dy, sl, dtype, attrs):
        """Rows ``sl`` of the per-row gradients ``{attr: [s, *shape]}`` of ``attrs``, in ``dtype``.

        ``dy`` is ``[n, ...]`` (``[n, k, ...]`` when the call flattened rows with their k
        positions: each row's inputs are then its k flattened entries, passed as they are).
        """
        from torch.func import functional_call, grad, vmap

        args, kwargs, leaf, merged = saved
        n = dy.shape[0]
        lead = n * merged if merged else n

        def batched_value(v):
            if not (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == lead):
                return None
            return v.reshape(n, merged, *v.shape[1:]) if merged else v

        values = list(args) + list(kwargs.values())
        rows = [batched_value(v) for v in values]
        is_batched = [r is not None for r in rows]
        flat = [r[sl] if b else v for v, r, b in zip(values, rows, is_batched, strict=True)]
        keys = list(kwargs)
        params = {a: getattr(module, a).detach() for a in attrs}

        def inner(p, batched, d):
            it = iter(batched)
            vals = [(next(it) if merged else next(it).unsqueeze(0)) if b else v
                    for v, b in zip(flat, is_batched, strict=True)]
            a_vals, k_vals = vals[:len(args)], dict(zip(keys, vals[len(args):], strict=True))
            out = functional_call(module, p, tuple(a_vals), k_vals)
            if leaf is not None:
                out = tensor_leaves(out)[leaf]
            elif not isinstance(out, torch.Tensor):
                raise ValueError(f"functorch capture: expected {type(module).__name__} to return "
                                 f"a tensor, got {type(out).__name__}.")
            return ((out if merged else out.squeeze(0)) * d).sum()

        batched = [v for v, b in zip(flat, is_batched, strict=True) if b]
        if module not in self._loops:
            try:
                g = vmap(grad(inner), in_dims=(None, 0, 0))(params, batched, dy[sl])
                return {a: v.to(dtype) for a, v in g.items()}
            except RuntimeError as e:  # data-dependent control flow (MoE routing loops)
                if "vmap" not in str(e):
                    raise
                self._loops.add(module)
        # one row at a time through this module only (the rest of the model stays batched)
        per_row = [grad(inner)(params, [v[j] for v in batched], dy[sl][j])
                   for j in range(dy[sl].shape[0])]
        return {a: torch.stack([r[a] for r in per_row]).to(dtype) for a in params}


LINEAR, CONV1D, CONV2D, EMBEDDING = LinearRule(), Conv1DRule(), Conv2dRule(), EmbeddingRule()
LAYERNORM, RMSNORM, FUNCTORCH = LayerNormRule(), RMSNormRule(), FunctorchRule()


def rule_for(module: torch.nn.Module):
    """The rule of a module kind, or ``None`` (then ``functorch`` covers its parameters)."""
    cls = type(module).__name__
    for base in (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Conv2d):
        if isinstance(module, base) and type(module).forward is not base.forward:
            return None  # a subclass computing something else (e.g. a scaled embedding)
    if isinstance(module, torch.nn.Linear):
        return LINEAR
    if cls == "Conv1D" and hasattr(module, "nf"):
        return CONV1D
    if isinstance(module, torch.nn.Conv2d):  # other paddings and grouped convs: functorch
        plain = module.groups == 1 and conv2d_padding(module) is not None
        return CONV2D if plain else None
    if isinstance(module, torch.nn.Embedding):
        plain = module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
        return EMBEDDING if plain else None
    if isinstance(module, torch.nn.LayerNorm):
        return LAYERNORM
    looks_rms = (isinstance(getattr(module, "weight", None), torch.nn.Parameter)
                 and getattr(module, "bias", None) is None and rms_eps(module) is not None)
    is_leaf = next(module.children(), None) is None
    if cls in RMS_CLASS_NAMES or (looks_rms and (cls.endswith("RMSNorm") or is_leaf)):
        return RMSNORM
    return None
