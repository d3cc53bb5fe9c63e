"""A peer check with MLIR: how many elementwise groups does MLIR's own
fusion make of the same model, beside ours?

torch-mlir imports the model to linalg-on-tensors; MLIR's
`linalg-fuse-elementwise-ops` fuses producer/consumer `linalg.generic` ops.
After it, every remaining non-GEMM linalg op is one loop nest (one kernel).
Ours: every launch of the fused graph that is not a GEMM/conv.
"""
from __future__ import annotations

import re
import warnings

from passlab.runtime.costmodel import node_cost
from passlab.runtime.opclass import OpClass, op_class


def available() -> bool:
    try:
        import torch_mlir  # noqa: F401
        return True
    except ImportError:
        return False


def count_linalg(text: str) -> dict[str, int]:
    ops = re.findall(r"linalg\.(\w+)", text)
    hist: dict[str, int] = {}
    for o in ops:
        if o != "yield" and o != "index":
            hist[o] = hist.get(o, 0) + 1
    return hist


def mlir_groups(module, example_inputs) -> dict:
    """linalg op counts before and after MLIR's elementwise fusion."""
    from torch_mlir import fx
    from torch_mlir.passmanager import PassManager
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fx.export_and_import(module, *example_inputs, output_type="linalg-on-tensors")
    before = count_linalg(str(m))
    with m.context:
        PassManager.parse("builtin.module(func.func(linalg-fuse-elementwise-ops))").run(m.operation)
    after = count_linalg(str(m))
    loops = lambda h: sum(v for k, v in h.items() if k in ("generic", "reduce", "map", "softmax") or
                          k.startswith(("elemwise", "pooling")))
    return {"linalg_before": before, "linalg_after": after,
            "elementwise_loops_before": loops(before), "elementwise_loops_after": loops(after)}


def our_groups(gm) -> int:
    """Non-GEMM kernels our graph launches (fused groups + unfused pointwise/reduction ops)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and node_cost(n).launches
               and op_class(n) not in (OpClass.GEMM, OpClass.COLLECTIVE))


def compare(sample, gm_before, gm_after) -> dict:
    out = mlir_groups(sample.module, sample.example_inputs)
    out["passlab_before"] = our_groups(gm_before)
    out["passlab_after"] = our_groups(gm_after)
    return out
