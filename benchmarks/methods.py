r"""Every method the runner times: fisher_fast, the plain floor, and the peers.

A method is ``fn(case) -> dict | None``: what it computed, for the cross-check
(``{parameter name: Tensor}`` of E[g²] or of the exact/MC Fisher, ``{name: total}`` for group
statistics, score tensors for the pipeline), or ``None`` (the floor). All of them compute
the same quantity on the same model and batch: per-row losses are the mean NLL over a
row's tokens (causal LM, no padding) or a classifier's cross-entropy, and E[g²] is
:math:`\frac1N \sum_n g_n^2` of those per-row gradients. A peer that cannot run a model
raises; the runner records the error. Notes on what a peer gets wrong are attached to its
result under ``"__notes__"``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F

import fisher_fast as ff

N_PERMUTATIONS = 1000  # the main job's default (fishercheck)
NOTES = "__notes__"


def loss_of(case):
    """fisher_fast's built-in loss for the case's family."""
    return ff.causal_lm_loss if case.family == "lm" else ff.sequence_classification_loss


def row_losses(model, batch: dict, family: str) -> torch.Tensor:
    """``Tensor[N]``: each row's loss, computed by one batched forward (the peers' loss)."""
    if family == "lm":
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                              reduction="none")
        return nll.reshape(labels.shape).mean(1)
    return F.cross_entropy(model(batch["input"]).float(), batch["labels"], reduction="none")


def _params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rows(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


# -- the floor and fisher_fast -------------------------------------------------------------
def fwd_bwd(case, autocast=None, tf32=False):
    """Plain forward + backward of the summed per-row loss (weight gradients formed)."""
    ctx = torch.autocast(case.batch["labels"].device.type, dtype=autocast) if autocast else \
        contextlib.nullcontext()
    with _tf32(tf32), ctx:
        loss = row_losses(case.model, case.batch, case.family).sum()
    with _tf32(tf32):
        loss.backward()
    case.model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _tf32(allow: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def fisher_fast_full(case, **kw):
    """``fisher_fast.empirical_fisher``: E[g²] of every parameter."""
    return dict(ff.empirical_fisher(case.model, case.batch, loss_fn=loss_of(case), **kw))


def fisher_fast_group(case):
    """``fisher_fast.group_fisher`` (generic groups); checked by each tensor's total."""
    res = ff.group_fisher(case.model, case.batch, loss_fn=loss_of(case))
    return {"__totals__": {n: v["mean"].sum() for n, v in res.items()}}


def fisher_fast_exact(case):
    """``fisher_fast.exact_fisher`` over the C classes of each row (token units)."""
    return dict(ff.exact_fisher(case.model, case.batch, loss_fn=loss_of(case), unit="token"))


def fisher_fast_mc(case):
    """``fisher_fast.mc_fisher`` with one label draw per row."""
    return dict(ff.mc_fisher(case.model, case.batch, loss_fn=loss_of(case), n_samples=1))


# -- plain autograd baselines -----------------------------------------------------------
def loop(case):
    """Micro-batch-of-one loop: forward + backward per row, square, add."""
    params = _params(case.model)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    N = case.batch["labels"].shape[0]
    for i in range(N):
        grads = torch.autograd.grad(row_losses(case.model, _rows(case.batch, i), case.family).sum(),
                                    list(params.values()), allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            if g is not None:
                acc[n].add_(g.square())
    return {n: a / N for n, a in acc.items()}


def loop_exact(case):
    """Exact Fisher by a loop over rows and classes: Σ_c p_c (∇ −log p_c)², plain autograd."""
    params = _params(case.model)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    N = case.batch["labels"].shape[0]
    for i in range(N):
        logp = torch.log_softmax(case.model(_rows(case.batch, i)["input"]), dim=-1)[0]
        p = logp.detach().exp()
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(-logp[c], list(params.values()), retain_graph=True,
                                        allow_unused=True)
            for n, g in zip(params, grads, strict=True):
                if g is not None:
                    acc[n].add_(g.square(), alpha=float(p[c]))
    return {n: a / N for n, a in acc.items()}


def vmap(case):
    """``torch.func.vmap(grad(...))`` of ``functional_call`` over rows, squares summed (8 rows
    per call on CUDA, where every row's gradient copy must fit; all rows on the CPU).
    """
    from torch.func import grad
    from torch.func import vmap as vm

    params = {n: p.detach() for n, p in _params(case.model).items()}
    key = "input_ids" if case.family == "lm" else "input"

    def one(p, x, y):
        row = {key: x[None], "labels": y[None]}
        model = _Functional(case.model, p)
        return row_losses(model, row, case.family).sum()

    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    xs, ys = case.batch[key], case.batch["labels"]
    N = ys.shape[0]
    step = 8 if ys.is_cuda else N
    for s in range(0, N, step):
        g = vm(grad(one), in_dims=(None, 0, 0))(params, xs[s:s + step], ys[s:s + step])
        for n in acc:
            acc[n].add_(g[n].square().sum(0))
    return {n: a / N for n, a in acc.items()}


class _Functional:
    """``model`` called with parameters ``p`` (``torch.func.functional_call``)."""

    def __init__(self, model, p):
        self.model, self.p = model, p

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call
        return functional_call(self.model, self.p, args, kwargs)


# -- peers ---------------------------------------------------------------------------------
def opacus(case):
    """Opacus ``GradSampleModule`` (train mode on a copy: its hooks record nothing in eval
    mode; dropout is 0): per-sample ``grad_sample``, squared and averaged.
    """
    from opacus import GradSampleModule

    if "opacus" not in case.cache:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.cache["opacus"] = GradSampleModule(copy.deepcopy(case.model).train(),
                                                    loss_reduction="sum")
    gm = case.cache["opacus"]
    N = case.batch["labels"].shape[0]
    row_losses(gm, case.batch, case.family).sum().backward()
    out, notes = {}, []
    for n, p in gm._module.named_parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            notes.append(f"{n}: no grad_sample")
        elif gs.shape[0] != N:
            notes.append(f"{n}: grad_sample has {gs.shape[0]} rows for {N} samples "
                         "(a broadcast input, e.g. position ids [1, T]): not per-sample")
            out[n] = gs.square().sum(0) / N
        else:
            out[n] = gs.square().mean(0)
        p.grad_sample, p.grad = None, None
    out[NOTES] = notes
    return out


def _backpack_model(case):
    from backpack import extend

    if "backpack" not in case.cache:
        try:
            case.cache["backpack"] = extend(copy.deepcopy(case.model))
        except Exception:  # try the fx converter before giving up
            case.cache["backpack"] = extend(copy.deepcopy(case.model), use_converter=True)
    return case.cache["backpack"]


def _backpack(case, extension, attr):
    from backpack import backpack, extend

    model = _backpack_model(case)
    lossf = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    N = case.batch["labels"].shape[0]
    if case.family == "lm":  # per-token terms with the row as BackPACK's sample axis
        logits = model(input_ids=case.batch["input_ids"]).logits[:, :-1]
        loss = lossf(logits.permute(0, 2, 1), case.batch["labels"][:, 1:])
        scale = 1.0 / (N * (logits.shape[1] ** 2))  # per-row mean: (T−1)⁻¹ per gradient
    else:
        loss = lossf(model(case.batch["input"]), case.batch["labels"])
        scale = 1.0 / N
    with backpack(extension):
        loss.backward()
    out, notes = {}, []
    for n, p in model.named_parameters():
        v = getattr(p, attr, None)
        if v is None:
            notes.append(f"{n}: no {attr} (module not supported)")
        else:
            out[n] = v * scale
        p.grad = None
        if hasattr(p, attr):
            delattr(p, attr)
    out[NOTES] = notes
    return out


def backpack_full(case):
    """BackPACK ``SumGradSquared``: Σ_n g_n², divided by N."""
    from backpack.extensions import SumGradSquared
    return _backpack(case, SumGradSquared(), "sum_grad_squared")


def backpack_exact(case):
    """BackPACK ``DiagGGNExact`` (the exact Fisher for softmax cross-entropy), divided by N."""
    from backpack.extensions import DiagGGNExact
    return _backpack(case, DiagGGNExact(), "diag_ggn_exact")


def backpack_mc(case):
    """BackPACK ``DiagGGNMC`` with one sample (its own draws), divided by N."""
    from backpack.extensions import DiagGGNMC
    return _backpack(case, DiagGGNMC(mc_samples=1), "diag_ggn_mc")


def _nngeometry(case, build):
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatDiag

    model = case.model
    lc = LayerCollection.from_model(model)
    key = "input_ids" if case.family == "lm" else "input"
    data = torch.utils.data.TensorDataset(case.batch[key], case.batch["labels"])
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    diag = build(model, loader, PMatDiag, lc, key).get_diag()
    mods, out = dict(model.named_modules()), {}
    for name in lc.layers:
        pos = lc.p_pos[name]
        for attr in ("weight", "bias"):
            p = getattr(mods[name], attr, None)
            if p is not None:
                out[f"{name}.{attr}" if name else attr] = diag[pos:pos + p.numel()].view_as(p)
                pos += p.numel()
    return out


def nngeometry_full(case):
    """Nngeometry ``FIM(variant="regression")`` of the per-row losses: E[g²] (PMatDiag)."""
    from nngeometry.metrics import FIM

    def build(model, loader, rep, lc, key):
        def fn(x, y):
            return row_losses(model, {key: x, "labels": y}, case.family)[:, None]
        return FIM(model, loader, rep, variant="regression", function=fn, layer_collection=lc)
    return _nngeometry(case, build)


def nngeometry_exact(case):
    """Nngeometry ``FIM(variant="classif_logits")``: the exact Fisher (Cholesky columns)."""
    from nngeometry.metrics import FIM
    return _nngeometry(case, lambda m, loader, rep, lc, key: FIM(
        m, loader, rep, variant="classif_logits", layer_collection=lc))


def nngeometry_mc(case):
    """Nngeometry ``FIM_MonteCarlo`` with one trial (its own draws)."""
    from nngeometry.metrics import FIM_MonteCarlo
    return _nngeometry(case, lambda m, loader, rep, lc, key: FIM_MonteCarlo(
        m, loader, rep, trials=1, layer_collection=lc))


# -- Phase 5/6 pipeline ------------------------------------------------------------------------
def _scores(inter, conf) -> dict:
    out = {f"interference.{b}": inter[b] for b in ("Q", "K", "V", "O")}
    out["conflicts.mean_cosine"] = torch.tensor([v["mean_cosine"] for v in conf.values()])
    return out


def _loop_gradients(case, batch, names=None):
    """``PerUnit`` of every row's gradient (of ``names``, default all) by a micro-batch-of-one
    loop: one forward + backward per row, plain autograd.
    """
    from fisher_fast.results import PerUnit

    params = {n: p for n, p in _params(case.model).items() if names is None or n in names}
    rows = [torch.autograd.grad(row_losses(case.model, _rows(batch, i), case.family).sum(),
                                list(params.values()))
            for i in range(batch["labels"].shape[0])]
    g = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}
    return PerUnit(g, list(range(len(rows))), torch.ones(len(rows)))


def _slice_names(lay) -> list:
    return list(dict.fromkeys(n for la in lay.layers for n in (la.q, la.k, la.v, la.o)))


def pipeline_naive(case):
    """The naive pipeline: every phase computes its own per-sample gradients by a
    micro-batch-of-one loop — contributions of every parameter (A, then B), interference
    (A's and B's attention slices), conflicts (again) — as three separate tools would.
    """
    from fisher_fast.conflicts import conflicts_from_units
    from fisher_fast.interference import interference_from_units

    lay = ff.attention_layout(case.model)
    slices = _slice_names(lay)
    for batch in case.tasks:
        g = _loop_gradients(case, batch)
        _ = {n: t.square_() for n, t in g.tensors.items()}  # C_u = g_u²
    inter = interference_from_units(lay, *(_loop_gradients(case, b, slices) for b in case.tasks))
    conf = conflicts_from_units(*(_loop_gradients(case, b, slices) for b in case.tasks),
                                layout=lay, n_permutations=N_PERMUTATIONS)
    return _scores(inter, conf)


def pipeline_shared_loop(case):
    """Per-sample gradients by a micro-batch-of-one loop computed once per task and shared
    by the contributions, interference and conflicts (a careful hand-written pipeline).
    """
    from fisher_fast.conflicts import conflicts_from_units
    from fisher_fast.interference import interference_from_units

    per_task = [_loop_gradients(case, b) for b in case.tasks]
    for g in per_task:
        _ = {n: t.square() for n, t in g.tensors.items()}  # C_u = g_u²
    lay = ff.attention_layout(case.model)
    inter = interference_from_units(lay, *per_task)
    conf = conflicts_from_units(*per_task, layout=lay, n_permutations=N_PERMUTATIONS)
    return _scores(inter, conf)


def pipeline_separate(case):
    """fisher_fast's separate public calls: contributions of A and of B, interference,
    conflicts (each recomputes the per-sample gradients it needs).
    """
    a, b = case.tasks
    for batch in (a, b):
        ff.per_sample_contributions(case.model, batch)
    inter = ff.interference(case.model, a, b)
    conf = ff.conflicts(case.model, a, b, n_permutations=N_PERMUTATIONS)
    return _scores(inter, conf)


def pipeline_cross_task(case):
    """``fisher_fast.cross_task``: one gradient pass per task for all three."""
    a, b = case.tasks
    res = ff.cross_task(case.model, a, b, contributions="all",
                        conflicts=dict(n_permutations=N_PERMUTATIONS))
    return _scores(res.interference, res.conflicts)


# -- the accumulator's stream ------------------------------------------------------------
def stream_fwd_bwd(case):
    """The floor over the stream: forward + backward of every batch."""
    for batch in case.stream:
        row_losses(case.model, batch, case.family).sum().backward()
    case.model.zero_grad(set_to_none=True)


def accumulator(case, statistics="all"):
    """``FisherAccumulator.update`` per batch, then ``empirical_fisher``."""
    acc = ff.FisherAccumulator(case.model, loss_fn=loss_of(case), statistics=statistics)
    for batch in case.stream:
        acc.update(batch)
    return dict(acc.empirical_fisher())


def one_shot(case):
    """``fisher_fast.empirical_fisher`` of all the stream's rows at once."""
    return fisher_fast_full(case)


METHODS = {
    "fwd+bwd": fwd_bwd, "fisher_fast": fisher_fast_full, "fisher_fast-group": fisher_fast_group,
    "fisher_fast-exact": fisher_fast_exact, "fisher_fast-mc": fisher_fast_mc,
    "loop": loop, "loop-exact": loop_exact, "vmap": vmap, "opacus": opacus,
    "backpack": backpack_full, "backpack-exact": backpack_exact, "backpack-mc": backpack_mc,
    "nngeometry": nngeometry_full, "nngeometry-exact": nngeometry_exact,
    "nngeometry-mc": nngeometry_mc,
    "naive-loop": pipeline_naive, "shared-loop": pipeline_shared_loop,
    "separate-calls": pipeline_separate, "cross_task": pipeline_cross_task,
    "accumulator": accumulator, "accumulator-fisher": lambda c: accumulator(c, "fisher"),
    "one-shot": one_shot,
    "fwd+bwd-tf32": lambda c: fwd_bwd(c, tf32=True),
    "fisher_fast-tf32": lambda c: fisher_fast_full(c, allow_tf32=True),
    "fwd+bwd-bf16": lambda c: fwd_bwd(c, autocast=torch.bfloat16),
    "fisher_fast-bf16": lambda c: fisher_fast_full(c, autocast=torch.bfloat16),
}


def method(name: str, kind: str):
    """The callable of ``name`` for a workload of ``kind`` (``fwd+bwd`` of a stream runs
    over its batches).
    """
    if kind == "stream" and name == "fwd+bwd":
        return stream_fwd_bwd
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}.")
    return METHODS[name]
