"""Suite-wide pytest configuration: Hypothesis profiles and the slow / gpu tiers.

- ``slow`` tests run only with ``--run-slow`` (or FISHERCHECK_SLOW=1); otherwise they are
  reported as skipped, never as passed.
- ``gpu`` tests run only with ``--run-gpu`` (or FISHERCHECK_GPU=1). When asked for and no
  CUDA device is present they *fail*, so a GPU run can never pass by skipping.
- Hypothesis profiles: ``ci`` (derandomized, no database, few examples), ``dev`` (default for
  local runs), ``gpu`` (ci settings, fewer examples, longer deadline). Pick one with the
  HYPOTHESIS_PROFILE environment variable.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# function_scoped_fixture: the gpu-marked property tests take the `device` fixture, a
# constant string per test, which is the same for every example (without CUDA they fail in
# its setup before Hypothesis looks, so only a GPU run would meet this health check)
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=15, deadline=None,
    suppress_health_check=SUPPRESSED,
    print_blob=True,
)
settings.register_profile(
    "dev", max_examples=25, deadline=None,
    suppress_health_check=SUPPRESSED,
)
settings.register_profile(
    "gpu", derandomize=True, database=None, max_examples=10, deadline=None,
    suppress_health_check=SUPPRESSED,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(1)  # pytest -n auto: one worker per core, no oversubscription


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run slow tests")
    parser.addoption("--run-gpu", action="store_true", default=False, help="run CUDA tests")


def _flag(config, opt: str, env: str) -> bool:
    return bool(config.getoption(opt)) or os.environ.get(env, "") == "1"


def pytest_collection_modifyitems(config, items):
    run_slow = _flag(config, "--run-slow", "FISHERCHECK_SLOW")
    run_gpu = _flag(config, "--run-gpu", "FISHERCHECK_GPU")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: opt in with --run-slow"))
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: opt in with --run-gpu"))


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and _flag(item.config, "--run-gpu", "FISHERCHECK_GPU"):
        if not torch.cuda.is_available():
            pytest.fail("GPU tests were requested (--run-gpu) but no CUDA device is available.")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def device(request):
    """'cuda' for tests marked gpu, else 'cpu'."""
    return "cuda" if "gpu" in request.keywords else "cpu"
