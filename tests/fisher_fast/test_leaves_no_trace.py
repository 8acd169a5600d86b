"""Every public fisher_fast call leaves the process and the model as it found them.

After a warm-up call, further calls leave no fisher_fast object (and no tensor) alive; after a
call that succeeds, fails on bad input, or is interrupted by ``KeyboardInterrupt`` inside the
backward, the model has no hooks left and its flags, dtypes, devices and ``.grad`` fields
are as before. Written against a leak in which every call retained its capture (a cycle
through a tensor hook that the garbage collector cannot see) with all its per-row gradients.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

import fisher_fast as ff
from fisher_fast.losses import causal_lm_loss
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model

N_CALLS = 3


def _model():
    return build_model(TinyConfig(arch="gpt2", num_layers=2, num_heads=2, head_dim=4),
                       dtype=torch.float64)


def _batches(seed=0):
    return random_batch(batch_size=4, seq_len=6, seed=seed), \
        random_batch(batch_size=3, seq_len=6, seed=seed + 1)


def _store_interference(model, a, b, tmp):
    store = ff.ContributionStore(tmp, device="cpu", host_bytes=0)
    return ff.interference(model, a, b, store=store, chunk_size=2, dtype=torch.float64)


def _store_contributions(model, a, b, tmp):
    store = ff.ContributionStore(tmp, device="cpu", host_bytes=0)
    ff.per_sample_contributions(model, a, store=store, task="a", chunk_size=2,
                                return_tensors=False)
    return store.get_stacked("a", store.ids("a"))


def _accumulate(model, a, b, tmp):
    os.makedirs(tmp, exist_ok=True)
    acc = ff.FisherAccumulator(model, dtype=torch.float64, groups="heads",
                               micro_batch_sizes=(2,), chunk_size=2)
    acc.update(a, task="a")
    acc.update(b, task="b")
    acc.save(os.path.join(tmp, "state.safetensors"))
    return ff.FisherAccumulator(model, dtype=torch.float64, groups="heads",
                                micro_batch_sizes=(2,)).load(
        os.path.join(tmp, "state.safetensors")).empirical_fisher("a")


F64 = dict(dtype=torch.float64)
ENTRY_POINTS = {
    "mean_gradient": lambda m, a, b, t: ff.mean_gradient(m, a, **F64),
    "empirical_fisher": lambda m, a, b, t: ff.empirical_fisher(m, a, chunk_size=2, **F64),
    "squared_mean_gradient": lambda m, a, b, t: ff.squared_mean_gradient(m, a, **F64),
    "gradient_variance": lambda m, a, b, t: ff.gradient_variance(m, a, unbiased=True, **F64),
    "batch_squared_gradient": lambda m, a, b, t: ff.batch_squared_gradient(
        m, a, micro_batch_size=2, **F64),
    "mc_fisher": lambda m, a, b, t: ff.mc_fisher(m, a, n_samples=2, chunk_size=3, **F64),
    "exact_fisher": lambda m, a, b, t: ff.exact_fisher(m, a, **F64),
    "group_fisher": lambda m, a, b, t: ff.group_fisher(m, a, groups="heads", **F64),
    "per_sample_gradients": lambda m, a, b, t: ff.per_sample_gradients(m, a, check=True, **F64),
    "iter_unit_gradients": lambda m, a, b, t: list(ff.iter_unit_gradients(m, a, chunk_size=2,
                                                                          **F64)),
    "FisherAccumulator": _accumulate,
    "per_sample_contributions": lambda m, a, b, t: ff.per_sample_contributions(m, a, **F64),
    "per_sample_contributions(store)": _store_contributions,
    "interference": lambda m, a, b, t: ff.interference(m, a, b, fisher="pooled", **F64),
    "interference(store)": _store_interference,
    "conflicts": lambda m, a, b, t: ff.conflicts(m, a, b, n_permutations=20, n_bootstrap=20,
                                                 **F64),
}


def _live_objects() -> dict[str, int]:
    """Live fisher_fast objects and torch tensors, after a full collection."""
    gc.collect()
    counts = {"fisher_fast": 0, "tensors": 0}
    for o in gc.get_objects():
        module = getattr(type(o), "__module__", None)
        if isinstance(module, str) and module.startswith("fisher_fast"):
            counts["fisher_fast"] += 1
        elif issubclass(type(o), torch.Tensor):
            counts["tensors"] += 1
    return counts


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_repeated_calls_retain_nothing(entry, tmp_path):
    model, (a, b) = _model(), _batches()
    call = ENTRY_POINTS[entry]
    out = call(model, a, b, str(tmp_path / "warm"))
    del out
    before = _live_objects()
    for k in range(N_CALLS):
        out = call(model, a, b, str(tmp_path / f"call{k}"))
        del out
    assert _live_objects() == before


# --------------------------------------------------------------------- the model untouched
def _hook_dicts(module: torch.nn.Module) -> dict:
    return {k: len(getattr(module, k)) for k in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")}


def model_state(model: torch.nn.Module) -> dict:
    """Everything a call may not change: hooks (module, global, parameter), training mode,
    requires_grad, dtype, device and ``.grad`` of every parameter, the grad mode, the TF32
    switches and the global random state.
    """
    from torch.nn.modules import module as mod

    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return {
        "module hooks": {n: _hook_dicts(m) for n, m in model.named_modules()},
        "global hooks": [len(getattr(mod, k)) for k in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")],
        "tensor hooks": {n: (len(p._backward_hooks or {}),
                             len(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
                         for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "params": {n: (p.requires_grad, p.dtype, p.device, p.is_leaf)
                   for n, p in model.named_parameters()},
        "grad": {n: None if g is None else g.tolist() for n, g in grads.items()},
        "grad mode": torch.is_grad_enabled(),
        "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        "rng": torch.random.get_rng_state().tolist(),
    }


def _prepared_model():
    """A model with a user's own state on it: a frozen parameter, a ``.grad`` field, one
    forward hook of the user's, a submodule in training mode (dropout 0: rows independent).
    """
    model = _model()
    params = dict(model.named_parameters())
    params["transformer.wpe.weight"].requires_grad_(False)
    params["transformer.h.0.ln_1.weight"].grad = torch.full_like(
        params["transformer.h.0.ln_1.weight"], 0.5)
    model.transformer.h[1].attn.register_forward_hook(lambda *args: None)
    model.transformer.drop.train()
    return model


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_success_leaves_the_model_untouched(entry, tmp_path):
    model, (a, b) = _prepared_model(), _batches()
    before = model_state(model)
    ENTRY_POINTS[entry](model, a, b, str(tmp_path))
    assert model_state(model) == before


def _bad_labels(batch):
    bad = dict(batch)
    bad["labels"] = batch["labels"].clone()
    bad["labels"][0, 1] = 10_000  # out of the vocabulary
    return bad


def _nan_loss(model, batch):
    return causal_lm_loss(model, batch) * float("nan")


class _Interrupt:
    """A per-row loss whose backward raises ``KeyboardInterrupt`` (as Ctrl-C would) when it
    reaches the logits, in the middle of fisher_fast's backward.
    """

    def __call__(self, model, batch):
        keys = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**keys).logits
        logits.register_hook(self._raise)
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        labels = batch["labels"][:, 1:]
        active = labels != -100
        nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * active
        return nll.sum(1) / active.sum(1).clamp(min=1)

    @staticmethod
    def _raise(grad):
        raise KeyboardInterrupt


FAILURES = {
    "bad labels": (lambda m, a, b: ff.empirical_fisher(m, _bad_labels(a)), ValueError),
    "non-finite loss": (lambda m, a, b: ff.empirical_fisher(m, a, loss_fn=_nan_loss), ValueError),
    "interrupt: empirical_fisher": (
        lambda m, a, b: ff.empirical_fisher(m, a, loss_fn=_Interrupt()), KeyboardInterrupt),
    "interrupt: accumulator": (
        lambda m, a, b: ff.FisherAccumulator(m, loss_fn=_Interrupt(), groups="generic").update(a),
        KeyboardInterrupt),
    "interrupt: per_sample_gradients": (
        lambda m, a, b: ff.per_sample_gradients(m, a, loss_fn=_Interrupt()), KeyboardInterrupt),
    "interrupt: iter_unit_gradients": (
        lambda m, a, b: list(ff.iter_unit_gradients(m, a, loss_fn=_Interrupt(), chunk_size=2)),
        KeyboardInterrupt),
    "interrupt: interference": (
        lambda m, a, b: ff.interference(m, a, b, loss_fn=_Interrupt()), KeyboardInterrupt),
    "interrupt: conflicts": (
        lambda m, a, b: ff.conflicts(m, a, b, loss_fn=_Interrupt(), n_permutations=5),
        KeyboardInterrupt),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failure_leaves_the_model_untouched_and_retains_nothing(case):
    model, (a, b) = _prepared_model(), _batches()
    call, error = FAILURES[case]
    with pytest.raises(error):
        call(model, a, b)
    before, live = model_state(model), _live_objects()
    for _ in range(N_CALLS):
        with pytest.raises(error):
            call(model, a, b)
    assert model_state(model) == before
    assert _live_objects() == live


def test_tf32_switch_is_the_callers_between_chunks():
    """``iter_unit_gradients`` turns TF32 off for its own matmuls only, not while the caller
    holds a chunk.
    """
    model, (a, _) = _model(), _batches()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        seen = [torch.backends.cuda.matmul.allow_tf32
                for _ in ff.iter_unit_gradients(model, a, chunk_size=2)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert seen == [True, True]


# --------------------------------------------------------------------- CUDA and the soak
@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["empirical_fisher", "FisherAccumulator", "interference",
                                   "conflicts", "per_sample_contributions"])
def test_cuda_memory_returns_to_baseline(entry, device, tmp_path):
    model = _model().to(device)
    a, b = ({k: v.to(device) for k, v in x.items()} for x in _batches())
    call = ENTRY_POINTS[entry]
    call(model, a, b, str(tmp_path / "warm"))
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for k in range(N_CALLS):
        call(model, a, b, str(tmp_path / f"call{k}"))
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_soak_resident_memory_stays_bounded(tmp_path):
    """300 calls of the heaviest entry points: the resident set after the last hundred is
    within 64 MiB of where it stood after the first hundred (a leak of one capture per call,
    as before the fix, grows it by hundreds of MiB).
    """
    if not os.path.exists("/proc/self/statm"):
        pytest.fail("the soak test reads the resident set from /proc (Linux only)")
    model = build_model(TinyConfig(arch="gpt2", num_layers=2, num_heads=4, head_dim=32, max_positions=32),
                        dtype=torch.float32)
    a = random_batch(batch_size=8, seq_len=32, seed=0)
    b = random_batch(batch_size=8, seq_len=32, seed=1)
    calls = [lambda: ff.empirical_fisher(model, a), lambda: ff.interference(model, a, b),
             lambda: ff.FisherAccumulator(model).update(a)]
    marks = []
    for k in range(300):
        calls[k % len(calls)]()
        if k % 100 == 99:
            gc.collect()
            marks.append(_resident_bytes())
    assert marks[-1] - marks[0] < 64 << 20, [m >> 20 for m in marks]
