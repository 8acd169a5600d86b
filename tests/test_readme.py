"""Every Python example of README.md runs as printed (tiny GPT-2, on the CPU).

The examples use names the reader supplies (``model``, ``batch``, ``small_batch``,
``loader_a``, ``loader_b``); the test supplies tiny ones. An example that names a CUDA
device cannot run as printed on a CPU machine: there the test checks that it is refused at
that line, at construction, with a one-line ``ValueError`` (never after a batch), and
reports the line as an expected failure; the same example with ``"cpu"`` must then run.
"""

import re
import traceback
from pathlib import Path

import pytest
import torch

from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import build_model
from fisher_ref.testing.tolerances import tolerance

README = Path(__file__).resolve().parents[1] / "README.md"
CUDA = re.compile(r"""(device\s*=\s*)(["'])cuda(?::\d+)?""")


def _examples() -> list:
    """``(first code line's number in README.md, code)`` of every ```python block."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        start = text[:m.start()].count("\n") + 2
        out.append(pytest.param(start, m.group(1), id=f"line-{start}"))
    return out


def _namespace() -> dict:
    batch = random_batch(batch_size=4, seq_len=6, empty_rows=(1,))
    return {
        "model": build_model(arch="gpt2"),
        "batch": batch,
        "small_batch": batch,
        "loader_a": [random_batch(batch_size=3, seq_len=5, seed=s) for s in (1, 2)],
        "loader_b": [random_batch(batch_size=3, seq_len=5, seed=s) for s in (3, 4)],
    }


def _run(start: int, code: str) -> dict:
    """Execute ``code`` with README.md's line numbers in its tracebacks."""
    namespace = _namespace()
    exec(compile("\n" * (start - 1) + code, str(README), "exec"), namespace)
    return namespace


def _check_claims(ns: dict) -> None:
    """What the examples claim, where they make the claim."""
    if "F" in ns:
        assert ns["F"].empty_ids == [1]  # F reports the empty row
    if "acc" in ns and "Fa" in ns:  # the resumed state is the saved one
        reloaded = ns["acc"].empirical_fisher("a")
        assert all(torch.equal(reloaded[k], ns["Fa"][k]) for k in ns["Fa"])
    if "F_ewc" in ns and "Fa" in ns:
        rtol, atol = tolerance("float32-fisher", torch.float32)  # two float32 paths, same units
        for k, v in ns["F_ewc"].items():
            torch.testing.assert_close(v, ns["Fa"][k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("start, code", _examples())
def test_readme_python_example_runs_as_printed(start, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cuda = [start + i for i, line in enumerate(code.splitlines()) if CUDA.search(line)]
    if cuda and not torch.cuda.is_available():
        with pytest.raises(ValueError) as err:
            _run(start, code)
        message = str(err.value)
        assert message.startswith("device: expected an available device") and "\n" not in message
        lines = [f.lineno for f in traceback.extract_tb(err.tb) if f.filename == str(README)]
        assert lines == [cuda[0]]  # refused at construction, at the first line naming CUDA
        assert not (tmp_path / "fisher_state.safetensors").exists()
        pytest.xfail(f"README.md line {cuda[0]} names a CUDA device: it cannot run as printed on "
                     f"a CPU machine (refused there at construction: {message})")
    _check_claims(_run(start, code))


@pytest.mark.parametrize("start, code", _examples())
def test_readme_python_example_runs_on_the_cpu(start, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _check_claims(_run(start, CUDA.sub(r"\1\2cpu", code)))
