"""`fuse_epilogue`: what follows a GEMM goes into the GEMM call.

    mm(x, w) + b                 -> addmm(b, x, w)                 (bias folded)
    mm(x, w) + r                 -> addmm(r, x, w)                 (residual is the C operand)
    addmm(b, x, w) + r           -> addmm(r + b, x, w)

The BLAS call accumulates into its C operand (beta = 1), so the separate
pass over the output that the add made disappears. These rewrites are applied
only where they are exact up to rounding order: the add does not broadcast
the GEMM result (the residual has the output's shape, the bias one row), the
dtypes agree, and addmm has alpha = beta = 1. Views and eval-dropout clones
between the GEMM and the add are looked through; each must have no other user.

On CPU with oneDNN (`onednn=true`, the default) the GEMM and what follows it
become one oneDNN linear with a post-op, as TorchInductor's mkldnn fusion does:

    addmm(b, x, permute(w)) -> gelu/silu/relu   -> mkldnn._linear_pointwise(x, w, b, act)
    addmm(b, x, permute(w)) + r                 -> mkldnn._linear_pointwise.binary(x, r, w, b, "add")

one launch where the addmm route leaves two (GEMM + activation kernel, or
residual-plus-bias add + GEMM); w is the linear's own [out, in] weight.

Elsewhere (fp16, no oneDNN, `onednn=false`, or what the above did not take)
the activation after a GEMM (GELU / SiLU — also as `x * sigmoid(x)`
after decomposition — / ReLU, plus an add or mul reading it) becomes one
generated kernel of the fusion engine: the pair is one BLAS call and one
FusedKernel (`kernels=false` leaves activations to `fuse`). On CUDA
(`ctx.device == "cuda"`) the GEMM with its whole epilogue — bias, activation,
residual add — becomes one Triton kernel (`runtime/codegen/triton_gemm.py`),
block sizes picked per shape.
"""
from __future__ import annotations

import torch
import torch.fx

from passlab.passes import PassResult, register_pass
from passlab.passes.meta import propagate

from . import Counters, aten, constant_of, erase_dead, new_constant, users

GEMMS = {aten.mm.default, aten.addmm.default}
PASS_THROUGH = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default}
ACTIVATIONS = {aten.gelu.default: "gelu", aten.silu.default: "silu", aten.relu.default: "relu"}


def shape(n) -> tuple:
    return tuple(n.meta["val"].shape)


def gemm_behind(t):
    """(gemm, nodes between) when `t` is a GEMM seen through single-user views/clones."""
    between = []
    while isinstance(t, torch.fx.Node) and t.op == "call_function" and t.target in PASS_THROUGH:
        if t.target == aten.clone.default and set(t.kwargs) - {"memory_format"}:
            return None, []
        between.append(t)
        t = t.args[0]
    if not (isinstance(t, torch.fx.Node) and t.target in GEMMS):
        return None, []
    if t.target == aten.addmm.default and (t.kwargs.get("beta", 1) != 1 or t.kwargs.get("alpha", 1) != 1):
        return None, []
    return t, between


def fold_add(g, add: torch.fx.Node, c: Counters, allow: set) -> str | None:
    """Rewrite one `add(gemm..., y)`; returns the kind folded, or None (reason counted)."""
    if add.kwargs.get("alpha", 1) != 1 or not all(isinstance(a, torch.fx.Node) for a in add.args):
        return None
    sides = []
    for t, y in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        gemm, between = gemm_behind(t)
        if gemm is not None:
            sides.append((all(len(users(n)) == 1 for n in [gemm] + between), t, y, gemm, between))
    if not sides:
        return None
    c.matched += 1
    sides.sort(key=lambda s: not s[0])
    alone, t, y, gemm, between = sides[0]
    if not alone:
        c.skip("gemm_output_used_elsewhere")
        return None
    out_val, y_val = gemm.meta["val"], y.meta["val"]
    N, M = out_val.shape
    if y_val.dtype != out_val.dtype or add.meta["val"].dtype != out_val.dtype:
        c.skip("dtype")
        return None
    if shape(add) != shape(t):
        c.skip("add_broadcasts_gemm_output")
        return None
    is_bias = y_val.numel() == M and y_val.shape[-1] == M if y_val.dim() else False
    is_residual = shape(y) == shape(add)
    if gemm.target == aten.addmm.default:
        b, x, w = gemm.args
    else:
        (x, w), b = gemm.args, None
    with g.inserting_before(add):
        if is_bias and b is None and (y_val.dim() == 1 or not is_residual) and "bias" in allow:
            cin = y if y_val.dim() == 1 else g.call_function(aten.reshape.default, (y, [M]))
            kind = "bias"
        elif is_residual and "residual" not in allow:
            c.skip("residual_disabled")
            return None
        elif is_residual:
            cin = g.call_function(aten.reshape.default, (y, [N, M]))
            if b is not None:
                cin = g.call_function(aten.add.Tensor, (cin, b))
            kind = "residual"
        else:
            c.skip("not_bias_or_residual")
            return None
        new = g.call_function(aten.addmm.default, (cin, x, w))
        new.meta["fused_from"] = [gemm.name, add.name]
        out = g.call_function(aten.view.default, (new, list(shape(add)))) if shape(add) != (N, M) else new
    new.meta["val"], out.meta["val"] = gemm.meta["val"], add.meta["val"]  # until propagate() at the end
    add.replace_all_uses_with(out)
    erase_dead(g, [add] + between + [gemm])
    return kind


def act_of(n) -> str | None:
    if n.target == aten.gelu.default:
        return "gelu_tanh" if n.kwargs.get("approximate", "none") == "tanh" else "gelu"
    return ACTIVATIONS.get(n.target)


def decomposed_silu(t):
    """`t * sigmoid(t)` (SiLU after core-aten decomposition): (sigmoid, mul) or None."""
    us = users(t)
    if len(us) != 2:
        return None
    sig = next((u for u in us if u.target == aten.sigmoid.default and u.args[0] is t), None)
    mul = next((u for u in us if u.target == aten.mul.Tensor and sig is not None and set(u.args) == {t, sig}), None)
    return (sig, mul) if sig is not None and mul is not None and users(sig) == [mul] else None


def sole_user_through_views(n, passed: list):
    """Follow single-user views/clones from `n`; returns the first other op (or None)."""
    while True:
        us = users(n)
        if len(us) != 1:
            return None
        u = us[0]
        if u.target in PASS_THROUGH and u.args[0] is n:
            passed.append(u)
            n = u
            continue
        return u


def template_for(g, gemm: torch.fx.Node, c: Counters) -> bool:
    """CUDA: GEMM [-> activation] [-> + residual] as one Triton GEMM-template node."""
    passed, act, res, last = [], "none", None, gemm
    if gemm.target == aten.addmm.default:
        b, x, w = gemm.args
        if gemm.kwargs or b.meta["val"].dim() != 1:
            return False
    else:
        (x, w), b = gemm.args, None
    nxt = sole_user_through_views(gemm, passed)
    t = passed[-1] if passed else gemm
    silu = decomposed_silu(t)
    if silu is not None:
        act, last = "silu", silu[1]
        passed.extend(silu)
        nxt = sole_user_through_views(last, passed)
    elif nxt is not None and act_of(nxt) and nxt.args[0] is t:
        act, last = act_of(nxt), nxt
        passed.append(nxt)
        nxt = sole_user_through_views(nxt, passed)
    if nxt is not None and nxt.target == aten.add.Tensor and not nxt.kwargs:
        t = passed[-1] if passed else gemm
        y = nxt.args[1] if nxt.args[0] is t else nxt.args[0]
        if isinstance(y, torch.fx.Node) and y is not t and shape(y) == shape(nxt) == shape(t) \
                and y.meta["val"].dtype == gemm.meta["val"].dtype:
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


ONEDNN_ATTRS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", ""), "relu": ("relu", "")}
WEIGHT_VIEWS = {aten.permute.default, aten.t.default}


def onednn_available(device) -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (str(device).startswith("cpu") and torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_linear_pointwise") and hasattr(mkldnn._linear_pointwise, "binary"))


def register_binary_fake() -> None:
    """oneDNN's fused linear + add has no meta kernel (inductor lowers it without one); the
    graph's `meta["val"]` needs it. The unary variant has one in torch."""
    if not onednn_available("cpu"):
        return
    if torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise.binary", "Meta"):
        return

    @torch.library.register_fake("mkldnn::_linear_pointwise.binary")
    def _linear_binary_fake(x, other, w, b, attr):
        return x.new_empty((*x.shape[:-1], w.shape[0]))


register_binary_fake()


def cast_to(n, dtype) -> bool:
    return isinstance(n, torch.fx.Node) and n.target == aten._to_copy.default and n.kwargs == {"dtype": dtype}


def activation_at(t, nxt):
    """(name, nodes) of the activation applied to `t` (`nxt`: t's sole user, if any), or None."""
    silu = decomposed_silu(t)
    if silu is not None:
        return "silu", list(silu)
    if nxt is not None and act_of(nxt) and nxt.args[0] is t:
        return act_of(nxt), [nxt]
    return None


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
    """CPU: GEMM [-> activation | -> + residual] as one oneDNN linear with a post-op
    (`mkldnn._linear_pointwise`, as TorchInductor's mkldnn fusion emits); returns the kind."""
    g = gm.graph
    if gemm.target == aten.addmm.default:
        b, x, wt = gemm.args
        if any(v != 1 for v in gemm.kwargs.values()):
            return None
    else:
        (x, wt), b = gemm.args, None
    passed = []
    nxt = sole_user_through_views(gemm, passed)
    t = passed[-1] if passed else gemm
    act, last, res = None, None, None
    found = activation_at(t, nxt)
    if found is None and cast_to(nxt, torch.float32) and gemm.meta["val"].dtype == torch.bfloat16:
        up = users(nxt)                 # bf16: upcast, activation in fp32, downcast
        found = activation_at(nxt, up[0] if len(up) == 1 else None)
        down = users(found[1][-1]) if found else []
        found = (found[0], [nxt] + found[1] + down) if len(down) == 1 and cast_to(down[0], torch.bfloat16) else None
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


def cpu_epilogues(gm: torch.fx.GraphModule, c: Counters):
    """CPU: the activation after each GEMM (plus an add that reads it) as one generated
    pointwise kernel, so the pair is GEMM call + one FusedKernel. Legality and the
    kernel itself come from the fusion engine (`passes/fuse.py`, `runtime/kernel.py`)."""
    from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

    from passlab.passes.fuse import Grouper, to_kernels

    groups, grouper = [], Grouper(gm, 64)
    for gemm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in GEMMS]:
        passed = []
        nxt = sole_user_through_views(gemm, passed)
        t = passed[-1] if passed else gemm
        silu = decomposed_silu(t)
        if silu is not None:
            nodes = list(silu)
        elif nxt is not None and act_of(nxt) and nxt.args[0] is t:
            nodes = [nxt]
        else:
            continue
        after = users(nodes[-1])
        if len(after) == 1 and after[0].target in (aten.add.Tensor, aten.mul.Tensor):
            nodes.append(after[0])
        c.matched += 1
        if not grouper.legal(nodes):
            c.skip("epilogue_not_one_kernel")
            continue
        groups.append(nodes)
    if not groups:
        return gm, 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    gm = fuse_by_partitions(gm, [dict.fromkeys(sorted(g, key=order.get)) for g in groups], prefix="epilogue_")
    to_kernels(gm, "epilogue_")
    return gm, len(groups)


@register_pass("fuse_epilogue")
def fuse_epilogue(gm: torch.fx.GraphModule, ctx, *, residual: bool = True, kernels: bool = True,
                  onednn: bool = True) -> PassResult:
    """Fold bias and residual adds after a GEMM into addmm; CPU: GEMM + activation or
    residual as one oneDNN linear with a post-op (CUDA: Triton GEMM + epilogue)."""
    c, g = Counters(), gm.graph
    folded = {"bias": 0, "residual": 0}

    def fold_adds(counters, allow):
        for add in [n for n in g.nodes if n.op == "call_function" and n.target == aten.add.Tensor]:
            if not getattr(add, "_erased", False):
                kind = fold_add(g, add, counters, allow)
                if kind:
                    folded[kind] += 1
                    c.rewritten += 1

    bias_only = Counters()               # first pass: mm + b -> addmm, so templates see the bias
    fold_adds(bias_only, {"bias"})
    c.matched += bias_only.rewritten
    templates = 0
    if str(ctx.device).startswith("cuda"):
        for gemm in [n for n in g.nodes if n.op == "call_function" and n.target in GEMMS]:
            if template_for(g, gemm, c):
                templates += 1
                c.rewritten += 1
    fused = {"linear": 0, "binary": 0}
    if onednn and not str(ctx.device).startswith("cuda") and onednn_available(ctx.device):
        for gemm in [n for n in g.nodes if n.op == "call_function" and n.target in GEMMS]:
            kind = onednn_linear(gm, gemm, c, residual)
            if kind:
                fused[kind] += 1
                c.rewritten += 1
    fold_adds(c, {"bias", "residual"} if residual else {"bias"})
    epilogues = 0
    if kernels and not str(ctx.device).startswith("cuda"):
        g.lint()
        gm.recompile()
        propagate(gm)
        gm, epilogues = cpu_epilogues(gm, c)
        g = gm.graph
        c.rewritten += epilogues
    activations = sum(1 for n in g.nodes if n.op == "call_function" and n.target in ACTIVATIONS
                      and gemm_behind(n.args[0])[0] is not None)
    if c.rewritten:
        g.lint()
        gm.recompile()
        propagate(gm)
    return PassResult(gm, changed=c.rewritten > 0,
                      stats=c.as_dict(bias_folded=folded["bias"], residual_folded=folded["residual"],
                                      gemm_templates=templates, epilogue_kernels=epilogues,
                                      onednn_linear=fused["linear"], onednn_binary=fused["binary"],
                                      activations_after_gemm=activations))
