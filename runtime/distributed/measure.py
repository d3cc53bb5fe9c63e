"""Graphs timed on the real link, on every rank, and one decision for all.

`time_on_every_rank` runs `timing.measure_lockstep` on every rank (the same
calls in the same order everywhere, a barrier before each, since every call is
collective), gathers every rank's samples on every rank and makes each
contender's sample of a round the slowest rank's (the step is as slow as its
slowest rank); `decide` evaluates a choice on rank 0 and broadcasts it, so
every rank keeps the same graph (ranks that chose differently would deadlock).
"""
from __future__ import annotations

from typing import Callable

ROUNDS = 5               # timed rounds per contender (paired: every round times every contender)


def time_on_every_rank(fns: dict[str, Callable], inputs: tuple, *, rounds: int = ROUNDS, warmup: int = 1,
                       device: str = "cpu") -> dict:
    """{name: Timing of the slowest rank per round}, the same on every rank."""
    import torch
    import torch.distributed as dist
    from passlab.runtime import timing
    sync = (lambda: (torch.cuda.synchronize(), dist.barrier())) if device.startswith("cuda") else dist.barrier
    mine = timing.measure_lockstep(fns, [inputs], rounds=rounds, warmup=warmup, device=device, before=sync)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {k: t.samples_s for k, t in mine.items()})
    out = {}
    for k, t in mine.items():
        xs = [max(r[k][i] for r in every) for i in range(len(t.samples_s))]
        out[k] = timing.Timing(*timing.median_ci(xs), len(xs), t.method + ", slowest rank per round",
                               t.threads, xs, list(t.rounds))
    return out


def compare_on_every_rank(fns: dict[str, Callable], inputs: tuple, ref: str, *, rounds: int = ROUNDS,
                          most: int | None = None, warmup: int = 1, device: str = "cpu") -> dict:
    """`time_on_every_rank` in batches of `rounds` paired rounds until every
    contender's speedup over `ref` has a 95% CI that excludes 1 (a clear win or
    loss), or `most` rounds (3 x `rounds` by default) are timed: a shared
    machine's noise gets more rounds only where the verdict is still open.
    Rank 0 decides whether to go on; every rank gets the same timings."""
    from passlab.runtime import timing
    most = most or 3 * rounds
    merged: dict = {}
    while True:
        got = time_on_every_rank(fns, inputs, rounds=rounds, warmup=warmup if not merged else 0, device=device)
        for k, t in got.items():
            merged[k] = as_timing((merged[k].samples_s if k in merged else []) + t.samples_s)
        n = len(merged[ref].samples_s)

        def open_verdict():
            return n < most and any(lo <= 1.0 <= hi for k, t in merged.items() if k != ref
                                    for _, lo, hi in [timing.speedup(t, merged[ref])])
        if not decide(open_verdict):
            return merged


def as_timing(samples: list[float]):
    """Paired-round samples (one a round, as `time_on_every_rank` keeps them) as a Timing with its rounds,
    for `timing.speedup`'s paired bootstrap."""
    from passlab.runtime import timing
    return timing.Timing(*timing.median_ci(samples), len(samples), "paired rounds", 1, list(samples),
                         list(range(len(samples))))


def decide(choose: Callable[[], object]):
    """`choose()` evaluated on rank 0 and broadcast: every rank gets rank 0's answer."""
    import torch.distributed as dist
    box = [choose() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def timing_row(t, ref=None) -> dict:
    """A Timing for a record; with `ref`, its speedup over ref (> 1: faster) and the 95% CI."""
    from passlab.runtime import timing
    row = {"median_s": t.median_s, "ci_low_s": t.ci_low_s, "ci_high_s": t.ci_high_s, "n": t.n}
    if ref is not None:
        row["speedup"] = list(timing.speedup(t, ref))
    return row


def multi_rank() -> bool:
    """A real process group of several ranks (not torch's fake one, which never runs collectives)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
        and dist.get_backend() != "fake"
