"""`fold_batchnorm`: eval-mode batchnorm after a conv or linear, folded into its weights.

    y = (conv(x, w) + b - mean) * gamma / sqrt(var + eps) + beta
      = conv(x, w * s) + (b - mean) * s + beta,      s = gamma / sqrt(var + eps)

The folded weight and bias are new buffers, computed in float64 once at
compile time; the model's parameters are never touched. A GEMM written
`addmm(b, x, w.t())` / `mm(x, w.t())` (a Linear) folds into its `[out, in]`
weight the same way, with the batchnorm's channel on dim 1.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from passlab.passes import PassResult, register_pass

from ..vocabulary import Counters, aten, constant_of, erase_dead, gemm_operands, new_constant, users

BATCHNORM = aten._native_batch_norm_legit_no_training.default


def bn_scale_shift(gm, bn: torch.fx.Node, channels: int):
    """(s, shift) in float64 so that bn(y) == y * s + shift, or a skip reason."""
    _, gamma, beta, mean, var, _, eps = bn.args
    mean_t, var_t = constant_of(gm, mean), constant_of(gm, var)
    if mean_t is None or var_t is None:
        return "statistics_not_constant"
    g = torch.ones(channels, dtype=torch.float64) if gamma is None else constant_of(gm, gamma)
    b = torch.zeros(channels, dtype=torch.float64) if beta is None else constant_of(gm, beta)
    if g is None or b is None:
        return "affine_not_constant"
    s = g.double() / torch.sqrt(var_t.double() + eps)
    return s, b.double() - mean_t.double() * s


def fold_into_conv(gm, conv: torch.fx.Node, bn: torch.fx.Node):
    x, w, b, stride, padding, dilation, transposed, out_pad, groups = conv.args
    if transposed:
        return "transposed_conv"
    w_t = constant_of(gm, w)
    b_t = None if b is None else constant_of(gm, b)
    if w_t is None or (b is not None and b_t is None):
        return "weight_not_constant"
    folded = bn_scale_shift(gm, bn, w_t.shape[0])
    if isinstance(folded, str):
        return folded
    s, shift = folded
    new_w = (w_t.double() * s.view(-1, *[1] * (w_t.dim() - 1))).to(w_t.dtype)
    new_b = (shift if b_t is None else b_t.double() * s + shift).to(w_t.dtype)
    g = gm.graph
    with g.inserting_before(conv):
        wn = g.get_attr(new_constant(gm, f"{w.target}_bnfold", new_w))
        bn_ = g.get_attr(new_constant(gm, f"{w.target}_bnfold_bias", new_b))
    conv.args = (x, wn, bn_, stride, padding, dilation, transposed, out_pad, groups)
    return conv


def fold_into_linear(gm, gemm: torch.fx.Node, bn: torch.fx.Node):
    """`[addmm(b, x, permute(w, [1, 0])) | mm(x, permute(w, [1, 0]))]` -> BN over dim 1."""
    ops = gemm_operands(gemm)
    if ops is None:
        return "scaled_addmm"
    x, wt, b = ops
    if not (isinstance(wt, torch.fx.Node) and wt.target == aten.permute.default and list(wt.args[1]) == [1, 0]):
        return "weight_layout"
    w_t = constant_of(gm, wt.args[0])
    b_t = None if b is None else constant_of(gm, b)
    if w_t is None or (b is not None and (b_t is None or b_t.dim() != 1)):
        return "weight_not_constant"
    folded = bn_scale_shift(gm, bn, w_t.shape[0])
    if isinstance(folded, str):
        return folded
    s, shift = folded
    new_w = (w_t.double() * s[:, None]).to(w_t.dtype)
    new_b = (shift if b_t is None else b_t.double() * s + shift).to(w_t.dtype)
    g, stem = gm.graph, wt.args[0].target
    with g.inserting_before(gemm):
        wn = g.get_attr(new_constant(gm, f"{stem}_bnfold", new_w))
        bn_ = g.get_attr(new_constant(gm, f"{stem}_bnfold_bias", new_b))
        wtn = g.call_function(aten.permute.default, (wn, [1, 0]))
        new = g.call_function(aten.addmm.default, (bn_, x, wtn))
    return new


PRODUCERS = {aten.convolution.default: fold_into_conv, aten.addmm.default: fold_into_linear,
             aten.mm.default: fold_into_linear}


@register_pass("fold_batchnorm")
def fold_batchnorm(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """Fold eval-mode batchnorm into the preceding conv/linear weights (new buffers)."""
    c, g = Counters(), gm.graph
    for bn in [n for n in g.nodes if n.op == "call_function" and n.target == BATCHNORM]:
        src = bn.args[0]
        fold = PRODUCERS.get(getattr(src, "target", None))
        c.matched += 1
        if fold is None:
            c.skip("no_conv_or_linear_before")
            continue
        outs = users(bn)
        if any(u.target != operator.getitem or u.args[1] != 0 for u in outs):
            c.skip("statistics_outputs_used")
            continue
        if len(users(src)) != 1:
            c.skip("producer_has_other_users")
            continue
        if fold is fold_into_linear and (src.meta["val"].dim() != 2 or bn.meta["val"][0].dim() != 2):
            c.skip("linear_not_2d")
            continue
        res = fold(gm, src, bn)
        if isinstance(res, str):
            c.skip(res)
            continue
        for u in outs:
            u.replace_all_uses_with(res)
        old_inputs = [a for a in (*bn.args, *src.args) if isinstance(a, torch.fx.Node)]
        erase_dead(g, outs + [bn] + ([src] if res is not src else []) + old_inputs)
        c.rewritten += 1
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict())
