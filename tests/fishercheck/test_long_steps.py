"""The long steps: interrupted and resumed from a store, each gives the uninterrupted result
bit for bit; C_A kept, stored or recomputed gives the same interference.
"""

import pytest
import torch

import fisher_fast
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fishercheck import long_steps
from fishercheck.interference_blocks import slice_names
from fishercheck.memory_plan import Plan
from fishercheck.run_store import RunStore


@pytest.fixture(scope="module")
def model():
    return build_model(TinyConfig(arch="llama", num_layers=2, num_heads=4, num_kv_heads=2))


def batch(n, seed, prefix):
    b = random_batch(batch_size=n, seed=seed)
    b["sample_ids"] = [f"{prefix}_{i}" for i in range(n)]
    return b


def opened(path):
    store = RunStore(path)
    store.open({"model": "m", "task_a": "a", "task_b": "b", "settings": {}}, {})
    return store


class Interrupt:
    """Replace ``owner.name`` by a wrapper raising KeyboardInterrupt on its ``at``-th call."""

    def __init__(self, monkeypatch, owner, name, at):
        self.calls, original = 0, getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.calls == at:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def test_units_are_the_rows_with_a_label_to_predict():
    b = batch(4, 0, "a")
    b["labels"] = b["labels"].clone()
    b["labels"][1, 1:] = -100  # the first label is never predicted (the shift): an empty row
    assert long_steps.units_of(b)["sample_ids"] == ["a_0", "a_2", "a_3"]
    assert torch.equal(long_steps.units_of(b)["input_ids"], b["input_ids"][[0, 2, 3]])


def test_moments_interrupted_and_resumed_equal_an_uninterrupted_run(model, tmp_path, monkeypatch):
    b = batch(7, 0, "a")
    want, _ = long_steps.task_moments(model, b, "A", chunk_rows=2, dtype=torch.float32)
    with opened(tmp_path / "s") as store:
        with pytest.raises(KeyboardInterrupt):
            with monkeypatch.context() as m:
                Interrupt(m, fisher_fast.FisherAccumulator, "update", at=3)
                long_steps.task_moments(model, b, "A", chunk_rows=2, dtype=torch.float32,
                                        store=store, interval=0)
        advanced = []
        got, resumed = long_steps.task_moments(model, b, "A", chunk_rows=2, dtype=torch.float32,
                                               store=store, interval=0, advance=advanced.append)
    assert resumed == 4 and sum(advanced) == 7
    for est in ("empirical_fisher", "squared_mean_gradient"):
        for n, t in getattr(want, est)("A").items():
            assert torch.equal(getattr(got, est)("A")[n], t), (est, n)


def test_contributions_skip_the_ids_the_store_has(model, tmp_path, monkeypatch):
    units = long_steps.units_of(batch(7, 1, "a"))
    names = slice_names(fisher_fast.attention_layout(model))
    kept = long_steps.kept_contributions(model, units, names, chunk_rows=3, dtype=torch.float32)
    store = fisher_fast.ContributionStore(tmp_path / "c", device_bytes=0, host_bytes=0)
    with pytest.raises(KeyboardInterrupt), monkeypatch.context() as m:
        Interrupt(m, fisher_fast, "per_sample_contributions", at=2)
        long_steps.file_contributions(model, units, names, store=store, chunk_rows=3,
                                      dtype=torch.float32)
    assert store.ids("A") == units["sample_ids"][:3]  # the first chunk, committed
    calls = Interrupt(monkeypatch, fisher_fast, "per_sample_contributions", at=0)
    skipped = long_steps.file_contributions(model, units, names, store=store, chunk_rows=3,
                                            dtype=torch.float32)
    assert (skipped, calls.calls) == (3, 2) and store.ids("A") == units["sample_ids"]
    got = store.get_stacked("A", units["sample_ids"])
    for n in names:
        assert torch.equal(got[n], torch.cat([c[n] for c in kept])), n


def test_kept_stored_and_recomputed_contributions_give_the_same_interference(model, tmp_path,
                                                                             monkeypatch):
    ua, ub = (long_steps.units_of(batch(n, s, p)) for n, s, p in ((7, 2, "a"), (5, 3, "b")))
    layout = fisher_fast.attention_layout(model)
    names = slice_names(layout)
    F = fisher_fast.empirical_fisher(model, ua)
    fhat = {n: F[n] for n in names}
    plan = Plan(0, "memory", chunk_rows=2, block_rows=3, peaks={})
    kept = long_steps.kept_contributions(model, ua, names, chunk_rows=2, dtype=torch.float32)
    want, _ = long_steps.interference(model, ua, ub, fhat, layout, plan, dtype=torch.float32,
                                      kept=kept)
    recomputed, _ = long_steps.interference(model, ua, ub, fhat, layout, plan, dtype=torch.float32)
    assert recomputed == want
    contributions = fisher_fast.ContributionStore(tmp_path / "c", device_bytes=0, host_bytes=0)
    long_steps.file_contributions(model, ua, names, store=contributions, chunk_rows=2,
                                  dtype=torch.float32)
    with opened(tmp_path / "s") as store:
        with pytest.raises(KeyboardInterrupt), monkeypatch.context() as m:  # in the second block
            Interrupt(m, fisher_fast, "per_sample_gradients", at=2)
            long_steps.interference(model, ua, ub, fhat, layout, plan, dtype=torch.float32,
                                    contributions=contributions, store=store)
        assert store.block(0) is not None and store.block(1) is None
        calls = Interrupt(monkeypatch, fisher_fast, "per_sample_gradients", at=0)
        stored, resumed = long_steps.interference(model, ua, ub, fhat, layout, plan,
                                                  dtype=torch.float32,
                                                  contributions=contributions, store=store)
    assert (resumed, calls.calls) == (1, 1)
    assert stored == want
    assert len(want["top"]) == 10 and {t["id_b"] for t in want["top"]} <= set(ub["sample_ids"])
