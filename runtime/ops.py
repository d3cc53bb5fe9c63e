"""passlab's own ATen-level ops (`torch.ops.passlab.*`), registered on import.

- `grouped_mm(x [S, I], w [E, I, O], offs [E] int32) -> [S, O]`: rows
  `offs[e-1]:offs[e]` of `x` times expert `e`'s weight. `aten._grouped_mm`
  computes exactly this, but its fake (meta) kernel accepts bf16 only while
  the CPU kernel also runs fp32 and fp16; this op gives every dtype one fake
  kernel and runs `aten._grouped_mm` where it has a kernel, a loop of `mm`
  over the row blocks elsewhere. Rows past `offs[-1]` are zero.
"""
from __future__ import annotations

import functools

import torch

aten = torch.ops.aten


@functools.lru_cache(maxsize=None)
def aten_grouped_mm_runs(dtype: torch.dtype, device_type: str) -> bool:
    """Whether `aten._grouped_mm` has a kernel for this dtype on this device kind (a tiny probe)."""
    if not hasattr(aten, "_grouped_mm"):
        return False
    if device_type == "cuda" and (dtype != torch.bfloat16 or not torch.cuda.is_available()
                                  or torch.cuda.get_device_capability() < (8, 0)):
        return False
    try:
        x = torch.ones(3, 16, dtype=dtype, device=device_type)
        w = torch.ones(2, 16, 16, dtype=dtype, device=device_type)
        offs = torch.tensor([1, 3], dtype=torch.int32, device=device_type)
        return bool((aten._grouped_mm(x, w, offs) == 16).all())
    except Exception:   # no kernel for this dtype / device in this torch
        return False


@torch.library.custom_op("passlab::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if aten_grouped_mm_runs(x.dtype, x.device.type):
        return aten._grouped_mm(x, w, offs)
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


@grouped_mm.register_fake
def _grouped_mm_fake(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])
