"""The benchmarks' one way to time sides against each other: interleaved, block by block, in one run.

Every side runs on every block in turn and the order rotates each block, so drift in what else the
machine is doing hits all sides alike; a side's time is the sum over blocks (wall, and this
process's CPU time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class Timings:
    wall: dict[str, float]
    cpu: dict[str, float]
    outputs: dict[str, list[Any]] = field(default_factory=dict)  # each side's output per block, in block order


def interleaved(sides: dict[str, Callable[[Any], Any]], blocks: Sequence[Any], sync: Callable[[], None] = lambda: None,
                progress: Callable[[int, Timings], None] | None = None) -> Timings:
    """Run each side on each block, rotating who goes first; `sync` waits for queued device work (CUDA) around
    each timing; `progress(block number, timings so far)` after each block."""
    names = list(sides)
    timings = Timings(dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), {name: [] for name in names})
    for b, block in enumerate(blocks):
        for name in names[b % len(names):] + names[: b % len(names)]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            timings.outputs[name].append(sides[name](block))
            sync()
            timings.wall[name] += time.perf_counter() - t0
            timings.cpu[name] += time.process_time() - c0
        if progress is not None:
            progress(b + 1, timings)
    return timings
