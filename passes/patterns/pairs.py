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
"""
from __future__ import annotations

import torch
import torch.fx

from passlab.passes import PassResult, register_pass

from ..vocabulary import Counters, Skip, aten, shape

SUM = aten.sum.dim_IntList


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
    for n, (x, d, keep) in c.matches(g, SUM, match, not_candidates=("not_a_pair",)):
        with g.inserting_before(n):
            a = g.call_function(aten.select.int, (x, d, 0))
            b = g.call_function(aten.select.int, (x, d, 1))
            out = g.call_function(aten.add.Tensor, (a, b))
            if keep:
                out = g.call_function(aten.unsqueeze.default, (out, d))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        c.rewritten += 1
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict())
