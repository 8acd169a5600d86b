r"""Benchmark: full-diagonal E[g²] and group-reduced Fisher against their baselines.

Measures, side by side in one run on one device, for one GPT-2-shaped model and batch:

- ``fwd+bwd``: a plain forward and backward of the summed per-row loss (the floor);
- ``fisher_fast.empirical_fisher``: the full diagonal E[g²] of every parameter;
- ``fisher_fast.group_fisher``: per-output-unit (``--groups generic``) or per-head
  (``--groups heads``) group Fisher, with Gram products where cheaper;
- ``loop``: the micro-batch-of-one loop (forward+backward per sample, square, add);
- ``vmap``: ``torch.func.vmap(grad)`` of ``functional_call`` over samples (chunked);
- ``mc`` (only with ``--methods``): ``fisher_fast.mc_fisher`` with ``--mc-samples`` draws;
- ``fwd+bwd-bf16``, ``fisher-bf16`` (only with ``--methods``): the plain pass and
  ``empirical_fisher`` under the bf16 fast path (``autocast=torch.bfloat16``).

Reports samples/s, peak memory and ratios to ``fwd+bwd``. On CUDA, peak memory is
``torch.cuda.max_memory_allocated``. On CPU each method runs once in its own subprocess for
its memory: the peak is the growth of the resident set (``ru_maxrss``) over the set after a
one-row warm-up; times come from rounds that cycle through all methods in one process (a
shared, busy machine then slows every method alike).

Not a test. Examples::

    python benchmarks/bench_fisher.py                      # CUDA: GPT-2-small shape, 64 x 256
    python benchmarks/bench_fisher.py --device cpu         # a small CPU shape
    python benchmarks/bench_fisher.py --layers 2 --d-model 128 --heads 4 --vocab 1000 \
        --batch 16 --seq-len 64 --device cpu --methods fwd+bwd,fisher
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fisher_fast as ff  # noqa: E402

METHODS = ("fwd+bwd", "fisher", "groups", "loop", "vmap")
GPU_DEFAULT = dict(layers=12, d_model=768, heads=12, vocab=50257, batch=64, seq_len=256)
CPU_DEFAULT = dict(layers=2, d_model=128, heads=4, vocab=1000, batch=16, seq_len=64)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The GPT-2-shaped model (eval mode, eager attention, seeded) and a random batch
    ``input_ids: LongTensor[batch, pos]`` (with ``attention_mask`` and ``labels``) on ``args.device``.
    """
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
                        vocab_size=args.vocab, n_positions=max(args.seq_len, 16),
                        tie_word_embeddings=args.tied, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg).to(args.device, getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    batch = {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device),
             "labels": ids.to(args.device)}
    return model, batch


def run_fwd_bwd(model, batch, args) -> None:
    """The floor: one forward and backward of the summed per-row loss."""
    loss = ff.causal_lm_loss(model, batch).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def run_fisher(model, batch, args) -> None:
    """``fisher_fast.empirical_fisher``: the full diagonal E[g²]."""
    ff.empirical_fisher(model, batch, chunk_size=args.chunk)


def run_groups(model, batch, args) -> None:
    """``fisher_fast.group_fisher`` with ``args.groups``."""
    ff.group_fisher(model, batch, chunk_size=args.chunk, groups=args.groups)


def run_mc(model, batch, args) -> None:
    """``fisher_fast.mc_fisher`` with ``args.mc_samples`` label draws."""
    ff.mc_fisher(model, batch, chunk_size=args.chunk, n_samples=args.mc_samples)


def run_loop(model, batch, args) -> None:
    """Baseline: a forward and backward per row, each gradient squared and added."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(ff.causal_lm_loss(model, row).sum(), params)
        for a, g in zip(acc, grads, strict=True):
            a.add_(g.square())


def run_vmap(model, batch, args) -> None:
    """Baseline: ``vmap(grad)`` of ``functional_call`` over rows, ``args.vmap_chunk`` at a time."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}

    def row_loss(p, ids, mask, labels):
        logits = functional_call(model, p, (ids[None],), {"attention_mask": mask[None]}).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1], labels[1:])

    B = batch["input_ids"].shape[0]
    step = args.vmap_chunk or B
    for s in range(0, B, step):
        sl = slice(s, s + step)
        g = vmap(grad(row_loss), in_dims=(None, 0, 0, 0))(
            params, batch["input_ids"][sl], batch["attention_mask"][sl], batch["labels"][sl])
        for n in acc:
            acc[n].add_(g[n].square().sum(0))


def run_fwd_bwd_bf16(model, batch, args) -> None:
    """The floor under ``torch.autocast(dtype=torch.bfloat16)``."""
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
        loss = ff.causal_lm_loss(model, batch).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def run_fisher_bf16(model, batch, args) -> None:
    """``empirical_fisher`` on the bf16 fast path (``autocast=torch.bfloat16``)."""
    ff.empirical_fisher(model, batch, chunk_size=args.chunk, autocast=torch.bfloat16)


# mc and the bf16 fast path (autocast) rows: only when named in --methods
RUNNERS = {"fwd+bwd": run_fwd_bwd, "fisher": run_fisher, "groups": run_groups,
           "loop": run_loop, "vmap": run_vmap, "mc": run_mc,
           "fwd+bwd-bf16": run_fwd_bwd_bf16, "fisher-bf16": run_fisher_bf16}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name, model, batch, args) -> dict:
    """Median seconds of ``args.repeats`` runs (after a warm-up) and the peak memory."""
    fn = RUNNERS[name]
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        if cuda:
            fn(model, batch, args)  # warm-up
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:  # warm up on one row (loads lazy kernels, small peak): ru_maxrss cannot be reset
            fn(model, {k: v[:1] for k, v in batch.items()}, args)
            base = _rss_bytes()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(model, batch, args)
            sync()
            times.append(time.perf_counter() - t0)
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        t = statistics.median(times)
        return {"method": name, "seconds": t, "samples_per_s": args.batch / t,
                "peak_bytes": max(peak, 0)}
    except Exception as e:  # a baseline that cannot run here is reported, not fatal
        return {"method": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def interleaved_times(methods, model, batch, args) -> dict:
    """Median seconds per method over ``args.repeats`` rounds that cycle through the methods,
    so that a busy machine slows every method alike.
    """
    times = {m: [] for m in methods}
    for m in methods:
        RUNNERS[m](model, batch, args)  # warm-up
    for _ in range(args.repeats):
        for m in methods:
            t0 = time.perf_counter()
            RUNNERS[m](model, batch, args)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the arguments, run the methods, print the report; return the result rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k in GPU_DEFAULT:
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    p.add_argument("--tied", action="store_true", help="tie the head to wte (default untied)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--chunk", type=int, default=None, help="fisher_fast chunk size (default: from memory)")
    p.add_argument("--vmap-chunk", type=int, default=None,
                   help="samples per vmap call (default: 8 on CUDA, the whole batch on CPU)")
    p.add_argument("--groups", default="generic", choices=("generic", "heads"),
                   help="groups of the group_fisher row (heads: attention heads, generic else)")
    p.add_argument("--mc-samples", type=int, default=4, help="label draws of the mc row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.add_argument("--json-out", default=None,
                   help="also write {environment, arguments, results, ratios} to this file")
    args = p.parse_args(argv)
    defaults = GPU_DEFAULT if args.device.startswith("cuda") else CPU_DEFAULT
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.vmap_chunk is None and args.device.startswith("cuda"):
        args.vmap_chunk = 8  # 8 per-sample copies of a 163 M-parameter gradient: ~5 GiB
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    methods = [args.only] if args.only else args.methods.split(",")
    isolate = not args.device.startswith("cuda") and args.only is None
    results = []
    if isolate:  # memory: a fresh process per method; time: interleaved rounds here
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        for m in methods:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--only", m, "--json",
                                  "--repeats", "1"], capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            results.append(json.loads(line[-1]) if line else
                           {"method": m, "error": out.stderr.strip()[-300:]})
        ok = [r["method"] for r in results if "error" not in r]
        model, batch = build(args)
        for r, t in zip([r for r in results if "error" not in r],
                        interleaved_times(ok, model, batch, args).values(), strict=True):
            r["seconds"], r["samples_per_s"] = t, args.batch / t
    else:
        model, batch = build(args)
        results = [measure(m, model, batch, args) for m in methods]
    if args.json:
        for r in results:
            print(json.dumps(r))
        return results
    report(args, results)
    if args.json_out:
        write_json(args, results, args.json_out)
    return results


def environment(args) -> dict:
    """Versions, threads, TF32 settings and the device of this run."""
    import datetime
    import platform

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "device": args.device,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
           "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE")}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if args.device.startswith("cuda"):
        env.update(card=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_json(args, results, path) -> None:
    """Write ``{environment, arguments, results, ratios}`` (ratios to ``fwd+bwd``) to ``path``."""
    base = next((r for r in results if r["method"] == "fwd+bwd" and "error" not in r), None)
    ratios = {}
    for r in results:
        if base and "error" not in r:
            ratios[r["method"]] = {
                "time_over_fwd_bwd": r["seconds"] / base["seconds"],
                "memory_over_fwd_bwd": (r["peak_bytes"] / base["peak_bytes"]
                                        if base["peak_bytes"] else None)}
    keep = ("layers", "d_model", "heads", "vocab", "batch", "seq_len", "tied", "dtype", "chunk",
            "vmap_chunk", "groups", "mc_samples", "repeats", "methods")
    with open(path, "w") as f:
        json.dump({"environment": environment(args),
                   "arguments": {k: getattr(args, k) for k in keep},
                   "results": results, "ratios": ratios}, f, indent=1)


def report(args, results) -> None:
    """Print the device, the model and one line per method (samples/s, peak MiB, ratios)."""
    import platform
    cuda = args.device.startswith("cuda")
    dev = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"device: {args.device} ({dev}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"model: GPT-2 shape L={args.layers} d={args.d_model} H={args.heads} V={args.vocab} "
          f"{'tied' if args.tied else 'untied'} {args.dtype}; batch {args.batch} x {args.seq_len}")
    base = next((r for r in results if r["method"] == "fwd+bwd" and "error" not in r), None)
    print(f"{'method':<10} {'samples/s':>10} {'peak MiB':>10} {'time/fwd+bwd':>13} {'mem/fwd+bwd':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<10} failed: {r['error']}")
            continue
        tr = r["seconds"] / base["seconds"] if base else float("nan")
        mr = r["peak_bytes"] / base["peak_bytes"] if base and base["peak_bytes"] else float("nan")
        print(f"{r['method']:<10} {r['samples_per_s']:>10.1f} {r['peak_bytes'] / 2**20:>10.1f} "
              f"{tr:>13.2f} {mr:>12.2f}")


if __name__ == "__main__":
    main()
