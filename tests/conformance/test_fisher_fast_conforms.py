"""The CI gate: fisher_fast passes every conformance property (float64, float32, CUDA).

Uses the pytest plugin, as a downstream project would: one test per property.
"""

import pytest

from fisher_ref.conformance.pytest_plugin import conformance_suite

test_fisher_fast_float64 = conformance_suite("fishercheck.adapters:FisherFastAdapter")
test_fisher_fast_float32 = conformance_suite("fishercheck.adapters:FisherFast32Adapter",
                                             marks=(pytest.mark.slow,))
test_fisher_fast_thorough = conformance_suite("fishercheck.adapters:FisherFastAdapter",
                                              profile="thorough", marks=(pytest.mark.slow,))
test_fisher_fast_cuda = conformance_suite("fishercheck.adapters:FisherFastCudaAdapter",
                                          marks=(pytest.mark.gpu,))
