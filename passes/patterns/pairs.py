"""`sum_pairs`: a sum over a dim of size 2 -> the add of its two halves.

    x.sum(d)            (x.shape[d] == 2)   ->   x.select(d, 0) + x.select(d, 1)

A top-2 mixture of experts combines each token's two expert outputs this way
(`y.view(tokens, 2, dim).sum(1)`, Hugging Face's experts and the `moe`
sample). ATen's reduction over a middle dim of two elements walks the tensor
with reduction machinery (about 0.5 ms for [1024, 2, 512] bf16 on Zen 4);
`add` is one elementwise pass. The values are the same bits: both add two
elements in the accumulation type (fp32 for bf16/fp16) and round once, and
0 + a is a. So the rewrite is legal inside an MoE routing cone too, where
`fuse` keeps float ops in ATen. Only a single-dim sum without `dtype=` whose
summed dim has size 2, on a float tensor.

Where the pairs are rows of a computation that gathers (the top-2 combine:
`(ys[slot] * w).view(tokens, 2, dim).sum(1)`), each half is built from its own
rows instead: pointwise ops are rebuilt on the even and the odd rows of their
inputs, and a gather takes every other index. The halves then fuse with the
add (and a residual) into one kernel that gathers each token's two rows; the
values are the same, element for element (`halves`).
"""
from __future__ import annotations

import torch
import torch.fx

from passlab.passes import PassResult, register_pass

from passlab.runtime.opclass import OpClass, op_class

from ..vocabulary import Counters, Skip, aten, shape, users

SUM = aten.sum.dim_IntList
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def match(n: torch.fx.Node):
    x, dims = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if n.kwargs.get("dtype") is not None or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        raise Skip("not_one_dim")
    xs = shape(x)
    d = dims[0] % len(xs) if xs else 0
    if not xs or xs[d] != 2:
        raise Skip("not_a_pair")
    if not x.meta["val"].dtype.is_floating_point:      # an integer sum promotes to int64, add does not
        raise Skip("not_float")
    return x, d, keep


@register_pass("sum_pairs")
def sum_pairs(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """A sum over a dim of size 2 (top-2 MoE combine) -> add of the two halves (same bits)."""
    c, g = Counters(), gm.graph
    gathered = 0
    for n, (x, d, keep) in c.matches(g, SUM, match, not_candidates=("not_a_pair",)):
        with g.inserting_before(n):
            pair = halves(g, x, d)
            gathered += pair is not None
            a, b = pair or [g.call_function(aten.select.int, (x, d, k)) for k in (0, 1)]
            out = g.call_function(aten.add.Tensor, (a, b))
            if keep:
                out = g.call_function(aten.unsqueeze.default, (out, d))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        c.rewritten += 1
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(gathered=gathered))


def halves(g: torch.fx.Graph, x: torch.fx.Node, d: int):
    """`x` = view(e, [n, 2, ...]) (d == 1) of e = [2n, ...] computed by pointwise ops from a
    row gather: the two halves (rows 0, 2, 4... and 1, 3, 5... of e) each built from its
    own rows; None where `x` is not such a view or no gather is reached."""
    if d != 1 or x.op != "call_function" or x.target not in VIEWS or len(users(x)) != 1:
        return None
    e, xs = x.args[0], shape(x)
    es = shape(e) if isinstance(e, torch.fx.Node) else ()
    if len(xs) != len(es) + 1 or es[0] != 2 * xs[0] or es[1:] != xs[2:]:
        return None
    made, reached = [], []
    try:
        pair = [rows(g, e, k, xs[0], made, reached) for k in (0, 1)]
    except Skip:
        reached = []
    if not reached:        # nothing gathers (or a row view would copy): plain selects of x serve
        for m in reversed(made):
            g.erase_node(m)
        return None
    return pair


def rows(g, e, k, n, made, reached):
    """Rows k, k + 2, ... of `e` ([2n, ...]) as an [n, ...] value; new nodes go to `made`."""
    def call(target, *args, **kwargs):
        made.append(g.call_function(target, args, kwargs))
        return made[-1]
    es = shape(e)
    if e.op == "call_function" and len(users(e)) == 1:
        if e.target == aten.index_select.default and e.args[1] == 0:
            reached.append(e)
            return call(aten.index_select.default, e.args[0], 0,
                        call(aten.select.int, call(aten.view.default, e.args[2], [n, 2]), 1, k))
        if op_class(e) is OpClass.POINTWISE and not any(isinstance(v, torch.fx.Node) for v in e.kwargs.values()):
            args = [rows(g, a, k, n, made, reached) if isinstance(a, torch.fx.Node) and len(shape(a)) == len(es)
                    and shape(a)[0] == 2 * n else a for a in e.args]
            return call(e.target, *args, **e.kwargs)
    try:
        e.meta["val"].view(n, 2, *es[1:])
    except RuntimeError:
        raise Skip("rows_not_viewable") from None
    return call(aten.select.int, call(aten.view.default, e, [n, 2, *es[1:]]), 1, k)
