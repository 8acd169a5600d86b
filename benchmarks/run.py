"""The benchmark runner: ``python -m benchmarks.run --suite cpu|gpu``.

Times every method of every workload of the suite (``benchmarks/workloads.py``) side by side
in this one process, records peak memory and cross-checks the results
(``benchmarks/measure.py``), and writes a JSON file and the markdown tables of
docs/benchmarks.md. Not a test. Examples::

    python -m benchmarks.run --suite cpu --threads 1 --json-out cpu.json --md-out cpu.md
    python -m benchmarks.run --suite cpu --only mlp --rounds 3      # workloads matching 'mlp'
    python -m benchmarks.run --suite gpu                            # on a CUDA device
    python -m benchmarks.run --suite cpu --quick --rounds 1         # tiny shapes: smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from .measure import environment, lean_allocator, memory_and_checks, run_workload
from .workloads import suite


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "–"


def table(workload, records: list[dict]) -> str:
    """One workload's markdown table (ratios to its first method, in this run)."""
    base = workload.methods[0]
    lines = [f"**{workload.name}** ({workload.kind}; ratios to `{base}`)", "",
             "| method | ms | rows/s | peak MiB | time / base | memory / base | max rel. diff (vs) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | cannot run: {r['error']} | | | | | |")
            continue
        peak = r.get("peak_bytes")
        check = f"{r['max_rel_diff']:.1e} ({r['check_vs']})" if "max_rel_diff" in r else "–"
        if r.get("max_rel_diff", 0) > 1e-4:
            check += f", worst {r.get('worst_tensor')}"
        if r.get("missing_tensors"):
            check += f", {r['missing_tensors']} tensors missing"
        lines.append(f"| {r['method']} | {_fmt(r.get('seconds', 0) * 1e3, '.1f')} | "
                     f"{_fmt(r.get('rows_per_s'), '.1f')} | "
                     f"{_fmt(None if peak is None else peak / 2**20, '.1f')} | "
                     f"{_fmt(r.get('time_ratio'), '.2f')} | {_fmt(r.get('memory_ratio'), '.2f')} | {check} |")
        notes = r.get("notes", [])
        for note in notes[:2]:
            lines.append(f"| ↳ {r['method']} note | {note} | | | | | |")
        if len(notes) > 2:
            lines.append(f"| ↳ {r['method']} note | … and {len(notes) - 2} more like these | | | | | |")
    return "\n".join(lines)


def _memory_in_child(workload, args, device) -> dict:
    """``memory_and_checks`` of one workload in a fresh process (CPU peaks, see measure.py)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", args.suite, "--device", device,
           "--memory-child", workload.name] + (["--quick"] if args.quick else []) + \
        (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1][:240]
        return {m: {"method": m, "error": f"memory child failed: {err}"} for m in workload.methods}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    """Run the suite; print the tables; write ``--json-out`` and ``--md-out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    p.add_argument("--device", default=None, help="default: cuda for the gpu suite, else cpu")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--only", default=None, help="comma-separated substrings of workload names")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the runner)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--md-out", default=None)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("the gpu suite needs a CUDA device (none here); use --device cpu to try it on the CPU",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 unless a -tf32 method says otherwise
    torch.backends.cudnn.allow_tf32 = False
    workloads = suite(args.suite, quick=args.quick)
    if args.memory_child is not None:  # one workload's memory and cross-checks, as JSON
        lean_allocator()
        w = next(w for w in workloads if w.name == args.memory_child)
        print(json.dumps(memory_and_checks(w, device, log=lambda s: print(s, file=sys.stderr))))
        return 0
    if args.only:
        keys = args.only.split(",")
        workloads = [w for w in workloads if any(k in w.name for k in keys)]
    env = environment(device)
    print(f"# {args.suite} suite on {env.get('card') or env.get('cpu')}, torch {env['torch']}, "
          f"{env['threads']} threads, {env['date_utc']}", flush=True)
    out, tables = [], []
    for w in workloads:
        memory = None if device.startswith("cuda") else _memory_in_child(w, args, device)
        records = run_workload(w, device, args.rounds, memory=memory,
                               log=lambda s: print(s, file=sys.stderr, flush=True))
        out.append({"name": w.name, "kind": w.kind, "methods": list(w.methods), "results": records})
        tables.append(table(w, records))
        print("\n" + tables[-1], flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"environment": env, "suite": args.suite, "rounds": args.rounds,
                       "quick": args.quick, "workloads": out}, f, indent=1, default=str)
    if args.md_out:
        with open(args.md_out, "w") as f:
            head = (f"Machine: {env.get('card') or env.get('cpu')}, {env['cpu_count']} cores, "
                    f"torch {env['torch']}, {env['threads']} threads, {env['date_utc']}; "
                    f"medians of {args.rounds} interleaved rounds.\n\n")
            f.write(head + "\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
