"""``fishercheck``: the main job (``run``) and the conformance harness (``conform``).

    fishercheck run --out DIR                         # embedded default model and tasks
    fishercheck run --model CKPT --task-a A.txt --task-b B.jsonl --out DIR [--check]
    fishercheck conform --impl fisher_fast [--profile quick|thorough|scale] [--report out.json]

See docs/cli.md and docs/conformance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import torch

from fishercheck.interrupts import Interrupted, signals_interrupt
from fishercheck.progress import Progress

_EPILOG = """\
examples:
  fishercheck run --out report/                     # embedded tiny GPT-2 and two tasks
  fishercheck run --model ckpt/ --task-a a.txt --task-b b.jsonl --out report/ --check
  fishercheck conform --impl my_project.fisher_adapter:MyAdapter --report conformance.json

exit status: 0 success (conform: every provided property passed), 1 conform found a failure
(or nothing to check), 2 bad arguments or input. Nothing is ever downloaded.
See docs/cli.md and docs/conformance.md."""


DEFAULT_MAX_LENGTH = 64  # tokens per row unless --max-length (or the model's positions) says less
DEFAULT_SAMPLES = 64  # rows per task unless --samples says otherwise


def _parser() -> argparse.ArgumentParser:
    """The ``fishercheck`` argument parser (``run`` and ``conform``)."""
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
    r.add_argument("--allow-partial", action="store_true",
                   help="run a checkpoint that lacks some of the model's tensors (left random) or "
                        "holds others (ignored); the report lists them (default: an error)")
    r.add_argument("--tokenizer", metavar="DIR",
                   help="local tokenizer directory (default: the --model directory)")
    r.add_argument("--task-a", metavar="FILE", help="task A texts: .txt (one per line) or .jsonl "
                                                     "(required with --model)")
    r.add_argument("--task-b", metavar="FILE", help="task B texts: .txt or .jsonl "
                                                     "(required with --model)")
    r.add_argument("--text-field", default="text", metavar="NAME",
                   help="field of .jsonl records (default: text)")
    r.add_argument("--samples", "--max-samples", type=int, default=None, metavar="N",
                   dest="samples", help=f"rows per task, the first N texts of each task file "
                                        f"(default: {DEFAULT_SAMPLES}; a file with fewer is used "
                                        f"whole, and said when N is given)")
    r.add_argument("--max-length", type=int, default=None, metavar="N",
                   help=f"tokens per row (default: {DEFAULT_MAX_LENGTH}, or the model's positions "
                        f"if fewer)")
    r.add_argument("--pairs", type=int, default=32, metavar="N",
                   help="rows per task for the conflicts' permutation test (default: 32); "
                        "interference uses every row")
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
    r.add_argument("--store", metavar="DIR",
                   help="keep task A's contributions and every finished step in DIR (created "
                        "if missing): an interrupted run rerun with the same command continues "
                        "from there")
    r.add_argument("--memory-budget", metavar="BYTES",
                   help="bytes the job's tensors may hold, e.g. 512M or 4G (default: a quarter "
                        "of the available RAM, or half the free memory of a CUDA device); task "
                        "A's contributions are computed again for each scoring block when they "
                        "do not fit and no --store is given")
    r.add_argument("--checkpoint-interval", type=float, default=60.0, metavar="SECONDS",
                   help="with --store: save an accumulator at most this often (default: 60; "
                        "0: after every chunk)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are drawn on stderr only when it is a terminal)")
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
    c.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (a bar when stderr is a terminal, else one line "
                        "per property)")
    return p


def _positive(name: str, value: int) -> None:
    """A ``ValueError`` unless ``value`` >= 1."""
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


def _check_run_options(args: argparse.Namespace) -> None:
    """The options of ``run`` that need no file: positive counts, --model with both tasks."""
    from fishercheck.memory_plan import parse_bytes

    for name in ("samples", "max_length", "pairs", "permutations", "check_rows"):
        if getattr(args, name) is not None:
            _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.memory_budget is not None:
        parse_bytes(args.memory_budget)
    if not args.checkpoint_interval >= 0:  # also nan
        raise ValueError(f"--checkpoint-interval: expected a number of seconds >= 0, got "
                         f"{args.checkpoint_interval}.")
    if args.model is not None and (args.task_a is None or args.task_b is None):
        raise ValueError("--model: expected --task-a and --task-b with it, got "
                         f"task-a={args.task_a!r}, task-b={args.task_b!r}.")
    if args.tokenizer is not None and args.model is None:
        raise ValueError(f"--tokenizer: expected it with --model, got --tokenizer "
                         f"{args.tokenizer!r} for the embedded default.")


def run_command(args: argparse.Namespace) -> int:
    """``fishercheck run``: check the inputs, run the main job, write the report; exit status.

    The report is written into a fresh directory beside ``--out`` and swapped in whole
    (:class:`fishercheck.outputs.OutputDir`): a run that fails leaves ``--out`` as it was.
    With ``--store``, every finished piece of work is kept there
    (:class:`fishercheck.run_store.RunStore`) and a rerun continues from it.

    Raises:
        ValueError: bad input (``main`` prints it and exits with status 2).
        Interrupted: SIGINT or SIGTERM (after cleaning up).
    """
    from fishercheck import inputs, outputs, plots, progress
    from fishercheck.run_store import RunStore

    start = time.perf_counter()
    _check_run_options(args)
    device = _device(args.device)
    out = outputs.OutputDir(args.out, known=("report.json", "report.md", *plots.PLOTS))
    store = RunStore(args.store, out=args.out) if args.store is not None else None
    default_a, default_b = inputs.default_tasks()
    paths = (Path(args.task_a) if args.task_a else default_a,
             Path(args.task_b) if args.task_b else default_b)
    bars = progress.Progress(_n_steps(args, "memory"), enabled=progress.wanted(args.quiet),
                             desc="fishercheck run")
    with signals_interrupt(), out as staging, bars, contextlib.ExitStack() as held:
        given, args.samples = args.samples is not None, args.samples or DEFAULT_SAMPLES
        with bars.step("reading the tasks"):
            texts = [inputs.read_texts(p, args.text_field, args.samples) for p in paths]
            for task, t, p in zip("AB", texts, paths, strict=True):
                if given and len(t) < args.samples:
                    bars.write(f"fishercheck run: task {task}: {str(p)!r} has {len(t)} texts, "
                               f"fewer than --samples {args.samples}: all {len(t)} are used")
        with bars.step("loading the model"):
            inp = inputs.load_model(args.model, args.tokenizer, allow_partial=args.allow_partial)
        with bars.step("tokenising"):
            max_length = _max_length(args, inp.model, bars)
            batches = [inputs.make_batch(inp.tokenizer, t, prefix, max_length, source=p)
                       for t, prefix, p in zip(texts, ("a", "b"), paths, strict=True)]
            for batch, path in zip(batches, paths, strict=True):
                inputs.check_batch(batch, inp.model, path)
        model = inp.model.to(device)
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                   for b in batches]
        with bars.step("planning the memory"):
            plan = _plan(args, model, batches, device, max_length, store)
            if store is not None:
                held.enter_context(store)
        bars.total(_n_steps(args, plan.mode))
        results = _main_job(args, model, batches, plan, store, bars)
        results["meta"] = _meta(inp, paths, device, max_length, batches, args.samples)
        _write(results, staging, plots=not args.no_plots, start=start, bars=bars)
        out.commit()
    _summary(results, args.out)
    return 0


def _n_steps(args: argparse.Namespace, mode: str) -> int:
    """Steps of a run: reading, loading, tokenising, planning, the job's, plots, report."""
    from fishercheck import mainjob

    return 5 + len(mainjob.steps(args.check, mode)) + (0 if args.no_plots else 1)


def _plan(args: argparse.Namespace, model: torch.nn.Module, batches: list[dict],
          device: torch.device, max_length: int, store: object) -> object:
    """The memory plan; with ``--store``, the store opened (created, or checked and its plan
    kept: a resumed run chunks as the interrupted one did).
    """
    import fisher_fast
    from fishercheck import long_steps, mainjob, memory_plan
    from fishercheck.run_store import batch_digest, model_digest

    budget = (memory_plan.parse_bytes(args.memory_budget) if args.memory_budget is not None
              else memory_plan.default_budget(device))
    dtype = getattr(torch, args.dtype)
    layout = fisher_fast.attention_layout(model)
    sizes = mainjob.plan_sizes(model, layout, *(long_steps.units_of(b) for b in batches),
                               args.pairs, args.permutations, dtype)
    plan = memory_plan.make_plan(sizes, budget, store=store is not None)
    if store is None:
        return plan
    fingerprint = {
        "model": model_digest(model), "task_a": batch_digest(batches[0]),
        "task_b": batch_digest(batches[1]),
        "settings": {"samples": args.samples, "max_length": max_length, "pairs": args.pairs,
                     "permutations": args.permutations, "seed": args.seed, "dtype": args.dtype,
                     "device": device.type, "check": args.check,
                     "check_rows": args.check_rows if args.check else None}}
    recorded = store.open(fingerprint, plan.describe())
    if recorded is not None:
        plan = memory_plan.make_plan(sizes, budget, store=True, fixed=recorded)
    return plan


def _max_length(args: argparse.Namespace, model: torch.nn.Module, bars: Progress) -> int:
    """Tokens per row: --max-length (default 64), at most the model's positions."""
    from fishercheck import inputs

    max_length = DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length
    positions = inputs.model_max_length(model)
    if positions is not None and max_length > positions:
        if args.max_length is not None:  # the user asked for more than the model has
            bars.write(f"fishercheck run: --max-length {max_length} is more than the model's "
                       f"{positions} positions: rows are cut to {positions} tokens")
        max_length = positions
    return max_length


def _main_job(args: argparse.Namespace, model: torch.nn.Module, batches: list[dict],
              plan: object, store: object, bars: Progress) -> dict:
    """:func:`fishercheck.mainjob.run` with the plan and the store."""
    from fishercheck import mainjob

    return mainjob.run(model, *batches, n_pairs=args.pairs, n_permutations=args.permutations,
                       seed=args.seed, check=args.check, check_rows=args.check_rows,
                       dtype=getattr(torch, args.dtype), progress=bars, plan=plan, store=store,
                       checkpoint_interval=args.checkpoint_interval)


def _meta(inp: object, paths: tuple[Path, Path], device: torch.device, max_length: int,
          batches: list[dict], samples: int) -> dict:
    """The report's ``meta``: the model and how it loaded, the task files, where it ran."""
    return {"model": inp.source, "trained": inp.trained, "weights": inp.weights,
            "missing_tensors": inp.missing, "unexpected_tensors": inp.unexpected,
            "task_a": str(paths[0]), "task_b": str(paths[1]), "device": str(device),
            "max_length": max_length, "samples": samples,
            "rows": {t: int(b["input_ids"].shape[0]) for t, b in zip("AB", batches, strict=True)},
            "plots": []}


def _write(results: dict, directory: Path, *, plots: bool, start: float, bars: Progress) -> None:
    """The plots, report.json and report.md, each written whole into ``directory``."""
    from fishercheck import plots as plotting
    from fishercheck import reports

    if plots:
        with bars.step("plots", rows=len(plotting.PLOTS), unit="plot") as advance:
            results["meta"]["plots"] = plotting.write_plots(results, directory, advance)
    with bars.step("writing the report"):
        results["timings"]["total_s"] = time.perf_counter() - start
        reports.write_json(results, directory / "report.json")
        reports.write_markdown(results, directory / "report.md")


def _summary(results: dict, out: str) -> None:
    """What the run wrote, and the per-layer ratios, on stdout."""
    print(f"fishercheck: wrote report.json, report.md and {len(results['meta']['plots'])} plots "
          f"to {out} in {results['timings']['total_s']:.1f} s")
    for task, rec in results["tasks"].items():
        ratios = ", ".join(f"{r['layer']} {r['ratio']:.3g}" for r in rec["per_layer"])
        print(f"  task {task}: E[g²] / (E[g])² per layer: {ratios}")
    if "check" in results:
        print(f"  check against fisher_ref: {results['check']}")


def conform_command(args: argparse.Namespace) -> int:
    """``fishercheck conform``: the conformance harness on an adapter; exit status 0 or 1.

    Raises:
        ValueError: bad arguments or an adapter that cannot be built (exit status 2).
    """
    from fisher_ref.conformance.properties import PROPERTIES
    from fisher_ref.conformance.runner import run_conformance
    from fishercheck import progress
    from fishercheck.adapters import resolve
    from fishercheck.outputs import write_text

    if args.report and (not Path(args.report).resolve().parent.is_dir()
                        or Path(args.report).is_dir()):
        raise ValueError(f"--report: expected a file in an existing directory, got "
                         f"{args.report!r}.")
    if "" not in sys.path and os.getcwd() not in sys.path:
        # as `python -m` would: the console script can import the user's project from here
        sys.path.insert(0, os.getcwd())
    adapter = resolve(args.impl)
    names = args.properties or list(PROPERTIES)
    bar = progress.wanted(args.quiet)
    with progress.Progress(len(names), enabled=bar, desc="fishercheck conform") as bars:
        def done(result: object) -> None:
            bars.write(f"  {result.name}: {result.verdict}")
            bars.advance(result.name)

        report = run_conformance(adapter, profile=args.profile, properties=args.properties,
                                 derandomize=not args.explore,
                                 progress=None if args.quiet else done)
    print(report.table())
    if args.report:
        write_text(Path(args.report), report.to_json() + "\n")
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """The ``fishercheck`` command; returns the exit status (2 on bad input, with a message).

    Every error is one line on stderr: bad input (``ValueError``), running out of memory, a
    failed read or write (``OSError``), and any other exception (named, with its first line;
    ``FISHERCHECK_TRACEBACK=1`` re-raises it for the traceback). SIGINT and SIGTERM exit with
    128 + the signal's number.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args)
        return conform_command(args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        where = f"; --out {args.out!r} is as it was" if args.command == "run" else ""
        if getattr(args, "store", None) is not None:
            where += (f"; --store {args.store!r} keeps the work done: rerun the same command to "
                      "continue")
        print(f"fishercheck {args.command}: interrupted ({signal.Signals(signum).name}){where}.",
              file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:  # every error is one line (module docstring)
        if os.environ.get("FISHERCHECK_TRACEBACK") and not isinstance(exc, ValueError):
            raise
        print(f"fishercheck {args.command}: error: {_one_line(exc, args)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException, args: argparse.Namespace) -> str:
    """The message of an error, on one line (see :func:`main`)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, ValueError):
        return first
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        lower = " --memory-budget," if args.command == "run" else ""
        return (f"out of memory ({type(exc).__name__}: {first or 'no details'}); lower"
                f"{lower} --samples or --pairs, or use a machine with more memory.")
    if isinstance(exc, OSError):
        where = f" {exc.filename!r}" if exc.filename else ""
        return f"expected to read and write files, got {type(exc).__name__}{where}: " \
               f"{exc.strerror or first}."
    return (f"unexpected {type(exc).__name__}: {first} (a bug or an unsupported model: "
            "FISHERCHECK_TRACEBACK=1 shows the traceback).")


if __name__ == "__main__":
    sys.exit(main())
