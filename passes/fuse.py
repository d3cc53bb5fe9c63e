"""`fuse`: the fusion partitioner.

Groups pointwise ops, and pointwise ops with the reductions they feed or read
(softmax, LayerNorm, RMSNorm, GELU/SiLU chains, bias and residual adds,
masking, scaling), into single kernels:

1. candidates: torch.fx's `CapabilityBasedPartitioner` proposes maximal
   cycle-free partitions of ops the kernel description can express (views
   stay outside: a view of a kernel input is a strided read, a view of an
   intermediate ends the group, except a permute / transpose that only fused
   ops read: the kernel reads through it, e.g. ConvNeXt's NHWC layer scale,
   permute to NCHW, residual add); row gathers (index_select, embedding,
   x[idx]) on CPU, read through a checked index; a constant the graph makes
   and a concatenation read only as gather tables are first copied per
   reader (`copy_for_readers`), so each kernel computes its own;
2. vertical split: inside each candidate, nodes join their producers' group in
   topological order while the group stays legal: it lowers to ONE kernel
   description (one iteration space, reductions over the same dims, every
   value mapped consistently), stays cycle-free and within `max_nodes`;
3. horizontal: independent groups that read a common input merge when the
   result is still one legal kernel (`horizontal=on`);
4. exact routing: in bf16/fp16, whatever float a top-k/argmax/sort depends on
   rounds exactly as eager: integer and bool values (exact in any kernel) and,
   on CPU, the float ops ATen computes as one IEEE fp32 operation (add, mul,
   div, casts, views, cat, sqrt, ...: `ROUNDS_AS_EAGER`), and the 16-bit
   transcendentals the kernel was checked to round as ATen does on every
   input value (`runtime/kernel/exactness.py`), fuse, each result
   rounded in the kernel to its own dtype as eager stores it; the rest
   (reductions, softmax, unchecked ops) stays in ATen (`exact_routing=off` fuses it
   all; an MoE router may then pick other experts on ties and the output
   changes);
5. cost: a group is kept only if it saves bytes by the static cost model
   (a lone primitive op saves nothing and stays an ATen call; a lone
   composite such as softmax or layer_norm becomes one kernel, except GELU,
   whose ATen kernel is faster alone: `ATEN_ALONE`).

Each group becomes ONE call_function node whose target is a
`passlab.runtime.kernel.FusedKernel` keeping the subgraph it replaced.

A kernel made before (by `fuse_nodes`, e.g. a pattern pass's RMSNorm kernel,
or an earlier `fuse`) is one unit here: it is never split, and neighbouring
ops join it as they would join any group (its subgraph is inlined into the
bigger kernel's), so pre-fusing a pattern never costs launches.

`fuse_nodes(gm, nodes, label=...)` is the public way to make one kernel of a
chosen set of nodes: it checks that they lower to one kernel (`FusionError`
with the reason otherwise), drops the asserts hanging on them, and names the
kernel `<label>_<n>`.
"""
from __future__ import annotations

import heapq
import operator

import torch
import torch.fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.fx.passes.utils.fuser_utils import (erase_nodes, fuse_as_graphmodule, fuse_by_partitions, insert_subgm,
                                              validate_partition)

from passlab.runtime import costmodel
from passlab.runtime.kernel import ROUND_EACH_OP, TYPE_OF, FusedKernel, LoweringError, can_lower, lower
from passlab.runtime.kernel.exactness import exact_unary

from .api import PassResult
from .meta import propagate
from .vocabulary import Counters, Skip, side_effect_only
from .registry import register_pass

aten = torch.ops.aten
COMPOSITES = {aten._softmax.default, aten._log_softmax.default, aten.native_layer_norm.default,
              aten.gelu.default, aten.silu.default, aten.var.correction, aten.mean.dim,
              aten._native_batch_norm_legit_no_training.default}
# composites whose ATen kernel beats a generated one when nothing fuses with them: GELU (ATen calls
# MKL's vector CDF; the kernel's erf is a rational polynomial with a division: [512, 4096] fp32
# 0.24 ms against 0.45 ms on Zen 4)
ATEN_ALONE = {aten.gelu.default}
NO_OPS = {aten._assert_tensor_metadata.default}
# views a kernel reads through (dims relabelled, no data moved): a permute between two fused ops
KERNEL_VIEWS = {aten.permute.default, aten.transpose.int}
# row gathers: C++ kernels read them through a checked index (Triton kernels have no error flag)
GATHERS = {aten.index_select.default, aten.embedding.default, aten.index.Tensor}
# ops whose result jumps when an input moves by one ulp (MoE routers: top-k of bf16 probabilities).
# In bf16/fp16 everything they depend on is left to ATen, so it rounds exactly as eager does;
# otherwise a tie breaks the other way, tokens go to other experts and the output changes wholesale.
DISCONTINUOUS = {aten.topk.default, aten.sort.default, aten.argmax.default, aten.argmin.default,
                 aten.max.dim, aten.min.dim}


# ops whose fp32 result ATen's CPU kernels compute as the generated kernels do (one IEEE operation,
# no contraction, no polynomial): with their results rounded op by op they give eager's bits
ROUNDS_AS_EAGER = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor,
                   aten.mul.Scalar, aten.div.Tensor, aten.neg.default, aten.abs.default, aten.where.self,
                   aten._to_copy.default, aten.clone.default, aten.maximum.default, aten.minimum.default,
                   aten.sqrt.default, aten.rsqrt.default, aten.cat.default, aten.slice.Tensor, aten.view.default,
                   aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.expand.default,
                   aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.t.default, aten.transpose.int,
                   aten.index_select.default, aten.embedding.default, aten.index.Tensor, aten.full.default,
                   aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.scalar_tensor.default}


def rounds_as_eager(node) -> bool:
    """One IEEE operation as ATen computes it, or a transcendental on a 16-bit float that the
    kernel was checked, on this machine, to round as ATen does for every input value
    (`runtime/kernel/exactness.py`: SiLU and sigmoid in bf16 on Zen 4; not exp, whose kernel
    flushes results below FLT_MIN to 0)."""
    if node.target is aten.pow.Tensor_Scalar:
        return node.args[1] in (1, 2)
    if node.target in ROUNDS_AS_EAGER:
        return node.kwargs.get("alpha", 1) in (1, -1)
    return exact_unary(node)


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
            out |= {a for a in cone if not integral(a)}
    return out


def integral(node) -> bool:
    """An integer or bool value: it computes exactly in any kernel. Its float inputs
    in the cone stay in ATen, so they reach it rounded as in eager."""
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and not v.dtype.is_complex


def tensor_ok(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(tensor_ok(x) for x in v if x is not None)
    return isinstance(v, torch.Tensor) and v.dtype in TYPE_OF


class Fusible(OperatorSupportBase):
    """Ops the kernel description can express, on dtypes the kernels handle."""

    def __init__(self, exclude=frozenset(), gathers=True):
        super().__init__()
        self.exclude, self.gathers = exclude, gathers

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is operator.getitem:
            src = node.args[0]
            return isinstance(src, torch.fx.Node) and (src.target in COMPOSITES or is_kernel(src)) \
                and self.is_node_supported(None, src)
        if not (can_lower(node) or is_kernel(node)) or not tensor_ok(node.meta.get("val")) or node in self.exclude:
            return False
        if node.target in GATHERS and not self.gathers:
            return False
        if node.target in KERNEL_VIEWS and not all(self.is_node_supported(None, u) for u in node.users):
            return False        # a view read outside the kernels stays a view (a kernel would copy it)
        return all(tensor_ok(a.meta.get("val")) for a in node.all_input_nodes)


class Grouper:
    """Splits candidate partitions into legal kernels."""

    def __init__(self, gm, max_nodes, counters: Counters | None = None):
        self.gm, self.max_nodes = gm, max_nodes
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.counters = counters if counters is not None else Counters()
        self.cache: dict = {}

    @property
    def skipped(self) -> dict:
        return dict(self.counters.skipped)

    def skip(self, why, nodes=None):
        self.counters.skip(why, nodes=nodes)

    def legal(self, nodes) -> bool:
        key = frozenset(nodes)
        if key in self.cache:
            return self.cache[key]
        ok = self._legal(sorted(nodes, key=self.order.get))
        self.cache[key] = ok
        return ok

    def _legal(self, nodes) -> bool:
        if sum(1 for n in nodes if n.target is not operator.getitem) > self.max_nodes:
            self.skip("max_nodes", nodes)
            return False
        if not validate_partition(nodes):
            self.skip("cycle", nodes)
            return False
        try:
            lower(self.subgraph(nodes)[0])
        except LoweringError as e:   # "not_one_kernel", or an input class no kernel is made for ("empty_tensor")
            self.skip(e.reason, nodes)
            return False
        except Exception:  # an op with arguments the lowering did not foresee: leave it to ATen
            self.skip("lowering_error", nodes)
            return False
        return True

    def subgraph(self, nodes):
        sub, ins, outs = fuse_as_graphmodule(self.gm, nodes, "fused")
        for ph, src in zip([n for n in sub.graph.nodes if n.op == "placeholder"], ins):
            ph.meta["val"] = src.meta.get("val")
        for n, src in zip([n for n in sub.graph.nodes if n.op not in ("placeholder", "output")], nodes):
            n.meta["val"] = src.meta.get("val")
        inline_kernels(sub)
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
                if not self.legal(placed):   # not even alone (an empty tensor): it stays in ATen
                    continue
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


@register_pass("fuse", keeps_meta=True)
def fuse(gm: torch.fx.GraphModule, ctx, *, max_nodes: int = 64, horizontal: bool = True,
         exact_routing: bool = True) -> PassResult:
    """Fuse pointwise and reduction ops into single generated kernels (vertical and horizontal)."""
    before = costmodel.graph_cost(gm)
    dropped = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in NO_OPS:
            gm.graph.erase_node(n)
            dropped += 1
    gathers = str(ctx.device).startswith("cpu")     # C++ kernels only: Triton's have no error flag
    copied = copy_for_readers(gm, tables=gathers)
    exact = decision_cone(gm) if exact_routing else set()
    if exact and not str(ctx.device).startswith("cuda"):     # Triton may contract a*b+c: CPU kernels only
        rounded = {n for n in exact if rounds_as_eager(n)}
        for n in rounded:
            n.meta[ROUND_EACH_OP] = True
        exact -= rounded
    partitions = CapabilityBasedPartitioner(gm, Fusible(exact, gathers), allows_single_node_partition=True,
                                            skip_horizontal_fusion=True).propose_partitions()
    c = Counters()
    grouper = Grouper(gm, max_nodes, c)
    groups = [g for p in partitions for g in grouper.split(list(p.nodes))]
    merged = grouper.horizontal(groups) if horizontal else 0
    kept, saved, extended = [], 0, 0
    for g in groups:
        ops = [n for n in g if n.target is not operator.getitem]
        if len(ops) == 1 and (ops[0].target not in COMPOSITES or ops[0].target in ATEN_ALONE):
            grouper.skip("single_op", sorted(g, key=grouper.order.get))
            continue
        s = grouper.saves(g)
        if s <= 0 and not any(n.target in COMPOSITES for n in ops):
            grouper.skip("no_bytes_saved", sorted(g, key=grouper.order.get))
            continue
        kept.append(g)
        saved += max(0, s)
        extended += sum(1 for n in ops if is_kernel(n))
    nodes_fused = sum(1 for g in kept for n in g if n.target is not operator.getitem)
    if kept:
        order = grouper.order
        gm = fuse_by_partitions(gm, [dict.fromkeys(sorted(g, key=order.get)) for g in kept], prefix="fused_")
        to_kernels(gm, "fused_")
    gm.graph.eliminate_dead_code()
    propagate(gm)                        # the cost below reads the kernels' values
    after = costmodel.graph_cost(gm)
    if exact:
        cone = sorted((n for n in exact if can_lower(n)), key=grouper.order.get)
        c.skip("feeds_routing_decision", len(cone), nodes=cone)
    stats = {"groups": len(kept), "nodes_fused": nodes_fused, "horizontal_merges": merged,
             "kernels_extended": extended, "launches_before": before.launches, "launches_after": after.launches,
             "bytes_saved": saved, "asserts_dropped": dropped, "constants_copied": copied,
             "skipped": dict(c.skipped)}
    if c.declined:          # where it declined: the candidate node sets (`passlab explain`)
        stats["declined"] = list(c.declined)
    return PassResult(gm, changed=bool(kept) or dropped > 0, stats=stats)


def copy_for_readers(gm: torch.fx.GraphModule, tables: bool = True) -> int:
    """Values cheaper to recompute in each kernel that reads them than to share: a
    constant the graph makes (`full`, `arange`: no inputs), and a concatenation read only
    as gather tables (a kernel reads the rows it gathers from the concatenation's inputs;
    the concatenation itself is never written). With several readers each gets a copy:
    shared, the value would tie their kernels together and none could absorb it (the MoE's
    `cat([h, zeros])` and `cat([y, zeros])` share one zeros row; the top-2 combine gathers
    twice from `cat([y, zeros])`). `tables=False` (gathers stay in ATen there) copies constants
    only. Returns how many copies were made."""
    def table(n):
        return tables and n.target is aten.cat.default and all(
            u.target in GATHERS and u.args[0] is n and n not in u.args[1:] for u in n.users)
    made = 0
    for copied in (table, lambda n: not n.all_input_nodes):     # tables first: their copies read the constants
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or not can_lower(n) or len(n.users) < 2 \
                    or not tensor_ok(n.meta.get("val")) or not copied(n):
                continue
            for u in list(n.users)[1:]:
                with gm.graph.inserting_before(u):
                    c = gm.graph.node_copy(n)
                c.meta = dict(n.meta)
                u.replace_input_with(n, c)
                made += 1
    return made


def is_kernel(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and \
        getattr(node.target, "is_fused_kernel", False)


def inline_kernels(gm: torch.fx.GraphModule) -> int:
    """Replace each FusedKernel call in `gm` by the subgraph it stands for (its
    nodes keep their metadata, including the kernel's label); returns how many."""
    g, n_inlined = gm.graph, 0
    for node in [n for n in g.nodes if is_kernel(n)]:
        inner = node.target.subgraph
        val_map = dict(zip([p for p in inner.graph.nodes if p.op == "placeholder"], node.args))
        with g.inserting_before(node):
            out = g.graph_copy(inner.graph, val_map)
        if isinstance(out, (tuple, list)):
            for u in list(node.users):
                u.replace_all_uses_with(out[u.args[1]])
                g.erase_node(u)
        else:
            node.replace_all_uses_with(out)
        g.erase_node(node)
        n_inlined += 1
    return n_inlined


def to_kernels(gm: torch.fx.GraphModule, prefix: str, label: str | None = None) -> list[torch.fx.Node]:
    """fuse_by_partitions made call_module nodes; make each a FusedKernel call."""
    made = []
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(prefix)]:
        sub = getattr(gm, node.target)
        inline_kernels(sub)
        inner = [n for n in sub.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
        for ph, src in zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args):
            ph.meta["val"] = src.meta.get("val")
        propagate(sub)
        main = next((n for n in inner if n.target in COMPOSITES), inner[0])
        name = label or next((n.meta["kernel_label"] for n in inner if "kernel_label" in n.meta), None) \
            or getattr(main.target, "__name__", str(main.target)).split(".")[0].lstrip("_")
        for n in inner:
            n.meta.setdefault("kernel_label", name)
        delattr(gm, node.target)
        kname = f"{node.name}_{name}"
        if label:         # fuse_nodes: <label>_<n>, n counting this label's kernels in the graph
            taken = {n.target.name for n in gm.graph.nodes if is_kernel(n)}
            kname = next(f"{label}_{i}" for i in range(len(taken) + 1) if f"{label}_{i}" not in taken)
            node._rename(kname)
        node.op, node.target = "call_function", FusedKernel(kname, sub)
        node.meta["fused_from"] = [n.name for n in inner]
        made.append(node)
    return made


def sort_in_place(graph: torch.fx.Graph) -> None:
    """Stable topological order (Kahn's, by original position), moving nodes rather
    than copying them, so references to the graph's nodes stay valid."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    indeg = {n: len(n.all_input_nodes) for n in graph.nodes}
    ready = [(i, n) for n, i in index.items() if indeg[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for u in n.users:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, (index[u], u))
    if len(order) != len(index):
        raise FusionError("cycle")
    if order == list(index):
        return
    prev = order[0]
    for n in order[1:]:
        prev.append(n)
        prev = n


class FusionError(Skip):
    """`fuse_nodes` cannot make one kernel of these nodes; the message is the reason."""


def fuse_nodes(gm: torch.fx.GraphModule, nodes, *, label: str = "kernel", max_nodes: int = 64) -> torch.fx.Node:
    """Make ONE generated kernel of `nodes` (call_function nodes of `gm`), in place.

    Checks that the group lowers to one kernel description and stays cycle-free
    (raises `FusionError(reason)`: `not_fusible_op`, `max_nodes`, `cycle`,
    `not_one_kernel`, `lowering_error`), drops the asserts hanging on the nodes,
    and names the kernel `<label>_<n>` (`passlab show --kernels` lists it). A
    later `fuse` treats the kernel as one unit it can still extend with the
    pointwise ops around it. Returns the kernel's node; its `meta["val"]` is
    set (call `propagate(gm)` once after all rewrites for the rest)."""
    nodes = list(dict.fromkeys(nodes))
    if not label.isidentifier():
        raise ValueError(f"kernel label {label!r} must be an identifier, e.g. 'rmsnorm'")
    support = Fusible()
    if not nodes or any(n.graph is not gm.graph or not support.is_node_supported(None, n) for n in nodes):
        raise FusionError("not_fusible_op")
    grouper = Grouper(gm, max_nodes)
    members = set(nodes)
    for n in nodes:          # asserts on the nodes would become kernel outputs
        for u in [u for u in n.users if side_effect_only(u)]:
            gm.graph.erase_node(u)
    if not grouper.legal(members):
        raise FusionError(next(iter(grouper.counters.skipped)))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ordered = sorted(members, key=order.get)
    prefix = next(p for i in range(len(order) + 1) if not hasattr(gm, (p := f"_fuse_nodes{i}_") + "0"))
    sub, ins, outs = fuse_as_graphmodule(gm, ordered, prefix + "0")
    insert_subgm(gm, sub, ins, outs, ordered[-1])
    erase_nodes(gm, ordered)
    sort_in_place(gm.graph)        # the graph and every other node stay the same objects
    (node,) = to_kernels(gm, prefix, label)
    sub = node.target.subgraph
    out = sub.graph.output_node().args[0]
    node.meta["val"] = tuple(o.meta["val"] for o in out) if isinstance(out, (tuple, list)) else out.meta["val"]
    return node
