"""Device profiles: the machine's measured copy bandwidth and matmul rates.

Measured once per machine (CPU model, thread count, torch version) and cached
as JSON, so the roofline bound and the link presets use this machine's own
numbers, not a datasheet's.
"""
from __future__ import annotations

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


def measure_profile(device: str = "cpu", budget_s: float = 0.5) -> dict:
    """Copy bandwidth (read + write bytes / s) and matmul FLOP/s per dtype."""
    n = 64 * 1024 * 1024 // 4 if device.startswith("cuda") else 16 * 1024 * 1024 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), [()], device=device, budget_s=budget_s)
    prof = {"device": device, "copy_bytes_per_s": 2 * src.numel() * 4 / t.median_s, "matmul_flops_per_s": {}}
    size = 4096 if device.startswith("cuda") else 2048
    # fp16 GEMMs have no fast CPU path (~1 GFLOP/s): measured on GPUs only
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device.startswith("cuda") else \
        (torch.float32, torch.bfloat16)
    for dt in dtypes:
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        t = measure(lambda: torch.mm(a, b), [()], device=device, budget_s=budget_s)
        prof["matmul_flops_per_s"][str(dt).replace("torch.", "")] = 2 * size ** 3 / t.median_s
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
