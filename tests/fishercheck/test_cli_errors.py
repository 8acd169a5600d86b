"""Every bad input of the fishercheck CLI, in one table: each is a one-line error naming what
was expected and what came, exit status 2, and no file is created, changed or removed.
"""

import argparse
import os
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fishercheck.cli import main
from fishercheck.outputs import OutputDir
from tests.fishercheck._checkpoints import checkpoint, edit_weights, save_tokenizer
from tests.fishercheck.test_outputs import tree


@dataclass
class Ctx:
    tmp: Path
    stack: ExitStack
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self):
        return self.tmp / "out"


def run(ctx, *extra, out=None):
    """``fishercheck run`` on the embedded default."""
    return ["run", "--out", str(ctx.out if out is None else out), *extra]


def word_tasks(ctx, a="hello world foo\nfoo bar\n", b='{"text": "one two three"}\n'):
    d = ctx.tmp / "tasks"
    d.mkdir(exist_ok=True)
    (d / "a.txt").write_text(a)
    (d / "b.jsonl").write_text(b)
    return d / "a.txt", d / "b.jsonl"


def on_checkpoint(ckpt, *extra, tasks=None):
    """``fishercheck run`` on the checkpoint ``ckpt(ctx)`` and word tasks."""
    def argv(ctx):
        model = ckpt(ctx)
        a, b = tasks(ctx) if tasks else word_tasks(ctx)
        return ["run", "--model", str(model), "--task-a", str(a), "--task-b", str(b),
                "--out", str(ctx.out), *extra]
    return argv


def task_file(name, content):
    """``fishercheck run`` on the embedded default with task A read from ``name``."""
    def argv(ctx):
        path = ctx.tmp / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return run(ctx, "--task-a", str(path))
    return argv


def gpt2(ctx):
    return checkpoint(ctx.tmp, "gpt2")


def adapter(source, module):
    """``fishercheck conform`` on ``module:Adapter`` written to the test's directory (one module
    name per case: an imported module stays in ``sys.modules``).
    """
    def argv(ctx):
        (ctx.tmp / f"{module}.py").write_text(source)
        ctx.monkeypatch.syspath_prepend(str(ctx.tmp))
        return ["conform", "--impl", f"{module}:Adapter"]
    return argv


def _no_cuda(ctx):
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, anywhere
    return run(ctx, "--device", "cuda")


def _out_a_file(ctx):
    ctx.out.write_text("x")
    return run(ctx)


def _out_under_a_file(ctx):
    (ctx.tmp / "f").write_text("x")
    return run(ctx, out=ctx.tmp / "f" / "sub" / "out")


def _out_with_other_files(ctx):
    ctx.out.mkdir()
    (ctx.out / "report.json").write_text("{}")  # an earlier run's file: fine
    (ctx.out / "notes.txt").write_text("mine")  # not ours: a run would remove it
    return run(ctx)


def _out_locked(ctx):
    ctx.stack.enter_context(OutputDir(ctx.out, ()))  # another run, alive, writing to --out
    return run(ctx)


def _out_is_the_working_directory(ctx):
    (ctx.tmp / "work").mkdir()
    ctx.monkeypatch.chdir(ctx.tmp / "work")
    return run(ctx, out=".")


def _out_unwritable_system(ctx):
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys here")
    return run(ctx, out="/sys/fishercheck-test-out")


def _out_unwritable_directory(ctx):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (ctx.tmp / "ro").mkdir(mode=0o555)
    return run(ctx, out=ctx.tmp / "ro" / "out")


def _not_a_directory(ctx):
    return on_checkpoint(lambda c: c.tmp / "nope")(ctx)


def _no_config(ctx):
    (ctx.tmp / "plain").mkdir()
    return on_checkpoint(lambda c: c.tmp / "plain")(ctx)


def _tokenizer_elsewhere_missing(ctx):
    model = checkpoint(ctx.tmp, "gpt2", tokenizer=False)
    return on_checkpoint(lambda c: model, "--tokenizer", str(ctx.tmp / "nope"))(ctx)


def _bert(ctx):  # a masked LM: AutoModelForCausalLM loads it, wrongly
    return checkpoint(ctx.tmp, "bert")


def _corrupt(ctx):
    d = checkpoint(ctx.tmp, "gpt2")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    return d


def _missing_tensors(ctx):
    d = checkpoint(ctx.tmp, "gpt2")
    edit_weights(d, drop=("transformer.h.0.mlp.",))
    return d


def _unexpected_tensors(ctx):
    d = checkpoint(ctx.tmp, "gpt2")
    edit_weights(d, add={"transformer.extra.weight": torch.zeros(3)})
    return d


def _tokenizer_dir(ctx):
    save_tokenizer(ctx.tmp / "tok")
    return ctx.tmp / "tok"


EMPTY_JSONL = '{"text": ""}\n{"text": "  "}\n'
RUN = "fishercheck run: error: "
CONFORM = "fishercheck conform: error: "

BAD_INPUT = [
    # options
    pytest.param(lambda c: run(c, "--max-samples", "0"), RUN + r"--max-samples: expected a positive "
                 r"integer, got 0\.", id="max-samples"),
    pytest.param(lambda c: run(c, "--max-length", "0"), RUN + r"--max-length: expected a positive "
                 r"integer, got 0\.", id="max-length"),
    pytest.param(lambda c: run(c, "--pairs", "0"), RUN + r"--pairs: expected a positive integer, got 0\.",
                 id="pairs"),
    pytest.param(lambda c: run(c, "--permutations", "-5"), RUN + r"--permutations: expected a positive "
                 r"integer, got -5\.", id="permutations"),
    pytest.param(lambda c: run(c, "--check-rows", "0"), RUN + r"--check-rows: expected a positive "
                 r"integer, got 0\.", id="check-rows"),
    pytest.param(lambda c: run(c, "--model", str(c.tmp)), RUN + r"--model: expected --task-a and "
                 r"--task-b with it, got task-a=None, task-b=None\.", id="model-without-tasks"),
    pytest.param(lambda c: run(c, "--tokenizer", str(c.tmp)), RUN + r"--tokenizer: expected it with "
                 r"--model, got --tokenizer '.*' for the embedded default\.", id="tokenizer-without-model"),
    pytest.param(lambda c: run(c, "--device", "tpu"), RUN + r"--device: expected cpu, cuda, cuda:N or "
                 r"auto, got 'tpu'\.", id="device-unknown"),
    pytest.param(lambda c: run(c, "--device", "nonsense"), RUN + r"--device: expected cpu, cuda, cuda:N "
                 r"or auto, got 'nonsense'\.", id="device-nonsense"),
    pytest.param(_no_cuda, RUN + r"--device: expected an available CUDA device, got 'cuda' \(0 CUDA "
                 r"devices here\)\.", id="device-no-cuda"),
    # --out
    pytest.param(_out_a_file, RUN + r"--out: expected a directory \(created if missing\), got the "
                 r"existing file '.*out'\.", id="out-a-file"),
    pytest.param(_out_under_a_file, RUN + r"--out: expected a directory path, got '.*f/sub/out' under "
                 r"the existing file '.*f'\.", id="out-under-a-file"),
    pytest.param(_out_with_other_files, RUN + r"--out: expected a new or empty directory, or one "
                 r"holding only an earlier fishercheck run's files \(a run replaces it whole\), got "
                 r"'.*out' holding 1 other entries \(notes\.txt\)\.", id="out-with-other-files"),
    pytest.param(_out_locked, RUN + r"--out: expected no other fishercheck run writing to it, got "
                 r"'.*out' locked by the run with pid \d+ \('.*out\.lock'\); wait for it or choose "
                 r"another --out\.", id="out-locked"),
    pytest.param(_out_is_the_working_directory, RUN + r"--out: expected a directory that does not "
                 r"contain the working directory \(a run replaces it whole\), got '\.'\.", id="out-cwd"),
    pytest.param(_out_unwritable_system, RUN + r"--out: expected a writable location, got "
                 r"'/sys/fishercheck-test-out'", id="out-unwritable-sys"),
    pytest.param(_out_unwritable_directory, RUN + r"--out: expected a writable location, got "
                 r"'.*ro/out': cannot write in '.*ro'\.", id="out-unwritable-dir"),
    # task files
    pytest.param(lambda c: run(c, "--task-a", str(c.tmp / "missing.txt")), RUN + r"task file: expected "
                 r"an existing \.txt or \.jsonl file, got '.*missing\.txt'\.", id="task-a-missing"),
    pytest.param(lambda c: run(c, "--task-b", str(c.tmp / "b.txt")), RUN + r"task file: expected "
                 r"an existing \.txt or \.jsonl file, got '.*b\.txt'\.", id="task-b-missing"),
    pytest.param(task_file("t.json", '["a"]'), RUN + r"task file '.*t\.json': expected a \.txt \(one "
                 r"text per line\) or \.jsonl \(one JSON object per line\) file, got the suffix "
                 r"'\.json'\.", id="task-suffix"),
    pytest.param(task_file("t.txt", "\n \n"), RUN + r"task file .*t\.txt: expected at least one text, "
                 r"got none\.", id="task-empty"),
    pytest.param(task_file("t.jsonl", EMPTY_JSONL), RUN + r"task file .*t\.jsonl: expected at least one "
                 r"text, got none \(2 records with an empty 'text'\)\.", id="task-jsonl-all-empty-texts"),
    pytest.param(task_file("t.jsonl", '{"text": "1+1=2"}\n{oops\n'), RUN + r".*t\.jsonl:2: expected a "
                 r"JSON object, got invalid JSON \(.*, column 2\)\.", id="task-jsonl-invalid"),
    pytest.param(task_file("t.jsonl", '["1+1=2"]\n'), RUN + r".*t\.jsonl:1: expected a JSON object, got "
                 r"list\.", id="task-jsonl-not-an-object"),
    pytest.param(task_file("t.jsonl", '{"body": "1+1=2"}\n'), RUN + r".*t\.jsonl:1: expected a field "
                 r"'text', got \['body'\]\.", id="task-jsonl-no-field"),
    pytest.param(task_file("t.jsonl", '{"text": 12}\n'), RUN + r".*t\.jsonl:1: expected the field "
                 r"'text' to be a string, got int\.", id="task-jsonl-not-a-string"),
    pytest.param(task_file("t.txt", b"1+1=2\n\xff\xfe\n"), RUN + r"task file '.*t\.txt': expected "
                 r"UTF-8 text, got invalid start byte at byte 6\.", id="task-not-utf8"),
    pytest.param(task_file("t.txt", "1+1=2\nABC\n"), RUN + r"task file '.*t\.txt', text 2: text: "
                 r"expected characters from the model's vocabulary, got \['A', 'B', 'C'\]\.",
                 id="task-unknown-characters"),
    # checkpoints
    pytest.param(_not_a_directory, RUN + r"--model: expected a local checkpoint directory, got "
                 r"'.*nope'\.", id="model-not-a-directory"),
    pytest.param(_no_config, RUN + r"--model: expected a Hugging Face checkpoint directory with a "
                 r"config\.json, got '.*plain' without one\.", id="model-no-config"),
    pytest.param(on_checkpoint(lambda c: checkpoint(c.tmp, "gpt2", tokenizer=False)),
                 RUN + r"--model: expected tokenizer files in '.*gpt2' \(one of tokenizer\.json, .*\), "
                 r"got none; fishercheck never downloads a tokenizer: save yours there or pass "
                 r"--tokenizer DIR\.", id="model-no-tokenizer"),
    pytest.param(_tokenizer_elsewhere_missing, RUN + r"--tokenizer: expected a local tokenizer "
                 r"directory, got '.*nope'\.", id="tokenizer-missing"),
    pytest.param(on_checkpoint(lambda c: checkpoint(c.tmp, "gpt2", tokenizer=False, vocab_size=5),
                               "--tokenizer", "{tok}"),
                 RUN + r"task file '.*a\.txt': expected token ids below the model's vocabulary size 5, "
                 r"got id \d+: is the tokenizer the model's\?", id="tokenizer-foreign"),
    pytest.param(on_checkpoint(_bert), RUN + r"--model: expected a causal LM, got a bert checkpoint in "
                 r"'.*bert' with bidirectional attention \(is_decoder=False\)", id="model-bidirectional"),
    pytest.param(on_checkpoint(_corrupt), RUN + r"--model: expected a loadable causal-LM checkpoint in "
                 r"'.*gpt2', got ", id="model-corrupt-weights"),
    pytest.param(lambda c: on_checkpoint(_corrupt)(c) + ["--out", str(c.tmp / "new" / "deeper" / "out")],
                 RUN + r"--model: expected a loadable causal-LM checkpoint",
                 id="model-corrupt-new-out-parents"),
    pytest.param(on_checkpoint(_missing_tensors), RUN + r"--model: expected the checkpoint in '.*gpt2' "
                 r"to hold every tensor of the model and no other, got 4 missing "
                 r"\(transformer\.h\.0\.mlp\.c_fc\.bias, transformer\.h\.0\.mlp\.c_fc\.weight, "
                 r"transformer\.h\.0\.mlp\.c_proj\.bias, …\) \(they would be random\) and 0 unexpected; "
                 r"pass --allow-partial to run anyway \(the report lists them\)\.",
                 id="model-missing-tensors"),
    pytest.param(on_checkpoint(_unexpected_tensors), RUN + r"--model: .*got 0 missing \(they would "
                 r"be random\) and 1 unexpected \(transformer\.extra\.weight\); pass --allow-partial",
                 id="model-unexpected-tensors"),
    pytest.param(on_checkpoint(gpt2, tasks=lambda c: word_tasks(c, a="hello\nworld\n")),
                 RUN + r"task file '.*a\.txt': expected at least one text of two or more tokens \(the "
                 r"loss predicts each token from the previous ones\), got 2 text\(s\) of at most one "
                 r"token\.", id="texts-of-one-token"),
    # conform
    pytest.param(lambda c: ["conform", "--impl", "fisher_ref", "--report", str(c.tmp)],
                 CONFORM + r"--report: expected a file in an existing directory, got '.*'\.",
                 id="conform-report-a-directory"),
    pytest.param(lambda c: ["conform", "--impl", "fisher_ref", "--report", str(c.tmp / "no" / "r.json")],
                 CONFORM + r"--report: expected a file in an existing directory",
                 id="conform-report-dir-missing"),
    pytest.param(lambda c: ["conform", "--impl", "fisher_ref", "--property", "no_such_property"],
                 CONFORM + r"properties: expected names from \[.*\], got \['no_such_property'\]\.",
                 id="conform-unknown-property"),
    pytest.param(adapter("raise RuntimeError('boom')\n", "raises"),
                 CONFORM + r".*importing 'raises' raised RuntimeError: boom", id="adapter-raises"),
    pytest.param(adapter("def f(:\n", "syntax"), CONFORM + r".*importing 'syntax' raised "
                 r"SyntaxError", id="adapter-syntax-error"),
    pytest.param(adapter("class Adapter:\n    def __init__(self, path):\n        pass\n", "needs_args"),
                 CONFORM + r".*expected a class or factory callable with no arguments",
                 id="adapter-needs-args"),
    pytest.param(adapter("class Adapter:\n    def fisher(self): ...\n", "no_capabilities"),
                 CONFORM + r".*expected at least one capability method", id="adapter-no-capabilities"),
]


@pytest.mark.parametrize("make, message", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_changes_no_file(tmp_path, capsys, monkeypatch, make, message):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing an adapter writes no cache
    with ExitStack() as stack:
        ctx = Ctx(tmp_path, stack, monkeypatch)
        argv = make(ctx)
        if "{tok}" in argv:
            argv[argv.index("{tok}")] = str(_tokenizer_dir(ctx))
        before = tree(tmp_path)
        capsys.readouterr()  # what building the inputs printed (save_pretrained)
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2, err
        assert out == "" and err.count("\n") == 1, err
        assert re.match(message, err), err
        assert tree(tmp_path) == before


def test_the_table_covers_every_run_option_that_takes_a_value():
    from fishercheck.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    valued = {a.dest for a in sub.choices["run"]._actions if a.option_strings and a.nargs is None
              and a.const is None and a.dest != "help"}
    free = {"text_field", "seed", "dtype"}  # any name, any int, argparse's own choices
    ids = " ".join(p.id for p in BAD_INPUT)
    untested = [d for d in sorted(valued - free) if d.replace("_", "-") not in ids]
    assert untested == [], f"no bad-input case for {untested}"
