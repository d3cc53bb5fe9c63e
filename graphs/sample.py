"""The `Sample`: a model, its example inputs and what one forward is worth."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Sample:
    """A runnable model with example inputs.

    `unit` / `units_per_forward` turn a forward's time into throughput
    (tokens/s, images/s); `make_inputs(seed)` gives fresh random inputs of the
    same shapes and dtypes, which the numerics check needs so that a pass cannot
    overfit the example inputs.
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple
    unit: str = "samples"
    units_per_forward: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    preset: str = "tiny"
    description: str = ""
    input_factory: Callable[[int], tuple] | None = field(default=None, repr=False)

    def make_inputs(self, seed: int) -> tuple:
        if self.input_factory is not None:
            return self.input_factory(seed)
        return random_like(self.example_inputs, seed)


def random_like(inputs, seed: int):
    """Fresh inputs shaped like `inputs`: floats ~ N(0,1), integers within the
    example's range, bools copied (masks usually carry structure)."""
    g = torch.Generator().manual_seed(seed)

    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.dtype.is_floating_point:
            return torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype).to(x.device)
        if x.dtype == torch.bool or x.numel() == 0:
            return x.clone()
        lo, hi = int(x.min()), int(x.max())
        return torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype).to(x.device)

    return tuple(one(x) for x in inputs)


def has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix units (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def preset_dtype(preset: str, device: str, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """tiny runs fp32; bench runs bf16 on GPU and on CPUs with bf16 matrix units."""
    if dtype is not None:
        return parse_dtype(dtype)
    env = os.environ.get("PASSLAB_DTYPE")
    if env:
        return parse_dtype(env)
    if preset == "tiny":
        return torch.float32
    if device.startswith("cuda") or has_native_bf16():
        return torch.bfloat16
    return torch.float32


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[str(d).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r}; use one of fp32, bf16, fp16") from None
