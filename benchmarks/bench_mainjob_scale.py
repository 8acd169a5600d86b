"""Benchmark: the main job at the seed's scale (``fishercheck run --samples 768``), time and peak memory.

The embedded default model (character-level GPT-2, 2 layers, 4 heads, width 32) on two task
files of ``--samples`` lines written for the run (addition and reversal lines, as
``fishercheck/data/train_default.py`` makes them, seeded), run as the CLI runs, each
configuration in a fresh subprocess, one after the other:

- ``memory``: no ``--store`` (task A's contributions kept in memory);
- ``store``: a fresh ``--store`` (every chunk filed on disk, every step saved);
- ``resumed``: the ``store`` command killed (SIGKILL) once task A's contributions are half
  filed, then run again to the end; the time and peak are the second process's, and its
  report must equal the ``store`` run's number for number (checked here);
- ``recompute``: no ``--store`` and a ``--memory-budget`` below task A's contributions
  (``--recompute-budget``; and ``--recompute-pairs`` rows for the conflicts, whose test holds
  both tasks' gradients and would not fit): C_A computed again for each scoring block of B.

Each row reports the wall time of the subprocess (imports included), its peak resident set
(``ru_maxrss`` from ``os.wait4``), the plan's mode, chunks and blocks, the estimated peaks of
the memory plan and the job's own step timings. ``--json-out PATH`` writes them with the
environment. Not a test.

    python benchmarks/bench_mainjob_scale.py                       # 768 rows, --pairs 768
    python benchmarks/bench_mainjob_scale.py --samples 256 --pairs 32 --configs memory,store
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fishercheck" / "data"))
from train_default import addition_line, reversal_line  # noqa: E402


def task_files(directory: Path, n: int) -> tuple[Path, Path]:
    """``n`` addition and ``n`` reversal lines (seeds 101 and 102)."""
    paths = []
    for name, make, seed in (("a.txt", addition_line, 101), ("b.txt", reversal_line, 102)):
        rng = random.Random(seed)
        path = directory / name
        path.write_text("\n".join(make(rng) for _ in range(n)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def command(args: argparse.Namespace, a: Path, b: Path, out: Path, extra: list[str]) -> list[str]:
    """The ``fishercheck run`` command line of a configuration (``extra`` last: it wins)."""
    return [sys.executable, "-m", "fishercheck.cli", "run", "--model",
            str(ROOT / "fishercheck" / "data"), "--task-a", str(a), "--task-b", str(b),
            "--samples", str(args.samples), "--pairs", str(args.pairs),
            "--permutations", str(args.permutations), "--memory-budget", args.budget,
            "--out", str(out), "--no-plots", "--quiet", *extra]


def run(cmd: list[str], env: dict, kill_when=None) -> dict:
    """Run ``cmd``; with ``kill_when(), SIGKILL`` it once that holds. Wall time, peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if kill_when is not None:
        while proc.poll() is None and not kill_when():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
            "stderr": err.strip()}


def half_filed(store: Path, rows: int):
    """Whether the contribution store of ``store`` holds at least half of ``rows``."""
    def check() -> bool:
        path = store / "contributions" / "manifest.json"
        try:
            return len(json.loads(path.read_text())["records"]) >= rows // 2
        except (OSError, ValueError):
            return False
    return check


def numbers(out: Path) -> dict:
    """What a resumed run must reproduce exactly."""
    report = json.loads((out / "report.json").read_text())
    return {k: report[k] for k in ("tasks", "interference", "conflicts")}


def main() -> None:
    """Run the configurations and print one row each."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--pairs", type=int, default=768)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", default="8G", help="--memory-budget (but for recompute)")
    p.add_argument("--recompute-budget", default="24M",
                   help="--memory-budget of the recompute configuration")
    p.add_argument("--recompute-pairs", type=int, default=8,
                   help="--pairs of the recompute configuration (the conflicts' test holds "
                        "both tasks' gradients: at --pairs 768 it needs ~4 GiB)")
    p.add_argument("--configs", default="memory,store,resumed,recompute")
    p.add_argument("--json-out")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    work = Path(tempfile.mkdtemp(prefix="bench-mainjob-"))
    rows = []
    try:
        a, b = task_files(work, args.samples)
        for config in args.configs.split(","):
            out, store = work / f"out-{config}", work / f"store-{config}"
            extra = {"memory": [], "store": ["--store", str(store)],
                     "resumed": ["--store", str(store)],
                     "recompute": ["--memory-budget", args.recompute_budget,
                                   "--pairs", str(args.recompute_pairs)]}[config]
            cmd = command(args, a, b, out, extra)
            killed = None
            if config == "resumed":
                killed = run(cmd, env, kill_when=half_filed(store, args.samples))
            result = run(cmd, env)
            row = {"config": config, **result}
            if killed is not None:
                row["killed_after_s"] = killed["seconds"]
            if result["rc"] == 0:
                report = json.loads((out / "report.json").read_text())
                row.update(memory=report["settings"]["memory"], timings=report["timings"],
                           reused=report.get("store", {}).get("reused"))
                if config == "resumed" and (work / "out-store").is_dir():
                    row["equals_store_run"] = numbers(out) == numbers(work / "out-store")
            rows.append(row)
            m = row.get("memory", {})
            print(f"{config:9s} rc={row['rc']} {row['seconds']:7.1f} s  peak RSS "
                  f"{row['peak_rss_mib']:7.1f} MiB  mode={m.get('mode')} c={m.get('chunk_rows')} "
                  f"b={m.get('block_rows')}  " + (f"equal={row['equals_store_run']} "
                                                  if "equals_store_run" in row else "")
                  + (f"timings={ {k: round(v, 1) for k, v in row['timings'].items()} }"
                     if "timings" in row else row["stderr"][-300:]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json_out:
        import torch
        env_info = {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "environment": env_info,
                                                   "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
