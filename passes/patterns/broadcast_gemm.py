"""`unbroadcast_gemm`: a batched GEMM by one matrix broadcast over the batch -> one GEMM.

    bmm(x [B, M, K], expand(W [K, N] | [1, K, N], [B, K, N]))
        -> view(mm(view(x, [B*M, K]), W [K, N]), [B, M, N])

`torch.matmul` of a 3-D activation that is not contiguous (Hugging Face's LM
head on the last position, `hidden[:, -1:, :] @ W.T`) is captured as a `bmm`
whose right operand is the weight expanded over the batch (stride 0). ATen's
CPU `bmm` copies that operand out to [B, K, N] on every call (the Llama
prefill's LM head: an 8 MB transposed copy per call) and then runs B small
GEMMs; one `mm` over the B*M rows reads the weight once, and `pack_weights`
then packs it like any linear's. The values are the same: every row is the
same dot products with the same weight.
"""
from __future__ import annotations

import torch
import torch.fx

from passlab.passes import PassResult, register_pass

from ..cleanup import noop_source
from ..vocabulary import Counters, Skip, aten, erase_dead

BMM = aten.bmm.default


def match(n: torch.fx.Node):
    x, b = n.args[:2]
    while isinstance(b, torch.fx.Node) and noop_source(b) is not None:
        b = noop_source(b)                  # view(expand(W), its own shape), as captured
    if not (isinstance(b, torch.fx.Node) and b.op == "call_function" and b.target == aten.expand.default):
        raise Skip("not_an_expanded_operand")
    w = b.args[0]
    wv, xv = w.meta["val"], x.meta["val"]
    if not (wv.dim() == 2 or (wv.dim() == 3 and wv.shape[0] == 1)):
        raise Skip("operand_batched")
    B, M, K = xv.shape
    if B > 1 and M > 1 and xv.stride(0) != M * xv.stride(1):
        raise Skip("rows_not_one_view")
    return x, w, b, (B, M, K), tuple(n.meta["val"].shape)


@register_pass("unbroadcast_gemm")
def unbroadcast_gemm(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """bmm(x, W expanded over the batch) -> mm over the batch's rows (one read of W, no copy of it)."""
    c, g = Counters(), gm.graph
    for n, (x, w, expanded, (B, M, K), out_shape) in c.matches(g, BMM, match,
                                                               not_candidates=("not_an_expanded_operand",)):
        with g.inserting_before(n):
            rows = g.call_function(aten.view.default, (x, [B * M, K]))
            if len(w.meta["val"].shape) == 3:
                w = g.call_function(aten.select.int, (w, 0, 0))
            out = g.call_function(aten.view.default, (g.call_function(aten.mm.default, (rows, w)), list(out_shape)))
        n.replace_all_uses_with(out)
        erase_dead(g, [n, n.args[1], expanded])
        c.rewritten += 1
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict())
