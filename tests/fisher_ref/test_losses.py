"""The built-in losses against Hugging Face's own loss of each row, and hand cases."""

import pytest
import torch

from fisher_ref.losses import (
    CausalLMLoss,
    MaskedLMLoss,
    SequenceClassificationLoss,
    causal_lm_loss,
    masked_lm_loss,
    sequence_classification_loss,
)
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance

CASES = [
    pytest.param("gpt2", "causal", causal_lm_loss, id="arch=gpt2-causal"),
    pytest.param("bert", "mlm", masked_lm_loss, id="arch=bert-mlm"),
    pytest.param("bert-cls", "cls", sequence_classification_loss, id="arch=bert-cls-cls"),
]


@pytest.mark.parametrize("arch,kind,loss", CASES)
def test_row_loss_equals_cross_entropy_of_the_row_alone(arch, kind, loss):
    model = build_model(TinyConfig(arch=arch), dtype=torch.float64)
    batch = random_batch(kind=kind, batch_size=3, seed=1)
    rows = loss(model, batch)
    rtol, atol = tolerance("float64-paths")
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        logits, labels = model(**one).logits, one["labels"]
        if kind == "causal":  # HF's convention, written out: logits[t] predict labels[t + 1]
            logits, labels = logits[0, :-1], labels[0, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(rows[i], expected, rtol=rtol, atol=atol)


def test_sum_reduction_is_mean_times_token_count():
    model = build_model(TinyConfig(arch="gpt2"), dtype=torch.float64)
    batch = random_batch(kind="causal", batch_size=4, seed=2)
    counts = causal_lm_loss.token_counts(batch)
    torch.testing.assert_close(CausalLMLoss("sum")(model, batch), causal_lm_loss(model, batch) * counts)


def test_token_counts_by_hand():
    labels = torch.tensor([[5, 6, -100, -100], [-100, -100, -100, -100], [1, 2, 3, 4]])
    batch = {"labels": labels}
    assert CausalLMLoss().token_counts(batch).tolist() == [1, 0, 3]  # shift drops position 0
    assert MaskedLMLoss().token_counts(batch).tolist() == [2, 0, 4]
    cls = {"labels": torch.tensor([2, -100, 0])}
    assert SequenceClassificationLoss().token_counts(cls).tolist() == [1, 0, 1]


def test_empty_row_has_zero_loss():
    model = build_model(TinyConfig(arch="gpt2"), dtype=torch.float64)
    batch = random_batch(kind="causal", batch_size=3, empty_rows=(1,), seed=3)
    for loss in (CausalLMLoss("mean"), CausalLMLoss("sum")):
        assert loss(model, batch)[1].item() == 0.0


def test_causal_alignment_by_hand():
    """Logits at t predict the label at t + 1: a one-hot model makes the NLL readable."""

    class Echo(torch.nn.Module):  # logits at t put mass on token input_ids[t] + 1
        def forward(self, input_ids, labels=None):
            return 50.0 * torch.nn.functional.one_hot(input_ids + 1, 6).double()

    batch = {"input_ids": torch.tensor([[0, 1, 2]]), "labels": torch.tensor([[0, 1, 2]])}
    assert causal_lm_loss(Echo(), batch).item() < 1e-15  # every next token predicted
    wrong = {"input_ids": torch.tensor([[0, 1, 2]]), "labels": torch.tensor([[0, 3, 3]])}
    assert causal_lm_loss(Echo(), wrong).item() > 10.0


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction: expected one of"):
        CausalLMLoss("none")
