"""A plugin package for passlab's tests, installed separately from passlab.

`recompose_silu` is a correct pass: it turns the decomposed `x * sigmoid(x)`
back into one `aten.silu`. `bad_pass` is deliberately wrong: it replaces GELU
by ReLU ("cheaper"), which changes numerics, so the pass manager must roll it
back and say why. The third entry point, `broken_plugin`, names a module that
does not exist: passlab must warn and go on.
"""
from __future__ import annotations

import torch

from passlab.passes import Pass, PassResult, register_pass
from passlab.passes.meta import propagate

aten = torch.ops.aten


@register_pass("recompose_silu")
def recompose_silu(gm, ctx):
    """Rewrite x * sigmoid(x) into one aten.silu (one op instead of two)."""
    matched = rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.mul.Tensor:
            continue
        a, b = node.args[:2]
        for x, s in ((a, b), (b, a)):
            if isinstance(s, torch.fx.Node) and s.target is aten.sigmoid.default and s.args[0] is x:
                matched += 1
                with gm.graph.inserting_before(node):
                    silu = gm.graph.call_function(aten.silu.default, (x,))
                node.replace_all_uses_with(silu)
                gm.graph.erase_node(node)
                if not s.users:
                    gm.graph.erase_node(s)
                rewritten += 1
                break
    if rewritten:
        gm.recompile()
        propagate(gm)
    return PassResult(gm, rewritten > 0, {"matched": matched, "rewritten": rewritten})


class CheaperGelu(Pass):
    """WRONG on purpose: replaces GELU by ReLU, which changes the model's output."""
    name = "bad_pass"
    description = "deliberately wrong test pass: GELU -> ReLU (must be rolled back)"

    def run(self, gm, ctx):
        n = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is aten.gelu.default:
                node.target, node.kwargs, n = aten.relu.default, {}, n + 1
        gm.recompile()
        return PassResult(gm, n > 0, {"rewritten": n})
