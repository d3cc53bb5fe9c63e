"""`pack_weights`: the constant weight of a CPU convolution or linear packed once,
at compile time, into oneDNN's blocked layout, as TorchInductor's freezing does:

    convolution(x, W, b, stride, pad, dil, False, _, g)   -> mkldnn._convolution_pointwise(x, Wp, b, ...)
    mkldnn._linear_pointwise(x, W, b, ...)                 -> the same op on Wp   (what `fuse_epilogue` made)
    mm(x, t(W)) | addmm(b, x, t(W))                        -> mkldnn._linear_pointwise(x, Wp, b, "none", [], "")

Without packing, every call reorders the weight into the layout the kernel
reads; a packed weight is read as it is. The weight must be a constant (a
parameter or folded buffer) and the shapes static. Each candidate is timed
against what it replaces at its own shape, strides and dtype (`autotune.fastest`)
and kept only where it measured faster: on one machine oneDNN's fp32 GEMM beats
MKL's twice over, on another it may not.

A packed weight is an opaque MKLDNN tensor: it has no storage, so it can be
neither deep-copied nor saved. The packed weights live in one submodule,
`_packed` (`PackedWeights`): non-persistent buffers (`state_dict` keeps the
model's plain weights), shared, never copied, when the graph module is
deep-copied (they are read-only). A compiler-made plain weight that only the
packed calls read is dropped (`drop_unread`).
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from passlab.passes import PassResult, register_pass
from passlab.runtime import autotune

from ..meta import fake_mode_of
from .onednn import ONEDNN_ATTRS, WEIGHT_VIEWS, onednn_available, onednn_dtype_ok
from ..vocabulary import (Counters, Skip, act_of, aten, constant_of, erase_dead, gemm_operands, residual_of,
                          shape, users)

CONV = aten.convolution.default
try:                       # a torch built without oneDNN has none of these: the pass then changes nothing
    CONV_PW = torch.ops.mkldnn._convolution_pointwise.default
    CONV_BINARY = torch.ops.mkldnn._convolution_pointwise.binary
    LINEAR_PW = torch.ops.mkldnn._linear_pointwise.default
    LINEAR_BINARY = torch.ops.mkldnn._linear_pointwise.binary
except (AttributeError, RuntimeError):
    CONV_PW = CONV_BINARY = LINEAR_PW = LINEAR_BINARY = None


class PackedWeights(nn.Module):
    """The packed weights of a graph module, as non-persistent buffers. A copy of
    the module shares them: they are read-only, and an opaque tensor cannot be copied."""

    def __deepcopy__(self, memo):
        twin = PackedWeights()
        for name, value in self._buffers.items():
            twin.register_buffer(name, value, persistent=False)
        memo[id(self)] = twin
        return twin


def packed_constant(gm: torch.fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """Register a packed weight under `_packed.<fresh name>`; returns the target."""
    if not isinstance(getattr(gm, "_packed", None), PackedWeights):
        gm.add_submodule("_packed", PackedWeights())
    holder = gm._packed
    base = "".join(ch if ch.isalnum() else "_" for ch in stem)
    name, i = base, 0
    while hasattr(holder, name):
        i += 1
        name = f"{base}_{i}"
    holder.register_buffer(name, value, persistent=False)
    return f"_packed.{name}"


def static_shape(n) -> tuple[int, ...]:
    s = shape(n)
    if not all(isinstance(d, int) for d in s):
        raise Skip("dynamic_shape")
    return s


def plain_weight(gm, n) -> torch.Tensor:
    w = constant_of(gm, n)
    if w is None:
        raise Skip("weight_not_constant")
    if w.is_mkldnn:
        raise Skip("already_packed")
    return w


def sample(val: torch.Tensor) -> torch.Tensor:
    """A random tensor with `val`'s shape, dtype and strides (for timing)."""
    out = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype)
    return out.normal_() if val.dtype.is_floating_point else out.zero_()


# ---------------------------------------------------------------- convolution

def match_conv(n, gm, device):
    x, w, b, stride, padding, dilation, transposed, _out_pad, groups = n.args
    if transposed:
        raise Skip("transposed")
    out = n.meta["val"]
    if out.device.type != "cpu" or not str(device).startswith("cpu"):
        raise Skip("not_cpu")
    if out.dim() != 4:
        raise Skip("not_2d")
    if not onednn_dtype_ok(out.dtype) or x.meta["val"].dtype != out.dtype:
        raise Skip("dtype")
    weight = plain_weight(gm, w)
    bias = None if b is None else plain_weight(gm, b)
    return x, weight, bias, list(stride), list(padding), list(dilation), groups, static_shape(x)


def conv_packed_faster(x_val, weight, bias, stride, padding, dilation, groups, packed) -> bool:
    x = sample(x_val)
    candidates = {
        "aten": lambda: torch.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups),
        "packed": lambda: CONV_PW(x, packed, bias, padding, stride, dilation, groups, "none", [], ""),
    }
    key = ("pack_conv", tuple(x_val.shape), tuple(x_val.stride()), tuple(weight.shape), x_val.dtype,
           tuple(stride), tuple(padding), tuple(dilation), groups, bias is not None)
    with torch.no_grad():
        return autotune.fastest(key, candidates) == "packed"


def ensure_fake_kernels() -> None:
    """oneDNN's convolution + binary post-op has no meta kernel in torch; its
    output is the plain convolution's (same shape and strides)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_convolution_pointwise.binary", "Meta"):
        return

    @torch.library.register_fake("mkldnn::_convolution_pointwise.binary")
    def _conv_binary_fake(x, other, w, b, padding, stride, dilation, groups, binary_attr, alpha, unary_attr,
                          unary_scalars, unary_algorithm):
        return CONV_PW(x, w, b, padding, stride, dilation, groups, "none", [], "")


def unary_post_op(n):
    """(attr, scalars, algorithm, node) of the activation that is `n`'s sole user, or None."""
    us = users(n)
    if len(us) != 1 or us[0].op != "call_function" or us[0].args[0] is not n:
        return None
    u = us[0]
    name = act_of(u)
    if name is not None:
        attr, algorithm = ONEDNN_ATTRS[name]
        return attr, [], algorithm, u
    if u.target == aten.hardtanh.default:
        lo, hi = (list(u.args[1:3]) + [-1.0, 1.0][len(u.args) - 1:])[:2]
        return "hardtanh", [float(lo), float(hi)], "", u
    if u.target == aten.hardswish.default:
        return "hardswish", [], "", u
    return None


def residual_add(n):
    """(other, add node) where `n`'s sole user, with no view between, adds a
    same-shape, same-dtype, same-strides tensor to it (a residual connection)."""
    passed: list = []
    other, add = residual_of(n, passed)
    v = n.meta["val"]
    if add is None or passed or other.meta["val"].stride() != v.stride() or add.meta["val"].stride() != v.stride():
        return None
    return other, add


def pack_conv(gm, n, c: Counters, device, measure: bool) -> int:
    """Pack one convolution's weight (with the activation / residual add after it as
    oneDNN post-ops); returns how many nodes the new one replaced (0: left alone)."""
    found = c.attempt(match_conv, n, gm, device)
    if found is None:
        return 0
    x, weight, bias, stride, padding, dilation, groups, x_shape = found
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight.detach(), padding, stride, dilation, groups,
                                                          list(x_shape))
    if measure and not conv_packed_faster(x.meta["val"], weight, bias, stride, padding, dilation, groups, packed):
        c.skip("aten_measured_faster", nodes=[n])
        return 0
    g = gm.graph
    conv_args = (padding, stride, dilation, groups)
    found_add = residual_add(n)
    last, fused = n, [n]
    if found_add is not None:
        other, last = found_add
        fused.append(last)
        post = unary_post_op(last)
        attr, scalars, algorithm = (None, [], None) if post is None else post[:3]
        if post is not None:
            last = post[3]
            fused.append(last)
        ensure_fake_kernels()
        op, make = CONV_BINARY, lambda wp: (x, other, wp, n.args[2], *conv_args, "add", None, attr, scalars, algorithm)
    else:
        post = unary_post_op(n)
        attr, scalars, algorithm = ("none", [], "") if post is None else post[:3]
        if post is not None:
            last = post[3]
            fused.append(last)
        op, make = CONV_PW, lambda wp: (x, wp, n.args[2], *conv_args, attr, scalars, algorithm)
    with g.inserting_before(last):
        wp = g.get_attr(packed_constant(gm, n.args[1].name, packed))
        node = g.call_function(op, make(wp))
    wp.meta["val"] = n.args[1].meta["val"]
    node.meta.update(last.meta)
    node.meta["fused_from"] = [f.name for f in fused]
    last.replace_all_uses_with(node)
    erase_dead(g, fused[::-1])
    return len(fused)


# ---------------------------------------------------------------- linear

def match_linear(n, gm, device):
    """(x, the weight operand as the node runs it now, its [N, K] weight, bias node) of a
    linear by a constant weight: a oneDNN linear `fuse_epilogue` made, or mm / addmm."""
    out = n.meta["val"]
    if out.device.type != "cpu" or not str(device).startswith("cpu"):
        raise Skip("not_cpu")
    if not onednn_dtype_ok(out.dtype):
        raise Skip("dtype")
    if n.target in (LINEAR_PW, LINEAR_BINARY):
        x, w, b = (n.args[0], n.args[1], n.args[2]) if n.target == LINEAR_PW else (n.args[0], n.args[2], n.args[3])
        weight = plain_weight(gm, w)
        static_shape(x)
        return x, weight, weight, b
    ops = gemm_operands(n)
    if ops is None or n.target == aten.bmm.default:
        raise Skip("not_a_matrix_gemm")
    x, wt, b = ops
    if {x.meta["val"].dtype, wt.meta["val"].dtype} != {out.dtype} or x.meta["val"].dim() != 2 \
            or wt.meta["val"].dim() != 2:
        raise Skip("dtype")
    if b is not None and (b.meta["val"].dim() != 1 or b.meta["val"].dtype != out.dtype):
        raise Skip("bias_not_1d")
    static_shape(x)
    if wt.op == "call_function" and wt.target in WEIGHT_VIEWS:      # mm(x, permute(W)): a Linear's own [N, K] W
        w = constant_of(gm, wt.args[0])
        if w is None or (wt.target == aten.permute.default and list(wt.args[1]) not in ([1, 0], [-1, -2])):
            raise Skip("weight_not_constant")
        return x, w.t(), w, b
    operand = plain_weight(gm, wt)                                 # a constant [K, N] operand (layout's, GPT-2's)
    return x, operand, operand.t().contiguous(), b


def linear_packed_faster(n, x_val, operand, weight, packed, has_bias: bool) -> bool:
    """The packed oneDNN linear against what `n` runs now (ATen's GEMM on its own
    operand, or the unpacked oneDNN linear), at this shape."""
    x = sample(x_val)
    N, K = weight.shape
    b = torch.randn(N, dtype=weight.dtype) if has_bias else None
    if n.target in (LINEAR_PW, LINEAR_BINARY):
        now = lambda: LINEAR_PW(x, weight, b, "none", [], "")          # noqa: E731
    else:
        now = (lambda: torch.addmm(b, x, operand)) if b is not None else (lambda: torch.mm(x, operand))
    candidates = {"now": now, "packed": lambda: LINEAR_PW(x, packed, b, "none", [], "")}
    key = ("pack_linear", str(n.target), tuple(x_val.shape), tuple(x_val.stride()), tuple(operand.stride()), N, K,
           x_val.dtype, has_bias)
    with torch.no_grad():
        return autotune.fastest(key, candidates) == "packed"


def pack_linear(gm, n, c: Counters, device, measure: bool) -> list:
    """Pack one linear's weight; returns the weight nodes it no longer reads ([]: left alone)."""
    found = c.attempt(match_linear, n, gm, device, not_candidates=("not_a_matrix_gemm",))
    if found is None:
        return []
    x, operand, weight, b = found
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), static_shape(x)[0])
    if measure and not linear_packed_faster(n, x.meta["val"], operand, weight, packed, b is not None):
        c.skip("aten_measured_faster", nodes=[n])
        return []
    g = gm.graph
    i = {LINEAR_PW: 1, LINEAR_BINARY: 2}.get(n.target)
    old = n.args[i] if i is not None else gemm_operands(n)[1]
    with g.inserting_before(n):
        wp = g.get_attr(packed_constant(gm, old.name, packed))
    wp.meta["val"] = fake_mode_of(gm).from_tensor(weight)       # what the packed weight stands for: [N, K]
    if i is not None:
        n.update_arg(i, wp)
    else:
        with g.inserting_before(n):
            node = g.call_function(LINEAR_PW, (x, wp, b, "none", [], ""))
        node.meta.update(n.meta)
        node.meta["fused_from"] = [n.name]
        n.replace_all_uses_with(node)
        erase_dead(g, [n])
    return [old]


def drop_unread(gm, nodes) -> int:
    """Erase the weight nodes nothing reads any more (and views of them); a
    compiler-made buffer (`_...`, never a user's parameter) that no node reads is
    dropped from the module too, so a folded weight is not held twice."""
    g = gm.graph
    roots = [m.args[0] if m.op == "call_function" else m for m in nodes]
    erase_dead(g, nodes)
    erase_dead(g, roots)
    read = {m.target for m in g.nodes if m.op == "get_attr"}
    dropped = 0
    for r in roots:
        if r.op == "get_attr" and r._erased and r.target.startswith("_") and "." not in r.target \
                and r.target not in read and r.target in gm._buffers:
            del gm._buffers[r.target]
            dropped += 1
    return dropped


@register_pass("pack_weights")
def pack_weights(gm: torch.fx.GraphModule, ctx, *, choose: str = "measure", linear: bool = True,
                 conv: bool = True) -> PassResult:
    """CPU: constant convolution and linear weights packed once into oneDNN's blocked layout (as freezing does)."""
    if choose not in ("measure", "always"):
        raise ValueError(f"choose must be 'measure' or 'always', got {choose!r}")
    c = Counters()
    if CONV_PW is None or not onednn_available(ctx.device):
        return PassResult(gm, changed=False, stats=c.as_dict(convolutions=0, linears=0, post_ops=0,
                                                                        reason="no_onednn"))
    measure = choose == "measure"
    convs = linears = post_ops = 0
    unread = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n._erased:
            continue
        if conv and n.target == CONV:
            weight = n.args[1]
            replaced = pack_conv(gm, n, c, ctx.device, measure)
            convs += replaced > 0
            post_ops += max(replaced - 1, 0)
            unread += [weight] if replaced else []
        elif linear and n.target in (LINEAR_PW, LINEAR_BINARY, aten.mm.default, aten.addmm.default):
            old = pack_linear(gm, n, c, ctx.device, measure)
            linears += bool(old)
            unread += old
    c.rewritten = convs + linears
    stats = c.as_dict(convolutions=convs, linears=linears, post_ops=post_ops,
                      plain_buffers_dropped=drop_unread(gm, unread))
    return PassResult(gm, changed=c.rewritten > 0, stats=stats)
