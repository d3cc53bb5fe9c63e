"""Measured choices: when two correct implementations compete and the machine
decides which is faster, time both once and remember the winner.

This is the cost model's measured half (the static half is `costmodel`): a
pass asks `fastest(key, candidates)` instead of guessing, and the answer is
cached per key (shapes, dtypes, device) for the life of the process.
"""
from __future__ import annotations

from typing import Callable

from .timing import measure_many

_CHOICES: dict = {}
MIN_FLOPS = 5e7   # below this, one launch beats several on overhead alone: not worth timing


def fastest(key, candidates: dict[str, Callable[[], object]], *, device: str = "cpu",
            budget_s: float = 0.3) -> str:
    """The name of the fastest candidate (each a no-argument callable)."""
    if key not in _CHOICES:
        t = measure_many(candidates, [()], device=device, budget_s=budget_s, min_reps=5, target_ci=0.05)
        _CHOICES[key] = rank0(min(t, key=lambda name: t[name].median_s))
    return _CHOICES[key]


def rank0(choice: str) -> str:
    """In a launched run, rank 0's choice on every rank: ranks that built
    different graphs from their own timings would issue different collectives."""
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "fake":
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return choice


def clear() -> None:
    _CHOICES.clear()
