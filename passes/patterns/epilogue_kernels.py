"""CPU without oneDNN (fp16, `onednn=false`, or what oneDNN did not take): the
activation after each GEMM — GELU / SiLU / ReLU, plus an add or mul reading
it — as ONE generated pointwise kernel (`fuse_nodes`), so the pair is one BLAS
call and one FusedKernel. Used by `fuse_epilogue` (`kernels=false` leaves
activations to `fuse`, which can still extend these kernels).
"""
from __future__ import annotations

import torch

from ..fuse import FusionError, fuse_nodes
from ..vocabulary import GEMMS, Counters, activation_at, aten, sole_user_through_views, users


def activation_groups(gm: torch.fx.GraphModule) -> list[list]:
    """[activation (, add/mul reading it)] after each GEMM (seen through views)."""
    groups = []
    for gemm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in GEMMS]:
        passed = []
        nxt = sole_user_through_views(gemm, passed)
        found = activation_at(passed[-1] if passed else gemm, nxt)
        if found is None:
            continue
        nodes = found[1]
        after = users(nodes[-1])
        if len(after) == 1 and after[0].target in (aten.add.Tensor, aten.mul.Tensor):
            nodes = nodes + [after[0]]
        groups.append(nodes)
    return groups


def cpu_epilogues(gm: torch.fx.GraphModule, c: Counters) -> int:
    """Each GEMM's activation (and the add/mul after it) as one generated kernel; returns how many."""
    made = 0
    for nodes in activation_groups(gm):
        c.matched += 1
        try:
            fuse_nodes(gm, nodes, label="epilogue")
        except FusionError:
            c.skip("epilogue_not_one_kernel", nodes=nodes)
            continue
        made += 1
    return made
