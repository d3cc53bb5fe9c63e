"""`fuse`: the fusion partitioner.

Groups pointwise ops, and pointwise ops with the reductions they feed or read
(softmax, LayerNorm, RMSNorm, GELU/SiLU chains, bias and residual adds,
masking, scaling), into single kernels:

1. candidates: torch.fx's `CapabilityBasedPartitioner` proposes maximal
   cycle-free partitions of ops the kernel description can express (views
   stay outside: a view of a kernel input is a strided read, a view of an
   intermediate ends the group);
2. vertical split: inside each candidate, nodes join their producers' group in
   topological order while the group stays legal: it lowers to ONE kernel
   description (one iteration space, reductions over the same dims, every
   value mapped consistently), stays cycle-free and within `max_nodes`;
3. horizontal: independent groups that read a common input merge when the
   result is still one legal kernel (`horizontal=on`);
4. exact routing: in bf16/fp16, whatever a top-k/argmax/sort depends on stays
   in ATen so it rounds exactly as eager (`exact_routing=off` fuses it too; an
   MoE router may then pick other experts on ties and the output changes);
5. cost: a group is kept only if it saves bytes by the static cost model
   (a lone primitive op saves nothing and stays an ATen call; a lone
   composite such as softmax or layer_norm becomes one kernel).

Each group becomes ONE call_function node whose target is a
`passlab.runtime.kernel.FusedKernel` keeping the subgraph it replaced.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule, fuse_by_partitions, validate_partition

from passlab.runtime import costmodel
from passlab.runtime.kernel import TYPE_OF, FusedKernel, LoweringError, can_lower, lower

from .api import PassResult
from .meta import propagate
from .registry import register_pass

aten = torch.ops.aten
COMPOSITES = {aten._softmax.default, aten._log_softmax.default, aten.native_layer_norm.default,
              aten.gelu.default, aten.silu.default, aten.var.correction, aten.mean.dim,
              aten._native_batch_norm_legit_no_training.default}
NO_OPS = {aten._assert_tensor_metadata.default}
# ops whose result jumps when an input moves by one ulp (MoE routers: top-k of bf16 probabilities).
# In bf16/fp16 everything they depend on is left to ATen, so it rounds exactly as eager does;
# otherwise a tie breaks the other way, tokens go to other experts and the output changes wholesale.
DISCONTINUOUS = {aten.topk.default, aten.sort.default, aten.argmax.default, aten.argmin.default,
                 aten.max.dim, aten.min.dim}


def decision_cone(gm) -> set:
    """Nodes a discrete choice depends on, where any of them computes in bf16/fp16."""
    low = (torch.bfloat16, torch.float16)
    out: set = set()
    for d in [n for n in gm.graph.nodes if n.target in DISCONTINUOUS]:
        cone, stack = set(), [d]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in cone:
                    cone.add(a)
                    stack.append(a)
        if any(isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dtype in low for a in cone):
            out |= cone
    return out


def tensor_ok(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(tensor_ok(x) for x in v if x is not None)
    return isinstance(v, torch.Tensor) and v.dtype in TYPE_OF


class Fusible(OperatorSupportBase):
    """Ops the kernel description can express, on dtypes the kernels handle."""

    def __init__(self, exclude=frozenset()):
        super().__init__()
        self.exclude = exclude

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is operator.getitem:
            src = node.args[0]
            return isinstance(src, torch.fx.Node) and src.target in COMPOSITES and self.is_node_supported(None, src)
        if not can_lower(node) or not tensor_ok(node.meta.get("val")) or node in self.exclude:
            return False
        return all(tensor_ok(a.meta.get("val")) for a in node.all_input_nodes)


class Grouper:
    """Splits candidate partitions into legal kernels."""

    def __init__(self, gm, max_nodes):
        self.gm, self.max_nodes = gm, max_nodes
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.skipped: dict[str, int] = {}
        self.cache: dict = {}

    def skip(self, why):
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def legal(self, nodes) -> bool:
        key = frozenset(nodes)
        if key in self.cache:
            return self.cache[key]
        ok = self._legal(sorted(nodes, key=self.order.get))
        self.cache[key] = ok
        return ok

    def _legal(self, nodes) -> bool:
        if sum(1 for n in nodes if n.target is not operator.getitem) > self.max_nodes:
            self.skip("max_nodes")
            return False
        if not validate_partition(nodes):
            self.skip("cycle")
            return False
        try:
            lower(self.subgraph(nodes)[0])
        except LoweringError:
            self.skip("not_one_kernel")
            return False
        except Exception:  # an op with arguments the lowering did not foresee: leave it to ATen
            self.skip("lowering_error")
            return False
        return True

    def subgraph(self, nodes):
        sub, ins, outs = fuse_as_graphmodule(self.gm, nodes, "fused")
        for ph, src in zip([n for n in sub.graph.nodes if n.op == "placeholder"], ins):
            ph.meta["val"] = src.meta.get("val")
        for n, src in zip([n for n in sub.graph.nodes if n.op not in ("placeholder", "output")], nodes):
            n.meta["val"] = src.meta.get("val")
        return sub, ins, outs

    def split(self, partition) -> list[set]:
        groups: list[set] = []
        where: dict = {}
        members = set(partition)
        for n in sorted(partition, key=self.order.get):
            if n.target is operator.getitem:
                continue
            unit = {n} | {u for u in n.users if u.target is operator.getitem and u in members}
            producers = []
            for a in n.all_input_nodes:
                g = where.get(a)
                if g is not None and all(g is not p for p in producers):
                    producers.append(g)
            placed = None
            if producers:
                union = set().union(*producers) | unit
                if self.legal(union):
                    for g in producers[1:]:
                        groups.remove(g)
                    producers[0] |= union
                    placed = producers[0]
                else:
                    for g in sorted(producers, key=len, reverse=True):
                        if self.legal(g | unit):
                            g |= unit
                            placed = g
                            break
            if placed is None:
                placed = set(unit)
                groups.append(placed)
            for m in placed:
                where[m] = placed
        return groups

    def horizontal(self, groups) -> int:
        merged = 0
        changed = True
        while changed:
            changed = False
            reads = {}
            for i, g in enumerate(groups):
                for n in g:
                    for a in n.all_input_nodes:
                        if a not in g:
                            reads.setdefault(a, []).append(i)
            for a, idx in reads.items():
                idx = sorted(set(idx))
                for x in range(len(idx)):
                    for y in range(x + 1, len(idx)):
                        gi, gj = groups[idx[x]], groups[idx[y]]
                        if self.legal(gi | gj):
                            groups[idx[x]] = gi | gj
                            del groups[idx[y]]
                            merged += 1
                            changed = True
                            break
                    if changed:
                        break
                if changed:
                    break
        return merged

    def saves(self, group) -> int:
        """Estimated bytes saved: what the ops moved one by one minus what the kernel moves."""
        nodes = sorted(group, key=self.order.get)
        before = sum(costmodel.node_cost(n).bytes for n in nodes)
        _, ins, outs = self.subgraph(nodes)
        after = sum(costmodel.nbytes(n.meta.get("val")) for n in list(ins) + list(outs))
        return before - after


@register_pass("fuse")
def fuse(gm: torch.fx.GraphModule, ctx, *, max_nodes: int = 64, horizontal: bool = True,
         exact_routing: bool = True) -> PassResult:
    """Fuse pointwise and reduction ops into single generated kernels (vertical and horizontal)."""
    before = costmodel.graph_cost(gm)
    dropped = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in NO_OPS:
            gm.graph.erase_node(n)
            dropped += 1
    exact = decision_cone(gm) if exact_routing else set()
    partitions = CapabilityBasedPartitioner(gm, Fusible(exact), allows_single_node_partition=True,
                                            skip_horizontal_fusion=True).propose_partitions()
    grouper = Grouper(gm, max_nodes)
    groups = [g for p in partitions for g in grouper.split(list(p.nodes))]
    merged = grouper.horizontal(groups) if horizontal else 0
    kept, saved = [], 0
    for g in groups:
        ops = [n for n in g if n.target is not operator.getitem]
        if len(ops) == 1 and ops[0].target not in COMPOSITES:
            grouper.skip("single_op")
            continue
        s = grouper.saves(g)
        if s <= 0 and not any(n.target in COMPOSITES for n in ops):
            grouper.skip("no_bytes_saved")
            continue
        kept.append(g)
        saved += max(0, s)
    nodes_fused = sum(1 for g in kept for n in g if n.target is not operator.getitem)
    if kept:
        order = grouper.order
        gm = fuse_by_partitions(gm, [dict.fromkeys(sorted(g, key=order.get)) for g in kept], prefix="fused_")
        to_kernels(gm, "fused_")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    propagate(gm)
    after = costmodel.graph_cost(gm)
    stats = {"groups": len(kept), "nodes_fused": nodes_fused, "horizontal_merges": merged,
             "launches_before": before.launches, "launches_after": after.launches,
             "bytes_saved": saved, "asserts_dropped": dropped,
             "skipped": {**grouper.skipped, **({"feeds_routing_decision": sum(1 for n in exact if can_lower(n))}
                                              if exact else {})}}
    return PassResult(gm, changed=bool(kept) or dropped > 0, stats=stats)


def to_kernels(gm: torch.fx.GraphModule, prefix: str) -> None:
    """fuse_by_partitions made call_module nodes; make each a FusedKernel call."""
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(prefix)]:
        sub = getattr(gm, node.target)
        inner = [n for n in sub.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
        for ph, src in zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args):
            ph.meta["val"] = src.meta.get("val")
        propagate(sub)
        main = next((n for n in inner if n.target in COMPOSITES), inner[0])
        label = getattr(main.target, "__name__", str(main.target)).split(".")[0].lstrip("_")
        delattr(gm, node.target)
        node.op, node.target = "call_function", FusedKernel(f"{node.name}_{label}", sub)
        node.meta["fused_from"] = [n.name for n in inner]
