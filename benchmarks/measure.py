"""Timing, peak memory and cross-checks of the methods of one workload, in this process.

- **Memory**: each method runs once (after a warm-up) from a clean state. On CUDA the peak
  is ``torch.cuda.max_memory_allocated`` above the allocation before the call, in this
  process. On the CPU it is the peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) above the resident set before the call, measured in a child
  process (``memory_and_checks``) whose allocator returns every freed block of 64 KiB or
  more to the system (``mallopt(M_MMAP_THRESHOLD)``, ``malloc_trim`` before each call), so
  that memory freed by an earlier method does not hide a later one's peak; the timings run
  in the parent, with the default allocator. That run's output is kept for the cross-check.
- **Time**: ``rounds`` rounds that cycle through all methods (a busy machine then slows
  every method alike), the median per method; CUDA events on a GPU, ``perf_counter``
  elsewhere.
- **Cross-check**: every method's output against the reference's (``loop``, else the first
  method with an output): the largest over parameters of ‖x − ref‖ / ‖ref‖ (for group
  statistics: of the per-tensor totals).
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import torch

from .methods import NOTES, method


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def lean_allocator() -> bool:
    """Make glibc return freed blocks of >= 64 KiB to the system (for RSS peaks)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 << 10))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_run(fn, case, cuda: bool):
    """``(output, peak bytes above the state before)`` of one call (``None`` bytes where the
    platform cannot tell).
    """
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(case)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    _trim()
    if not _reset_cpu_peak():
        return fn(case), None
    base = _status_kib("VmRSS")
    out = fn(case)
    return out, max(_status_kib("VmHWM") - base, 0) * 1024


def timed(fn, case, cuda: bool) -> float:
    """Seconds of one call (CUDA events on a GPU)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(case)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(case)
    return time.perf_counter() - t0


def _flat(out: dict) -> dict:
    return out["__totals__"] if "__totals__" in out else {k: v for k, v in out.items() if k != NOTES}


def difference(out: dict, ref: dict) -> tuple[float, str | None, int]:
    """``(largest norm-relative difference, the tensor where it is, how many of the
    reference's tensors are missing)`` over the tensors both have (``inf`` if none).
    """
    a, b = _flat(out), _flat(ref)
    grouped = "__totals__" in out and "__totals__" not in ref
    worst, where, shared = 0.0, None, 0
    for name, want in b.items():
        if name not in a:
            continue
        want = want.sum() if grouped else want
        got = a[name].double().cpu()
        want = want.double().cpu()
        scale = float(want.norm()) or 1.0
        d = float((got.reshape(want.shape) - want).norm()) / scale
        if d >= worst:
            worst, where = d, name
        shared += 1
    return (worst if shared else float("inf")), where, len(b) - shared


def memory_and_checks(workload, device: str, log=print) -> dict:
    """``{method: record}`` with each method's peak memory, notes, error and cross-check
    (``max_rel_diff`` against ``check_vs``), from one warmed-up run per method.
    """
    case = workload.build(device)
    cuda = device.startswith("cuda")
    records, outputs = {}, {}
    for name in workload.methods:
        rec = records[name] = {"method": name}
        fn = method(name, workload.kind)
        try:
            fn(case)  # warm-up (lazy kernels, a peer's wrapped copy)
            out, rec["peak_bytes"] = peak_run(fn, case, cuda)
            if isinstance(out, dict):
                outputs[name] = out
                if out.get(NOTES):
                    rec["notes"] = list(out[NOTES])
        except Exception as e:  # a peer that cannot run this model: recorded, not fatal
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"
        log(f"  {workload.name} {name}: {'error' if 'error' in rec else 'ok'}")
    ref = "loop" if "loop" in outputs else ("loop-exact" if "loop-exact" in outputs else
                                            next(iter(outputs), None))
    for name, out in outputs.items():
        if name != ref and workload.kind != "mc":
            d, where, missing = difference(out, outputs[ref])
            records[name].update(check_vs=ref, max_rel_diff=d, worst_tensor=where,
                                 missing_tensors=missing)
    return records


def run_workload(workload, device: str, rounds: int, log=print, memory=None) -> list[dict]:
    """Measure every method of the workload: ``memory`` (``memory_and_checks``'s records,
    from a child process on the CPU) or computed here; then the interleaved timing rounds of
    the methods that ran. One record per method, with ratios to the first method.
    """
    cuda = device.startswith("cuda")
    memory = memory if memory is not None else memory_and_checks(workload, device, log)
    case = workload.build(device)
    fns = {n: method(n, workload.kind) for n in workload.methods if "error" not in memory[n]}
    for name, fn in list(fns.items()):
        try:
            fn(case)  # warm-up in this process
        except Exception as e:  # ran in the child, fails here: record it
            memory[name]["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            del fns[name]
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, case, cuda))
    records = [dict(memory[n]) for n in workload.methods]
    for rec in records:
        if rec["method"] in times:
            rec["seconds"] = statistics.median(times[rec["method"]])
            rec["rows_per_s"] = case.rows / rec["seconds"]
    base = next((r for r in records if r["method"] == workload.methods[0] and "seconds" in r), None)
    for rec in records:
        if base and "seconds" in rec:
            rec["time_ratio"] = rec["seconds"] / base["seconds"]
            if rec.get("peak_bytes") is not None and base.get("peak_bytes"):
                rec["memory_ratio"] = rec["peak_bytes"] / base["peak_bytes"]
    del case
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return records


def environment(device: str) -> dict:
    """The machine and versions, for the JSON and the tables' header."""
    import datetime
    import platform

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": device, "cpu_count": os.cpu_count()}
    for mod in ("transformers", "opacus", "backpack", "nngeometry"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            env[mod] = None
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                              platform.machine())
        env["load_average"] = os.getloadavg()
    except OSError:
        env["cpu"] = platform.machine()
    if device.startswith("cuda"):
        env.update(card=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env
