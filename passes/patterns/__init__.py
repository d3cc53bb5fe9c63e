"""Pattern passes: each finds one idiom in the core-aten graph and rewrites it.

- `fold_batchnorm`     conv/linear + eval batchnorm -> conv/linear with folded weights
- `fuse_attention`     bmm, scale, mask, softmax, bmm -> scaled_dot_product_attention
- `merge_projections`  sibling GEMMs on one input (Q/K/V, gate/up) -> one GEMM + slices
- `fuse_epilogue`      GEMM + bias / residual add -> addmm; CPU: oneDNN linear + post-op; GPU: Triton GEMM + epilogue

Each pass registers on its own and counts what it saw (`Counters`), TorchInductor
style, so that the run record tells which pattern fired where and why one did not.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx

aten = torch.ops.aten
ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}


class Counters:
    """matched / rewritten / skipped{reason: n}: the statistics of a pattern pass."""

    def __init__(self):
        self.matched, self.rewritten, self.skipped = 0, 0, Counter()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self, **extra) -> dict:
        return {"matched": self.matched, "rewritten": self.rewritten,
                "skipped": dict(sorted(self.skipped.items())), **extra}


def users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that consume the value: metadata asserts left by export do not count."""
    return [u for u in node.users if u.target not in ASSERTS]


def erase_dead(graph: torch.fx.Graph, nodes) -> int:
    """Erase the given nodes (and the asserts hanging on them) once nothing reads them.

    Only the nodes a rewrite replaced are touched, so a pattern pass never
    removes dead code it did not create (that is `dce`'s job)."""
    erased, pending = 0, [n for n in dict.fromkeys(nodes) if n.graph is graph and not getattr(n, "_erased", False)]
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if users(n):
                continue
            for a in list(n.users):
                graph.erase_node(a)
            graph.erase_node(n)
            pending.remove(n)
            erased += 1
            changed = True
    return erased


def new_constant(gm: torch.fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """Register `value` as a new buffer under a fresh name; parameters are never mutated."""
    base = "_" + "".join(c if c.isalnum() else "_" for c in stem)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().contiguous())
    return name


def constant_of(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a get_attr node (or None)."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj if isinstance(obj, torch.Tensor) else None
    return None
