"""Accumulator state files: checksums verified, writes atomic, the model's fingerprint checked."""

import json
import os
import struct

import pytest
import torch

import fisher_fast as ff
from fisher_fast.stats import state_file
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch


def _acc(model, **kw):
    return ff.FisherAccumulator(model, dtype=torch.float64, groups="generic", **kw)


def _saved(tmp_path, model=None, name="acc.safetensors"):
    acc = _acc(model or TinyLM())
    acc.update(tiny_batch(B=3, seed=1), task="t")
    path = tmp_path / name
    acc.save(path)
    return acc, path


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), 8 + n, raw


def _rewrite_header(path, header):
    _, start, raw = _header(path)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[start:])


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_exact_and_leaves_no_temporary(tmp_path):
    acc, path = _saved(tmp_path)
    back = _acc(TinyLM()).load(path)
    assert _equal(back.empirical_fisher("t"), acc.empirical_fisher("t"))
    assert os.listdir(tmp_path) == ["acc.safetensors"]


def test_corrupted_payload_under_an_intact_header_names_file_and_tensor(tmp_path):
    _, path = _saved(tmp_path)
    header, start, raw = _header(path)
    key = "0/moments/lin.weight/m2"
    lo, hi = header[key]["data_offsets"]
    data = bytearray(raw)
    data[start + (lo + hi) // 2] ^= 0xFF  # one flipped byte in the middle of that tensor
    path.write_bytes(bytes(data))
    acc = _acc(TinyLM())
    with pytest.raises(ValueError, match=rf"{path}: expected tensor '{key}' to have the checksum "
                                         r"recorded when it was written.*corrupted"):
        acc.load(path)
    assert acc.tasks() == []


def test_an_edited_header_is_caught(tmp_path):
    _, path = _saved(tmp_path)
    header, _, _ = _header(path)
    meta = json.loads(header["__metadata__"]["fisher_fast"])
    meta["tasks"][0]["n_units"] += 1  # still valid JSON, still a plausible count
    header["__metadata__"]["fisher_fast"] = json.dumps(meta)
    _rewrite_header(path, header)
    with pytest.raises(ValueError, match=r"expected the 'fisher_fast' header to have the checksum"):
        _acc(TinyLM()).load(path)


@pytest.mark.parametrize("damage", ["truncated", "not-safetensors"])
def test_unreadable_files_are_value_errors_naming_the_file(tmp_path, damage):
    _, path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) - 40] if damage == "truncated" else b"\x00garbage" * 4)
    with pytest.raises(ValueError, match=rf"{path}: expected a readable safetensors file"):
        _acc(TinyLM()).load(path)


def test_saving_into_a_missing_directory_says_so_and_writes_nothing(tmp_path):
    acc = _acc(TinyLM())
    acc.update(tiny_batch(B=2))
    with pytest.raises(ValueError) as err:
        acc.save(tmp_path / "no" / "such" / "acc.safetensors")
    assert "expected a file in an existing directory" in str(err.value)
    assert "tmp" not in str(err.value).replace(str(tmp_path), "")  # no temporary name
    assert os.listdir(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    old, path = _saved(tmp_path)
    before = path.read_bytes()
    import safetensors.torch

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    new = _acc(TinyLM())
    new.update(tiny_batch(B=2, seed=5), task="other")
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["acc.safetensors"]


def test_a_state_of_other_weights_is_refused_unless_allowed(tmp_path):
    acc, path = _saved(tmp_path, TinyLM(seed=0))
    other = _acc(TinyLM(seed=1))  # same class and parameters, other values
    with pytest.raises(ValueError, match=r"expected a state saved with this model's weights, got "
                                         r"one saved with different values in 11 of 11 parameters "
                                         r".*allow_weights_change=True"):
        other.load(path)
    with pytest.raises(ValueError, match="different values"):
        other.load_state_dict(acc.state_dict())
    assert other.tasks() == []
    other.load(path, allow_weights_change=True)
    assert _equal(other.empirical_fisher("t"), acc.empirical_fisher("t"))


def test_a_change_in_one_weight_is_named(tmp_path):
    model = TinyLM()
    acc, path = _saved(tmp_path, model)
    with torch.no_grad():
        model.lin.bias[0] += 1e-12
    with pytest.raises(ValueError, match=r"different values in 1 of 11 parameters \('lin.bias'\)"):
        _acc(model).load(path)


class OtherLM(TinyLM):
    """Same parameters as TinyLM, another class."""


def test_a_state_of_another_model_class_or_dtype_is_refused(tmp_path):
    _, path = _saved(tmp_path, TinyLM())
    with pytest.raises(ValueError, match=r"expected a state saved for a .*OtherLM, got one saved "
                                         r"for a .*\.TinyLM"):
        _acc(OtherLM()).load(path, allow_weights_change=True)
    with pytest.raises(ValueError, match=r"'emb.weight': \[shape, dtype\] saved \[\[7, 4\], "
                                         r"'float64'\], here \[\[7, 4\], 'float32'\]"):
        _acc(TinyLM().float()).load(path, allow_weights_change=True)


def test_model_fingerprint_records_class_parameters_and_weights():
    model = TinyLM()
    fp = state_file.model_fingerprint(model)
    assert fp["class"].endswith(".TinyLM")
    assert fp["parameters"]["lin.weight"] == [[4, 4], "float64"]
    assert set(fp["weights"]) == {n for n, _ in model.named_parameters()}
    assert state_file.model_fingerprint(TinyLM()) == fp  # deterministic


def _legacy_file(acc, path):
    """What format 2 wrote: no checksums, no fingerprint, no seen ids."""
    from safetensors.torch import save_file

    state = acc.state_dict()
    flat, tasks = {}, []
    for i, (name, d) in enumerate(state["tasks"].items()):
        d = dict(d)
        for k, v in d.pop("tensors").items():
            if k != state_file.SEEN_KEY:
                flat[f"{i}/{k}"] = v.contiguous()
        tasks.append({"name": name, **d})
    meta = {"format": "fisher_fast.accumulator/2", "config": state["config"], "tasks": tasks}
    save_file(flat, str(path), metadata={"fisher_fast": json.dumps(meta)})


def test_a_format_2_file_loads_with_a_warning_and_format_1_is_refused(tmp_path):
    acc = _acc(TinyLM())
    acc.update(tiny_batch(B=3, seed=1), task="t")
    _legacy_file(acc, tmp_path / "v2.safetensors")
    back = _acc(TinyLM())
    with pytest.warns(UserWarning, match=r"format 'fisher_fast.accumulator/2'.*loaded without "
                                         r"verification"):
        back.load(tmp_path / "v2.safetensors")
    assert _equal(back.empirical_fisher("t"), acc.empirical_fisher("t"))
    back.save(tmp_path / "v3.safetensors")  # saving again upgrades it
    assert json.loads(_header(tmp_path / "v3.safetensors")[0]["__metadata__"]["fisher_fast"])[
        "format"] == state_file.FORMAT
    state = acc.state_dict()
    state["format"] = "fisher_fast.accumulator/1"
    with pytest.raises(ValueError, match="expected a 'fisher_fast.accumulator/3' state dict, got "
                                         "'fisher_fast.accumulator/1'"):
        _acc(TinyLM()).load_state_dict(state)
