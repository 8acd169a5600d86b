"""Progress bars: on stderr when it is a terminal, never when piped or with --quiet."""

import io
import sys

from fishercheck.cli import main
from fishercheck.progress import Progress, wanted

SMALL = ["--max-samples", "4", "--pairs", "4", "--permutations", "19"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_wanted_only_on_a_terminal_and_not_quiet():
    assert wanted(False, Terminal()) and not wanted(True, Terminal())
    assert not wanted(False, io.StringIO())


def test_a_step_with_rows_draws_a_second_bar(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with Progress(2, enabled=True, desc="job") as bars:
        with bars.step("first", rows=10) as advance:
            advance(4)
            advance(6)
        with bars.step("second"):
            pass
    text = term.getvalue()
    assert "job: 0/2 steps" in text and "first" in text and "second" in text
    assert "job: 0/2 steps [00:00], first" in text and "0/10" in text  # and its rows bar


def test_run_draws_every_step_on_a_terminal(tmp_path, monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["run", "--out", str(tmp_path / "out"), *SMALL, "--check", "--check-rows", "2"]) == 0
    text = term.getvalue()
    for step in ("reading the tasks", "loading the model", "tokenising", "planning the memory",
                 "task A: E[g²] and (E[g])²", "task B: E[g²] and (E[g])²", "task A: contributions",
                 "interference", "conflicts", "check against fisher_ref", "plots",
                 "writing the report"):
        assert step in text, step
    assert "fishercheck run: 0/12 steps" in text
    assert "pair/s" in text or " pair" in text  # the interference's own bar, over (i, j) pairs


def test_recompute_mode_has_no_contributions_step(tmp_path, monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["run", "--out", str(tmp_path / "out"), "--samples", "128", "--pairs", "4",
                 "--permutations", "19", "--no-plots", "--memory-budget", "10M"]) == 0
    text = term.getvalue()
    # 10 steps foreseen; once planned, 9: task A's contributions are no step of their own
    assert "fishercheck run: 0/10 steps" in text and "/9 steps" in text
    assert "task A: contributions" not in text


def test_quiet_draws_nothing(tmp_path, monkeypatch, capsys):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["run", "--out", str(tmp_path / "out"), *SMALL, "--no-plots", "--quiet"]) == 0
    assert term.getvalue() == ""
    assert "fishercheck: wrote report.json" in capsys.readouterr().out  # the summary stays


def test_conform_quiet_prints_only_the_table(capsys):
    assert main(["conform", "--impl", "fisher_ref", "--property", "qvalues_statsmodels", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "qvalues_statsmodels" in out
