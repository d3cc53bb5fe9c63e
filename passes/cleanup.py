"""Cleanup passes: dead code, common subexpressions, no-ops, constant folding.

They run first (the `cleanup` alias) so that the fusion and layout passes see
each value computed once, no copies that copy nothing, and weights already in
the form the kernels read. Captured graphs are functional, which is what makes
these rewrites sound; nodes with side effects (runtime asserts, mutations,
random ops) are never removed, merged or folded.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass

from passlab.graphs import fetch_attr
from passlab.runtime.costmodel import nbytes
from passlab.runtime.opclass import op_name

from .api import PassResult
from .vocabulary import Counters, Skip, new_constant
from .registry import register_pass

aten = torch.ops.aten


def side_effecting(node: torch.fx.Node) -> bool:
    """What DCE, CSE and folding must leave alone: fx's own impurity test
    (placeholders, outputs, asserts, mutations, random ops) plus any op whose
    schema returns nothing, which can only exist for its effect."""
    if node.is_impure():
        return True
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and (len(schema.returns) == 0 or schema.is_mutable)


def call_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method"))


# ---------------------------------------------------------------- dce

@register_pass("dce", keeps_meta=True)
def dce(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """Dead-code elimination: drop nodes nobody reads; keep asserts and other side effects."""
    before = Counter(op_name(n) for n in gm.graph.nodes if n.op != "output")
    kept = sum(1 for n in gm.graph.nodes if n.op == "call_function" and not n.users and side_effecting(n))
    changed = gm.graph.eliminate_dead_code(is_impure_node=side_effecting)
    after = Counter(op_name(n) for n in gm.graph.nodes if n.op != "output")
    removed = before - after
    return PassResult(gm, changed, {"removed": sum(removed.values()), "removed_by_op": dict(removed),
                                    "kept_side_effects": kept})


# ---------------------------------------------------------------- cse

def cse_banned(gm: torch.fx.GraphModule) -> set:
    """CSEPass bans by target: every target that has a side-effecting node."""
    return {getattr(n.target, "overloadpacket", n.target) for n in gm.graph.nodes
            if n.op == "call_function" and side_effecting(n)}


@register_pass("cse", keeps_meta=True)
def cse(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """Common-subexpression elimination: one node per (op, inputs, arguments)."""
    if any(getattr(getattr(n.target, "_schema", None), "is_mutable", False) for n in gm.graph.nodes):
        return PassResult(gm, False, {"merged": 0, "skipped": {"graph_mutates_in_place": 1}})
    n_before = call_count(gm)
    try:
        res = CSEPass(banned_ops=cse_banned(gm))(gm)
    except TypeError as e:  # an argument that cannot be hashed: nothing merged, say why
        return PassResult(gm, False, {"merged": 0, "skipped": {"unhashable_argument": 1}, "error": str(e)})
    if not res.modified:
        return PassResult(gm, False, {"merged": 0})
    new = res.graph_module
    new.graph._codegen = gm.graph._codegen
    new.meta.update(gm.meta)
    return PassResult(new, True, {"merged": n_before - call_count(new)})


# ---------------------------------------------------------------- remove_noops

# ops whose result equals their first input whenever shape, dtype, strides and
# storage offset come out unchanged (a view of the same elements, or a copy of them)
SAME_VALUE_OPS = {
    aten.view, aten._unsafe_view, aten.reshape, aten.alias, aten.clone, aten.contiguous, aten._to_copy,
    aten.expand, aten.permute, aten.transpose, aten.t, aten.slice, aten.squeeze, aten.flatten,
    aten.detach, aten.lift_fresh_copy, aten.as_strided, aten.repeat, aten.type_as,
}
for _name in ("_to_dim_order_copy", "to", "_unsafe_view"):
    if hasattr(aten, _name):
        SAME_VALUE_OPS.add(getattr(aten, _name))

# arithmetic identities: op -> (identity scalar, which argument may hold it)
IDENTITY_ARITH = {
    aten.mul.Tensor: (1, (0, 1)), aten.mul.Scalar: (1, (1,)),
    aten.div.Tensor: (1, (1,)), aten.div.Scalar: (1, (1,)),
    aten.add.Tensor: (0, (0, 1)), aten.add.Scalar: (0, (1,)),
    aten.sub.Tensor: (0, (1,)), aten.sub.Scalar: (0, (1,)),
    aten.pow.Tensor_Scalar: (1, (1,)),
}


def same_tensor_layout(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.layout == b.layout
            and (a.layout != torch.strided or (a.stride() == b.stride() and a.storage_offset() == b.storage_offset())))


def noop_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input `node` merely passes through, or None."""
    if node.op != "call_function" or side_effecting(node):
        return None
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    if packet in SAME_VALUE_OPS:
        src = node.args[0] if node.args else None
    elif t in IDENTITY_ARITH:
        ident, slots = IDENTITY_ARITH[t]
        if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
            return None
        src = None
        for i in slots:
            other = node.args[1 - i]
            if not isinstance(node.args[i], torch.fx.Node) and isinstance(other, torch.fx.Node) \
                    and type(node.args[i]) in (int, float) and node.args[i] == ident:
                src = other
    else:
        return None
    if not isinstance(src, torch.fx.Node):
        return None
    return src if same_tensor_layout(node.meta.get("val"), src.meta.get("val")) else None


@register_pass("remove_noops", keeps_meta=True)
def remove_noops(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """Remove views, copies, casts and arithmetic identities that change nothing (same shape, dtype, strides)."""
    removed, c = Counter(), Counters()
    outputs = set(gm.graph.output_node().all_input_nodes)
    for node in list(gm.graph.nodes):
        src = noop_source(node)
        if src is None:
            continue
        if node in outputs and (src.op in ("placeholder", "get_attr") or src in outputs):
            c.skip("output_would_alias_input")
            continue
        if any(getattr(getattr(u.target, "_schema", None), "is_mutable", False) for u in node.users):
            c.skip("user_mutates_it")
            continue
        if node in outputs:
            outputs.add(src)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        removed[op_name(node)] += 1
    stats = {"removed": sum(removed.values()), "removed_by_op": dict(removed)}
    if c.skipped:
        stats["skipped"] = dict(c.skipped)
    return PassResult(gm, bool(removed), stats)


# ---------------------------------------------------------------- fold_constants

def is_tensorish(value) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value))


def fits(value, cap: float) -> bool:
    """A folded value may take `cap` bytes; a single element always fits (it is a literal)."""
    if value is None:
        return True
    return nbytes(value) <= cap or (isinstance(value, torch.Tensor) and value.numel() <= 1)


def foldable_target(node: torch.fx.Node) -> str | None:
    """None if the node's op may be evaluated at compile time, else why not."""
    t = node.target
    if t is operator.getitem:
        return None
    if not isinstance(t, torch._ops.OpOverload):
        return "not_an_aten_op"
    if side_effecting(node):
        return "side_effect"
    if torch.Tag.nondeterministic_seeded in t.tags:
        return "random"
    return None


def weights_written(graph: torch.fx.Graph) -> set:
    """The get_attr targets an in-place op of the graph writes (a buffer it updates): never folded."""
    return {n.target for n in graph.nodes if n.op == "get_attr"
            and any(getattr(getattr(u.target, "_schema", None), "is_mutable", False) for u in n.users)}


def evaluate(node: torch.fx.Node, values: dict, cap: float):
    """The real value of `node` from its constant inputs, or raise Skip(reason)."""
    why = foldable_target(node)
    if why:
        raise Skip(why)
    if not fits(node.meta.get("val"), cap):      # decided on the fake value: nothing big is ever allocated
        raise Skip("would_grow_memory")
    env = lambda a: values[a] if isinstance(a, torch.fx.Node) else a
    try:
        v = node.target(*torch.fx.node.map_aggregate(node.args, env), **torch.fx.node.map_aggregate(node.kwargs, env))
    except Exception:
        raise Skip("could_not_evaluate") from None
    if isinstance(v, (tuple, list)) and is_tensorish(v) and any(u.target is not operator.getitem for u in node.users):
        raise Skip("multi_output_used_whole")
    if is_tensorish(v) and not fits(v, cap):
        raise Skip("would_grow_memory")
    return v


def constant_values(gm: torch.fx.GraphModule, max_growth: float, c: Counters) -> dict:
    """node -> real value, for every node computed from weights alone (within the memory cap)."""
    values: dict[torch.fx.Node, object] = {}
    leaves: dict[torch.fx.Node, frozenset] = {}    # constant node -> the weights it is computed from
    written = weights_written(gm.graph)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            v = fetch_attr(gm, node.target)
            if node.target in written:
                c.skip("weight_mutated_in_graph")
            elif isinstance(v, torch.Tensor):
                values[node], leaves[node] = v, frozenset([node.target])
            continue
        inputs = node.all_input_nodes
        if node.op != "call_function" or any(i not in values for i in inputs) or \
                (not inputs and not isinstance(node.target, torch._ops.OpOverload)):
            continue
        src = frozenset().union(*(leaves[i] for i in inputs)) if inputs else frozenset()
        try:
            v = evaluate(node, values, max_growth * sum(nbytes(fetch_attr(gm, t)) for t in src))
        except Skip as e:
            c.skip(str(e))
            continue
        if is_tensorish(v):
            values[node], leaves[node] = v, src
    return values


def store_folded(gm: torch.fx.GraphModule, values: dict, c: Counters) -> tuple[int, int, int]:
    """Each constant value a non-constant node reads becomes a buffer (a get_attr in place of
    its node); returns (buffers made, their bytes, the bytes not shared with a weight)."""
    graph = gm.graph
    shared = {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    consts, bytes_folded, bytes_new = 0, 0, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(values.get(node), torch.Tensor):
            continue
        if not node.users or all(u in values for u in node.users):
            continue          # interior of a folded subgraph: its users fold it in
        if graph.output_node() in node.users:
            c.skip("output_would_alias_weight")
            continue
        v = values[node]
        with graph.inserting_before(node):
            attr = graph.get_attr(new_constant(gm, f"folded_{node.name}", v, memory_format=None))
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        consts += 1
        bytes_folded += nbytes(v)
        if v.untyped_storage().data_ptr() not in shared:
            bytes_new += nbytes(v)
    return consts, bytes_folded, bytes_new


@register_pass("fold_constants", keeps_meta=True)
def fold_constants(gm: torch.fx.GraphModule, ctx, *, max_growth: float = 1.0) -> PassResult:
    """Compute parameter-only subgraphs once (weight transposes, casts, masks) and store them as buffers.

    A folded value may take at most `max_growth` times the bytes of the weights
    it is computed from (values of at most one element are always allowed), so
    folding never multiplies memory, e.g. an `expand` to a bigger tensor stays
    in the graph.
    """
    c = Counters()
    values = constant_values(gm, max_growth, c)
    consts, bytes_folded, bytes_new = store_folded(gm, values, c)
    folded = 0
    if consts:
        n_before = call_count(gm)
        gm.graph.eliminate_dead_code(is_impure_node=side_effecting)
        folded = n_before - call_count(gm)
    stats = {"folded": folded, "constants": consts, "bytes_folded": bytes_folded, "bytes_new": bytes_new}
    if c.skipped:
        stats["skipped"] = dict(c.skipped)
    return PassResult(gm, bool(consts), stats)
