"""The memory plan: byte counts parsed, each step's estimate by hand, modes and refusals."""

import pytest

from fishercheck.memory_plan import Sizes, make_plan, parse_bytes


@pytest.mark.parametrize("text, value", [("2000000000", 2_000_000_000), ("512M", 512 * 2**20),
                                         ("4G", 4 * 2**30), ("1.5GiB", 3 * 2**29), ("64kb", 65536),
                                         (" 2 T ", 2 * 2**40)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["0", "abc", "-1", "4X", "", "0.1"])
def test_parse_bytes_refuses_what_is_not_a_positive_byte_count(text):
    with pytest.raises(ValueError, match=r"--memory-budget: expected a positive number of bytes "
                                         r"with an optional K, M, G or T suffix"):
        parse_bytes(text)


# u = 100 bytes per unit, P = 1000 parameters of 4 bytes, 10 bytes of activations per row
SIZES = Sizes(n_params=1000, unit_bytes=100, itemsize=4, row_bytes=10, rows_a=50, rows_b=40,
              pairs_a=4, pairs_b=4, layers=2, heads=3, slices=24, permutations=9)


def test_the_estimates_by_hand():
    assert SIZES.moments(8) == 6 * 1000 * 4 + 8 * 10
    # kept 50 · 100, B block 3 · 5 · 100, A chunk 2 · 8 · 100, tiles 2 · 4 · 8 · 5 · 2 · 3 · 4,
    # 1/(F̂+ε) 100, activations 8 · 10
    assert SIZES.interference(8, 5, keep=True) == 5000 + 1500 + 1600 + 7680 + 100 + 80
    assert SIZES.interference(8, 5, keep=False) == 1500 + 1600 + 7680 + 100 + 80
    n = 8  # 4 + 4 rows: gradients 2 · 8 · 100, cosines 5 · 24 · 64 · 8, indicators 2 · 10 · 8 · 8,
    # labelling temporaries 4 · 24 · 10 · 8 · 8, bootstrap 2 · 24 · 1000 · 4 · 8
    assert SIZES.conflicts() == 2 * n * 100 + 5 * 24 * n * n * 8 + 2 * 10 * n * 8 \
        + 4 * 24 * 10 * n * 8 + 2 * 24 * 1000 * 4 * 8


def test_an_ample_budget_keeps_the_contributions_and_scores_task_b_in_one_block():
    plan = make_plan(SIZES, 10**9, store=False)
    assert (plan.mode, plan.chunk_rows, plan.block_rows) == ("memory", 32, 40)
    assert make_plan(SIZES, 10**9, store=True).mode == "store"


def test_a_budget_below_the_kept_contributions_recomputes_them():
    budget = SIZES.conflicts()  # ~1.7 MB: conflicts fit, and so do the moments and blocks
    assert SIZES.interference(32, 1, keep=True) <= budget  # C_A (5 kB) fits: memory mode
    assert make_plan(SIZES, budget, store=False).mode == "memory"
    small = Sizes(**{**SIZES.__dict__, "rows_a": 20_000})  # C_A: 2 MB, more than the budget
    plan = make_plan(small, budget, store=False)
    assert (plan.mode, plan.block_rows) == ("recompute", 40)  # all of B without C_A: fits


def test_blocks_shrink_to_fit():
    sizes = Sizes(**{**SIZES.__dict__, "pairs_a": 1, "pairs_b": 1, "slices": 1})
    budget = sizes.interference(32, 7, keep=False) + 1
    assert sizes.conflicts() < budget
    assert make_plan(sizes, budget, store=True).block_rows == 7
    # keeping C_A (5 kB) costs a block row, and is cheaper than computing A again per block
    plan = make_plan(sizes, budget, store=False)
    assert (plan.mode, plan.chunk_rows, plan.block_rows) == ("memory", 32, 6)
    assert sizes.interference(32, 6, keep=True) <= budget < sizes.interference(32, 7, keep=True)


def test_too_small_a_budget_names_what_does_not_fit():
    with pytest.raises(ValueError, match=r"--memory-budget: expected at least 24010 bytes \(23\.4 KiB\) "
                                         r"for the accumulator's states of 1000 parameters and one "
                                         r"row's forward and backward, got 1000 \(1000 B\); raise it"):
        make_plan(SIZES, 1000, store=False)


def test_conflicts_that_do_not_fit_say_how_many_pairs_would():
    big = Sizes(**{**SIZES.__dict__, "pairs_a": 300, "pairs_b": 300})
    budget = 30 * 2**20
    with pytest.raises(ValueError, match=r"the conflicts' test on 300 \+ 300 rows with 9 "
                                         r"permutations \(--pairs\), got 31457280 .*; use --pairs "
                                         r"(\d+) or fewer, or raise it") as err:
        make_plan(big, budget, store=False)
    fit = int(err.value.args[0].split("use --pairs ")[1].split()[0])
    assert big.conflicts(fit, fit) <= budget < big.conflicts(fit + 1, fit + 1)


def test_a_resumed_plan_keeps_its_chunks_or_is_refused():
    plan = make_plan(SIZES, 10**9, store=True, fixed={"chunk_rows": 4, "block_rows": 9})
    assert (plan.chunk_rows, plan.block_rows) == (4, 9)
    need = SIZES.interference(4, 9, keep=False)
    with pytest.raises(ValueError, match=r"for the chunks of 4 rows and scoring blocks of 9 rows the "
                                         r"run in --store was started with, got .*; resume with the "
                                         r"budget it was started with, or use a new --store"):
        make_plan(SIZES, need - 1, store=True, fixed={"chunk_rows": 4, "block_rows": 9})
