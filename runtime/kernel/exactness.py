"""Whether a generated CPU kernel computes a unary op on a 16-bit float exactly as ATen does.

`fuse` keeps the float ops an MoE router's top-k depends on bit-identical to eager. Ops ATen
computes as one IEEE fp32 operation are exact by construction (`fuse.ROUNDS_AS_EAGER`); a
transcendental (exp, SiLU, sigmoid, tanh, log, GELU) is computed by a polynomial, ATen's and the
kernel's different ones, so it is exact only where both round to the same 16-bit value. With a
16-bit input and output that is checked exhaustively: every one of the 65,536 values of the dtype
goes through

- a kernel of the op alone, its result rounded to the dtype as `fuse` marks routing-cone ops
  (`ROUND_EACH_OP`), and
- ATen on both of its CPU paths: a contiguous tensor (the vectorized loop) and a strided one
  (the scalar loop, which calls libm). ATen picks the path by layout and by an element's place
  in the tail, so eager's bits for a value may come from either,

and the op counts as exact only where all three agree on every value (NaN for NaN). Only ops the
C++ printer writes inline (no libm call, so the kernel's vector and tail loops compute the same
arithmetic) are candidates: `PROBED`. The answer is per machine (ATen's and the kernel's code
paths follow the ISA), so it is computed in the process, once per (op, dtype); the probe kernel's
compile is cached on disk like any other.
"""
from __future__ import annotations

import functools

import torch
import torch.fx

from .fused import FusedKernel
from .primitives import DECOMP, ROUND_EACH_OP

aten = torch.ops.aten
EXHAUSTIVE = (torch.bfloat16, torch.float16)
PROBED = {aten.exp.default, aten.sigmoid.default, aten.silu.default, aten.tanh.default, aten.log.default,
          aten.gelu.default, aten.erf.default}


def exact_unary(node: torch.fx.Node) -> bool:
    """`node` is a probed unary op (default arguments) from a 16-bit float to the same dtype,
    and the kernel computes it as ATen does on this machine."""
    if node.op != "call_function" or node.target not in PROBED or node.kwargs or len(node.args) != 1:
        return False
    x, out = node.args[0], node.meta.get("val")
    if not (isinstance(x, torch.fx.Node) and isinstance(out, torch.Tensor) and out.dtype in EXHAUSTIVE
            and isinstance(x.meta.get("val"), torch.Tensor) and x.meta["val"].dtype == out.dtype):
        return False
    return rounds_as_aten(node.target, out.dtype)


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65,536 bit patterns of a 16-bit dtype, then 17 of them again (so the kernel's
    tail loop runs too)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    return torch.cat([bits, bits[:17]]).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ia, ib = a.view(torch.int16), b.view(torch.int16)
    return bool(((ia == ib) | (a.isnan() & b.isnan())).all())


@functools.lru_cache(maxsize=None)
def rounds_as_aten(target, dtype: torch.dtype) -> bool:
    """The exhaustive check of one op at one dtype (see the module doc)."""
    if target not in PROBED or target not in DECOMP or dtype not in EXHAUSTIVE:
        return False
    x = every_value(dtype)
    strided = torch.empty(2 * x.numel(), dtype=dtype)[::2]
    strided.copy_(x)
    g = torch.fx.Graph()
    p = g.placeholder("x")
    p.meta["val"] = x
    n = g.call_function(target, (p,))
    n.meta["val"] = target(x)
    n.meta[ROUND_EACH_OP] = True
    g.output(n)
    try:
        with torch.no_grad():
            kernel = FusedKernel(f"exactness_{target.__name__.split('.')[0]}", torch.fx.GraphModule({}, g))
            got = kernel(x)
            return same_bits(got, target(x)) and same_bits(got, target(strided).contiguous())
    except Exception:       # no compiler, a lowering this torch lacks: not exact, stays in ATen
        return False
