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


CASES = [
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, unit="word"), "unit: expected one of", id="unit"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, weighting="x"), "weighting: expected", id="weighting"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, dtype=torch.float16), "dtype: expected", id="dtype"),
    pytest.param(ff.empirical_fisher, dict(batch=BATCH, chunk_size=0), "chunk_size: expected a positive int", id="chunk0"),
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
]


@pytest.mark.parametrize("fn, kwargs, message", CASES)
def test_bad_input_raises_value_error_with_message(fn, kwargs, message):
    kwargs = dict(kwargs)
    args = () if fn is _acc_update else (MODEL,)
    with pytest.raises(ValueError, match=None) as info:
        fn(*args, **kwargs)
    assert message in str(info.value)
