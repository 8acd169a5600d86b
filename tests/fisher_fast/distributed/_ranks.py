"""Start gloo ranks on localhost and run a scenario on each (not a test module).

``run_ranks(scenario, world, out_dir, *args)`` spawns ``world`` processes with
torch.multiprocessing, each joining a gloo group on 127.0.0.1 at a free port, runs
``scenario(rank, world, *args)`` and returns the ranks' results in rank order (each saved
with ``torch.save``). Every wait is bounded: a rank that does not finish within ``deadline``
seconds is killed and the test fails.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: seconds a whole multi-rank run may take (process start included, on a loaded 2-core box)
DEADLINE = 300.0
#: the gloo group's own timeout (seconds): a collective no rank answers fails, never hangs
GROUP_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, scenario, out_dir, args):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    try:
        result = scenario(rank, world, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(scenario, world: int, out_dir, *args, deadline: float = DEADLINE) -> list:
    """Run ``scenario(rank, world, *args)`` on ``world`` gloo ranks; their results in rank
    order. A rank's exception fails the call (with its traceback); so does the deadline.
    """
    ctx = mp.spawn(_entry, args=(world, free_port(), scenario, str(out_dir), args), nprocs=world,
                   join=False)
    end = time.monotonic() + deadline
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() >= end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            raise AssertionError(f"{world} ranks of {scenario.__name__} did not finish within "
                                 f"{deadline:g} s")
    # our own files, holding numpy arrays and lists: not weights only
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
