"""Measured choices: when two correct implementations compete and the machine
decides which is faster, time both once and remember the winner.

This is the cost model's measured half (the static half is `costmodel`): a
pass asks `fastest(key, candidates)` instead of guessing. The answer is kept
per key (shapes, dtypes, device) for the life of the process and, like
Inductor's autotuning cache, on disk per machine (CPU or GPU model, thread
count, torch version: `profiles.machine_key`) in the cache directory
(`$PASSLAB_CACHE/autotune-<machine>.json`), so a second setup of the same
shapes on the same machine measures nothing again. `PASSLAB_AUTOTUNE=fresh`
measures every choice anew in each process (and writes nothing). A stored
answer that is not one of the candidates asked about is measured again.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from .timing import measure_many

_CHOICES: dict = {}
_LOADED: set = set()      # devices whose stored choices were read
MIN_FLOPS = 5e7   # below this, one launch beats several on overhead alone: not worth timing


def fastest(key, candidates: dict[str, Callable[[], object]], *, device: str = "cpu",
            budget_s: float = 0.3) -> str:
    """The name of the fastest candidate (each a no-argument callable)."""
    stored = persistent()
    if stored and device not in _LOADED:
        _LOADED.add(device)
        _CHOICES.update(load(device))
    name = text_key(key)
    slot = name if name is not None else ("unstored", key)
    if _CHOICES.get(slot) not in candidates:
        t = measure_many(candidates, [()], device=device, budget_s=budget_s, min_reps=5, target_ci=0.05)
        _CHOICES[slot] = rank0(min(t, key=lambda c: t[c].median_s))
        if stored and name is not None:
            save(device, name, _CHOICES[slot])
    return _CHOICES[slot]


def text_key(key) -> str | None:
    """The key as stored: its repr, where that names no object by address (None: kept in memory only)."""
    text = repr(key)
    return None if " at 0x" in text else text


def persistent() -> bool:
    """Stored choices are used, except under PASSLAB_AUTOTUNE=fresh and in a launched run of several
    ranks (every rank measures, and takes rank 0's choice: no rank may skip that exchange)."""
    if os.environ.get("PASSLAB_AUTOTUNE", "").strip().lower() == "fresh":
        return False
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def path(device: str) -> str:
    from .codegen import cache_dir
    from .profiles import machine_key
    return os.path.join(cache_dir(), f"autotune-{machine_key(device)}.json")


def load(device: str) -> dict:
    try:
        with open(path(device)) as f:
            data = json.load(f)
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError):
        return {}       # none yet, or unreadable: measured again


def save(device: str, name: str, choice: str) -> None:
    """Add one choice to the machine's file (read again first: another process may have added some)."""
    p = path(device)
    data = load(device)
    data[name] = choice
    tmp = f"{p}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, p)
    except OSError:
        pass            # a read-only cache: the choice stays in this process only


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
    """Forget every choice, in this process and on disk."""
    _CHOICES.clear()
    _LOADED.clear()
    for device in ("cpu", "cuda"):
        try:
            os.remove(path(device))
        except OSError:
            pass
