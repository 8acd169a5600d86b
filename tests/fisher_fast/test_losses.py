"""Built-in losses against hand-computed NLLs on a model that returns fixed logits."""

import math

import torch

import fisher_fast as ff


class FixedLogits(torch.nn.Module):
    """Ignores its input: logits [B, T, 2] with p(class 1) = 3/4 everywhere."""

    def __init__(self, shape):
        super().__init__()
        self.z = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        with torch.no_grad():
            self.z[..., 1] = math.log(3.0)

    def forward(self, input_ids, attention_mask=None):
        return self.z


def test_causal_mean_and_sum_by_hand():
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long),
             "labels": torch.tensor([[5, 1, 0], [5, 1, -100]])}
    model = FixedLogits((2, 3, 2))
    # row 0 targets (1, 0): -log(3/4) - log(1/4); row 1 targets (1,): -log(3/4)
    a, b = -math.log(0.75), -math.log(0.25)
    torch.testing.assert_close(ff.CausalLMLoss("sum")(model, batch),
                               torch.tensor([a + b, a], dtype=torch.float64))
    torch.testing.assert_close(ff.causal_lm_loss(model, batch),
                               torch.tensor([(a + b) / 2, a], dtype=torch.float64))
    assert ff.causal_lm_loss.token_counts(batch).tolist() == [2, 1]


def test_empty_row_has_zero_loss_and_zero_count():
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([[-100, -100]])}
    model = FixedLogits((1, 2, 2))
    assert ff.masked_lm_loss(model, batch).tolist() == [0.0]
    assert ff.masked_lm_loss.token_counts(batch).tolist() == [0]


def test_sequence_classification_aligns_one_position():
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.tensor([0, -100])}
    model = FixedLogits((2, 2))
    logits, targets = ff.sequence_classification_loss.logits_and_targets(model, batch)
    assert logits.shape == (2, 1, 2) and targets.tolist() == [[0], [-100]]
    torch.testing.assert_close(ff.sequence_classification_loss(model, batch),
                               torch.tensor([-math.log(0.25), 0.0], dtype=torch.float64))
