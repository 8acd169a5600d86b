"""Row-coupling layers are refused before the first forward, or named when they show."""

import pytest
import torch
from torch import nn

import fisher_fast as ff
from fisher_fast.batching.row_coupling import coupling_modules, locate_coupling


class Classifier(nn.Module):
    """x [B, 2, 4] -> Linear -> ``mid`` -> tanh -> Linear -> 3 classes."""

    def __init__(self, mid: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.mid, self.out = nn.Linear(4, 6), mid, nn.Linear(12, 3)

    def forward(self, x, y=None):
        return self.out(torch.tanh(self.mid(self.lin(x))).flatten(1))


class RunningMean(nn.Module):
    """A parameter (so the functorch path re-runs it) and a buffer updated in its forward."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.register_buffer("running", torch.zeros(6))

    def forward(self, x):
        self.running.mul_(0.9).add_(0.1 * x.detach().mean(dim=(0, 1)))
        return x * self.scale


class Center(nn.Module):
    """Subtracts the batch mean: couples rows, invisible to any class check."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def batch(B=5):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(B, 2, 4, generator=g), "y": torch.arange(B) % 3}


def _counting(model):
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


ENTRY = {
    "empirical_fisher": lambda m: ff.empirical_fisher(m, batch(), loss_fn=loss),
    "per_sample_gradients": lambda m: ff.per_sample_gradients(m, batch(), loss_fn=loss),
    "accumulator.update": lambda m: ff.FisherAccumulator(m, loss_fn=loss).update(batch()),
}

COUPLED = [
    pytest.param(lambda: nn.BatchNorm1d(2), True, r"'mid' \(BatchNorm1d in training mode\)",
                 id="batchnorm-train"),
    pytest.param(lambda: nn.BatchNorm1d(2, track_running_stats=False), False,
                 r"'mid' \(BatchNorm1d without running statistics", id="batchnorm-no-stats-eval"),
    pytest.param(lambda: nn.SyncBatchNorm(2), True, r"'mid' \(SyncBatchNorm in training mode\)",
                 id="syncbatchnorm-train"),
    pytest.param(lambda: nn.InstanceNorm1d(2, track_running_stats=True), True,
                 r"'mid' \(InstanceNorm1d in training mode with track_running_stats=True\)",
                 id="instancenorm-tracking-train"),
    pytest.param(lambda: nn.Dropout(0.5), True, r"'mid' \(Dropout, p=0.5, in training mode\): "
                 r"each forward draws a new dropout mask", id="dropout-train"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY))
@pytest.mark.parametrize("make, train, message", COUPLED)
def test_coupling_layers_are_refused_before_any_forward(make, train, message, entry):
    model = Classifier(make()).train(train)
    calls = _counting(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        ENTRY[entry](model)
    assert calls == []  # no forward ran: running statistics untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


@pytest.mark.parametrize("make, train", [
    pytest.param(lambda: nn.GroupNorm(1, 2), True, id="groupnorm-train"),
    pytest.param(lambda: nn.LayerNorm(6), True, id="layernorm-train"),
    pytest.param(lambda: nn.Dropout(0.0), True, id="dropout-p0-train"),
    pytest.param(lambda: nn.Dropout(0.5), False, id="dropout-eval"),
    pytest.param(lambda: nn.BatchNorm1d(2), False, id="batchnorm-eval"),
    pytest.param(lambda: nn.InstanceNorm1d(2), True, id="instancenorm-untracked-train"),
])
def test_per_row_layers_are_accepted(make, train):
    model = Classifier(make()).train(train)
    assert coupling_modules(model) == []
    ff.per_sample_gradients(model, batch(), loss_fn=loss, dtype=torch.float64, check=True)


def test_functional_attention_dropout_in_training_mode_is_refused():
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="llama", num_layers=1))
    model.model.layers[0].self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn' \(LlamaAttention, "
                                         r"attention_dropout=0.1, in training mode\)"):
        ff.empirical_fisher(model, random_batch(vocab_size=11, batch_size=2, seq_len=5))


def test_the_first_offender_is_named_and_the_others_counted():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.BatchNorm1d(4)).train()
    assert [n for n, _ in coupling_modules(model)] == ["1", "2"]
    with pytest.raises(ValueError, match=r"module '1' \(and 1 more modules like it\)"):
        ff.empirical_fisher(model, {"x": torch.randn(3, 4)},
                            loss_fn=lambda m, b: m(b["x"]).square().sum(1))


def test_a_forward_that_mutates_its_state_is_named_not_a_functorch_error():
    model = Classifier(RunningMean()).eval()
    acc = ff.FisherAccumulator(model, loss_fn=loss)
    with pytest.raises(ValueError, match=r"module 'mid' \(RunningMean\) updating one in place.*"
                                         r"in eval mode too"):
        acc.update(batch())
    assert acc.tasks() == []


def test_a_failed_row_guard_names_the_module_that_mixes_rows():
    model = Classifier(Center()).eval()
    with pytest.raises(ValueError, match=r"rows interact.*The first module whose output for "
                                         r"that row changes with the other rows is 'mid' \(Center\)"):
        ff.per_sample_gradients(model, batch(), loss_fn=loss, dtype=torch.float64, check=True)


def test_locate_coupling_skips_modules_that_agree_and_reports_none_for_the_loss():
    model = Classifier(nn.Identity()).eval().double()
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in batch().items()}

    def run(rows):
        return lambda: model(b["x"][rows])

    assert locate_coupling(model, run(slice(None)), run(slice(2, 3)), 2, 1e-9) is None
    centered = Classifier(Center()).eval().double()
    assert locate_coupling(centered, lambda: centered(b["x"]), lambda: centered(b["x"][2:3]),
                           2, 1e-9) == "mid"
