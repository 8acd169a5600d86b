"""Every bad input of the fishercheck CLI, in one table: each is a one-line error naming what
was expected and what came, exit status 2, and no file is created, changed or removed.
"""

import argparse
import json
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


def _store_a_file(ctx):
    (ctx.tmp / "store").write_text("x")
    return run(ctx, "--store", str(ctx.tmp / "store"))


def _store_under_a_file(ctx):
    (ctx.tmp / "f").write_text("x")
    return run(ctx, "--store", str(ctx.tmp / "f" / "store"))


def _store_with_other_files(ctx):
    (ctx.tmp / "store").mkdir()
    (ctx.tmp / "store" / "notes.txt").write_text("mine")
    return run(ctx, "--store", str(ctx.tmp / "store"))


def _store_not_ours(ctx):
    (ctx.tmp / "store").mkdir()
    (ctx.tmp / "store" / "run.json").write_text('{"format": "something else"}')
    return run(ctx, "--store", str(ctx.tmp / "store"))


def _store_of_other_settings(ctx):
    # the store of a run with --pairs 16 --permutations 99 (an earlier, finished or killed run)
    from fishercheck.run_store import FORMAT

    (ctx.tmp / "store").mkdir()
    (ctx.tmp / "store" / ".lock").write_text("")  # as every store has
    settings = {"samples": 64, "max_length": 32, "pairs": 16, "permutations": 99, "seed": 0,
                "dtype": "float32", "device": "cpu", "check": False, "check_rows": None}
    (ctx.tmp / "store" / "run.json").write_text(json.dumps(
        {"format": FORMAT, "plan": {"chunk_rows": 32, "block_rows": 64},
         "fingerprint": {"model": "m", "task_a": "a", "task_b": "b", "settings": settings}}))
    return run(ctx, "--store", str(ctx.tmp / "store"))


def _store_locked(ctx):
    from fishercheck.run_store import RunStore

    holder = ctx.stack.enter_context(RunStore(ctx.tmp / "store"))  # another run, alive
    holder.open({"model": "m", "task_a": "a", "task_b": "b", "settings": {}}, {})
    return run(ctx, "--store", str(ctx.tmp / "store"))


def _store_unwritable(ctx):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (ctx.tmp / "ro").mkdir(mode=0o555)
    return run(ctx, "--store", str(ctx.tmp / "ro" / "store"))


def _disk_full(ctx):
    import errno

    from fishercheck import reports

    def full(results, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    ctx.monkeypatch.setattr(reports, "write_json", full)
    return run(ctx, *SMALL)


def _out_of_memory(ctx):
    from fishercheck import mainjob

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    ctx.monkeypatch.setattr(mainjob, "run", oom)
    return run(ctx, *SMALL)


def _a_bug(ctx):
    from fishercheck import mainjob

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")

    ctx.monkeypatch.setattr(mainjob, "run", bug)
    return run(ctx, *SMALL)


SMALL = ("--samples", "4", "--pairs", "4", "--permutations", "19", "--no-plots")
EMPTY_JSONL = '{"text": ""}\n{"text": "  "}\n'
RUN = "fishercheck run: error: "
CONFORM = "fishercheck conform: error: "

BAD_INPUT = [
    # options
    pytest.param(lambda c: run(c, "--samples", "0"), RUN + r"--samples: expected a positive "
                 r"integer, got 0\.", id="samples"),
    pytest.param(lambda c: run(c, "--max-samples", "-3"), RUN + r"--samples: expected a positive "
                 r"integer, got -3\.", id="max-samples-alias"),
    pytest.param(lambda c: run(c, "--max-length", "0"), RUN + r"--max-length: expected a positive "
                 r"integer, got 0\.", id="max-length"),
    pytest.param(lambda c: run(c, "--pairs", "0"), RUN + r"--pairs: expected a positive integer, got 0\.",
                 id="pairs"),
    pytest.param(lambda c: run(c, "--permutations", "-5"), RUN + r"--permutations: expected a positive "
                 r"integer, got -5\.", id="permutations"),
    pytest.param(lambda c: run(c, "--check-rows", "0"), RUN + r"--check-rows: expected a positive "
                 r"integer, got 0\.", id="check-rows"),
    pytest.param(lambda c: run(c, "--memory-budget", "lots"), RUN + r"--memory-budget: expected a "
                 r"positive number of bytes with an optional K, M, G or T suffix \(powers of 1024, "
                 r"e\.g\. 512M or 4G\), got 'lots'\.", id="memory-budget-not-bytes"),
    pytest.param(lambda c: run(c, "--memory-budget", "0"), RUN + r"--memory-budget: expected a "
                 r"positive number of bytes", id="memory-budget-zero"),
    pytest.param(lambda c: run(c, "--memory-budget", "512K"), RUN + r"--memory-budget: expected at "
                 r"least \d+ bytes \(.*\) for the accumulator's states of 27808 parameters and one "
                 r"row's forward and backward, got 524288 \(512\.0 KiB\); raise it\.",
                 id="memory-budget-too-small"),
    pytest.param(lambda c: run(c, "--memory-budget", "40M", "--pairs", "64"), RUN + r"--memory-budget: "
                 r"expected at least \d+ bytes \(.*\) for the conflicts' test on 64 \+ 64 rows with "
                 r"1000 permutations \(--pairs\), got 41943040 \(40\.0 MiB\); use --pairs \d+ or "
                 r"fewer, or raise it\.", id="memory-budget-conflicts"),
    pytest.param(lambda c: run(c, "--checkpoint-interval", "-1"), RUN + r"--checkpoint-interval: "
                 r"expected a number of seconds >= 0, got -1\.0\.", id="checkpoint-interval"),
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
    # --store
    pytest.param(_store_a_file, RUN + r"--store: expected a directory \(created if missing\), got the "
                 r"existing file '.*store'\.", id="store-a-file"),
    pytest.param(_store_under_a_file, RUN + r"--store: expected a directory path, got '.*f/store' "
                 r"under the existing file '.*f'\.", id="store-under-a-file"),
    pytest.param(_store_with_other_files, RUN + r"--store: expected a new or empty directory, or the "
                 r"store of an earlier fishercheck run, got '.*store' holding notes\.txt\.",
                 id="store-with-other-files"),
    pytest.param(lambda c: run(c, "--store", str(c.out / "store")), RUN + r"--store: expected a "
                 r"directory apart from --out \(a run replaces --out whole\), got '.*out/store' and "
                 r"--out '.*out'\.", id="store-inside-out"),
    pytest.param(_store_not_ours, RUN + r"--store: expected a fishercheck store "
                 r"\(fishercheck\.run_store/1\), got '.*store/run\.json', which is not one "
                 r"\(unreadable or of another format\)\.", id="store-manifest-unreadable"),
    pytest.param(_store_of_other_settings, RUN + r"--store: expected the store of a run with this "
                 r"run's settings, got '.*store', made with other settings: pairs 32 \(the store's: "
                 r"16\), permutations 1000 \(the store's: 99\); rerun with the store's settings, or "
                 r"use a new --store\.", id="store-of-other-settings"),
    pytest.param(_store_locked, RUN + r"--store: expected a store no other fishercheck run is using, "
                 r"got '.*store' in use by the run with pid \d+; wait for it or use another "
                 r"--store\.", id="store-locked"),
    pytest.param(_store_unwritable, RUN + r"--store: expected a writable location, got '.*ro/store': "
                 r"cannot write in '.*ro'\.", id="store-unwritable"),
    # what the run itself meets: one line each, --out as it was
    pytest.param(_disk_full, RUN + r"expected to read and write files, got OSError '.*report\.json': "
                 r"No space left on device\.", id="write-fails"),
    pytest.param(_out_of_memory, RUN + r"out of memory \(OutOfMemoryError: CUDA out of memory\.\); "
                 r"lower --memory-budget, --samples or --pairs, or use a machine with more memory\.",
                 id="out-of-memory"),
    pytest.param(_a_bug, RUN + r"unexpected TypeError: unsupported operand \(a bug or an unsupported "
                 r"model: FISHERCHECK_TRACEBACK=1 shows the traceback\)\.", id="unexpected-error"),
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
