"""Generic roles and group reduction (SPEC §3): output units of Linear rows and Conv1D
columns checked through the forward pass; R linear and total-preserving; group stats.
"""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fisher_ref.gradient_moments import empirical_fisher
from fisher_ref.groups import group_fisher, group_ids, parameter_roles, reduce_groups
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance
from fisher_ref.units import per_sample_gradients

RTOL, ATOL = tolerance("float64-paths")


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.lin = torch.nn.Linear(3, 4)
        self.conv = Conv1D(2, 4)  # nf=2 outputs, nx=4 inputs: weight [4, 2]
        self.norm = torch.nn.LayerNorm(2)
        self.scale = torch.nn.Parameter(torch.ones(2, 2))

    def forward(self, input_ids, labels=None):
        return self.norm(self.conv(self.lin(self.emb(input_ids)))) @ self.scale


def test_roles_and_group_counts():
    roles = parameter_roles(Mixed())
    assert roles == {"emb.weight": "embedding", "lin.weight": "linear", "lin.bias": "bias",
                     "conv.weight": "conv1d", "conv.bias": "bias", "norm.weight": "norm",
                     "norm.bias": "norm", "scale": "other"}
    counts = {k: n for k, (_, n) in group_ids(Mixed()).items()}
    assert counts == {"emb.weight": 5, "lin.weight": 4, "lin.bias": 4, "conv.weight": 2,
                      "conv.bias": 2, "norm.weight": 2, "norm.bias": 2, "scale": 1}


@pytest.mark.parametrize("module", [torch.nn.Linear(3, 4), Conv1D(4, 3)], ids=["linear", "conv1d"])
def test_each_weight_group_feeds_exactly_one_output_unit(module):
    ids, n = group_ids(torch.nn.Sequential(module))["0.weight"]
    x = torch.randn(5, 3)
    base, original = module(x).detach(), module.weight.detach().clone()
    for k in range(n):
        with torch.no_grad():
            module.weight.copy_(original + (ids == k).float())
            changed = (module(x) - base).abs().amax(0) > 0
        assert changed.tolist() == [j == k for j in range(n)]


def test_embedding_groups_are_rows():
    ids, n = group_ids(Mixed())["emb.weight"]
    assert n == 5 and (ids == torch.arange(5)[:, None]).all()


def test_reduction_is_linear_and_sums_to_the_total():
    ids, n = group_ids(Mixed())["conv.weight"]
    x, y = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    rx, ry = reduce_groups(x, ids, n), reduce_groups(y, ids, n)
    torch.testing.assert_close(reduce_groups(2 * x - 3 * y, ids, n), 2 * rx - 3 * ry)
    torch.testing.assert_close(rx.sum(-1), x.sum((1, 2)))
    torch.testing.assert_close(rx, x.sum(1))  # Conv1D: a group is a column


def test_group_fisher_statistics_by_hand():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(kind="causal", batch_size=4, seed=31)
    stats = group_fisher(model, batch)
    pu = per_sample_gradients(model, batch)
    F = empirical_fisher(model, batch)
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D [d, 3d]: groups are columns
    f = pu.tensors[name].square().sum(1)  # [U, 3d]
    expected = {"mean": F[name].sum(0), "variance": f.var(0, correction=0),
                "stderr": (f.var(0, correction=0) / 4).sqrt(),
                "snr": f.mean(0) / (f.var(0, correction=0) / 4).sqrt(),
                "n": torch.full((f.shape[1],), 4)}
    assert_dicts_close(stats[name], expected, rtol=RTOL, atol=ATOL)
    for k, v in stats.items():  # every group mean sums to the tensor total of F
        torch.testing.assert_close(v["mean"].sum(), F[k].sum(), rtol=RTOL, atol=ATOL)


def test_snr_conventions_for_zero_stderr():
    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
            self.unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x, labels=None):
            return x @ self.W.T

    def loss(model, batch):  # every row has gradient 1 on W: zero variance, positive mean
        return model(**batch).sum(1)

    batch = {"x": torch.ones(3, 3, dtype=torch.float64)}
    stats = group_fisher(Half(), batch, loss_fn=loss)
    assert torch.isinf(stats["W"]["snr"]).all()
    assert torch.isnan(stats["unused"]["snr"]).all()


def test_head_groups_are_the_qkov_slices():
    from fisher_ref.slicing import qkov_mask

    model = build_model(TinyConfig(arch="gpt2", num_layers=1))  # H = 2: groups Q0 Q1 K0 K1 V0 V1
    batch = random_batch(kind="causal", batch_size=3, seed=33)
    stats = group_fisher(model, batch, groups="heads")
    F = empirical_fisher(model, batch)
    qkv, o = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"
    expected_qkv = [F[qkv][qkov_mask(model, 0, h, b)[qkv]].sum() for b in "QKV" for h in range(2)]
    expected_o = [F[o][qkov_mask(model, 0, h, "O")[o]].sum() for h in range(2)]
    torch.testing.assert_close(stats[qkv]["mean"], torch.stack(expected_qkv), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(stats[o]["mean"], torch.stack(expected_o), rtol=RTOL, atol=ATOL)
    assert stats["transformer.h.0.attn.c_proj.bias"]["mean"].shape == (1,)
    assert stats["transformer.h.0.mlp.c_fc.weight"]["mean"].shape == (32,)  # generic: columns
