"""Collectives that fail together: every step is preceded by a status exchange.

A rank that raises between two collectives tells the others at the next status exchange
(:meth:`RankGroup.check`), so every rank raises :class:`RankFailure` naming the failed rank
and its cause instead of waiting in a collective the failed rank never reaches. Every
status exchange waits at most ``timeout`` seconds, so a rank that hangs or dies is an error
too, never a hang. The protocol holds as long as every rank runs the same sequence of
checked steps, which is what the functions of ``fisher_fast.distributed`` do.
"""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

#: seconds a status exchange waits for the slowest rank before raising
DEFAULT_TIMEOUT = 300.0


class RankFailure(RuntimeError):
    """Raised on every rank when one rank (or more) failed; names the ranks and causes."""


class EveryRankError(ValueError):
    """A ``ValueError`` that every rank raises alike (computed from gathered data), so no
    further status needs exchanging.
    """


class RankGroup:
    """A process group (``None``: the default one) with checked collectives.

    Args:
        group: the ``torch.distributed`` process group, or ``None`` for the default group.
        timeout: seconds each status exchange and tensor gather waits for every rank.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: float = DEFAULT_TIMEOUT):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed: expected an initialised process group "
                             "(torch.distributed.init_process_group), got none.")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}.")
        self.group = group
        self.timeout = float(timeout)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        #: where the collectives' tensors live: NCCL needs the current CUDA device
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")

    def _wait(self, work, step: str) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise RankFailure(f"rank {self.rank}: step {step!r}: a rank did not answer within "
                              f"{self.timeout:g} s (it hangs, died, or runs other collectives): "
                              f"{e}") from e

    def _status(self, failed: bool, step: str) -> list[bool]:
        flag = torch.tensor([int(failed)], dtype=torch.int64, device=self.device)
        out = [torch.zeros_like(flag) for _ in range(self.world_size)]
        self._wait(dist.all_gather(out, flag, group=self.group, async_op=True), step)
        return [bool(t.item()) for t in out]

    def _raise_failures(self, flags: list[bool], message: str | None, step: str) -> None:
        messages = [None] * self.world_size
        dist.all_gather_object(messages, message, group=self.group)
        causes = "; ".join(f"rank {r}: {messages[r]}" for r in range(self.world_size) if flags[r])
        failed = [r for r in range(self.world_size) if flags[r]]
        raise RankFailure(f"step {step!r}: rank{'s' if len(failed) > 1 else ''} "
                          f"{', '.join(map(str, failed))} of {self.world_size} failed: {causes}")

    def check(self, step: str) -> None:
        """Status exchange before a collective step: raises :class:`RankFailure` on every
        rank if some rank reported a failure instead.
        """
        flags = self._status(False, step)
        if any(flags):
            self._raise_failures(flags, None, step)

    def fail(self, error: BaseException, step: str) -> None:
        """Report ``error`` (raised on this rank) to every rank, then raise
        :class:`RankFailure` here too (chained to ``error``).
        """
        cause = "".join(traceback.format_exception_only(type(error), error)).strip()
        flags = self._status(True, step)
        try:
            self._raise_failures(flags, cause, step)
        except RankFailure as failure:
            raise failure from error

    def gather_objects(self, obj: object, step: str) -> list:
        """``all_gather_object`` after a status check: every rank's ``obj``, in rank order."""
        self.check(step)
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_tensor(self, tensor: torch.Tensor, step: str) -> list[torch.Tensor]:
        """``all_gather`` after a status check: every rank's ``tensor`` (same shape and dtype
        on every rank), in rank order, on ``tensor``'s device.
        """
        self.check(step)
        t = tensor.detach().to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), step)
        return [o.to(tensor.device) for o in out]


@contextmanager
def fail_together(group: dist.ProcessGroup | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> Iterator[RankGroup]:
    """Run a block on every rank so that an exception on one rank is raised on all.

    An exception raised in the block is reported at the other ranks' next status exchange
    (the next checked collective of ``fisher_fast.distributed``, or the end of their
    block), and every rank raises :class:`RankFailure` naming the rank and its cause;
    an exception every rank raises alike (:class:`EveryRankError`, :class:`RankFailure`)
    passes through. A rank that finishes the block waits (at most ``timeout`` seconds) for
    the others, so the ranks leave the block together::

        with fail_together():
            for batch in my_shard:
                acc.update(batch, task="a")
            fisher = acc.all_reduce().empirical_fisher("a")

    Yields:
        The :class:`RankGroup` of ``group``.
    """
    ranks = RankGroup(group, timeout)
    try:
        yield ranks
    except (RankFailure, EveryRankError):
        raise
    except Exception as error:  # reported to every rank, then re-raised
        ranks.fail(error, "fail_together")
    else:
        ranks.check("end of fail_together")
