"""The oracle refuses row-coupling and random layers before any forward, and names the
module when only its row-independence guard can see the coupling.
"""

import pytest
import torch
from torch import nn

import fisher_ref as fr
from fisher_ref.row_coupling import check_no_row_coupling


class Classifier(nn.Module):
    def __init__(self, mid: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.mid, self.out = nn.Linear(4, 6), mid, nn.Linear(12, 3)

    def forward(self, x, y=None):
        return self.out(torch.tanh(self.mid(self.lin(x))).flatten(1))


class Center(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def batch(B=4):
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(B, 2, 4, generator=g), "y": torch.arange(B) % 3}


@pytest.mark.parametrize("make, train, message", [
    pytest.param(lambda: nn.BatchNorm1d(2), True,
                 r"module 'mid': BatchNorm1d in training mode normalises each row with the "
                 r"batch's statistics\. Call model\.eval\(\)", id="batchnorm-train"),
    pytest.param(lambda: nn.BatchNorm1d(2, track_running_stats=False), False,
                 r"module 'mid': BatchNorm1d without running statistics", id="batchnorm-no-stats"),
    pytest.param(lambda: nn.InstanceNorm1d(2, track_running_stats=True), True,
                 r"module 'mid': InstanceNorm1d in training mode with track_running_stats=True",
                 id="instancenorm-tracking-train"),
    pytest.param(lambda: nn.Dropout(0.5), True,
                 r"module 'mid': Dropout \(p=0.5\) in training mode draws a new mask", id="dropout"),
])
def test_coupling_layers_are_refused_before_any_forward(make, train, message):
    model = Classifier(make()).train(train)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        fr.per_sample_gradients(model, batch(), loss_fn=loss)
    assert calls == []


@pytest.mark.parametrize("make", [lambda: nn.GroupNorm(1, 2), lambda: nn.Dropout(0.0),
                                  lambda: nn.InstanceNorm1d(2)], ids=["groupnorm", "dropout-p0",
                                                                      "instancenorm"])
def test_per_row_layers_in_training_mode_are_accepted(make):
    model = Classifier(make()).train()
    check_no_row_coupling(model)
    assert fr.per_sample_gradients(model, batch(), loss_fn=loss).ids == [0, 1, 2, 3]


def test_functional_dropout_rates_of_attention_modules_count():
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="llama", num_layers=1))
    model.model.layers[0].self_attn.attention_dropout = 0.25
    model.train()
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn'.*LlamaAttention "
                                         r"\(attention_dropout=0.25\) applies dropout"):
        fr.empirical_fisher(model, random_batch(vocab_size=11, batch_size=2, seq_len=5))


def test_a_failed_row_guard_names_the_module_that_mixes_rows():
    with pytest.raises(ValueError, match=r"expected each row's loss not to depend on the other "
                                         r"rows.*The first module whose output for that row "
                                         r"changes with the other rows is 'mid' \(Center\)"):
        fr.per_sample_gradients(Classifier(Center()).eval(), batch(), loss_fn=loss)


def test_a_loss_that_mixes_rows_is_said_to_be_outside_any_module():
    def mixing(model, b):
        rows = loss(model, b)
        return rows + rows.mean()

    with pytest.raises(ValueError, match="No module's output for that row changes"):
        fr.per_sample_gradients(Classifier(nn.Identity()).eval(), batch(), loss_fn=mixing)
