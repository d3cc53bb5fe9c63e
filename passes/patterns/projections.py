"""`merge_projections`: horizontal GEMM fusion of siblings that read one input.

    q, k, v = x @ Wq.T, x @ Wk.T, x @ Wv.T      ->   qkv = x @ cat([Wq, Wk, Wv]).T
                                                     q, k, v = qkv[:, :dq], qkv[:, dq:dq+dk], ...

One larger GEMM instead of several small ones reads `x` once and keeps the
matrix units busier. Shapes the pass knows: Linear after capture (`mm` /
`addmm` on `permute(W, [1, 0])`, Q/K/V and SwiGLU gate/up), Conv1D-style
`addmm(b, x, W)`, and batched expert weights (`bmm(x, W[E, D, F])`: the MoE
gate/up pair becomes one grouped GEMM over all experts). Weights are
concatenated once at compile time into new buffers (parameters are never
mutated); the outputs are column slices (views, no copy). A slice is not
contiguous, so the pass first replays every view that reads a member's output
on a meta tensor with the slice's strides and leaves the group alone if one
of them would need a copy.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx
from torch.fx.node import map_arg

from passlab.passes import PassResult, register_pass
from passlab.runtime import autotune
from passlab.runtime.opclass import OpClass, op_class

from ..vocabulary import RESHAPES, Counters, aten, constant_of, erase_dead, gemm_operands, new_constant, users


class Member:
    """One GEMM of a group: `out = x @ W (+ b)`, W stored as `layout` says."""

    def __init__(self, node, x, w_node, w, bias_node, bias, layout):
        self.node, self.x, self.w_node, self.w = node, x, w_node, w
        self.bias_node, self.bias, self.layout = bias_node, bias, layout

    @property
    def width(self) -> int:   # output columns
        return self.w.shape[0] if self.layout == "t" else self.w.shape[-1]


def input_key(x):
    """Siblings often read the same tensor through separate identical views."""
    if isinstance(x, torch.fx.Node) and x.target in RESHAPES:
        return x.args[0], tuple(x.meta["val"].shape)
    return x, tuple(x.meta["val"].shape) if isinstance(x, torch.fx.Node) else None


def as_member(gm, n):
    """(key, Member) for a GEMM with a constant weight, (key, reason) otherwise, or None."""
    ops = gemm_operands(n)
    if ops is None:
        return None
    x, w, b = ops
    if n.target == aten.bmm.default:
        wt = constant_of(gm, w)
        key = (input_key(x), "bmm")
        return (key, Member(n, x, w, wt, None, None, "bmm")) if wt is not None else (key, "weight_not_constant")
    key = (input_key(x), "mm")
    if isinstance(w, torch.fx.Node) and w.target == aten.permute.default and list(w.args[1]) == [1, 0]:
        wt, layout = constant_of(gm, w.args[0]), "t"
    else:
        wt, layout = constant_of(gm, w), "n"
    bt = None if b is None else constant_of(gm, b)
    if wt is None or (b is not None and (bt is None or bt.dim() != 1)):
        return key, "weight_not_constant"
    return key, Member(n, x, w, wt, b, bt, layout)


def views_survive(member: Member, strides: tuple) -> bool:
    """Replay the views that read `member`'s output on a meta tensor with the slice's strides."""
    val = member.node.meta["val"]
    env = {member.node: torch.empty_strided(val.shape, strides, dtype=val.dtype, device="meta")}
    todo = list(users(member.node))
    while todo:
        u = todo.pop(0)
        if op_class(u) not in (OpClass.VIEW, OpClass.BROADCAST) or u in env:
            continue
        if any(a not in env for a in u.all_input_nodes):
            continue
        try:
            env[u] = u.target(*map_arg(u.args, env.__getitem__), **map_arg(u.kwargs, env.__getitem__))
        except (RuntimeError, ValueError):
            return False
        todo.extend(users(u))
    return True


def merge(gm, group: list[Member]) -> None:
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    group.sort(key=lambda m: order[m.node])
    first, kind = group[0], group[0].layout
    dim = {"t": 0, "n": 1, "bmm": 2}[kind]
    stem = "_".join(str(m.w_node.args[0].target if kind == "t" else m.w_node.target) for m in group[:1])
    w_cat = torch.cat([m.w for m in group], dim)
    has_bias = any(m.bias is not None for m in group)
    with g.inserting_before(first.node):
        w = g.get_attr(new_constant(gm, f"{stem}_merged{len(group)}", w_cat))
        if kind == "t":
            w = g.call_function(aten.permute.default, (w, [1, 0]))
        if has_bias:
            b_cat = torch.cat([m.bias if m.bias is not None else m.w.new_zeros(m.width) for m in group])
            b = g.get_attr(new_constant(gm, f"{stem}_merged{len(group)}_bias", b_cat))
            out = g.call_function(aten.addmm.default, (b, first.x, w))
        else:
            out = g.call_function(aten.bmm.default if kind == "bmm" else aten.mm.default, (first.x, w))
        out.meta["fused_from"] = [m.node.name for m in group]
        start = 0
        for m in group:
            part = g.call_function(aten.slice.Tensor, (out, 2 if kind == "bmm" else 1, start, start + m.width))
            start += m.width
            m.node.replace_all_uses_with(part)
    old = [m.node for m in group] + [a for m in group for a in (m.w_node, m.bias_node, m.x) if a is not None]
    old += [m.w_node.args[0] for m in group if kind == "t"]
    erase_dead(g, old)


def slice_strides(group: list[Member], m: Member) -> tuple:
    total = sum(x.width for x in group)
    shape = m.node.meta["val"].shape
    if m.layout == "bmm":
        return (shape[1] * total, total, 1)
    return (total, 1)


def separate_is_faster(group: list[Member], device: str) -> bool:
    """Time the merged GEMM, with its consumers reading strided slices
    (modelled as one pass over each slice), against the separate GEMMs, at
    this group's shapes (once per shape, cached). On a CPU without AMX a wide
    GEMM gains nothing and the strided reads cost (moe bench: -5%)."""
    x = group[0].x.meta["val"]
    kind = group[0].layout
    flops = sum(2 * x.numel() * m.width for m in group)
    if flops < autotune.MIN_FLOPS:
        return False
    X = torch.randn(x.shape, dtype=x.dtype, device=device)
    ws = [m.w.to(device) for m in group]
    dim = {"t": 0, "n": 1, "bmm": 2}[kind]
    wc = torch.cat(ws, dim)
    mul = (lambda a, w: torch.bmm(a, w)) if kind == "bmm" else \
        (lambda a, w: a @ (w.t() if kind == "t" else w))
    widths = [m.width for m in group]

    def merged():
        out = mul(X, wc)
        return [part.sum() for part in out.split(widths, dim=-1)]

    def separate():
        return [mul(X, w).sum() for w in ws]

    key = ("merge_projections", kind, tuple(x.shape), tuple(widths), x.dtype, device)
    with torch.no_grad():
        return autotune.fastest(key, {"merged": merged, "separate": separate}, device=device) == "separate"


@register_pass("merge_projections")
def merge_projections(gm: torch.fx.GraphModule, ctx, *, min_group: int = 2, choose: str = "measure") -> PassResult:
    """Merge sibling GEMMs that share an input (Q/K/V, gate/up, expert gate/up) into one.

    `choose=measure` (default) keeps the GEMMs apart where that measured faster
    at the group's shapes on this machine; `choose=always` merges every group."""
    if choose not in ("measure", "always"):
        raise ValueError(f"choose must be 'measure' or 'always', got {choose!r}")
    c, merged = Counters(), 0
    groups: dict = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            found = as_member(gm, n)
            if found is not None:
                groups[found[0]].append(found[1])
    for key, members in groups.items():
        if len(members) < min_group:
            continue
        c.matched += 1
        for reason in [m for m in members if isinstance(m, str)]:
            c.skip(reason)
        members = [m for m in members if not isinstance(m, str)]
        by_kind = defaultdict(list)
        for m in members:
            by_kind[(m.layout, m.w.dtype, m.w.shape[1:] if m.layout == "t" else m.w.shape[:-1])].append(m)
        for group in by_kind.values():
            if len(group) < min_group:
                c.skip("no_compatible_sibling")
                continue
            if not all(views_survive(m, slice_strides(group, m)) for m in group):
                c.skip("view_needs_contiguous_output")
                continue
            if choose == "measure" and separate_is_faster(group, ctx.device):
                c.skip("separate_measured_faster")
                continue
            merge(gm, group)
            c.rewritten += 1
            merged += len(group)
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(gemms_merged=merged))
