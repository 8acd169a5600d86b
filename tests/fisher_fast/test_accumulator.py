"""FisherAccumulator: streaming equals one pass, failures change nothing, state persists."""

import os

import pytest
import torch

import fisher_fast as ff
from fisher_ref.testing.batches import concat_batches
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch

TOL = dict(zip(("rtol", "atol"), tolerance("welford"), strict=True))


def _acc(model, **kw):
    return ff.FisherAccumulator(model, dtype=torch.float64, groups="generic",
                                micro_batch_sizes=(2,), **kw)


def _tensors(acc):
    return {f"{t}/{k}": v for t, d in acc.state_dict()["tasks"].items()
            for k, v in d["tensors"].items()}


def test_updates_equal_one_batch_for_any_chunk_size():
    model, b1, b2 = TinyLM(), tiny_batch(B=3, seed=1), tiny_batch(B=4, seed=2, empty_rows=(1,))
    acc = _acc(model, chunk_size=2)
    acc.update(b1)
    acc.update(b2)
    whole = ff.empirical_fisher(model, concat_batches([b1, b2]), dtype=torch.float64, chunk_size=5)
    assert_dicts_close(acc.empirical_fisher(), whole, **TOL)
    assert acc.empirical_fisher().empty_ids == whole.empty_ids == [4]  # ids continue: 3 + 1


def test_tasks_are_kept_apart():
    model, b1, b2 = TinyLM(), tiny_batch(B=3, seed=1), tiny_batch(B=2, seed=2)
    acc = _acc(model)
    acc.update(b1, task="a")
    acc.update(b2, task="b")
    assert acc.tasks() == ["a", "b"]
    assert_dicts_close(acc.mean_gradient("b"), ff.mean_gradient(model, b2, dtype=torch.float64), **TOL)


def test_failed_update_leaves_state_unchanged():
    model = TinyLM()
    acc = _acc(model, chunk_size=1)  # chunks 1 and 2 succeed before chunk 3 fails
    acc.update(tiny_batch(B=3, seed=1))
    before = _tensors(acc)
    bad = tiny_batch(B=3, seed=2)
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][2, 0] = 99  # out of the vocabulary: fails in the forward of chunk 3
    with pytest.raises(IndexError):
        acc.update(bad)
    after = _tensors(acc)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert acc.n_units() == 3


def test_non_finite_gradient_names_parameter_and_unit():
    model = torch.nn.Linear(2, 1, bias=False).double()

    def loss_fn(m, batch):  # sqrt(z^2) is finite at z = 0, its gradient is not
        return torch.sqrt(m(batch["x"]).squeeze(-1) ** 2)

    acc = ff.FisherAccumulator(model, loss_fn=loss_fn, dtype=torch.float64)
    acc.update({"x": torch.tensor([[1.0, 2.0]], dtype=torch.float64)})
    before = _tensors(acc)
    with pytest.raises(ValueError, match=r"non-finite gradient.*'weight', unit 'b'"):
        acc.update({"x": torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
                    "sample_ids": ["a", "b"]})
    assert all(torch.equal(v, _tensors(acc)[k]) for k, v in before.items())


def test_resume_from_state_dict_is_identical():
    model, b1, b2 = TinyLM(), tiny_batch(B=3, seed=1), tiny_batch(B=3, seed=2)
    straight = _acc(model)
    straight.update(b1)
    straight.update(b2)
    first = _acc(model)
    first.update(b1)
    resumed = _acc(model)
    resumed.load_state_dict(first.state_dict())
    resumed.update(b2)
    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_load_round_trip(tmp_path):
    model = TinyLM()
    acc = _acc(model)
    acc.update(tiny_batch(B=3, seed=1, empty_rows=(0,)), task="t")
    acc.save(tmp_path / "acc.safetensors")
    back = _acc(model).load(tmp_path / "acc.safetensors")
    assert back.tasks() == ["t"] and back.empirical_fisher("t").empty_ids == [0]
    assert_dicts_close(back.empirical_fisher("t"), acc.empirical_fisher("t"), rtol=0, atol=0)
    assert_dicts_close(back.batch_squared_gradient(2, "t"), acc.batch_squared_gradient(2, "t"),
                       rtol=0, atol=0)


def test_loading_into_a_different_configuration_fails():
    model = TinyLM()
    acc = _acc(model)
    acc.update(tiny_batch(B=2))
    other = ff.FisherAccumulator(model, dtype=torch.float64, unit="token")
    with pytest.raises(ValueError, match="different one"):
        other.load_state_dict(acc.state_dict())


def _gpt2_acc(**kw):
    from fisher_ref.testing.models import TinyConfig, build_model
    return ff.FisherAccumulator(build_model(TinyConfig(arch="gpt2", num_layers=1)), **kw)


@pytest.mark.parametrize("saved, here, what", [
    (dict(groups="heads"), dict(groups="generic"), "groups"),
    (dict(), dict(loss_fn=ff.CausalLMLoss("sum")), "loss"),
    (dict(), dict(autocast=torch.bfloat16), "autocast"),
], ids=["groups", "loss-reduction", "autocast"])
def test_loading_checks_groups_loss_and_autocast(saved, here, what):
    from fisher_ref.testing.batches import random_batch
    acc = _gpt2_acc(**saved)
    acc.update(random_batch(vocab_size=11, batch_size=2, seq_len=5))
    with pytest.raises(ValueError, match="different one") as err:
        _gpt2_acc(**here).load_state_dict(acc.state_dict())
    assert f"'{what}'" in str(err.value)


def test_loading_checks_parameter_shapes():
    from fisher_ref.testing.models import TinyConfig, build_model
    small = ff.FisherAccumulator(build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=11)))
    big = ff.FisherAccumulator(build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=13)))
    with pytest.raises(ValueError, match="'params'.*transformer.wte.weight.*\\[11, 8\\].*\\[13, 8\\]"):
        big.load_state_dict(small.state_dict())


@pytest.mark.parametrize("statistics", ["all", "fisher"])
def test_mc_labels_equal_the_oracle_mc_fisher_over_updates(statistics):
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=7)).double()
    b1 = random_batch(vocab_size=7, batch_size=3, seq_len=5, seed=1)
    b2 = random_batch(vocab_size=7, batch_size=2, seq_len=5, seed=2, empty_rows=(0,))
    acc = ff.FisherAccumulator(model, dtype=torch.float64, chunk_size=2,
                               labels="mc", n_samples=3, seed=11, statistics=statistics)
    acc.update(b1)
    acc.update(b2)
    want = fr.mc_fisher(model, concat_batches([b1, b2]), n_samples=3, seed=11)
    assert_dicts_close(acc.empirical_fisher(), want,
                       **dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True)))


BAD = [
    pytest.param(dict(labels="drawn"), "labels: expected one of ('true', 'mc'), got 'drawn'", id="labels"),
    pytest.param(dict(labels="mc", micro_batch_sizes=(2,)), "expected no micro_batch_sizes", id="mc-micro"),
    pytest.param(dict(labels="mc", n_samples=0), "n_samples: expected", id="n-samples"),
    pytest.param(dict(labels="mc", seed=1.5), "seed: expected an int, got 1.5", id="seed"),
    pytest.param(dict(labels="mc", loss_fn=lambda m, b: ff.causal_lm_loss(m, b)),
                 "labels='mc' needs a loss with the token-loss protocol", id="mc-plain-loss"),
]


@pytest.mark.parametrize("kw, message", BAD)
def test_bad_mc_configuration_is_a_value_error(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ff.FisherAccumulator(TinyLM(), **kw)


def test_mc_accumulator_offers_only_fisher_estimators():
    acc = ff.FisherAccumulator(TinyLM(), dtype=torch.float64, labels="mc")
    acc.update(tiny_batch(B=2))
    with pytest.raises(ValueError, match="expected an accumulator with labels='true'"):
        acc.gradient_variance()


def test_mc_non_finite_gradient_names_the_unit():
    model = TinyLM(rms=False)

    batch = tiny_batch(B=3)

    keep = []

    def find_row_one(module, args, out):  # forward rows that copy sample 1 (any order)
        keep[:] = [(args[0] != batch["input_ids"][1]).any(dim=1).to(out.dtype)[:, None, None]]

    def zero_row_one(module, args, out):  # sqrt(z^2) at z = 0 (sample 1's rows): 0/0
        return out * keep[0] + torch.sqrt((out * keep[0]) ** 2) * 0

    model.emb.register_forward_hook(find_row_one)
    model.ln.register_forward_hook(zero_row_one)
    acc = ff.FisherAccumulator(model, dtype=torch.float64, labels="mc", n_samples=2)
    with pytest.raises(ValueError, match=r"non-finite gradient.*'emb.weight', unit 1\."):
        acc.update(batch)
    assert acc.tasks() == []


def test_fisher_only_statistics_stream_resume_and_refuse_the_rest(tmp_path):
    # statistics="fisher": E[g²] over updates equals the full-state accumulator and the
    # functional estimator; resuming from a file continues identically; estimators that
    # need the mean are refused; a failed update leaves it untouched
    model, b1, b2 = TinyLM(), tiny_batch(B=3, seed=1), tiny_batch(B=4, seed=2, empty_rows=(1,))
    lean = _acc(model, chunk_size=2, statistics="fisher")
    full = _acc(model, chunk_size=3)
    for acc in (lean, full):
        acc.update(b1)
        acc.update(b2)
    assert_dicts_close(lean.empirical_fisher(), full.empirical_fisher(), **TOL)
    assert_dicts_close(lean.empirical_fisher(), ff.empirical_fisher(
        model, concat_batches([b1, b2]), dtype=torch.float64), **TOL)
    assert_dicts_close(lean.batch_squared_gradient(2), full.batch_squared_gradient(2), **TOL)
    assert lean.empirical_fisher().empty_ids == [4]
    assert {k.rsplit("/", 1)[1] for k in _tensors(lean) if "/moments/" in k} == {"W", "f"}
    for what in ("mean_gradient", "squared_mean_gradient", "gradient_variance"):
        with pytest.raises(ValueError, match=f"{what}: expected an accumulator with statistics='all'"):
            getattr(lean, what)()
    first = _acc(model, chunk_size=2, statistics="fisher")
    first.update(b1)
    first.save(tmp_path / "lean.safetensors")
    resumed = _acc(model, chunk_size=2, statistics="fisher").load(tmp_path / "lean.safetensors")
    resumed.update(b2)
    a, b = _tensors(lean), _tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different one"):
        _acc(model).load(tmp_path / "lean.safetensors")
    bad = tiny_batch(B=2, seed=3)
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][1, 0] = 99
    with pytest.raises(IndexError):
        resumed.update(bad)
    assert all(torch.equal(v, _tensors(resumed)[k]) for k, v in b.items())
    # the result is a copy: changing it does not change the accumulator
    f = resumed.empirical_fisher()
    next(iter(f.values())).zero_()
    assert_dicts_close(resumed.empirical_fisher(), lean.empirical_fisher(), rtol=0, atol=0)


def test_statistics_must_be_all_or_fisher():
    with pytest.raises(ValueError, match="statistics"):
        ff.FisherAccumulator(TinyLM(), statistics="mean")


def test_finite_gradients_whose_squares_overflow_are_named_as_such():
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e30)  # input-side gradients ~1e30: finite, squares are not
    acc = ff.FisherAccumulator(model)
    before = acc.state_dict()
    with pytest.raises(ValueError, match="squares overflow torch.float32 at parameter "
                                         "'transformer.wte.weight', unit 0"):
        acc.update(random_batch(vocab_size=11, batch_size=2, seq_len=5))
    assert acc.state_dict() == before


def test_an_id_seen_in_an_earlier_update_of_the_task_is_refused_and_nothing_changes():
    model = TinyLM()
    acc = _acc(model)
    acc.update(tiny_batch(B=3, seed=1), sample_ids=["a", "b", "c"])
    before = _tensors(acc)
    with pytest.raises(ValueError, match=r"sample_ids: expected ids not seen before in task "
                                         r"'default', got 'b', counted in an earlier update "
                                         r"\(1 of this batch's 2 ids were\)"):
        acc.update(tiny_batch(B=2, seed=2), sample_ids=["d", "b"])
    assert _equal_tensors(before, _tensors(acc)) and acc.n_units() == 3
    acc.update(tiny_batch(B=2, seed=2), sample_ids=["d", "e"])  # new ids: counted
    acc.update(tiny_batch(B=2, seed=2), task="other", sample_ids=["a", "b"])  # other task
    assert acc.n_units() == 5 and acc.n_units("other") == 2


def test_default_ids_continue_and_clash_with_explicit_ones():
    acc = _acc(TinyLM())
    acc.update(tiny_batch(B=2, seed=1))  # ids 0, 1
    acc.update(tiny_batch(B=2, seed=2))  # ids 2, 3
    with pytest.raises(ValueError, match="got 3, counted in an earlier update"):
        acc.update(tiny_batch(B=2, seed=3), sample_ids=[3, 4])
    acc.update(tiny_batch(B=2, seed=3), sample_ids=["3", "4"])  # str "3" is not int 3


def test_an_empty_row_s_id_counts_as_seen():
    acc = _acc(TinyLM())
    acc.update(tiny_batch(B=2, seed=1, empty_rows=(1,)), sample_ids=["x", "y"])
    with pytest.raises(ValueError, match="got 'y'"):
        acc.update(tiny_batch(B=1, seed=2), sample_ids=["y"])


def test_seen_ids_survive_save_and_load(tmp_path):
    model = TinyLM()
    acc = _acc(model)
    acc.update(tiny_batch(B=2, seed=1), sample_ids=[10, 11])
    acc.save(tmp_path / "acc.safetensors")
    back = _acc(model).load(tmp_path / "acc.safetensors")
    with pytest.raises(ValueError, match="got 11, counted in an earlier update"):
        back.update(tiny_batch(B=1, seed=2), sample_ids=[11])
    resumed = _acc(model)
    resumed.load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="got 10, counted"):
        resumed.update(tiny_batch(B=1, seed=2), sample_ids=[10])


def _equal_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_integer_labels_of_any_width_give_the_int64_result(dtype):
    model, b = TinyLM(), tiny_batch(B=3, seed=1)
    if dtype == torch.uint8:  # no -100 in uint8: every label active
        b["labels"] = b["input_ids"].clone()
    narrow = {**b, "labels": b["labels"].to(dtype)}
    acc = _acc(model)
    acc.update(narrow)
    want = ff.empirical_fisher(model, b, dtype=torch.float64)
    assert_dicts_close(acc.empirical_fisher(), want, **TOL)
    assert_dicts_close(ff.empirical_fisher(model, narrow, dtype=torch.float64), want, rtol=0, atol=0)


@pytest.mark.parametrize("model, kw, message", [
    pytest.param("gpt2", {}, "model: expected a torch.nn.Module, got str.", id="model-str"),
    pytest.param(None, {"dtype": "float64"},
                 "dtype: expected torch.float32 or torch.float64, got 'float64' (str).",
                 id="dtype-str"),
    pytest.param(None, {"dtype": torch.float16},
                 "dtype: expected torch.float32 or torch.float64, got torch.float16.",
                 id="dtype-half"),
    pytest.param(None, {"device": "gpu"}, "device: expected a torch device such as 'cpu'",
                 id="device-name"),
], )
def test_bad_construction_arguments_are_one_line_value_errors(model, kw, message):
    with pytest.raises(ValueError) as err:
        ff.FisherAccumulator(TinyLM() if model is None else model, **kw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_a_cuda_device_on_a_cpu_machine_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"device: expected an available device, got 'cuda' "
                                         r"\(CUDA is not available here; use 'cpu'\)"):
        ff.FisherAccumulator(TinyLM(), device="cuda")


@pytest.mark.parametrize("method, path, message", [
    ("save", "missing/acc.safetensors", "path: expected a file in an existing directory"),
    ("save", ".", "path: expected a file name, got the directory"),
    ("save", None, "path: expected a str or os.PathLike, got NoneType."),
    ("load", "missing.safetensors", "path: expected an existing file"),
    ("load", ".", "path: expected a file, got"),
])
def test_bad_save_and_load_paths_are_value_errors_before_any_work(method, path, message,
                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    acc = _acc(TinyLM())
    acc.update(tiny_batch(B=2))
    before = _tensors(acc)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        getattr(acc, method)(path)
    assert _equal_tensors(before, _tensors(acc)) and os.listdir(tmp_path) == []
