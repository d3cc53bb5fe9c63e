"""`group_experts`: per-token gathered expert GEMMs -> one grouped GEMM.

Hugging Face's `batched_mm` experts (and any MoE written the same way) compute
each (token, expert) pair's projection by gathering that expert's whole weight
matrix and running a batch of matrix-vector products:

    w = W[expert_ids]                          # [S, O, I]: one weight copy per pair
    y = bmm(w, x.unsqueeze(-1)).squeeze(-1)    # [S, O]
    # or, weights stored transposed: bmm(x.unsqueeze(1), W[expert_ids]) -> [S, 1, O]

On a CPU that is S matrix-vector products over S gathered copies of the
weights (for Mixtral-style sizes, hundreds of MB per layer). The rewrite sorts
the pairs by expert once, runs the experts as one grouped GEMM over contiguous
row blocks (`aten._grouped_mm` in bf16, `passlab::grouped_mm` in other dtypes,
runtime/ops.py; offsets from `searchsorted`), and puts the rows
back in their order:

    ids_s, perm = sort(expert_ids, stable=True)
    offs = searchsorted(ids_s, arange(E), right=True)        # row block ends, int32
    y = _grouped_mm(x[perm], W.transpose(1, 2), offs)[argsort(perm)]

Every shape stays static, so the graph stays capturable and every pass after
this one sees ordinary aten ops. Each output row is the same dot products as
before (one GEMM row instead of one GEMV), so only the accumulation order can
differ. Two gathered GEMMs over the same ids (up, then down projection) share
one sort. The rewrite is legal when the gathered tensor is a weight (get_attr,
3-D), read only by the bmm, the ids are a 1-D integer tensor with one id per
row, and the dtypes match.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from passlab.passes import PassResult, register_pass
from passlab.runtime import ops

from ..vocabulary import Counters, Skip, aten, erase_dead, shape, users

INDEX = aten.index.Tensor


def match(n: torch.fx.Node):
    """(gathered index node, weight node, ids node, x operand [S, I, 1] or [S, 1, I], transposed)."""
    a, b = n.args[:2]
    for gathered, x, transposed in ((a, b, False), (b, a, True)):
        if isinstance(gathered, torch.fx.Node) and gathered.op == "call_function" and gathered.target == INDEX:
            break
    else:
        raise Skip("not_gathered")
    w, idx = gathered.args
    if len(idx) != 1 or not isinstance(idx[0], torch.fx.Node):
        raise Skip("index_not_one_tensor")
    ids = idx[0]
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and len(shape(w)) == 3):
        raise Skip("gathered_not_a_weight")
    iv = ids.meta["val"]
    if iv.dim() != 1 or iv.dtype.is_floating_point or iv.dtype == torch.bool:
        raise Skip("ids_not_1d_integer")
    if users(gathered) != [n]:
        raise Skip("gathered_weights_reused")
    S, (E, P, Q) = iv.shape[0], shape(w)
    xs = shape(x)
    want = (S, 1, P) if transposed else (S, Q, 1)      # x @ W[ids] with W [E, I, O]; W[ids] @ x with W [E, O, I]
    if xs != want:
        raise Skip("not_one_row_per_id")
    xv, wv = x.meta["val"], w.meta["val"]
    if xv.dtype != wv.dtype or not xv.dtype.is_floating_point:
        raise Skip("dtype")
    return gathered, w, ids, x, transposed


def grouped_mm_op(w):
    """aten's grouped GEMM where its fake kernel takes the dtype (bf16), passlab's wrapper elsewhere."""
    return aten._grouped_mm.default if ops.aten_grouped_mm_runs(w.dtype, w.device.type) \
        and w.dtype == torch.bfloat16 else torch.ops.passlab.grouped_mm.default


def sorted_rows(g: torch.fx.Graph, ids: torch.fx.Node, experts: int):
    """perm (pairs sorted by expert), offsets (int32 block ends), inverse perm."""
    srt = g.call_function(aten.sort.stable, (ids,), {"stable": True, "dim": 0})
    ids_s = g.call_function(operator.getitem, (srt, 0))
    perm = g.call_function(operator.getitem, (srt, 1))
    iv = ids.meta["val"]
    ar = g.call_function(aten.arange.default, (experts,), {"dtype": iv.dtype, "device": iv.device})
    offs = g.call_function(aten.searchsorted.Tensor, (ids_s, ar), {"out_int32": True, "right": True})
    inv_sort = g.call_function(aten.sort.stable, (perm,), {"stable": True, "dim": 0})
    inv = g.call_function(operator.getitem, (inv_sort, 1))
    return perm, offs, inv


def rewrite(g: torch.fx.Graph, bmm: torch.fx.Node, w, ids, x, transposed: bool, memo: dict) -> None:
    E = shape(w)[0]
    with g.inserting_before(bmm):
        if ids not in memo:
            memo[ids] = sorted_rows(g, ids, E)
        perm, offs, inv = memo[ids]
        rows = g.call_function(aten.squeeze.dims, (x, [1 if transposed else -1]))      # [S, I]
        rows_s = g.call_function(INDEX, (rows, [perm]))
        wt = w if transposed else g.call_function(aten.permute.default, (w, [0, 2, 1]))  # [E, I, O]
        ys = g.call_function(grouped_mm_op(w.meta["val"]), (rows_s, wt, offs))
        y = g.call_function(INDEX, (ys, [inv]))
        out = g.call_function(aten.unsqueeze.default, (y, 1 if transposed else -1))
    bmm.replace_all_uses_with(out)


@register_pass("group_experts")
def group_experts(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """Gathered per-token expert GEMMs (W[ids] bmm x) -> sort by expert + one grouped GEMM."""
    c, memo, done = Counters(), {}, []
    g = gm.graph
    for n in [n for n in g.nodes if n.op == "call_function" and n.target == aten.bmm.default]:
        found = c.attempt(match, n, not_candidates=("not_gathered",))
        if found is None:
            continue
        gathered, w, ids, x, transposed = found
        rewrite(g, n, w, ids, x, transposed, memo)
        done += [n, gathered]
        c.rewritten += 1
    if c.rewritten:
        erase_dead(g, done)
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(sorts=len(memo)))
