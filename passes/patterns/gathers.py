"""`gather_rows`: a row gather written as advanced indexing -> `index_select`.

    x[idx]     (aten.index.Tensor(x, [idx]), idx a 1-D integer tensor)
        -> index_select(x, 0, idx)                         idx from sort / topk / arange: never negative
        -> index_select(x, 0, where(idx < 0, idx + n, idx))  otherwise (x[-1] is the last row)

ATen runs `index.Tensor` through its generic element-wise indexing kernel,
which computes an offset per element; `index_select` copies whole rows
(measured on Zen 4: [2561, 512] bf16, 2560 rows, 358 -> 35 us). MoE dispatch
and combine are row gathers (`hidden[perm]`, `ys[inv_perm]`, the `moe`
sample's `hpad[src]`). The values are the same: both copy rows; a negative
index counts from the end in both (wrapped explicitly for `index_select`,
which refuses negatives), and an index out of range raises in both.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from passlab.passes import PassResult, register_pass

from ..vocabulary import Counters, Skip, aten

INDEX = aten.index.Tensor
NONNEG_PRODUCERS = {aten.sort.default, aten.sort.stable, aten.topk.default, aten.max.dim, aten.min.dim}
NONNEG_VIEWS = {aten.view.default, aten.reshape.default, aten.slice.Tensor, aten._unsafe_view.default,
                aten.squeeze.dims, aten.unsqueeze.default, aten.clone.default}


def never_negative(n) -> bool:
    """The indices of a sort / topk / max, or an arange from >= 0, through views."""
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in NONNEG_VIEWS:
        n = n.args[0]
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return False
    if n.target is operator.getitem:
        src = n.args[0]
        return n.args[1] == 1 and isinstance(src, torch.fx.Node) and src.target in NONNEG_PRODUCERS
    if n.target == aten.arange.default:
        return True
    if n.target == aten.arange.start_step:
        start, step = n.args[0], n.args[2] if len(n.args) > 2 else n.kwargs.get("step", 1)
        return isinstance(start, int) and start >= 0 and isinstance(step, int) and step > 0
    return False


def match(n: torch.fx.Node):
    x, indices = n.args[:2]
    if len(indices) != 1 or not isinstance(indices[0], torch.fx.Node):
        raise Skip("not_one_index")
    idx = indices[0]
    iv, xv = idx.meta["val"], x.meta["val"]
    if iv.dtype not in (torch.int64, torch.int32) or iv.dim() != 1:
        raise Skip("index_not_1d_integer")
    if xv.dim() < 1 or xv.shape[0] == 0:
        raise Skip("no_rows")
    return x, idx, xv.shape[0]


@register_pass("gather_rows")
def gather_rows(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """x[idx] with a 1-D integer idx (a row gather) -> index_select(x, 0, idx): whole rows copied."""
    c, g = Counters(), gm.graph
    wrapped = 0
    for n, (x, idx, rows) in c.matches(g, INDEX, match):
        with g.inserting_before(n):
            if not never_negative(idx):
                neg = g.call_function(aten.lt.Scalar, (idx, 0))
                idx = g.call_function(aten.where.self, (neg, g.call_function(aten.add.Tensor, (idx, rows)), idx))
                wrapped += 1
            out = g.call_function(aten.index_select.default, (x, 0, idx))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        c.rewritten += 1
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(wrapped=wrapped))
