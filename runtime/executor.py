"""The executor: an optimized GraphModule -> a callable for a device.

Unfused ops run through ATen as the graph's generated Python calls them; fused
nodes call their kernel objects, which the executor builds for the device
first (all C++ kernels of a graph in one compiler call).
"""
from __future__ import annotations

import torch
import torch.fx


def fused_kernels(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "is_fused_kernel", False)]


def compile_graph(gm: torch.fx.GraphModule, device: str = "cpu"):
    """Prepare every fused kernel of `gm` for `device` and return a callable."""
    kernels = fused_kernels(gm)
    if kernels:
        from . import codegen
        codegen.build(kernels, device)
    return gm
