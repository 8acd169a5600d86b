"""fisher_fast.show_progress: bars over a long call's units on stderr, off by default."""

from __future__ import annotations

import pytest
import torch

import fisher_fast as ff
from fisher_fast.progress import progress_enabled
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch


def test_quiet_by_default_and_a_bar_over_the_units_when_asked(capsys):
    model, batch = TinyLM(), tiny_batch(B=4)
    ff.empirical_fisher(model, batch, dtype=torch.float64, chunk_size=2)
    assert capsys.readouterr().err == ""
    with ff.show_progress():
        assert progress_enabled()
        quiet = ff.empirical_fisher(model, batch, dtype=torch.float64, chunk_size=2)
    err = capsys.readouterr().err
    assert "fisher_fast" in err and "/4" in err and "unit" in err  # a bar over the 4 units
    assert not progress_enabled()  # restored after the block
    torch.testing.assert_close(quiet["lin.weight"],
                               ff.empirical_fisher(model, batch, dtype=torch.float64)["lin.weight"],
                               rtol=1e-12, atol=0)


def test_show_progress_wants_a_bool():
    with pytest.raises(ValueError, match="show_progress: expected True or False, got 'yes'"):
        ff.show_progress("yes")
