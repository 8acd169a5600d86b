"""mc_fisher and exact_fisher: the class enumeration by hand, the label-drawing convention
by hand, and Monte-Carlo convergence to the exact Fisher.
"""

import copy
import zlib

import numpy as np
import pytest
import torch

from fisher_ref.gradient_moments import empirical_fisher
from fisher_ref.losses import causal_lm_loss
from fisher_ref.losses import sequence_classification_loss as cls_loss
from fisher_ref.mc_fisher import draw_labels, exact_fisher, mc_fisher
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_ref._tiny import SoftmaxRegression, softmax_data, softmax_probs

RTOL, ATOL = tolerance("float64-paths")


def _near_uniform_softmax():
    model, batch = SoftmaxRegression(), softmax_data(n=4)
    with torch.no_grad():
        model.W.mul_(0.5)
    return model, batch


def test_exact_fisher_softmax_closed_form():
    model, batch = _near_uniform_softmax()
    p, x = softmax_probs(model, batch), batch["x"].numpy()
    C = p.shape[1]
    # sum_c p_c ((p - e_c) x^T)^2 per unit, averaged over units
    per_unit = [sum(p[i, c] * np.outer(p[i] - np.eye(C)[c], x[i]) ** 2 for c in range(C))
                for i in range(len(x))]
    got = exact_fisher(model, batch, loss_fn=cls_loss, unit="token")["W"]
    torch.testing.assert_close(got, torch.from_numpy(np.mean(per_unit, 0)), rtol=RTOL, atol=ATOL)


def _norm_rel(a, b):
    num = sum(float((a[k] - b[k]).square().sum()) for k in b)
    return (num / sum(float(v.square().sum()) for v in b.values())) ** 0.5


def test_mc_fisher_approaches_exact_fisher():
    model, batch = _near_uniform_softmax()
    exact = exact_fisher(model, batch, loss_fn=cls_loss, unit="token")
    mc = mc_fisher(model, batch, loss_fn=cls_loss, unit="token", n_samples=300, seed=0)
    assert _norm_rel(mc, exact) < tolerance("mc-fisher-vs-exact")[0]


@pytest.mark.slow
def test_mc_fisher_approaches_exact_fisher_on_gpt2_heavy():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(kind="causal", batch_size=3, seq_len=4, seed=21)
    exact = exact_fisher(model, batch, unit="token")
    mc = mc_fisher(model, batch, unit="token", n_samples=4000, seed=1)
    assert _norm_rel(mc, exact) < tolerance("mc-fisher-vs-exact-heavy")[0]


def test_draws_follow_the_documented_convention():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([[1, -100, 2], [0, 4, -100]])
    ids, seed, n = ["row-a", 17], 5, 4
    drawn = draw_labels(logits, targets, ids, n, seed)
    for i, sid in enumerate(ids):
        row_seed = (seed * 1_000_003 + zlib.crc32(str(sid).encode())) % 2**63
        u = torch.rand((3, n), dtype=torch.float64, generator=torch.Generator("cpu").manual_seed(row_seed))
        for t in range(3):
            probs = torch.softmax(logits[i, t], -1).tolist()
            for k in range(n):
                if targets[i, t] == -100:
                    assert drawn[k, i, t] == -100
                    continue
                acc, expected = 0.0, len(probs) - 1  # none above u: clamped to C - 1
                for c, pc in enumerate(probs):  # smallest c with cumsum > u
                    acc += pc
                    if acc > u[t, k]:
                        expected = c
                        break
                assert drawn[k, i, t] == expected


def test_mc_fisher_is_the_mean_of_F_over_drawn_labels():
    model, batch = _near_uniform_softmax()
    ids, n = [10, 11, 12, 13], 3
    logits = model(batch["x"]).detach()[:, None, :]
    drawn = draw_labels(logits, batch["labels"][:, None], ids, n, seed=2)
    fs = [empirical_fisher(model, {"x": batch["x"], "labels": drawn[k, :, 0]}, loss_fn=cls_loss)
          for k in range(n)]
    mc = mc_fisher(model, batch, loss_fn=cls_loss, n_samples=n, seed=2, sample_ids=ids)
    assert_dicts_close(mc, {"W": sum(f["W"] for f in fs) / n}, rtol=RTOL, atol=ATOL)


def test_draws_do_not_depend_on_batch_composition():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(kind="causal", batch_size=4, seed=22, sample_ids=["a", "b", "c", "d"])
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 2), slice(2, 4))]
    kw = dict(unit="token", n_samples=2, seed=9)
    whole = mc_fisher(model, batch, **kw)
    parts = [mc_fisher(model, h, **kw) for h in halves]
    combined = {k: sum(p[k] * p.total_weight for p in parts) / whole.total_weight for k in whole}
    assert_dicts_close(whole, combined, rtol=RTOL, atol=ATOL)


def test_exact_fisher_reports_empty_rows():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(kind="causal", batch_size=3, seq_len=3, empty_rows=(1,), seed=23)
    F = exact_fisher(model, batch, loss_fn=causal_lm_loss)
    assert F.empty_ids == [1] and F.n_units == int(causal_lm_loss.token_counts(batch).sum())


def test_causal_mc_fisher_draws_the_next_token_label():
    """Drawn targets are aligned (logits at t draw the label at t + 1): rebuild unshifted
    labels from the documented draws and average F over them.
    """
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(kind="causal", batch_size=3, seq_len=4, empty_rows=(1,), seed=24,
                         sample_ids=["p", "q", "r"])
    data = {k: v for k, v in batch.items() if k != "sample_ids"}
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(input_ids=data["input_ids"],
                                               attention_mask=data["attention_mask"]).logits[:, :-1]
    drawn = draw_labels(logits, data["labels"][:, 1:], ["p", "q", "r"], 2, seed=4)
    fs = []
    for k in range(2):
        labels = torch.cat([torch.full((3, 1), -100), drawn[k]], dim=1)
        fs.append(empirical_fisher(model, {**batch, "labels": labels}, weighting="token"))
    mc = mc_fisher(model, batch, weighting="token", n_samples=2, seed=4)
    assert_dicts_close(mc, {n: (fs[0][n] + fs[1][n]) / 2 for n in mc}, rtol=RTOL, atol=ATOL)
    assert mc.empty_ids == ["q"] and mc.total_weight == fs[0].total_weight
