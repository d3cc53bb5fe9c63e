"""Op classes: what kind of work each core-aten op is.

One table, extended with one line per op. The fusion engine, the cost model
and the drawings all read it: pointwise ops fuse freely, views are free,
reductions end a loop, GEMMs/convs go to vendor libraries, collectives talk to
other ranks, and anything unknown is opaque (never fused, always one launch).
"""
from __future__ import annotations

import operator
from enum import Enum

import torch
import torch.fx

aten = torch.ops.aten


class OpClass(str, Enum):
    POINTWISE = "pointwise"
    BROADCAST = "broadcast"     # expand: a view that repeats data
    VIEW = "view"               # view/injective: changes indexing, moves no data
    REDUCTION = "reduction"     # includes normalizations and softmax (decomposed by the engine)
    GEMM = "gemm"               # mm/addmm/bmm/conv: vendor kernels
    COLLECTIVE = "collective"
    FUSED = "fused"             # a node made by the fusion engine
    OPAQUE = "opaque"


def _ops(*names):
    out = []
    for n in names:
        ns, _, n = n.rpartition("::")
        packet, _, overload = n.partition(".")
        p = getattr(getattr(torch.ops, ns) if ns else aten, packet, None)
        if p is not None and hasattr(p, overload or "default"):
            out.append(getattr(p, overload or "default"))
    return out


TABLE: dict = {}
for _cls, _names in {
    OpClass.POINTWISE: [
        "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor", "mul.Scalar",
        "div.Tensor", "div.Scalar", "div.Tensor_mode", "neg.default", "exp.default", "log.default",
        "sqrt.default", "rsqrt.default", "abs.default", "tanh.default", "sigmoid.default",
        "relu.default", "gelu.default", "silu.default", "erf.default", "pow.Tensor_Scalar",
        "pow.Tensor_Tensor", "pow.Scalar", "reciprocal.default", "maximum.default", "minimum.default",
        "clamp.default", "clamp_min.default", "clamp_max.default", "where.self", "masked_fill.Scalar",
        "masked_fill.Tensor", "eq.Scalar", "eq.Tensor", "ne.Scalar", "ne.Tensor", "lt.Scalar",
        "lt.Tensor", "le.Scalar", "le.Tensor", "gt.Scalar", "gt.Tensor", "ge.Scalar", "ge.Tensor",
        "logical_not.default", "logical_and.default", "logical_or.default", "bitwise_and.Tensor",
        "bitwise_or.Tensor", "bitwise_not.default", "_to_copy.default", "sin.default", "cos.default",
        "expm1.default", "log1p.default", "hardtanh.default", "leaky_relu.default", "floor.default",
        "ceil.default", "round.default", "sign.default", "fill.Scalar", "rsub.Scalar",
        "clone.default", "copy.default", "lerp.Scalar", "exp2.default", "log2.default",
        "remainder.Scalar", "fmod.Scalar", "hardsigmoid.default", "hardswish.default", "elu.default",
        "softplus.default", "mish.default", "log_sigmoid.default", "sigmoid_backward.default",
        "tanh_backward.default", "isinf.default",
        "isnan.default", "scalar_tensor.default", "full.default", "full_like.default",
        "zeros_like.default", "ones_like.default"],
    OpClass.BROADCAST: ["expand.default"],
    OpClass.VIEW: [
        "view.default", "_unsafe_view.default", "reshape.default", "permute.default", "t.default",
        "transpose.int", "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default",
        "slice.Tensor", "select.int", "alias.default", "as_strided.default", "split.Tensor",
        "split_with_sizes.default", "unbind.int", "detach.default", "lift_fresh_copy.default"],
    OpClass.REDUCTION: [
        "sum.dim_IntList", "sum.default", "mean.dim", "mean.default", "amax.default", "amin.default",
        "max.dim", "min.dim", "var.correction", "var_mean.correction", "prod.dim_int",
        "_softmax.default", "_log_softmax.default", "native_layer_norm.default", "any.dims",
        "any.dim", "all.dim", "argmax.default", "argmin.default", "logsumexp.default",
        "native_batch_norm.default", "_native_batch_norm_legit_no_training.default", "cumsum.default"],
    OpClass.GEMM: [
        "mm.default", "addmm.default", "bmm.default", "baddbmm.default", "convolution.default",
        "linear.default", "matmul.default", "_scaled_dot_product_flash_attention_for_cpu.default",
        "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
        "scaled_dot_product_attention.default", "_scaled_dot_product_cudnn_attention.default",
        "mkldnn::_linear_pointwise.default", "mkldnn::_linear_pointwise.binary",
        "mkldnn::_convolution_pointwise.default", "mkldnn::_convolution_pointwise.binary"],
}.items():
    for _op in _ops(*_names):
        TABLE[_op] = _cls
TABLE[operator.getitem] = OpClass.VIEW


def _collective_ops():
    ns = getattr(torch.ops, "_c10d_functional", None)
    names = ["all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
             "wait_tensor", "broadcast", "all_reduce_coalesced"]
    return [getattr(getattr(ns, n), "default") for n in names if ns is not None and hasattr(ns, n)]


for _op in _collective_ops():
    TABLE[_op] = OpClass.COLLECTIVE


def op_class(node_or_target) -> OpClass:
    """The class of an fx node (or a call target)."""
    node = isinstance(node_or_target, torch.fx.Node)
    target = node_or_target.target if node else node_or_target
    if node and node_or_target.op != "call_function":     # (an OpOverload has an `.op` of its own)
        return OpClass.OPAQUE
    if getattr(target, "is_fused_kernel", False):
        return OpClass.FUSED
    if getattr(target, "is_gemm_template", False):
        return OpClass.GEMM
    return TABLE.get(target, OpClass.OPAQUE)


def op_name(node_or_target, *, overload: bool = False) -> str:
    """The short name of what a node calls: `aten.addmm.default` -> `addmm`
    (`overload=True`: `add.Tensor`, the default overload's name left out), a
    fused kernel's own name, a function's `__name__`; a placeholder or
    get_attr node is named by its op."""
    t = node_or_target
    if isinstance(t, torch.fx.Node):
        if t.op in ("placeholder", "get_attr"):
            return t.op
        t = t.target
    if isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
        return f"{name}.{t._overloadname}" if overload and t._overloadname != "default" else name
    if getattr(t, "is_fused_kernel", False):
        return t.name
    return getattr(t, "__name__", None) or getattr(t, "name", None) or str(t)

