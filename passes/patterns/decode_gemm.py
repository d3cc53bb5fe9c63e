"""`decode_gemm`: a GEMM of a few rows by a constant weight (the decode step of a
language model) -> the C++ decode-GEMM template (`runtime/codegen/cpp_gemv.py`),
with a bias and a following residual add folded in:

    mm(x, permute(W)) | addmm(b, x, permute(W))  [-> views] [-> + r]
        -> DecodeGemm(x, W, b, r)                [-> view]

x has at most 8 rows (static), W is a constant [N, K] weight (a Linear's own
layout; any other constant [K, N] operand is transposed once into a new
buffer), one float dtype, CPU. At each shape the template is timed against
ATen's GEMM (`autotune.fastest`) and used only where it measured faster.

A MoE decode step's grouped expert GEMM goes the same way:

    _grouped_mm | passlab::grouped_mm (x, permute(W, [0, 2, 1]), offs) -> DecodeGroupedGemm(x, W, offs)

x has at most 8 rows in all, W is the experts' constant [E, N, K] weight (what
`group_experts` and HF's grouped experts pass, transposed by a view); each
expert's rows run through the template, timed against the grouped GEMM with the
rows spread over the experts as a top-k router spreads them.
"""
from __future__ import annotations

import torch
import torch.fx

from passlab.passes import PassResult, register_pass
from passlab.runtime import autotune, ops  # noqa: F401  (ops: registers passlab::grouped_mm)
from passlab.runtime.codegen import cpp_gemv

from .onednn import onednn_weight
from ..vocabulary import Counters, Skip, aten, constant_of, erase_dead, gemm_operands, residual_of, shape


def match(gemm: torch.fx.Node, device: str):
    ops = gemm_operands(gemm)
    if ops is None or gemm.target == aten.bmm.default:
        raise Skip("not_a_matrix_gemm")
    x, wt, b = ops
    out = gemm.meta["val"]
    if out.device.type != "cpu" or not str(device).startswith("cpu"):
        raise Skip("not_cpu")
    M, N = out.shape
    if M > cpp_gemv.MAX_ROWS:
        raise Skip("too_many_rows")
    if out.dtype not in cpp_gemv.DTYPES or {x.meta["val"].dtype, wt.meta["val"].dtype} != {out.dtype}:
        raise Skip("dtype")
    if b is not None and (b.meta["val"].dim() != 1 or b.meta["val"].dtype != out.dtype):
        raise Skip("bias_not_1d")
    if x.meta["val"].stride(-1) != 1:
        raise Skip("input_rows_strided")
    return x, wt, b


def template_faster(M: int, N: int, K: int, dtype, bias: bool, residual: bool) -> bool:
    """The template against ATen's GEMM (+ add) at this shape, timed once per shape."""
    x, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    r = torch.randn(M, N, dtype=dtype) if residual else None
    kernel = cpp_gemv.DecodeGemm(bias, residual)
    candidates = {"template": lambda: kernel(x, w, b, r), "aten": lambda: cpp_gemv.reference(x, w, b, r)}
    key = ("decode_gemm", M, N, K, dtype, bias, residual)
    with torch.no_grad():
        return autotune.fastest(key, candidates) == "template"


GROUPED = {torch.ops.passlab.grouped_mm.default} | (
    {aten._grouped_mm.default} if hasattr(aten, "_grouped_mm") else set())


def match_grouped(node: torch.fx.Node, gm, device: str):
    """(x, the constant [E, N, K] weight node, offs) of a decode-shaped grouped GEMM."""
    if node.target not in GROUPED:
        raise Skip("not_grouped")
    x, wt, offs = node.args[:3]
    out = node.meta["val"]
    if out.device.type != "cpu" or not str(device).startswith("cpu"):
        raise Skip("not_cpu")
    if x.meta["val"].dim() != 2 or out.shape[0] > cpp_gemv.MAX_ROWS:
        raise Skip("too_many_rows")
    if out.dtype not in cpp_gemv.DTYPES or x.meta["val"].dtype != out.dtype or offs.meta["val"].dtype != torch.int32:
        raise Skip("dtype")
    if not (wt.op == "call_function" and wt.target == aten.permute.default and list(wt.args[1]) == [0, 2, 1]):
        raise Skip("weight_not_transposed_view")
    w = constant_of(gm, wt.args[0])
    if w is None or w.dim() != 3 or not w.is_contiguous():
        raise Skip("weight_not_constant")
    return x, wt.args[0], offs


def grouped_template_faster(S: int, E: int, N: int, K: int, dtype) -> bool:
    """The per-expert template against the grouped GEMM at this shape, rows
    spread over distinct experts as a router spreads a decode step's tokens."""
    x, w = torch.randn(S, K, dtype=dtype), torch.randn(E, N, K, dtype=dtype)
    counts = torch.bincount(torch.arange(S) % E, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    kernel = cpp_gemv.DecodeGroupedGemm()
    candidates = {"template": lambda: kernel(x, w, offs), "aten": lambda: cpp_gemv.grouped_reference(x, w, offs)}
    with torch.no_grad():
        return autotune.fastest(("decode_grouped_gemm", S, E, N, K, dtype), candidates) == "template"


def rewrite_grouped(gm, node, c: Counters, device: str, choose: str) -> bool:
    found = c.attempt(match_grouped, node, gm, device, not_candidates=("not_grouped", "too_many_rows"))
    if found is None:
        return False
    x, w, offs = found
    S, K = shape(x)
    E, N, _ = shape(w)
    if choose == "measure" and not grouped_template_faster(S, E, N, K, node.meta["val"].dtype):
        c.skip("aten_measured_faster", nodes=[node])
        return False
    g = gm.graph
    with g.inserting_before(node):
        new = g.call_function(cpp_gemv.DecodeGroupedGemm(), (x, w, offs))
    new.meta.update(node.meta)
    new.meta["fused_from"] = [node.name]
    wt = node.args[1]
    node.replace_all_uses_with(new)
    erase_dead(g, [node, wt])
    return True


@register_pass("decode_gemm")
def decode_gemm(gm: torch.fx.GraphModule, ctx, *, choose: str = "measure") -> PassResult:
    """GEMMs of <= 8 rows by a constant weight (+ bias, + residual) -> the C++ decode-GEMM template."""
    if choose not in ("measure", "always"):
        raise ValueError(f"choose must be 'measure' or 'always', got {choose!r}")
    c, g = Counters(), gm.graph
    residuals = 0
    for gemm in [n for n in g.nodes if n.op == "call_function" and n.target in (aten.mm.default, aten.addmm.default)]:
        found = c.attempt(match, gemm, ctx.device, not_candidates=("not_a_matrix_gemm", "too_many_rows"))
        if found is None:
            continue
        x, wt, b = found
        M, N = shape(gemm)
        passed: list = []
        res, add = residual_of(gemm, passed)
        if res is not None and not res.meta["val"].is_contiguous():
            res, add = None, None
        dt = gemm.meta["val"].dtype
        if choose == "measure" and not template_faster(M, N, x.meta["val"].shape[1], dt, b is not None,
                                                        res is not None):
            c.skip("aten_measured_faster", nodes=[gemm])
            continue
        w = onednn_weight(gm, gemm, wt)          # the [N, K] weight (a Linear's own, or a transposed copy)
        if w is None:
            c.skip("weight_not_constant")
            continue
        last = add if res is not None else gemm
        with g.inserting_before(last):
            r2 = None
            if res is not None:
                r2 = res if shape(res) == (M, N) else g.call_function(aten.view.default, (res, [M, N]))
            node = g.call_function(cpp_gemv.DecodeGemm(b is not None, res is not None), (x, w, b, r2))
            node.meta["fused_from"] = [n.name for n in [gemm] + (passed + [add] if res is not None else [])]
            out = node if shape(last) == (M, N) else g.call_function(aten.view.default, (node, list(shape(last))))
        for n in (node, r2):       # later matches read shapes before the pass ends (api.finish)
            if n is not None and "val" not in n.meta:
                n.meta["val"] = gemm.meta["val"]
        out.meta["val"] = last.meta["val"]
        last.replace_all_uses_with(out)
        erase_dead(g, [last] + passed[::-1] + [gemm, wt])
        c.rewritten += 1
        residuals += res is not None
    grouped = 0
    for n in [n for n in g.nodes if n.op == "call_function"]:
        if n.target in GROUPED:
            grouped += rewrite_grouped(gm, n, c, ctx.device, choose)
    c.rewritten += grouped
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(residual_folded=residuals, grouped=grouped))
