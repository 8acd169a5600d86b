"""The README's Python example runs as printed (on a tiny GPT-2, on the CPU)."""

import re
from pathlib import Path

import torch

from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import build_model
from fisher_ref.testing.tolerances import tolerance

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace('device="cuda"', 'device="cpu"')
    batch = random_batch(batch_size=4, seq_len=6, empty_rows=(1,))
    namespace = {
        "model": build_model(arch="gpt2"),
        "batch": batch,
        "small_batch": batch,
        "loader_a": [random_batch(batch_size=3, seq_len=5, seed=s) for s in (1, 2)],
        "loader_b": [random_batch(batch_size=3, seq_len=5, seed=s) for s in (3, 4)],
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    # what the example claims: F reports the empty row, and the resumed state is the saved one
    assert namespace["F"].empty_ids == [1]
    reloaded = namespace["acc"].empirical_fisher("a")
    assert all(torch.equal(reloaded[k], namespace["Fa"][k]) for k in namespace["Fa"])
    rtol, atol = tolerance("float32-fisher", torch.float32)  # two float32 paths, same units
    for k, v in namespace["F_ewc"].items():
        torch.testing.assert_close(v, namespace["Fa"][k], rtol=rtol, atol=atol)
