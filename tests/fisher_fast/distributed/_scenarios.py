"""What each gloo rank runs in tests/fisher_fast/distributed/test_ranks.py (not a test
module). Every rank builds the same tiny model and its own shard; results go back as CPU
tensors and messages. Imports torch and fisher_fast only (no transformers, no fisher_ref):
each spawned rank imports this module, and process start dominates these tests.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import fisher_fast.distributed as ffd

V, D, T = 7, 4, 6


class TinyLM(nn.Module):
    """ids -> token + position embeddings -> LayerNorm -> Linear -> tanh -> Linear logits
    (float64, eval mode, rows independent).
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.pos = nn.Embedding(V, D, padding_idx=0), nn.Embedding(T, D)
        self.ln, self.lin, self.head = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, V)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.double().eval()

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1])[None])
        return self.head(torch.tanh(self.lin(self.ln(h))))


def tiny_batch(B: int, seed: int, empty_rows=()) -> dict:
    """B random rows of T tokens (the last one padding, its label inactive)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    ids[:, -1] = 0
    labels = ids.clone()
    labels[:, -1] = -100
    for r in empty_rows:
        labels[r] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def concat_batches(batches: list) -> dict:
    """Row-wise concatenation of batches of one sequence length."""
    return {k: [i for b in batches for i in b[k]] if k == "sample_ids" else
            torch.cat([b[k] for b in batches]) for k in batches[0]}

#: rows per rank, and the rank's empty rows, for the accumulator scenario (rank 0 keeps a
#: multiple of 2 units so that batch_squared_gradient(2) joins exactly)
ROWS = {2: (5, 3), 3: (5, 0, 3)}
EMPTY = {0: (1,)}
#: rows per rank with rank 0 empty (in the default, 2-rank run too)
EMPTY_FIRST = {2: (0, 3), 3: (0, 2, 3)}
ESTIMATORS = ("mean_gradient", "empirical_fisher", "squared_mean_gradient", "gradient_variance")
FAILED_RANK = 1


def shard(rank: int, rows: tuple, seed: int = 10, task: str = "a") -> dict | None:
    """Rank ``rank``'s rows (``None`` for no rows), ids ``"<task>.r<rank>.<i>"``."""
    B = rows[rank]
    if B == 0:
        return None
    batch = tiny_batch(B=B, seed=seed + rank, empty_rows=EMPTY.get(rank, ()) if task == "a" else ())
    batch["sample_ids"] = [f"{task}.r{rank}.{i}" for i in range(B)]
    return batch


def all_rows(rows: tuple, seed: int = 10, task: str = "a") -> dict:
    """The ranks' rows concatenated in rank order: what one process sees."""
    return concat_batches([b for r in range(len(rows)) if (b := shard(r, rows, seed, task))])


def _cpu(result) -> dict:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else _cpu(v)) for k, v in result.items()}


def _estimates(acc, task) -> dict:
    out = {name: _cpu(getattr(acc, name)(task)) for name in ESTIMATORS}
    out["unbiased"] = _cpu(acc.gradient_variance(task, unbiased=True))
    out["bsg2"] = _cpu(acc.batch_squared_gradient(2, task))
    out["groups"] = {k: _cpu(v) for k, v in acc.group_fisher(task).items()}
    out["n_units"], out["empty_ids"] = acc.n_units(task), acc.empirical_fisher(task).empty_ids
    return out


def _message(fn) -> str:
    try:
        fn()
    except (ValueError, ffd.RankFailure) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def accumulate(rank: int, world: int) -> dict:
    """ShardedAccumulator (float64, groups, micro-batches of 2) on uneven shards, in two
    updates per rank; task "b" lives on the last rank only; then float32, an id clash,
    missing ids and an injected failure.
    """
    rows, model = ROWS[world], TinyLM()
    acc = ffd.ShardedAccumulator(model, dtype=torch.float64, groups="generic",
                                 micro_batch_sizes=(2,), timeout=30)
    mine = shard(rank, rows)
    if mine is not None:  # two updates: ids are the batch's, the split is the rank's business
        k = 2
        acc.update({n: v[:k] for n, v in mine.items()}, task="a")
        acc.update({n: v[k:] for n, v in mine.items()}, task="a")
    if rank == world - 1:
        acc.update(shard(0, (2,), seed=30, task="b"), task="b")
    reduced = acc.all_reduce()
    out = {"a": _estimates(reduced, "a"), "b": _estimates(reduced, "b"),
           "local_units": acc.local.n_units("a") if mine is not None else 0}

    model32 = TinyLM().float()
    acc32 = ffd.ShardedAccumulator(model32, timeout=30)
    if mine is not None:
        acc32.update(mine, task="a")
    out["f32"] = _cpu(acc32.all_reduce().empirical_fisher("a"))

    clash = ffd.ShardedAccumulator(model, dtype=torch.float64, timeout=30)
    clash.update(tiny_batch(B=2, seed=rank), sample_ids=[f"own{rank}", "same"])
    out["clash"] = _message(clash.all_reduce)
    out["no_ids"] = _message(lambda: clash.update(tiny_batch(B=2, seed=rank)))

    def failing_run():
        with ffd.fail_together(timeout=30):
            run = ffd.ShardedAccumulator(model, dtype=torch.float64, timeout=30)
            if rank == FAILED_RANK:
                raise RuntimeError("injected failure")
            run.update(tiny_batch(B=2, seed=rank), sample_ids=[f"x{rank}", f"y{rank}"])
            run.all_reduce()
    t0 = time.monotonic()
    out["failure"] = _message(failing_run)
    out["failure_s"] = time.monotonic() - t0
    return out


def functional(rank: int, world: int) -> dict:
    """The sharded functional estimators, each on the same shards."""
    rows, model = ROWS[world], TinyLM()
    mine = shard(rank, rows)
    est, kw = ffd.estimators, dict(dtype=torch.float64, timeout=30)
    return {
        "mean_gradient": _cpu(est.mean_gradient(model, mine, **kw)),
        "empirical_fisher": _cpu(est.empirical_fisher(model, mine, **kw)),
        "squared_mean_gradient": _cpu(est.squared_mean_gradient(model, mine, **kw)),
        "gradient_variance": _cpu(est.gradient_variance(model, mine, unbiased=True, **kw)),
        "batch_squared_gradient": _cpu(est.batch_squared_gradient(model, mine, micro_batch_size=2, **kw)),
        "mc_fisher": _cpu(est.mc_fisher(model, mine, n_samples=2, seed=3, **kw)),
        "group_fisher": {k: _cpu(v) for k, v in est.group_fisher(model, mine, **kw).items()},
        "token_units": _cpu(est.empirical_fisher(model, mine, unit="token", **kw)),
        "empty_rank_0": _cpu(est.gradient_variance(model, shard(rank, EMPTY_FIRST[world]), **kw)),
    }


class TinyAttention(nn.Module):
    """Causal attention with separate q/k/v/o projections (detected as a LLaMA-like layout)."""

    def __init__(self, heads: int = 2, head_dim: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q_proj, self.k_proj = nn.Linear(D, heads * head_dim), nn.Linear(D, heads * head_dim)
        self.v_proj, self.o_proj = nn.Linear(D, heads * head_dim), nn.Linear(heads * head_dim, D)

    def forward(self, h):
        B, n, _ = h.shape

        def split(x):
            return x.view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, n, -1)
        return self.o_proj(out)


class TinyAttnLM(nn.Module):
    """ids -> embeddings -> attention (residual) -> LayerNorm -> Linear logits, float64."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.pos = nn.Embedding(V, D, padding_idx=0), nn.Embedding(T, D)
        self.attn, self.ln, self.head = TinyAttention(), nn.LayerNorm(D), nn.Linear(D, V)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.double().eval()

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1])[None])
        return self.head(self.ln(h + self.attn(h)))


#: rows per rank of tasks A and B for the cross-task scenario
CROSS_ROWS = {2: ((3, 2), (2, 3)), 3: ((3, 0, 2), (2, 2, 1))}
CONFLICT_OPTS = dict(n_permutations=200, seed=5, n_bootstrap=50, dtype=torch.float64)
INTERFERENCE_OPTS = dict(top_k=5, dtype=torch.float64)


def cross_task(rank: int, world: int) -> dict:
    """Conflicts (heads and parameters) and interference of sharded tasks A and B."""
    rows_a, rows_b = CROSS_ROWS[world]
    model = TinyAttnLM()
    a, b = shard(rank, rows_a, seed=40, task="a"), shard(rank, rows_b, seed=50, task="b")
    ct, kw = ffd.cross_task, dict(timeout=30)
    out = {}
    for groups in ("heads", "parameters"):
        res = ct.conflicts(model, a, b, groups=groups, **CONFLICT_OPTS, **kw)
        out[groups] = {"result": dict(res), "nulls": res.nulls, "ids": (res.ids_a, res.ids_b)}
    inter = ct.interference(model, a, b, **INTERFERENCE_OPTS, **kw)
    out["interference"] = {"blocks": {k: inter[k].cpu() for k in ("Q", "K", "V", "O")},
                           "top": inter.top_k, "ids": (inter.ids_a, inter.ids_b)}
    clash = shard(rank, (2,) * world, seed=60, task="c")
    clash["sample_ids"] = [f"c.r{rank}.0", "c.same"]
    out["clash"] = _message(lambda: ct.conflicts(model, clash, b, groups="parameters",
                                                 n_permutations=10, **kw))
    return out
