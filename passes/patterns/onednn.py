"""CPU: a GEMM and what follows it as ONE oneDNN linear with a post-op, as
TorchInductor's mkldnn fusion emits:

    addmm(b, x, permute(w)) -> gelu/silu/relu   -> mkldnn._linear_pointwise(x, w, b, act, [], algorithm)
    addmm(b, x, permute(w)) + r                 -> mkldnn._linear_pointwise.binary(x, r, w, b, "add")

one launch where the addmm route leaves two; w is the linear's own [out, in]
weight (a constant [in, out] operand is transposed once into a new buffer).
Used by `fuse_epilogue` (`onednn=true`, the default on CPU).

`mkldnn._linear_pointwise.binary` has no meta kernel in torch (inductor lowers
it without one); `ensure_fake_kernels()` registers one the first time a rewrite
inserts the op, never at import.
"""
from __future__ import annotations

import torch
import torch.fx

from ..vocabulary import (Counters, activation_at, aten, constant_of, erase_dead, gemm_operands, new_constant,
                         shape, sole_user_through_views)

ONEDNN_ATTRS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", ""), "relu": ("relu", "")}
WEIGHT_VIEWS = {aten.permute.default, aten.t.default}


def onednn_available(device) -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (str(device).startswith("cpu") and torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_linear_pointwise") and hasattr(mkldnn._linear_pointwise, "binary"))


def ensure_fake_kernels() -> None:
    """Give oneDNN's fused linear + add a fake (meta) kernel so `meta["val"]` can be
    propagated through it; idempotent. The unary variant has one in torch."""
    if not onednn_available("cpu"):
        return
    if torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise.binary", "Meta"):
        return

    @torch.library.register_fake("mkldnn::_linear_pointwise.binary")
    def _linear_binary_fake(x, other, w, b, attr):
        return x.new_empty((*x.shape[:-1], w.shape[0]))


def onednn_dtype_ok(dtype: torch.dtype) -> bool:
    if dtype == torch.float32:      # a reduced-precision fp32 matmul setting would cost the 1e-4
        return getattr(torch.backends.mkldnn.matmul, "fp32_precision", "none") in ("none", "ieee")
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_weight(gm, gemm: torch.fx.Node, wt: torch.fx.Node):
    """The [out, in] weight oneDNN wants, for the GEMM's [in, out] operand `wt`: the
    tensor the transpose read (a linear's parameter), else a transposed copy of a
    constant, made once now as a new buffer; None for a runtime [in, out] weight."""
    if wt.op == "call_function" and wt.target in WEIGHT_VIEWS and wt.args[0].meta["val"].dim() == 2 \
            and (wt.target == aten.t.default or list(wt.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])):
        return wt.args[0]
    value = constant_of(gm, wt)
    if value is None:
        return None
    with gm.graph.inserting_before(gemm):
        return gm.graph.get_attr(new_constant(gm, f"{wt.name}_t", value.t()))


def onednn_linear(gm, gemm: torch.fx.Node, c: Counters, residual: bool = True) -> str | None:
    """GEMM [-> activation | -> + residual] as one oneDNN linear with a post-op; returns the kind."""
    g = gm.graph
    ops = gemm_operands(gemm)
    if ops is None or gemm.target == aten.bmm.default:
        return None
    x, wt, b = ops
    passed = []
    nxt = sole_user_through_views(gemm, passed)
    t = passed[-1] if passed else gemm
    act, last, res = None, None, None
    found = activation_at(t, nxt)
    if found is not None:
        act, nodes = found
        passed.extend(nodes)
        last = nodes[-1]
    elif residual and nxt is not None and nxt.target == aten.add.Tensor and not nxt.kwargs and len(nxt.args) == 2:
        y = nxt.args[1] if nxt.args[0] is t else nxt.args[0]
        if isinstance(y, torch.fx.Node) and y is not t and shape(y) == shape(nxt) == shape(t):
            res, last = y, nxt
    if last is None:
        return None
    c.matched += 1
    out_val, x_val, wt_val = gemm.meta["val"], x.meta["val"], wt.meta["val"]
    if out_val.device.type != "cpu":
        c.skip("onednn_not_cpu")
        return None
    if not onednn_dtype_ok(out_val.dtype) or {x_val.dtype, wt_val.dtype, last.meta["val"].dtype} != {out_val.dtype} \
            or (res is not None and res.meta["val"].dtype != out_val.dtype):
        c.skip("onednn_dtype")
        return None
    if b is not None and (b.meta["val"].dim() != 1 or b.meta["val"].shape[0] != out_val.shape[1]
                          or b.meta["val"].dtype != out_val.dtype):
        c.skip("onednn_bias_not_1d")
        return None
    if x_val.dim() != 2 or wt_val.dim() != 2:
        c.skip("onednn_not_2d")
        return None
    w = onednn_weight(gm, gemm, wt)
    if w is None:
        c.skip("weight_not_constant")
        return None
    ensure_fake_kernels()
    M, N = out_val.shape
    with g.inserting_before(last):
        if res is None:
            op, algorithm = ONEDNN_ATTRS[act]
            node = g.call_function(torch.ops.mkldnn._linear_pointwise.default, (x, w, b, op, [], algorithm))
        else:
            r2 = g.call_function(aten.reshape.default, (res, [M, N])) if shape(res) != (M, N) else res
            node = g.call_function(torch.ops.mkldnn._linear_pointwise.binary, (x, r2, w, b, "add"))
        node.meta["fused_from"] = [n.name for n in [gemm] + passed + ([last] if res is not None else [])]
        out = g.call_function(aten.view.default, (node, list(shape(last)))) if shape(last) != (M, N) else node
    node.meta["val"], out.meta["val"] = out_val, last.meta["val"]
    last.replace_all_uses_with(out)
    erase_dead(g, [last] + passed[::-1] + [gemm, wt])
    return "binary" if res is not None else "linear"
