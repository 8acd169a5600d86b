"""Benchmark: peak resident memory of the Phase 5/6 pipeline, for one or more code trees.

The pipeline, per round, on a GPT-2-shaped model (``--layers 4 --d-model 256 --heads 4
--vocab 8192``) and two tasks of ``--samples`` rows of ``--seq-len`` tokens each: per-sample
contributions of every parameter for task A and for task B, QK-OV interference of A on B,
and per-head conflicts (``--permutations`` permutations). ``--rounds`` rounds run one after
the other in one process, as a researcher's loop over tasks would.

Each code tree (``--code LABEL=PATH``, a checkout whose ``fisher_fast`` is imported; the
default is this one) runs in its own subprocess, one after the other in this run, and reports
its peak resident set (``ru_maxrss``), its resident set after the last round and its
wall time. Used for issue #14 (memory retained across calls): the tree before the fix and
after, side by side. Not a test.

    python benchmarks/bench_pipeline_memory.py --code before=/tmp/before --code after=.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    """One code tree: build, run the rounds, report (in this process)."""
    sys.path.insert(0, args.child)
    import torch
    import transformers as tf

    import fisher_fast as ff

    torch.set_num_threads(args.threads)
    cfg = tf.GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
                        vocab_size=args.vocab, n_positions=args.seq_len, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg).eval()

    def task(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    a, b = task(1), task(2)
    base = _rss_bytes()
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for batch in (a, b):
            ff.per_sample_contributions(model, batch)
        ff.interference(model, a, b)
        ff.conflicts(model, a, b, n_permutations=args.permutations, n_bootstrap=100)
    seconds = time.perf_counter() - t0
    gc.collect()
    return {"code": os.path.abspath(args.child), "fisher_fast": os.path.dirname(ff.__file__),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "start_mib": base / 2**20, "end_mib": _rss_bytes() / 2**20, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Run each code tree's pipeline in its own subprocess and print the memory table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--code", action="append", default=None,
                   help="LABEL=PATH of a checkout to measure (repeatable; default: this one)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--samples", type=int, default=64, help="rows per task")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for spec in args.code or [f"this={HERE}"]:
        label, _, path = spec.partition("=")
        cmd = [sys.executable, __file__, "--child", path] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("code", "child")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            rows.append({"label": label, "error": out.stderr.strip().splitlines()[-1:]})
        else:
            rows.append({"label": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    shape = (f"L={args.layers} d={args.d_model} H={args.heads} V={args.vocab}, "
             f"{args.samples}+{args.samples} samples x {args.seq_len} tokens, "
             f"{args.rounds} rounds")
    print(f"Phase 5/6 pipeline, {shape}")
    print("| code | peak RSS (MiB) | RSS after (MiB) | RSS before (MiB) | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | error: {r['error']} | | | |")
        else:
            print(f"| {r['label']} | {r['peak_mib']:.0f} | {r['end_mib']:.0f} | "
                  f"{r['start_mib']:.0f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
