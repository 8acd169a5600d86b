"""Capture of any module output (#12 item 2): tuples, dicts and dataclasses, outputs computed
from one another, rows flattened with their positions, subclasses that override ``forward``,
sparse MoE routing and per-expert groups, and parameters read outside their module, each
against the oracle or refused in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fisher_fast as ff
import fisher_ref as fr
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.tolerances import tolerance

TOL = dict(zip(("rtol", "atol"), tolerance("float64-paths")))
F64 = dict(dtype=torch.float64)


@dataclass
class Halves:
    first: torch.Tensor
    second: torch.Tensor


class Splits(nn.Module):
    """Returns its two halves as a tuple, a dict or a dataclass."""

    def __init__(self, d, kind):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 2 * d * d, dtype=torch.float64).reshape(2 * d, d))
        self.kind = kind

    def forward(self, x):
        y = x @ self.w.T
        a, b = y.chunk(2, dim=-1)
        if self.kind == "tuple":
            return a, None, b  # a non-tensor in between
        if self.kind == "dict":
            return {"a": a, "b": b}
        if self.kind == "dataclass":
            return Halves(a, b)
        return a, torch.softmax(a, -1) * b  # the second output computed from the first


class Net(nn.Module):
    """ids -> embedding -> Splits -> head; the two outputs of Splits are both used."""

    def __init__(self, kind, V=7, d=4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, d)
        self.split = Splits(d, kind)
        self.head = nn.Linear(d, V)
        self.double().eval()

    def forward(self, input_ids, attention_mask=None):
        out = self.split(torch.tanh(self.emb(input_ids)))
        if isinstance(out, dict):
            a, b = out["a"], out["b"]
        elif isinstance(out, Halves):
            a, b = out.first, out.second
        else:
            a, b = out[0], out[-1]
        return self.head(torch.tanh(a) * b + a)


def _batch(V=7):
    return random_batch(vocab_size=V, batch_size=4, seq_len=5, seed=3)


@pytest.mark.parametrize("kind", ["tuple", "dict", "dataclass", "dependent"])
def test_structured_outputs_equal_the_oracle(kind):
    model, batch = Net(kind), _batch()
    assert_dicts_close(ff.empirical_fisher(model, batch, **F64), fr.empirical_fisher(model, batch),
                       **TOL)
    got = ff.per_sample_gradients(model, batch, **F64).tensors["split.w"]
    want = fr.per_sample_gradients(model, batch).tensors["split.w"]
    torch.testing.assert_close(got, want, **TOL)


class Flattening(nn.Module):
    """Flattens rows with their positions before a Linear (OPT's decoder MLP) and looks up a
    position table at ``arange(T)`` (no batch axis).
    """

    def __init__(self, V=7, d=4, positions=False):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.fc, self.head = nn.Embedding(V, d), nn.Linear(d, d), nn.Linear(d, V)
        self.pos = nn.Embedding(8, d) if positions else None
        self.double().eval()

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if self.pos is not None:
            h = h + self.pos(torch.arange(input_ids.shape[1]))  # [T, d]: not the batch's rows
        B, T, d = h.shape
        h = self.fc(h.reshape(-1, d)).reshape(B, T, d)
        return self.head(torch.tanh(h))


def test_rows_flattened_with_their_positions_equal_the_oracle():
    model, batch = Flattening(), _batch()
    assert_dicts_close(ff.empirical_fisher(model, batch, **F64), fr.empirical_fisher(model, batch),
                       **TOL)


def test_a_table_looked_up_without_the_batch_axis_is_still_refused():
    """A [T, d] lookup at arange(T) is not rows flattened with positions, even where the batch
    size divides T: it keeps the error it always had, never a silent mis-assignment.
    """
    model = Flattening(positions=True)
    batch = random_batch(vocab_size=7, batch_size=2, seq_len=4, seed=3)
    with pytest.raises(ValueError, match="pos to lead with the batch axis"):
        ff.empirical_fisher(model, batch, **F64)


class ScaledEmbedding(nn.Embedding):
    """An ``nn.Embedding`` subclass whose forward scales (Gemma's): not the plain rule."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class Scaled(nn.Module):
    def __init__(self, V=7, d=4):
        super().__init__()
        torch.manual_seed(2)
        self.emb, self.head = ScaledEmbedding(V, d), nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight  # tied: one known use, one functorch use
        self.double().eval()

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(input_ids)))


def test_a_subclass_that_overrides_forward_is_not_read_as_its_base():
    model, batch = Scaled(), _batch()
    assert sorted(ff.capture_plan(model)["emb.weight"]) == ["emb:functorch", "head:linear"]
    assert_dicts_close(ff.empirical_fisher(model, batch, **F64), fr.empirical_fisher(model, batch),
                       **TOL)


class ReadsDirectly(nn.Module):
    """Uses ``self.fc.weight`` without calling ``self.fc`` (Mamba's mixer does this)."""

    def __init__(self, V=7, d=4):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(V, d), nn.Linear(d, d), nn.Linear(d, V)
        self.double().eval()

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(input_ids) @ self.fc.weight.T))


def test_a_parameter_read_outside_its_module_is_refused_not_zero():
    with pytest.raises(ValueError, match=r"'fc\.weight' .* reads the parameter directly"):
        ff.empirical_fisher(ReadsDirectly(), _batch(), **F64)


def _mixtral():
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                           num_experts_per_tok=1, max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # a loop over the routed experts
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(cfg).double().eval()


def test_mixtral_router_and_experts_equal_the_oracle_and_unrouted_experts_are_zero():
    model, batch = _mixtral(), random_batch(vocab_size=11, batch_size=4, seq_len=3, seed=5)
    assert_dicts_close(ff.empirical_fisher(model, batch, **F64), fr.empirical_fisher(model, batch),
                       **TOL)
    name = "model.layers.0.mlp.experts.down_proj"  # [experts, d, d_ff]
    got = ff.per_sample_gradients(model, batch, params=[name], **F64).tensors[name]
    want = fr.per_sample_gradients(model, batch).tensors[name]
    torch.testing.assert_close(got, want, **TOL)
    used = want.flatten(2).abs().amax(-1) > 0  # [rows, experts]: which experts a row reached
    assert not bool(used.all())  # top-1 routing over 4 experts: some row misses some expert
    assert bool((got.flatten(2)[~used] == 0).all())


def test_per_expert_group_fisher_equals_the_oracle():
    model, batch = _mixtral(), random_batch(vocab_size=11, batch_size=4, seq_len=3, seed=5)
    name = "model.layers.0.mlp.experts.gate_up_proj"  # [experts, 2 d_ff, d]
    p = dict(model.named_parameters())[name]
    ids = torch.arange(p.shape[0])[:, None, None].expand(p.shape).contiguous()
    got = ff.group_fisher(model, batch, groups={name: (ids, p.shape[0])}, **F64)[name]
    pu = fr.per_sample_gradients(model, batch)
    pu.tensors = {name: pu.tensors[name]}
    want = fr.group_fisher_of(pu, {name: (ids, p.shape[0])})[name]
    torch.testing.assert_close(got["mean"], want["mean"], **TOL)
