"""Bad input: one table, one test asserting the error type and message."""

import pytest
import torch

import fisher_fast as ff
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch

MODEL, BATCH = TinyLM(), tiny_batch(B=2)


def _plain_loss(model, batch):
    return ff.causal_lm_loss(model, batch)


def _acc_update(**kw):
    ff.FisherAccumulator(MODEL, dtype=torch.float64).update(**kw)


def _half_ragged():
    b = dict(BATCH)
    b["attention_mask"] = b["attention_mask"][:1]
    return b


def _short_labels():
    b = dict(BATCH)
    b["labels"] = b["labels"][:, :-1]
    return b


def _short_mask():
    b = dict(BATCH)
    b["attention_mask"] = b["attention_mask"][:, :-1]
    return b


def _hf_batch(**changes):
    from fisher_ref.testing.batches import random_batch
    return {**random_batch(vocab_size=11, batch_size=2, seq_len=5, seed=1), **changes}


def _hf_fisher(batch, **kw):
    from fisher_ref.testing.models import TinyConfig, build_model
    return ff.empirical_fisher(build_model(TinyConfig(arch="gpt2", num_layers=1)), batch, **kw)


def _labels(values):
    b = _hf_batch()
    labels = b["labels"].clone()
    labels[0, -1] = values
    return {**b, "labels": labels}


CASES = [
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, unit="word"), "unit: expected one of", id="unit"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, weighting="x"), "weighting: expected", id="weighting"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, dtype=torch.float16), "dtype: expected", id="dtype"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, chunk_size=0), "chunk_size: expected None or a positive int", id="chunk0"),
    pytest.param(ff.empirical_fisher, dict(batch=[1, 2]), "batch: expected a dict", id="not-dict"),
    pytest.param(ff.empirical_fisher, dict(batch=_half_ragged()), "same leading batch size", id="ragged"),
    pytest.param(ff.empirical_fisher, dict(batch=_short_labels()), "batch['labels']: expected the shape of input_ids", id="labels-shape"),
    pytest.param(ff.empirical_fisher, dict(batch=_short_mask()), "batch['attention_mask']: expected the shape of input_ids", id="mask-shape"),
    pytest.param(_acc_update, dict(batch=_short_labels()), "expected the shape of input_ids", id="acc-labels-shape"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, sample_ids=[1]), "expected 2 ids", id="n-ids"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, sample_ids=["a", "a"]), "unique ids, got 'a' twice", id="dup-ids"),
    pytest.param(ff.empirical_fisher, dict(batch={**BATCH, "sample_ids": [0, 1]}, sample_ids=[0, 1]), "got both", id="ids-twice"),
    pytest.param(ff.empirical_fisher, dict(batch=tiny_batch(B=2, empty_rows=(0, 1))), "at least one non-empty row", id="all-empty"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, unit="token", loss_fn=_plain_loss), "token-loss protocol", id="plain-token"),
    pytest.param(ff.mc_fisher, dict(batch=BATCH, n_samples=0), "n_samples: expected a positive int", id="n-samples"),
    pytest.param(ff.mc_fisher, dict(batch=BATCH, seed=1.5), "seed: expected an int", id="seed"),
    pytest.param(ff.exact_fisher, dict(batch=BATCH, unit="sample"), "expected unit='token'", id="exact-unit"),
    pytest.param(ff.gradient_variance, dict(batch=tiny_batch(B=1), unbiased=True), "at least two units", id="unbiased-1"),
    pytest.param(ff.batch_squared_gradient, dict(batch=BATCH, micro_batch_size=0), "micro_batch_size", id="micro0"),
    pytest.param(ff.group_fisher, dict(batch=BATCH, groups="rows"), "groups: expected one of", id="groups"),
    pytest.param(ff.group_fisher, dict(batch=BATCH, groups={"nope": (torch.zeros(1), 1)}), "trainable parameter names", id="groups-name"),
    pytest.param(_acc_update, dict(batch=BATCH, task=3), "task: expected a str", id="task"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, sample_ids=torch.tensor([5, 5])), "unique ids, got 5 twice", id="tensor-dup-ids"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, sample_ids=[0.5, 1.5]), "expected str or int ids, got 0.5", id="float-ids"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, sample_ids=[True, False]), "expected str or int ids, got True", id="bool-ids"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, memory_budget=0), "memory_budget: expected None or a number of bytes >= 1, got 0", id="budget-0"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, memory_budget="1GB"), "memory_budget: expected", id="budget-str"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, loss_fn=lambda m, b: [0.0, 0.0]), "expected a tensor of one loss per row, got list", id="loss-list"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, loss_fn=lambda m, b: ff.causal_lm_loss(m, b).detach()), "tensor without a graph", id="loss-detached"),
]

# the same failures on an HF model, whose embedding table and logits give the bounds
HF_CASES = [
    pytest.param(_labels(99), "labels: expected class indices in [0, 11) or -100, got 99", id="label-too-big"),
    pytest.param(_labels(-5), "labels: expected class indices in [0, 11) or -100, got -5", id="label-negative"),
    pytest.param({**_hf_batch(), "labels": _hf_batch()["labels"].float()}, "expected integer class labels", id="float-labels"),
    pytest.param(_hf_batch(input_ids=torch.full((2, 5), 50)), "batch['input_ids']: expected token ids in [0, 11), got 50", id="ids-too-big"),
    pytest.param(_hf_batch(input_ids=torch.full((2, 5), -1)), "expected token ids in [0, 11), got -1", id="ids-negative"),
]


@pytest.mark.parametrize("batch, message", HF_CASES)
def test_bad_labels_and_token_ids_are_value_errors(batch, message):
    with pytest.raises(ValueError) as info:
        _hf_fisher(batch)
    assert message in str(info.value)


def test_sample_ids_as_a_tensor_are_read_as_ints(tmp_path):
    # the MC draws are seeded from the ids: a 0-d tensor id would seed from "tensor(3)"
    from fisher_ref.testing.models import TinyConfig, build_model
    model = build_model(TinyConfig(arch="gpt2", num_layers=1)).double()
    kw = dict(n_samples=2, seed=1, dtype=torch.float64)
    want = ff.mc_fisher(model, _hf_batch(sample_ids=[3, 4]), **kw)
    got = ff.mc_fisher(model, _hf_batch(sample_ids=torch.tensor([3, 4])), **kw)
    assert all(torch.equal(got[k], want[k]) for k in want)
    acc = ff.FisherAccumulator(model, dtype=torch.float64)
    acc.update(_hf_batch(), sample_ids=torch.tensor([7, 8]))
    acc.save(tmp_path / "a.safetensors")  # ids are JSON-able ints


@pytest.mark.parametrize("fn, kwargs, message", CASES)
def test_bad_input_raises_value_error_with_message(fn, kwargs, message):
    kwargs = dict(kwargs)
    args = () if fn is _acc_update else (MODEL,)
    with pytest.raises(ValueError, match=None) as info:
        fn(*args, **kwargs)
    assert message in str(info.value)


def test_a_model_without_an_embedding_table_skips_the_token_id_check():
    class NoTable(TinyLM):  # HF's base class raises NotImplementedError for such models
        def get_input_embeddings(self):
            raise NotImplementedError

    F = ff.empirical_fisher(NoTable(), BATCH, dtype=torch.float64)
    assert F.n_units == 2
