"""``fishercheck``: the main job (``run``) and the conformance harness (``conform``).

    fishercheck run --out DIR                         # embedded default model and tasks
    fishercheck run --model CKPT --task-a A.txt --task-b B.jsonl --out DIR [--check]
    fishercheck conform --impl fisher_fast [--profile quick|thorough|scale] [--report out.json]

See docs/cli.md and docs/conformance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

_EPILOG = """\
examples:
  fishercheck run --out report/                     # embedded tiny GPT-2 and two tasks
  fishercheck run --model ckpt/ --task-a a.txt --task-b b.jsonl --out report/ --check
  fishercheck conform --impl my_project.fisher_adapter:MyAdapter --report conformance.json

exit status: 0 success (conform: every provided property passed), 1 conform found a failure
(or nothing to check), 2 bad arguments or input. Nothing is ever downloaded.
See docs/cli.md and docs/conformance.md."""


def _parser() -> argparse.ArgumentParser:
    from fisher_ref.conformance.properties import PROPERTIES

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="fishercheck", formatter_class=fmt, epilog=_EPILOG,
        description="Diagonal Fisher diagnostics of a causal LM (run), and a conformance\n"
                    "check of any Fisher implementation against the definitions (conform).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,conform}")
    r = sub.add_parser("run", formatter_class=fmt, epilog=_EPILOG,
                       help="Fisher diagnostics of a model on two tasks (reports and plots)",
                       description="E[g²] vs (E[g])² per layer, group Fisher per head, QK-OV "
                                   "interference and\nper-head conflicts of task A vs task B, "
                                   "written to --out as report.json,\nreport.md and plots. "
                                   "Without --model: the embedded tiny GPT-2 and its two tasks.")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    r.add_argument("--model", metavar="DIR",
                   help="local HF causal-LM checkpoint directory (default: embedded model)")
    r.add_argument("--tokenizer", metavar="DIR",
                   help="local tokenizer directory (default: the --model directory)")
    r.add_argument("--task-a", metavar="FILE", help="task A texts: .txt (one per line) or .jsonl "
                                                     "(required with --model)")
    r.add_argument("--task-b", metavar="FILE", help="task B texts: .txt or .jsonl "
                                                     "(required with --model)")
    r.add_argument("--text-field", default="text", metavar="NAME",
                   help="field of .jsonl records (default: text)")
    r.add_argument("--max-samples", type=int, default=64, metavar="N",
                   help="rows per task (default: 64)")
    r.add_argument("--max-length", type=int, default=64, metavar="N",
                   help="tokens per row (default: 64)")
    r.add_argument("--pairs", type=int, default=32, metavar="N",
                   help="rows per task for interference and conflicts (default: 32)")
    r.add_argument("--permutations", type=int, default=1000, metavar="N",
                   help="permutations per conflict test (default: 1000)")
    r.add_argument("--seed", type=int, default=0, help="seed of the permutations (default: 0)")
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="fisher_fast accumulation dtype (default: float32)")
    r.add_argument("--device", default="cpu", metavar="DEV",
                   help="where fisher_fast runs: cpu, cuda, cuda:N or auto (cuda when "
                        "available); --check's oracle always runs on the CPU (default: cpu)")
    r.add_argument("--check", action="store_true",
                   help="recompute a subset with fisher_ref (float64) and report the largest "
                        "differences")
    r.add_argument("--check-rows", type=int, default=8, metavar="N",
                   help="rows per task for --check (default: 8)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    c = sub.add_parser("conform", formatter_class=fmt, epilog=_EPILOG,
                       help="check an implementation against the definitions",
                       description="Run the named, Hypothesis-driven properties against an "
                                   "adapter; print property,\nverdict (pass / FAIL / not "
                                   "provided) and, for each failure, the minimal model\nand "
                                   "batch. Deterministic unless --explore.")
    c.add_argument("--impl", required=True, metavar="SPEC",
                   help="package.module:object adapter, or one of fisher_fast, fisher_fast32, "
                        "fisher_fast_cuda, fisher_ref")
    c.add_argument("--profile", choices=("quick", "thorough", "scale"), default="quick",
                   help="quick (default, CI): 6 examples per property after the smallest of "
                        "every architecture; thorough: 60; scale: 2 examples of 12 layers, 8 "
                        "heads, 16+ rows")
    c.add_argument("--report", metavar="FILE", help="also write the report as JSON to FILE")
    c.add_argument("--property", action="append", dest="properties", metavar="NAME",
                   help="run only this property (repeatable); one of: " + ", ".join(PROPERTIES))
    c.add_argument("--explore", action="store_true",
                   help="random (not derandomized) examples: finds new cases, not for CI gates")
    return p


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}.")


def _device(name: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N or auto; a CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}.")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device: expected an available CUDA device, got {name!r} "
                             f"({count} CUDA devices here).")
    return device


def run_command(args) -> int:
    from fishercheck import inputs

    for name in ("max_samples", "max_length", "pairs", "permutations", "check_rows"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.model is not None and (args.task_a is None or args.task_b is None):
        raise ValueError("--model: expected --task-a and --task-b with it, got "
                         f"task-a={args.task_a!r}, task-b={args.task_b!r}.")
    device = _device(args.device)
    start = time.perf_counter()
    if args.tokenizer is not None and args.model is None:
        raise ValueError(f"--tokenizer: expected it with --model, got --tokenizer "
                         f"{args.tokenizer!r} for the embedded default.")
    default_a, default_b = inputs.default_tasks()
    path_a, path_b = args.task_a or default_a, args.task_b or default_b
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected a directory (created if missing), got the existing "
                         f"file {args.out!r}.")
    texts = [inputs.read_texts(p, args.text_field, args.max_samples) for p in (path_a, path_b)]
    inp = inputs.load_model(args.model, args.tokenizer)
    max_length = args.max_length
    positions = inputs.model_max_length(inp.model)
    if positions is not None and max_length > positions:
        print(f"fishercheck run: --max-length {max_length} is more than the model's {positions} "
              f"positions: rows are cut to {positions} tokens", file=sys.stderr)
        max_length = positions
    batches = [inputs.make_batch(inp.tokenizer, t, prefix, max_length, source=p)
               for t, prefix, p in zip(texts, ("a", "b"), (path_a, path_b))]
    for batch, path in zip(batches, (path_a, path_b)):
        inputs.check_batch(batch, inp.model, path)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run_and_report(args, inp, batches, out, device, start, max_length,
                               (path_a, path_b))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no empty directory behind
        raise


def _run_and_report(args, inp, batches, out, device, start, max_length, paths) -> int:
    from fishercheck import mainjob, plots, reports

    path_a, path_b = paths
    model = inp.model.to(device)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
               for b in batches]
    results = mainjob.run(model, *batches, n_pairs=args.pairs, n_permutations=args.permutations,
                          seed=args.seed, check=args.check, check_rows=args.check_rows,
                          dtype=getattr(torch, args.dtype))
    results["meta"] = {"model": inp.source, "trained": inp.trained, "task_a": str(path_a),
                       "task_b": str(path_b), "device": str(device), "max_length": max_length,
                       "rows": {t: int(b["input_ids"].shape[0]) for t, b in zip("AB", batches)},
                       "plots": []}
    if not args.no_plots:
        results["meta"]["plots"] = plots.write_plots(results, out)
    results["timings"]["total_s"] = time.perf_counter() - start
    reports.write_json(results, out / "report.json")
    reports.write_markdown(results, out / "report.md")
    print(f"fishercheck: wrote report.json, report.md and {len(results['meta']['plots'])} plots "
          f"to {out} in {results['timings']['total_s']:.1f} s")
    for task, rec in results["tasks"].items():
        ratios = ", ".join(f"{r['layer']} {r['ratio']:.3g}" for r in rec["per_layer"])
        print(f"  task {task}: E[g²] / (E[g])² per layer: {ratios}")
    if "check" in results:
        print(f"  check against fisher_ref: {results['check']}")
    return 0


def conform_command(args) -> int:
    from fisher_ref.conformance.runner import run_conformance
    from fishercheck.adapters import resolve

    if args.report and (not Path(args.report).resolve().parent.is_dir()
                        or Path(args.report).is_dir()):
        raise ValueError(f"--report: expected a file in an existing directory, got "
                         f"{args.report!r}.")
    if "" not in sys.path and os.getcwd() not in sys.path:
        # as `python -m` would: the console script can import the user's project from here
        sys.path.insert(0, os.getcwd())
    adapter = resolve(args.impl)
    report = run_conformance(adapter, profile=args.profile, properties=args.properties,
                             derandomize=not args.explore,
                             progress=lambda r: print(f"  {r.name}: {r.verdict}", file=sys.stderr))
    print(report.table())
    if args.report:
        report.to_json(args.report)
    return 0 if report.passed else 1


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args)
        return conform_command(args)
    except ValueError as exc:
        print(f"fishercheck {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
