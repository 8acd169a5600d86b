"""Bad input: one table of calls, each a ValueError saying what was expected and what came."""

import pytest
import torch

from fisher_ref.gradient_moments import (
    batch_squared_gradient,
    empirical_fisher,
    gradient_variance,
)
from fisher_ref.groups import group_fisher
from fisher_ref.losses import sequence_classification_loss as cls_loss
from fisher_ref.mc_fisher import exact_fisher, mc_fisher
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.units import per_sample_gradients
from tests.fisher_ref._tiny import SoftmaxRegression, softmax_data

GPT2 = build_model(TinyConfig(arch="gpt2", num_layers=1, num_heads=1))
BATCH = random_batch(kind="causal", batch_size=3, seq_len=4, seed=41)


def _without(key, **extra):
    return {**{k: v for k, v in BATCH.items() if k != key}, **extra}


class SqrtShift(SoftmaxRegression):
    """Finite loss, infinite gradient: d sqrt(s) / ds at s = 0."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x, labels=None):
        return x @ self.W.T + self.s.sqrt()


def _frozen():
    m = SoftmaxRegression()
    m.W.requires_grad_(False)
    return m


class BatchCentred(SoftmaxRegression):
    """Logits centred over the batch: each row's loss depends on the other rows."""

    def forward(self, x, labels=None):
        z = x @ self.W.T
        return z - z.mean(0)


def _plain_loss(model, batch):
    return cls_loss(model, batch)


SOFT, DATA = SoftmaxRegression(), softmax_data(n=2)
INF_ROW = {"x": DATA["x"].clone().index_fill_(0, torch.tensor([1]), float("inf")),
           "labels": DATA["labels"], "sample_ids": ["ok", "bad"]}

CASES = [
    pytest.param(empirical_fisher, dict(model=GPT2, batch=BATCH, unit="word"),
                 r"unit: expected one of \('sample', 'token'\), got 'word'", id="unknown-unit"),
    pytest.param(empirical_fisher, dict(model=GPT2, batch=BATCH, weighting="row"),
                 r"weighting: expected one of .*, got 'row'", id="unknown-weighting"),
    pytest.param(empirical_fisher, dict(model=GPT2, batch=_without("labels")),
                 r"expected key 'labels' .*, got keys", id="missing-labels"),
    pytest.param(empirical_fisher, dict(model=GPT2, batch=_without("labels", label=BATCH["labels"])),
                 r"got unknown keys \['label'\]", id="misnamed-labels"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2, batch=_without("input_ids", input_id=BATCH["input_ids"])),
                 r"expected key 'input_ids' \(the model's main input\)", id="misnamed-input-ids"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2, batch=_without("labels", labels=BATCH["labels"][:, :3])),
                 r"labels: expected the shape of input_ids \(3, 4\), got \(3, 3\)", id="labels-shape"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2,
                      batch=_without("attention_mask", attention_mask=BATCH["attention_mask"][:, :2])),
                 r"attention_mask: expected the shape of input_ids", id="mask-shape"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2, batch=_without("labels", labels=BATCH["labels"][:2])),
                 r"expected one batch size across keys", id="batch-size-mismatch"),
    pytest.param(empirical_fisher,
                 dict(model=SOFT, batch={"x": DATA["x"], "labels": DATA["labels"][:, None]},
                      loss_fn=cls_loss),
                 r"labels: expected shape \(2,\) for sequence classification, got \(2, 1\)",
                 id="cls-labels-shape"),
    pytest.param(empirical_fisher, dict(model=GPT2, batch=BATCH, sample_ids=[1, 2]),
                 r"sample_ids: expected 3 ids \(one per row\), got 2", id="ids-length"),
    pytest.param(empirical_fisher, dict(model=GPT2, batch=BATCH, sample_ids=["a", "b", "a"]),
                 r"sample_ids: expected unique ids, got duplicates \['a'\]", id="ids-duplicate"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2, batch={**BATCH, "sample_ids": [0, 1, 2]}, sample_ids=[0, 1, 2]),
                 r"expected them in the batch or as the argument, got both", id="ids-twice"),
    pytest.param(empirical_fisher, dict(model=SOFT, batch=INF_ROW, loss_fn=cls_loss),
                 r"Non-finite loss for unit 'bad'", id="nonfinite-loss"),
    pytest.param(empirical_fisher,
                 dict(model=SqrtShift(), batch=DATA, loss_fn=cls_loss, sample_ids=["p", "q"]),
                 r"Non-finite gradient of parameter 's' for unit 'p'", id="nonfinite-gradient"),
    pytest.param(empirical_fisher, dict(model=_frozen(), batch=DATA, loss_fn=cls_loss),
                 r"expected at least one trainable parameter", id="no-trainable-parameters"),
    pytest.param(empirical_fisher, dict(model=GPT2, batch=[BATCH]),
                 r"batch: expected a dict of tensors, got list", id="batch-not-dict"),
    pytest.param(empirical_fisher, dict(model=SOFT, batch=DATA, loss_fn=_plain_loss, unit="token"),
                 r"expected a token loss .* for unit='token'", id="plain-loss-token-unit"),
    pytest.param(per_sample_gradients,
                 dict(model=SOFT, batch=DATA, loss_fn=lambda m, b: cls_loss(m, b)[:, None]),
                 r"loss_fn: expected a 1-D tensor of row losses, got \(2, 1\)", id="loss-shape"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2, batch=random_batch(batch_size=2, empty_rows=(0, 1))),
                 r"expected at least one non-empty row, got none \(empty rows: \[0, 1\]\)", id="all-empty"),
    pytest.param(empirical_fisher,
                 dict(model=BatchCentred(), batch=DATA, loss_fn=cls_loss, sample_ids=["r", "s"]),
                 r"loss_fn: expected each row's loss not to depend on the other rows .*, got .* for "
                 r"row 'r' in the batch and .* with the row run alone", id="rows-interact"),
    pytest.param(empirical_fisher,
                 dict(model=SOFT, batch={"x": DATA["x"], "labels": torch.tensor([0, 3])}, loss_fn=cls_loss),
                 r"labels: expected class indices in \[0, 3\) or -100, got 3", id="label-out-of-range"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2, batch=_without("labels", labels=BATCH["labels"].clamp(max=-1))),
                 r"labels: expected class indices in \[0, 11\) or -100, got -1", id="negative-label"),
    pytest.param(empirical_fisher,
                 dict(model=GPT2, batch=_without("labels", labels=torch.tensor([1, 2, 3])), loss_fn=cls_loss),
                 r"logits: expected shape \[B, C\] for sequence classification, got \(3, 4, 11\)",
                 id="cls-loss-on-lm"),
    pytest.param(batch_squared_gradient, dict(model=GPT2, batch=BATCH, micro_batch_size=0),
                 r"micro_batch_size: expected an integer >= 1, got 0", id="micro-batch-zero"),
    pytest.param(gradient_variance, dict(model=GPT2, batch=random_batch(batch_size=1), unbiased=True),
                 r"expected at least 2 units, got 1", id="unbiased-one-unit"),
    pytest.param(mc_fisher, dict(model=GPT2, batch=BATCH, n_samples=0),
                 r"n_samples: expected an integer >= 1, got 0", id="mc-zero-draws"),
    pytest.param(mc_fisher, dict(model=SOFT, batch=DATA, loss_fn=_plain_loss),
                 r"expected a token loss .* for this estimator", id="mc-plain-loss"),
    pytest.param(exact_fisher, dict(model=GPT2, batch=BATCH, unit="sample"),
                 r"exact_fisher: expected unit='token', got unit='sample'", id="exact-sample-unit"),
    pytest.param(group_fisher, dict(model=GPT2, batch=BATCH, groups="rows"),
                 r"groups: expected one of \('generic', 'heads'\), got 'rows'", id="unknown-groups"),
]


@pytest.mark.parametrize("fn,kwargs,message", CASES)
def test_bad_input_raises_a_clear_value_error(fn, kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=message):
        fn(kwargs.pop("model"), kwargs.pop("batch"), **kwargs)


def test_sample_ids_as_a_tensor_or_array_are_ints():
    import copy

    import numpy as np

    model = copy.deepcopy(GPT2).double()  # the module's GPT2 stays float32
    want = mc_fisher(model, BATCH, sample_ids=[4, 5, 6], n_samples=2, seed=3)
    for ids in (torch.tensor([4, 5, 6]), np.array([4, 5, 6])):
        got = mc_fisher(model, BATCH, sample_ids=ids, n_samples=2, seed=3)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_forward_without_labels_is_fine_for_the_built_in_losses():
    # the built-in losses withhold `labels` from the model (docs/definitions.md §0)
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 3).double()

        def forward(self, x):
            return self.lin(x)

    batch = {"x": torch.randn(4, 2, dtype=torch.float64), "labels": torch.tensor([0, 1, 2, 0])}
    F = empirical_fisher(Linear(), batch, loss_fn=cls_loss)
    assert F.n_units == 4 and set(F) == {"lin.weight", "lin.bias"}
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        empirical_fisher(Linear(), {**batch, "extra": torch.zeros(4)}, loss_fn=cls_loss)
