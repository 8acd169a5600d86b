"""The main job on a user's local Hugging Face checkpoint (save_pretrained), never downloading."""

import json

import pytest
import torch

from fishercheck.cli import main
from tests.fishercheck._checkpoints import WORDS, checkpoint, edit_weights, save_tokenizer


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "a.txt").write_text("hello world foo\nfoo bar\n\nbaz hello two world\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                       for t in ("one two three", "four one", "three three two")))
    return d / "a.txt", d / "b.jsonl"


def run(model, tasks, out, *extra):
    return main(["run", "--model", str(model), "--task-a", str(tasks[0]), "--task-b", str(tasks[1]),
                 "--out", str(out), "--pairs", "2", "--permutations", "19", "--no-plots", *extra])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_run_on_a_saved_checkpoint(tmp_path, tasks, arch):
    model = checkpoint(tmp_path, arch)
    assert run(model, tasks, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["meta"]["model"] == str(model) and report["meta"]["trained"] is True
    assert report["tasks"]["A"]["n_units"] == 3 and report["tasks"]["B"]["n_units"] == 3
    assert [r["layer"] for r in report["tasks"]["A"]["per_layer"]][1] == "layer 0"


def test_tokenizer_from_another_directory(tmp_path, tasks):
    model = checkpoint(tmp_path, "gpt2", tokenizer=False)
    save_tokenizer(tmp_path / "tok")
    assert run(model, tasks, tmp_path / "out", "--tokenizer", str(tmp_path / "tok")) == 0


def test_rows_longer_than_the_model_are_cut_to_its_positions(tmp_path, tasks, capsys):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(WORDS[2:] * 6) + "\n" + "hello world\n")  # 54 words, 16 positions
    model = checkpoint(tmp_path, "gpt2")
    capsys.readouterr()
    for extra, said in (((), False), (("--max-length", "64"), True)):  # said only when asked
        out = tmp_path / f"out{len(extra)}"
        assert main(["run", "--model", str(model), "--task-a", str(long), "--task-b", str(tasks[1]),
                     "--out", str(out), "--pairs", "2", "--permutations", "19", "--no-plots",
                     *extra]) == 0
        err = capsys.readouterr().err
        assert ("--max-length 64 is more than the model's 16 positions: rows are cut to 16 "
                "tokens" in err) is said, err
        meta = json.loads((out / "report.json").read_text())["meta"]
        assert meta["max_length"] == 16 and meta["rows"] == {"A": 2, "B": 3}


def test_allow_partial_runs_and_the_report_lists_what_was_not_loaded(tmp_path, tasks):
    model = checkpoint(tmp_path, "gpt2")
    dropped = edit_weights(model, drop=("transformer.h.0.mlp.",),
                            add={"transformer.extra.weight": torch.zeros(3)})
    assert dropped == ["transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_fc.weight",
                       "transformer.h.0.mlp.c_proj.bias", "transformer.h.0.mlp.c_proj.weight"]
    assert run(model, tasks, tmp_path / "out", "--allow-partial") == 0
    meta = json.loads((tmp_path / "out" / "report.json").read_text())["meta"]
    assert meta["trained"] is False and meta["weights"] == "partial"
    assert meta["missing_tensors"] == dropped
    assert meta["unexpected_tensors"] == ["transformer.extra.weight"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**partially loaded**: 4 of the model's tensors" in text
    assert "transformer.h.0.mlp.c_proj.weight" in text and "transformer.extra.weight" in text


def test_allow_partial_on_a_complete_checkpoint_is_trained(tmp_path, tasks):
    assert run(checkpoint(tmp_path, "gpt2"), tasks, tmp_path / "out", "--allow-partial") == 0
    meta = json.loads((tmp_path / "out" / "report.json").read_text())["meta"]
    assert meta["trained"] is True and meta["weights"] == "loaded"
    assert meta["missing_tensors"] == [] == meta["unexpected_tensors"]
