"""`fuse_epilogue`: what follows a GEMM goes into the GEMM call.

One driver, one module per rewrite:

1. `activations.py`  activations written out (x * sigmoid(x), the GELU formulas,
   also in their bf16 upcast form) back to one aten op, so the rules below see them;
2. `folds.py`        `mm + b -> addmm(b, ...)` first (so the later rules see the bias);
3. `gemm_template.py` CUDA (`ctx.device == "cuda"`): GEMM + bias + activation +
   residual -> one Triton GEMM-template node;
4. `onednn.py`       CPU with oneDNN (`onednn=true`, the default): GEMM + GELU /
   SiLU / ReLU -> `mkldnn._linear_pointwise`, GEMM + residual ->
   `mkldnn._linear_pointwise.binary(..., "add")`, one launch each;
5. `folds.py`        what is left: `mm/addmm + residual -> addmm(residual [+ b])`
   (`residual=false` keeps residual adds);
6. `epilogue_kernels.py` CPU: the activation after a GEMM (plus an add or mul reading
   it) -> one generated kernel (`kernels=false` leaves activations to `fuse`).

These rewrites are applied only where they are exact up to rounding order: the
add does not broadcast the GEMM result, the dtypes agree, and addmm has
alpha = beta = 1; views between the GEMM and what follows are looked through,
each must have no other user.
"""
from __future__ import annotations

import torch
import torch.fx

from ..api import PassResult
from ..meta import refresh
from ..registry import register_pass
from .activations import RECOMPOSE
from .epilogue_kernels import cpu_epilogues
from .folds import fold_adds
from .gemm_template import template_for
from .onednn import onednn_available, onednn_linear
from ..vocabulary import ACTIVATIONS, GEMMS, Counters, through_views

__all__ = ["fuse_epilogue", "onednn_available"]


def gemms(g: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in g.nodes if n.op == "call_function" and n.target in GEMMS and n.target != torch.ops.aten.bmm.default]


@register_pass("fuse_epilogue")
def fuse_epilogue(gm: torch.fx.GraphModule, ctx, *, residual: bool = True, kernels: bool = True,
                  onednn: bool = True) -> PassResult:
    """Fold bias and residual adds after a GEMM into addmm; CPU: GEMM + activation or
    residual as one oneDNN linear with a post-op (CUDA: Triton GEMM + epilogue)."""
    c, g = Counters(), gm.graph
    cuda = str(ctx.device).startswith("cuda")
    recomposed = sum(r["rewritten"] for r in RECOMPOSE.apply(gm).values())
    folded = {"bias": 0, "residual": 0}
    bias_only = Counters()               # first: mm + b -> addmm, so templates and oneDNN see the bias
    c.rewritten += fold_adds(gm, bias_only, {"bias"}, folded)
    c.matched += bias_only.rewritten
    templates = 0
    if cuda:
        for gemm in gemms(g):
            if template_for(g, gemm, c):
                templates += 1
                c.rewritten += 1
    fused = {"linear": 0, "binary": 0}
    if onednn and not cuda and onednn_available(ctx.device):
        for gemm in gemms(g):
            kind = onednn_linear(gm, gemm, c, residual)
            if kind:
                fused[kind] += 1
                c.rewritten += 1
    c.rewritten += fold_adds(gm, c, {"bias", "residual"} if residual else {"bias"}, folded)
    epilogues = 0
    if kernels and not cuda:
        refresh(gm)                      # the kernels below read the shapes of what the folds made
        epilogues = cpu_epilogues(gm, c)
        c.rewritten += epilogues
    activations = sum(1 for n in g.nodes if n.op == "call_function" and n.target in ACTIVATIONS
                      and through_views(n.args[0])[0].target in GEMMS)
    return PassResult(gm, changed=c.rewritten + recomposed > 0,
                      stats=c.as_dict(bias_folded=folded["bias"], residual_folded=folded["residual"],
                                      gemm_templates=templates, epilogue_kernels=epilogues,
                                      onednn_linear=fused["linear"], onednn_binary=fused["binary"],
                                      activations_after_gemm=activations, activations_recomposed=recomposed))
