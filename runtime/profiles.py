"""Device profiles: the machine's measured copy bandwidth and matmul rates.

Measured once per machine (CPU model, thread count, torch version) and cached
as JSON, so the roofline bound and the link presets use this machine's own
numbers, not a datasheet's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time

import torch

from .codegen import cache_dir  # noqa: F401  (one cache directory, trust-checked; simulator reads it here)
from .timing import measure


def machine_key(device: str) -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else ""
    raw = f"{device}|{cpu}|{gpu}|{torch.get_num_threads()}|{torch.__version__}|{platform.machine()}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


QUICK = {"target_ci": 0.0, "min_reps": 3, "warmup": 1}   # a quick probe: its whole budget, >= 3 calls, 1 warm-up


@contextlib.contextmanager
def thread_count(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: left as it is) for the block."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rate_of(fn, work: float, *, device: str, budget_s: float, best: bool, **timing) -> float:
    """`work` per second of `fn()`, timed for `budget_s` (runtime/timing.py): by
    the median, or with `best` by the fastest call (a shared machine only ever
    slows one down)."""
    t = measure(fn, [()], device=device, budget_s=budget_s, **timing)
    return work / (min(t.samples_s) if best else t.median_s)


def matmul_flops(dtype="float32", *, size: int = 512, device: str = "cpu", threads: int | None = None,
                 budget_s: float = 0.3, best: bool = False, **timing) -> float:
    """This machine's FLOP/s of a `size` x `size` matmul in `dtype` (at `threads`
    threads), the one measurement of a matmul rate: the profiles, the quick
    profile of a run about to start and the link presets' scaling all use it."""
    dt = getattr(torch, str(dtype).replace("torch.", ""))
    with thread_count(threads):
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        return rate_of(lambda: torch.mm(a, b), 2 * size ** 3, device=device, budget_s=budget_s, best=best, **timing)


def copy_bytes(*, mbytes: int = 16, device: str = "cpu", threads: int | None = None, budget_s: float = 0.3,
               **timing) -> float:
    """This machine's copy bandwidth (read + write bytes / s) over `mbytes` MB of float32."""
    with thread_count(threads):
        src = torch.randn(mbytes * 1024 * 1024 // 4, device=device)
        dst = torch.empty_like(src)
        return rate_of(lambda: dst.copy_(src), 2 * src.numel() * 4, device=device, budget_s=budget_s, best=False,
                       **timing)


def measure_profile(device: str = "cpu", budget_s: float = 0.5) -> dict:
    """Copy bandwidth (read + write bytes / s) and matmul FLOP/s per dtype."""
    cuda = device.startswith("cuda")
    prof = {"device": device, "copy_bytes_per_s": copy_bytes(mbytes=64 if cuda else 16, device=device,
                                                              budget_s=budget_s)}
    # fp16 GEMMs have no fast CPU path (~1 GFLOP/s): measured on GPUs only
    dtypes = ("float32", "bfloat16", "float16") if cuda else ("float32", "bfloat16")
    prof["matmul_flops_per_s"] = {dt: matmul_flops(dt, size=4096 if cuda else 2048, device=device, budget_s=budget_s)
                                  for dt in dtypes}
    prof["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return prof


def get_profile(device: str = "cpu", refresh: bool = False) -> dict:
    path = os.path.join(cache_dir(), f"profile-{machine_key(device)}.json")
    if not refresh:
        try:
            with open(path) as f:
                prof = json.load(f)
            if prof.get("copy_bytes_per_s") and prof.get("matmul_flops_per_s"):
                return prof
        except (OSError, ValueError):
            pass
    prof = measure_profile(device)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(prof, f, indent=1)
    os.replace(tmp, path)
    return prof
