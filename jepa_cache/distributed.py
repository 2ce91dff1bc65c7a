"""Running under torchrun: which rank this is, and the few collectives build and train-heads need.

A command started by `torchrun --nproc_per_node=N -m jepa_cache ...` (or multi-node, with the usual
rendezvous flags) finds WORLD_SIZE/RANK/LOCAL_RANK in its environment and joins the process group:
NCCL when every rank has its own GPU, gloo otherwise. Without torchrun the world is one process and
every helper here is a no-op, so single-process code paths stay exactly as they were.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import UserError
from .files import exclusive_lock


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that locks, logs, finalises and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(device: str = "auto") -> World:
    """This process's place in the torchrun job, joining the process group on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device} under torchrun: use auto, cuda or cpu; "
                        "each rank takes its node's GPU LOCAL_RANK")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # the same decision on every rank (homogeneous nodes): NCCL for GPUs, gloo for CPU tensors
        gpu = device != "cpu" and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if gpu else "gloo")
    return World(rank, size, local_rank)


def rank_device(device: str, w: World) -> str:
    """`auto`/`cuda` on rank r of a job is its node's GPU `local_rank` (modulo the GPUs it sees) when it has one."""
    if w.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank % torch.cuda.device_count()}"
    return device


def barrier(w: World) -> None:
    if w.distributed:
        dist.barrier()


def broadcast(w: World, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the outcome of something only rank 0 did)."""
    if not w.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(w: World, part: dict) -> dict:
    """Every rank's dict merged on rank 0 (the other ranks get an empty one)."""
    if not w.distributed:
        return part
    parts = [None] * w.size if w.main else None
    dist.gather_object(part, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if w.main else {}


def broadcast_tensor(w: World, x: Tensor) -> Tensor:
    """Rank 0's tensor on every rank, in place (every rank passes one of the same shape and dtype)."""
    if w.distributed:
        dist.broadcast(x, src=0)
    return x


def split_rows(n: int, w: World) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n rows (the first n % size ranks get one more)."""
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return start, start + base + (1 if w.rank < extra else 0)


def sharded_forward(module: torch.nn.Module, x: Tensor, w: World) -> Tensor:
    """`module(x)` with the rows of x split over the ranks and the outputs all-gathered, gradients kept.

    Every rank gets the whole output, so a loss over the global batch (InfoNCE against every
    document of every rank, SIGReg's statistic over all rows) is computed identically everywhere.
    The all-gather's backward sums each rank's gradient into the rows it computed; with the same
    loss on every rank that is `size` times the true gradient, which `average_gradients` undoes.
    """
    if not w.distributed:
        return module(x)
    from torch.distributed.nn.functional import all_gather  # noqa: PLC0415  (autograd collectives: only under torchrun)

    n = len(x)
    shares = [split_rows(n, World(r, w.size)) for r in range(w.size)]
    width = max(stop - start for start, stop in shares)
    start, stop = shares[w.rank]
    local = module(x[start:stop])
    if len(local) < width:  # all_gather needs equal shapes: pad, then drop the padding
        local = torch.cat([local, local.new_zeros(width - len(local), *local.shape[1:])])
    gathered = all_gather(local)
    return torch.cat([g[: b - a] for g, (a, b) in zip(gathered, shares)])


def average_gradients(params: list[Tensor], w: World) -> None:
    """Mean of every parameter's gradient over the ranks (what DDP's reducer does), in place."""
    if not w.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def on_main(w: World, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 only; its (picklable) result on every rank, and a failure as the same UserError everywhere.

    Without torchrun this is just `fn()`. Under it, rank 0's failure must reach the others, or
    they would wait for it in the next collective forever.
    """
    if not w.distributed:
        return fn()
    outcome = None
    if w.main:
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001
            outcome = ("error", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
    kind, value = broadcast(w, outcome)
    if kind == "error":
        raise UserError(value)
    return value


@contextmanager
def main_lock(target, what: str, w: World) -> Iterator[None]:
    """`files.exclusive_lock`, taken by rank 0 for the whole job; a refusal reaches every rank as the same error."""
    lock = exclusive_lock(target, what) if w.main else nullcontext()
    on_main(w, lock.__enter__)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
