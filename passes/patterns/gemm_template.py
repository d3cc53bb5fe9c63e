"""CUDA: a GEMM with its whole epilogue — bias, activation, residual add — as
ONE Triton GEMM-template node (`runtime/codegen/triton_gemm.py`, block sizes
picked per shape). Used by `fuse_epilogue` when `ctx.device` is CUDA.

    addmm(b, x, w) [-> gelu/silu/relu] [+ r]   -> GemmEpilogue(act, bias, residual)(x, w, b, r)
"""
from __future__ import annotations

import torch.fx

from ..vocabulary import Counters, activation_at, aten, erase_dead, gemm_operands, shape, sole_user_through_views


def residual_after(t, nxt, gemm):
    """The same-shape, same-dtype tensor `nxt` adds to `t`, or None."""
    if nxt is None or nxt.target != aten.add.Tensor or nxt.kwargs:
        return None
    y = nxt.args[1] if nxt.args[0] is t else nxt.args[0]
    if isinstance(y, torch.fx.Node) and y is not t and shape(y) == shape(nxt) == shape(t) \
            and y.meta["val"].dtype == gemm.meta["val"].dtype:
        return y
    return None


def template_for(g, gemm: torch.fx.Node, c: Counters) -> bool:
    """GEMM [-> activation] [-> + residual] as one Triton GEMM-template node."""
    ops = gemm_operands(gemm)
    if ops is None or gemm.target == aten.bmm.default:
        return False
    x, w, b = ops
    if b is not None and (gemm.kwargs or b.meta["val"].dim() != 1):
        return False
    passed, act, res, last = [], "none", None, gemm
    nxt = sole_user_through_views(gemm, passed)
    t = passed[-1] if passed else gemm
    found = activation_at(t, nxt)
    if found is not None:
        act, nodes = found
        last = nodes[-1]
        passed.extend(nodes)
        nxt = sole_user_through_views(last, passed)
    y = residual_after(passed[-1] if passed else gemm, nxt, gemm)
    if y is not None:
        res, last = y, nxt
    if act == "none" and res is None:
        return False
    c.matched += 1
    from passlab.runtime.codegen.triton_gemm import GemmEpilogue
    N, M = gemm.meta["val"].shape
    with g.inserting_before(last):
        r2 = g.call_function(aten.reshape.default, (res, [N, M])) if res is not None else None
        node = g.call_function(GemmEpilogue(act, b is not None, res is not None), (x, w, b, r2))
        node.meta["fused_from"] = [n.name for n in [gemm] + passed + ([last] if res is not None else [])]
        out = g.call_function(aten.view.default, (node, list(shape(last)))) if shape(last) != (N, M) else node
    node.meta["val"], out.meta["val"] = gemm.meta["val"], last.meta["val"]
    last.replace_all_uses_with(out)
    erase_dead(g, [last] + passed[::-1] + [gemm])
    return True
