"""The main job on a user's local Hugging Face checkpoint (save_pretrained), never downloading."""

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fisher_ref.testing.models import TinyConfig, build_model
from fishercheck.cli import main

WORDS = ["[UNK]", "[PAD]", "hello", "world", "foo", "bar", "baz", "one", "two", "three", "four"]


def save_tokenizer(directory):
    """A word-level tokenizer of 11 words, saved as tokenizer.save_pretrained does."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(directory)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "a.txt").write_text("hello world foo\nfoo bar\n\nbaz hello two world\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                       for t in ("one two three", "four one", "three three two")))
    return d / "a.txt", d / "b.jsonl"


def checkpoint(tmp_path, arch, tokenizer=True):
    d = tmp_path / arch
    build_model(TinyConfig(arch=arch, num_layers=1, num_heads=2, head_dim=4,
                           vocab_size=len(WORDS)), dtype=torch.float32).save_pretrained(d)
    if tokenizer:
        save_tokenizer(d)
    return d


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


def _no_tokenizer(tmp_path):
    return checkpoint(tmp_path, "gpt2", tokenizer=False), ()


def _foreign_tokenizer(tmp_path):  # ids beyond a 5-word model's vocabulary
    d = tmp_path / "small"
    build_model(TinyConfig(arch="gpt2", num_layers=1, num_heads=2, head_dim=4, vocab_size=5),
                dtype=torch.float32).save_pretrained(d)
    save_tokenizer(d)
    return d, ()


def _missing_tokenizer_dir(tmp_path):
    return checkpoint(tmp_path, "gpt2", tokenizer=False), ("--tokenizer", str(tmp_path / "nope"))


def _not_a_checkpoint(tmp_path):
    (tmp_path / "plain").mkdir()
    return tmp_path / "plain", ()


def _bidirectional_bert(tmp_path):  # a masked LM: AutoModelForCausalLM loads it, wrongly
    d = tmp_path / "bert"
    build_model(TinyConfig(arch="bert", num_layers=1, vocab_size=len(WORDS))).save_pretrained(d)
    save_tokenizer(d)
    return d, ()


def _corrupt_weights(tmp_path):
    d = checkpoint(tmp_path, "gpt2")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    return d, ()


def _edit_weights(directory, drop=(), add=None):
    """Rewrite the checkpoint's weights without the tensors whose names start with ``drop``,
    plus ``add``; returns the names dropped.
    """
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    dropped = sorted(n for n in tensors if n.startswith(drop)) if drop else []
    kept = {n: t for n, t in tensors.items() if n not in dropped}
    save_file({**kept, **(add or {})}, path, metadata={"format": "pt"})
    return dropped


def _missing_tensors(tmp_path):
    d = checkpoint(tmp_path, "gpt2")
    _edit_weights(d, drop=("transformer.h.0.mlp.",))
    return d, ()


def _unexpected_tensors(tmp_path):
    d = checkpoint(tmp_path, "gpt2")
    _edit_weights(d, add={"transformer.extra.weight": torch.zeros(3)})
    return d, ()


BAD_CHECKPOINTS = [
    pytest.param(_missing_tensors, r"expected the checkpoint in .* to hold every tensor of the model "
                 r"and no other, got 4 missing \(transformer\.h\.0\.mlp\.c_fc\.bias, .*, …\) \(they would be "
                 r"random\) and 0 unexpected; pass --allow-partial", id="missing-tensors"),
    pytest.param(_unexpected_tensors, r"got 0 missing .* and 1 unexpected "
                 r"\(transformer\.extra\.weight\); pass --allow-partial", id="unexpected-tensors"),
    pytest.param(_bidirectional_bert, "expected a causal LM, got a bert checkpoint .*is_decoder=False",
                 id="bidirectional-bert"),
    pytest.param(_corrupt_weights, "expected a loadable causal-LM checkpoint", id="corrupt-weights"),
    pytest.param(_no_tokenizer, "expected tokenizer files in .*never downloads", id="no-tokenizer"),
    pytest.param(_foreign_tokenizer, "expected token ids below the model's vocabulary size 5",
                 id="foreign-tokenizer"),
    pytest.param(_missing_tokenizer_dir, "--tokenizer: expected a local tokenizer directory",
                 id="missing-tokenizer-dir"),
    pytest.param(_not_a_checkpoint, "expected a Hugging Face checkpoint directory with a config",
                 id="no-config"),
]


@pytest.mark.parametrize("make, message", BAD_CHECKPOINTS)
def test_bad_checkpoint_exits_2_with_a_message(tmp_path, tasks, capsys, make, message):
    model, extra = make(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    assert run(model, tasks, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert re.search("^fishercheck run: error: .*" + message, err, re.M), err


def test_a_failed_run_leaves_no_empty_output_directory(tmp_path, tasks, capsys):
    model = checkpoint(tmp_path, "gpt2")
    (model / "model.safetensors").write_bytes(b"broken")
    assert run(model, tasks, tmp_path / "new" / "out") == 2
    assert not (tmp_path / "new" / "out").exists()


def test_out_that_is_a_file_is_an_error(tmp_path, tasks, capsys):
    (tmp_path / "taken").write_text("x")
    assert run(checkpoint(tmp_path, "gpt2"), tasks, tmp_path / "taken") == 2
    assert "--out: expected a directory" in capsys.readouterr().err


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
    dropped = _edit_weights(model, drop=("transformer.h.0.mlp.",),
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
