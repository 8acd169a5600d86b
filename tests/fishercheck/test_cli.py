"""The fishercheck CLI: the main job on the embedded default, and the conformance gate."""

import contextlib
import io
import json
import re
import sys

import pytest

from fishercheck.cli import main

EXPECTED_FILES = ("report.json", "report.md", "layers.png", "heads.png", "impact.png",
                  "interference.png", "conflicts.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fishercheck-run")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--out", str(out), "--max-samples", "12", "--pairs", "6",
                     "--permutations", "99", "--check", "--check-rows", "3"])
    return Run((code, out), err.getvalue())


class Run(tuple):
    """(exit status, output directory), with the run's stderr."""

    def __new__(cls, values, stderr):
        run = super().__new__(cls, values)
        run.stderr = stderr
        return run


def test_the_embedded_default_runs_without_a_warning(run_dir):
    # default --max-length (64) on the embedded model (32 positions): cut silently
    code, out = run_dir
    assert code == 0 and run_dir.stderr == ""
    assert json.loads((out / "report.json").read_text())["meta"]["max_length"] == 32


def test_run_writes_every_report_file(run_dir):
    code, out = run_dir
    assert code == 0
    for name in EXPECTED_FILES:
        assert (out / name).stat().st_size > 0, name
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_report_json_is_consistent(run_dir):
    _, out = run_dir
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["trained"] is True and report["meta"]["device"] == "cpu"
    for task in ("A", "B"):
        rec = report["tasks"][task]
        assert rec["n_units"] == 12
        assert [r["layer"] for r in rec["per_layer"]] == ["embeddings", "layer 0", "layer 1", "final/head"]
        for r in rec["per_layer"]:  # E[g²] >= (E[g])² elementwise, so also summed
            assert r["E_g2"] >= r["Eg_2"] > 0 and r["ratio"] == pytest.approx(r["E_g2"] / r["Eg_2"])
        assert len(rec["head_fisher"]) == 2 and len(rec["head_fisher"][0]) == 4
    assert all(1 / 100 <= c["p"] <= 1 and c["q"] >= c["p"] for c in report["conflicts"]["slices"])
    check = report["check"]  # fisher_fast float32 against the float64 oracle
    assert check["empirical_fisher"] < 1e-4 and check["interference"] < 1e-4


def test_run_report_json_fits_the_schema(run_dir):
    from fishercheck.report_schema import validate

    _, out = run_dir
    report = json.loads((out / "report.json").read_text())
    validate(report)
    slices = {(c["layer"], c["head"], c["block"]) for c in report["conflicts"]["slices"]}
    assert slices == {(la, h, b) for la in range(2) for h in range(4) for b in "QKVO"}


def test_run_report_states_the_conflicts_hypothesis_and_intervals_beside_q(run_dir):
    # 6 + 6 rows (C(12, 6) = 924 labellings) and 99 permutations: p can reach 0.01
    _, out = run_dir
    conf = json.loads((out / "report.json").read_text())["conflicts"]
    assert conf["testable"] is True and conf["note"] == ""
    assert conf["min_attainable_p"] == pytest.approx(1 / 100)
    text = (out / "report.md").read_text()
    assert "Tested for each slice: H0: the two tasks' per-sample gradients restricted to the " \
           "group are exchangeable" in text
    assert "| slice | mean cosine | q | 95% interval of the mean cosine | p | effect (z) |" in text
    sig = [c for c in conf["slices"] if c["q"] < 0.05]
    below = sum(c["interval"][1] < 0 for c in sig)
    assert f"a 95% interval of the mean cosine below 0: {below} of them" in text


def test_too_few_rows_for_any_significance_is_said_instead_of_p_values(tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--max-samples", "3", "--pairs", "3",
                 "--permutations", "9", "--no-plots"]) == 0
    conf = json.loads((out / "report.json").read_text())["conflicts"]
    assert conf["testable"] is False and conf["min_attainable_p"] == pytest.approx(0.1)
    text = (out / "report.md").read_text()
    assert "**Not testable with these sizes**: no slice can reach q < 0.05 whatever the " \
           "gradients: 9 permutations cannot give a p-value below 1/(P + 1) = 0.1 (use " \
           "--permutations 20 or more); 3 + 3 rows have only C(6, 3) = 20 labellings (10 " \
           "distinct splits: each is tied with its mirror image), so the exact test's smallest " \
           "p-value is 0.1 (use --pairs 4 or more)." in text
    assert "| slice |" not in text and "nan" not in text.split("## Per-head conflicts")[1]


def test_run_report_markdown_names_the_model_and_tasks(run_dir):
    _, out = run_dir
    text = (out / "report.md").read_text()
    assert "trained by fishercheck/data/train_default.py" in text
    assert "task_a.txt" in text and "task_b.txt" in text
    # the significant-conflicts table lists at most SHOWN_SLICES rows and says so when cut
    from fishercheck.reports import SHOWN_SLICES
    report = json.loads((out / "report.json").read_text())
    n_sig = sum(c["q"] < 0.05 for c in report["conflicts"]["slices"])
    rows = [line for line in text.splitlines() if line.startswith("| L")]
    assert len(rows) == min(n_sig, SHOWN_SLICES)
    assert ("most negative mean cosines are listed" in text) == (n_sig > SHOWN_SLICES)
    assert report["settings"]["pairs_per_task"] == {"A": 6, "B": 6}
    assert report["meta"]["rows"] == {"A": 12, "B": 12}


@pytest.mark.gpu
def test_run_on_cuda_checks_against_the_cpu_oracle(tmp_path, device):
    out = tmp_path / "cuda-run"
    code = main(["run", "--out", str(out), "--device", device, "--max-samples", "8",
                 "--pairs", "4", "--permutations", "19", "--check", "--check-rows", "3",
                 "--no-plots"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["device"] == "cuda"
    assert report["check"]["empirical_fisher"] < 1e-4 and report["check"]["interference"] < 1e-4


SMALL = ["--max-samples", "4", "--pairs", "4", "--permutations", "19"]


def test_a_rerun_replaces_the_whole_output_directory(tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), *SMALL]) == 0
    assert (out / "heads.png").is_file()
    assert main(["run", "--out", str(out), *SMALL, "--no-plots", "--seed", "1"]) == 0
    # no plot of the first run is left beside the second run's report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["settings"]["seed"] == 1


def test_an_interrupted_run_leaves_the_previous_report(tmp_path, capsys, monkeypatch):
    import fishercheck.mainjob

    out = tmp_path / "out"
    assert main(["run", "--out", str(out), *SMALL, "--no-plots"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fishercheck.mainjob, "run", interrupted)
    capsys.readouterr()
    assert main(["run", "--out", str(out), *SMALL]) == 130
    assert f"fishercheck run: interrupted (SIGINT); --out '{out}' is as it was." in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_conform_passes_for_fisher_fast(tmp_path, capsys):
    report = tmp_path / "conform.json"
    code = main(["conform", "--impl", "fisher_fast", "--report", str(report),
                 "--property", "empirical_fisher_agreement", "--property", "qvalues_statsmodels"])
    assert code == 0, capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["passed"] and [r["verdict"] for r in data["results"]] == ["pass", "pass"]


def test_conform_fails_for_a_mutant(capsys):
    code = main(["conform", "--impl", "tests.conformance.mutants.wrong_bh:Adapter",
                 "--property", "qvalues_statsmodels"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "minimal counterexample: p = [" in out


def _checkpoint(tmp_path, with_weights: bool):
    from fishercheck.inputs import DATA

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    names = ["config.json", "char_vocab.json"] + (["model.safetensors"] if with_weights else [])
    for name in names:
        (ckpt / name).write_bytes((DATA / name).read_bytes())
    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    a.write_text("\n".join(json.dumps({"body": f"{i}+{i}={2 * i}"}) for i in range(5)) + "\n")
    b.write_text("ab>ba\nabc>cba\n\nkdj>jdk\n")
    return ckpt, a, b


@pytest.mark.parametrize("with_weights", [True, False], ids=["trained", "config-only"])
def test_run_on_a_local_checkpoint_and_jsonl(tmp_path, with_weights):
    ckpt, a, b = _checkpoint(tmp_path, with_weights)
    out = tmp_path / "out"
    code = main(["run", "--out", str(out), "--model", str(ckpt), "--task-a", str(a),
                 "--task-b", str(b), "--text-field", "body", "--permutations", "19", "--no-plots"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"]["A"]["n_units"] == 5 and report["tasks"]["B"]["n_units"] == 3
    assert report["meta"]["trained"] is with_weights
    assert ("randomly initialised" in (out / "report.md").read_text()) is not with_weights


def _conform_output(capsys, *args):
    code = main(["conform", *args])
    out = capsys.readouterr().out
    return code, re.sub(r"\d+\.\d+( s\))?", "<t>", out)  # seconds vary between runs


def test_conform_prints_the_same_pasteable_counterexample_twice(capsys):
    args = ("--impl", "tests.conformance.mutants.p_zero:Adapter", "--property", "pvalues_positive")
    code, first = _conform_output(capsys, *args)
    assert code == 1 and _conform_output(capsys, *args) == (1, first)
    assert "pvalues_positive" in first and "FAIL" in first
    assert "= TinyConfig(arch=" in first and "attention_mask=[[" in first, first


def test_conform_imports_an_adapter_from_the_working_directory(tmp_path, capsys, monkeypatch):
    # the console script's sys.path lacks the working directory; `conform` adds it
    (tmp_path / "my_project").mkdir()
    (tmp_path / "my_project" / "__init__.py").write_text("")
    (tmp_path / "my_project" / "adapter.py").write_text(
        "from fisher_ref.conformance.builtin_adapters import ReferenceAdapter as Adapter\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["conform", "--impl", "my_project.adapter:Adapter", "--property",
                 "loss_scaling"]) == 0
