"""The kernel package: lowering a fused group to one description, and `FusedKernel`.

A fused group (an FX subgraph of pointwise and reduction ops) is lowered to ONE
description (`ir.Kernel`) that both printers (C++ for CPU, Triton for GPU) read.
Lowering runs in three steps: build a DAG of primitives with PyTorch shapes
(broadcasting semantics), pick the anchor from the reductions (or from the
outputs), then materialize each value for the anchor dims it maps onto,
walking down from the outputs. A value that cannot be mapped consistently
raises `LoweringError`; the fusion pass uses that as its legality test.

- `primitives`: step 1, the fused FX subgraph -> a DAG of primitives (`DECOMP`);
- `materialize`: steps 2-3, the anchor and the `Kernel` (`lower`, `simplify`);
- `ir`: the description itself (`Kernel`, `Buffer`, `Value`);
- `fused`: `FusedKernel`, the target of a fused node;
- `exactness`: whether a kernel rounds a 16-bit transcendental as ATen does (checked on every value).

The printers (`runtime/codegen/`) schedule and print a `Kernel`; nothing here
imports them except `FusedKernel`, when it is asked for its source or called.
"""
from .fused import FusedKernel, op_names
from .ir import COMPARE, LOGICAL, REDUCE_INIT, TYPE_OF, Buffer, Kernel, LoweringError, Value
from .materialize import Materializer, lower, simplify
from .primitives import DECOMP, ROUND_EACH_OP, P, Builder, can_lower

__all__ = ["FusedKernel", "op_names", "COMPARE", "LOGICAL", "REDUCE_INIT", "TYPE_OF", "Buffer", "Kernel",
           "LoweringError", "Value", "Materializer", "lower", "simplify", "DECOMP", "ROUND_EACH_OP", "P", "Builder",
           "can_lower"]
