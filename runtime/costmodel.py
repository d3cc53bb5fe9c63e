"""Static cost model: FLOPs, bytes moved and kernel launches of a graph.

These are *estimates* read off the graph's metadata (no timing): a view moves
nothing and launches nothing; every other op is one launch that reads its
tensor inputs and writes its outputs once; a fused node is one launch that
reads its inputs and writes its outputs once (its intermediates stay in
registers). GEMM/conv FLOPs are exact; pointwise ops count one FLOP per output
element.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.fx

from .opclass import OpClass, op_class

aten = torch.ops.aten


@dataclass
class Cost:
    flops: int = 0
    bytes: int = 0
    launches: int = 0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.bytes + o.bytes, self.launches + o.launches)

    def as_dict(self):
        return asdict(self)


def tensors(x):
    """Flat list of tensors in a (possibly nested) meta value."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors(v)]
    return []


def nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(x))


def arg_vals(node: torch.fx.Node):
    vals = []
    for a in node.all_input_nodes:
        vals.extend(tensors(a.meta.get("val")))
    return vals


def gemm_flops(node: torch.fx.Node) -> int:
    t = node.target
    out = tensors(node.meta.get("val"))
    if not out:
        return 0
    o = out[0]
    ins = [a.meta.get("val") for a in node.args if isinstance(a, torch.fx.Node)]
    if t in (aten.mm.default, aten.addmm.default):
        a = ins[-2]
        return 2 * o.numel() * a.shape[-1]
    if t in (aten.bmm.default, aten.baddbmm.default):
        a = ins[-2]
        return 2 * o.numel() * a.shape[-1]
    if getattr(getattr(t, "_schema", None), "name", "") == "mkldnn::_linear_pointwise":
        return 2 * o.numel() * node.args[0].meta["val"].shape[-1]    # x [M, K], weight [N, K]
    if t == aten.convolution.default or getattr(getattr(t, "_schema", None), "name", "") == \
            "mkldnn::_convolution_pointwise":                   # oneDNN's takes `other` before W in .binary
        w = ins[2 if getattr(t, "_overloadname", "") == "binary" else 1]      # [out, in / groups, kh, kw]
        return 2 * o.numel() * math.prod(w.shape[1:])
    if len(ins) >= 2 and hasattr(ins[0], "shape"):  # attention and friends: a rough count
        q, k = ins[0], ins[1]
        return 4 * q.numel() * k.shape[-2]
    return 2 * o.numel()


def node_cost(node: torch.fx.Node) -> Cost:
    if node.op != "call_function":
        return Cost()
    cls = op_class(node)
    if cls in (OpClass.VIEW, OpClass.BROADCAST):
        return Cost()
    target = node.target
    if hasattr(target, "cost") and (cls == OpClass.FUSED or getattr(target, "is_gemm_template", False)):
        return target.cost(node)
    out_val = node.meta.get("val")
    moved = nbytes(out_val) + sum(t.numel() * t.element_size() for t in arg_vals(node))
    if cls == OpClass.GEMM:
        return Cost(gemm_flops(node), moved, 1)
    if "assert" in str(target):
        return Cost()
    return Cost(sum(t.numel() for t in tensors(out_val)), moved, 1)


def graph_cost(gm: torch.fx.GraphModule) -> Cost:
    total = Cost()
    for n in gm.graph.nodes:
        total = total + node_cost(n)
    return total


def op_histogram(gm: torch.fx.GraphModule) -> dict[str, int]:
    hist: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            name = str(n.target) if name in ("default", "Tensor") else name
            hist[name] = hist.get(name, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def materialized_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the tensors the graph writes to memory (views excluded): what
    fusion saves when intermediates stay in registers."""
    total = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_class(n) not in (OpClass.VIEW, OpClass.BROADCAST):
            total += nbytes(n.meta.get("val"))
    return total


def roofline_bound_s(gm: torch.fx.GraphModule, profile: dict, dtype: torch.dtype) -> float:
    """A lower bound on the graph's time (an estimate): GEMM/conv FLOPs at the
    measured matmul rate for `dtype`, every other byte moved at copy bandwidth."""
    rate = profile["matmul_flops_per_s"].get(str(dtype).replace("torch.", "")) \
        or profile["matmul_flops_per_s"]["float32"]
    bw = profile["copy_bytes_per_s"]
    t = 0.0
    for n in gm.graph.nodes:
        c = node_cost(n)
        if n.op == "call_function" and op_class(n) == OpClass.GEMM:
            t += max(c.flops / rate, c.bytes / bw)
        else:
            t += c.bytes / bw
    return t
