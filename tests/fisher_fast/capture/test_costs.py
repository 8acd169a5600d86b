"""The cost model's choices, and that every path it can choose gives the oracle's numbers."""

import pytest
import torch

import fisher_fast as ff
import fisher_ref as fr
from fisher_fast.capture import costs
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast._classifiers import classifier_batch, cnn, mlp

# the CNN's first layer pads asymmetrically on purpose (padding="same", even kernel)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

F64 = dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True))
GRAM = dict(zip(("rtol", "atol"), tolerance("ghost-norm"), strict=True))


def test_one_position_e_g2_is_separable_and_moments_materialise():
    assert costs.route(8, 1, 512, 784, elements="second", groups=False, gram_ok=False) == \
        costs.Route("separable", None)
    assert costs.route(8, 1, 512, 784, elements="rows", groups=False, gram_ok=False) == \
        costs.Route("materialise", None)
    # several positions: (Σ_t δ_t x_tᵀ)² has cross terms, never separable
    assert costs.route(8, 2, 512, 784, elements="second", groups=False, gram_ok=False) == \
        costs.Route("materialise", None)


def test_groups_take_gram_products_only_where_cheaper_and_possible():
    assert costs.route(8, 4, 512, 512, elements=None, groups=True, gram_ok=True).groups == "gram"
    assert costs.route(8, 4096, 64, 64, elements=None, groups=True,
                       gram_ok=True).groups == "materialise"
    assert costs.route(8, 4, 512, 512, elements=None, groups=True,
                       gram_ok=False).groups == "materialise"
    # E[g²] and groups at T = 1: the separable product and the Gram norms, no rows formed
    both = costs.route(8, 1, 512, 512, elements="second", groups=True, gram_ok=True)
    assert both == costs.Route("separable", "gram") and not both.materialises
    # groups that need rows: the rows then serve the elements too
    assert costs.route(8, 1, 512, 512, elements="second", groups=True, gram_ok=False) == \
        costs.Route("materialise", "materialise")


def test_forced_paths_apply_where_they_can_and_are_restored():
    with costs.forced(elements="materialise", groups="materialise"):
        assert costs.route(8, 1, 512, 784, elements="second", groups=True, gram_ok=True) == \
            costs.Route("materialise", "materialise")
    with costs.forced(elements="separable", groups="gram"):
        # T = 2 cannot be separable: forcing does not make it so
        assert costs.route(8, 2, 4, 4, elements="second", groups=False,
                           gram_ok=True).elements == "materialise"
        assert costs.route(8, 4096, 64, 64, elements=None, groups=True, gram_ok=True).groups == "gram"
    assert costs.route(8, 4096, 64, 64, elements=None, groups=True,
                       gram_ok=True).groups == "materialise"


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"elements": "gram"}, "elements: expected one of", id="elements-gram"),
    pytest.param({"groups": "separable"}, "groups: expected one of", id="groups-separable"),
])
def test_forcing_an_unknown_path_is_an_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with costs.forced(**kwargs):
            pass


@pytest.fixture
def taken(monkeypatch):
    """The routes the capture chose, in call order."""
    seen = []
    real = costs.route

    def record(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]
    monkeypatch.setattr(costs, "route", record)
    return seen


MODELS = {"mlp": mlp, "cnn": cnn, "cnn-valid-stride2": lambda: cnn(padding="valid", stride=2)}
PATHS = [pytest.param(e, g, id=f"elements={e}-groups={g}")
         for e in ("separable", "materialise") for g in ("gram", "materialise")]


@pytest.mark.parametrize("path_e, path_g", PATHS)
@pytest.mark.parametrize("name", MODELS)
def test_every_path_equals_the_oracle_on_classifiers(name, path_e, path_g, taken):
    model = MODELS[name]()
    batch = classifier_batch(model)
    kw = dict(loss_fn=ff.sequence_classification_loss, dtype=torch.float64, chunk_size=3)
    ref = dict(loss_fn=fr.sequence_classification_loss)
    with costs.forced(elements=path_e, groups=path_g):
        fisher = ff.empirical_fisher(model, batch, **kw)
        groups = ff.group_fisher(model, batch, **kw)
        exact = ff.exact_fisher(model, batch, unit="token", **kw)
    assert_dicts_close(fisher, fr.empirical_fisher(model, batch, **ref), **F64)
    assert_dicts_close(exact, fr.exact_fisher(model, batch, **ref), **F64)
    want = fr.group_fisher(model, batch, **ref)
    for stat in ("mean", "variance"):
        assert_dicts_close({k: v[stat] for k, v in groups.items()},
                           {k: v[stat] for k, v in want.items()}, **GRAM, what=stat)
    elements = {r.elements for r in taken if r.elements}
    group_paths = {r.groups for r in taken if r.groups}
    if name == "mlp":  # every weight has T = 1: the forced path is the one taken
        assert elements == {path_e}
    assert path_g in group_paths


def test_default_choice_on_a_classifier_forms_no_weight_rows(taken, monkeypatch):
    from fisher_fast.capture.rules import LinearRule

    def no_rows(*a, **k):
        raise AssertionError("a per-row weight gradient was formed")
    monkeypatch.setattr(LinearRule, "_weight", no_rows)
    model = mlp()
    batch = classifier_batch(model, rows=7)
    got = ff.empirical_fisher(model, batch, loss_fn=ff.sequence_classification_loss,
                              dtype=torch.float64)
    assert_dicts_close(got, fr.empirical_fisher(model, batch, loss_fn=fr.sequence_classification_loss),
                       **F64)
    assert {r.elements for r in taken} == {"separable"}


@pytest.mark.parametrize("path_e, path_g", PATHS)
def test_every_path_equals_the_oracle_on_a_transformer(path_e, path_g):
    # GPT-2 (T > 1): materialised elements; the Gram path for generic and head groups; a
    # BERT sequence classifier's pooler and head see one position per row (separable)
    tol = F64
    for cfg, loss_ff, loss_fr in [
            (TinyConfig(arch="gpt2", num_layers=1, tie_embeddings=False), ff.causal_lm_loss,
             fr.causal_lm_loss),
            (TinyConfig(arch="bert-cls", num_layers=1), ff.sequence_classification_loss,
             fr.sequence_classification_loss)]:
        model = build_model(cfg).double()
        kind = "cls" if cfg.arch == "bert-cls" else "causal"
        batch = random_batch(vocab_size=cfg.vocab_size, batch_size=3, seq_len=5, seed=4,
                             kind=kind, num_labels=cfg.num_labels)
        with costs.forced(elements=path_e, groups=path_g):
            got = ff.empirical_fisher(model, batch, loss_fn=loss_ff, dtype=torch.float64, chunk_size=2)
            groups = ff.group_fisher(model, batch, loss_fn=loss_ff, dtype=torch.float64, chunk_size=2)
        assert_dicts_close(got, fr.empirical_fisher(model, batch, loss_fn=loss_fr), **tol)
        want = fr.group_fisher(model, batch, loss_fn=loss_fr)
        assert_dicts_close({k: v["mean"] for k, v in groups.items()},
                           {k: v["mean"] for k, v in want.items()}, **GRAM, what=cfg.make_id())
