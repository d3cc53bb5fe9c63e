"""Bias and residual adds after a GEMM, folded into addmm's C operand:

    mm(x, w) + b                 -> addmm(b, x, w)                 (bias folded)
    mm(x, w) + r                 -> addmm(r, x, w)                 (residual is the C operand)
    addmm(b, x, w) + r           -> addmm(r + b, x, w)

also with a view between the GEMM and the add (a 3-D linear), the view's
sizes bound as a free literal and handed to the replacement. The BLAS call
accumulates into C (beta = 1), so the separate pass over the output that the
add made disappears. Each rule is a pattern and a replacement written as
PyTorch functions (`Rewrite`, as `register_rewrite` makes them), the four in
one rule table (`Rules`); `fold_kind` is the legality they share: the add does
not broadcast the GEMM result (the residual has the output's shape, the bias
one row), the dtypes agree.
"""
from __future__ import annotations

import torch

from .rewrite import Rewrite, Rules
from ..vocabulary import Counters, Skip

X, W, B, R = (5, 8), (8, 6), (6,), (5, 6)     # example shapes the patterns are traced at
SIZES, R3 = (1, 5, 6), (1, 5, 6)               # the view's sizes: bound per match


def c_operand(y, rows: int, cols: int):
    """y as addmm's C: a bias row stays 1-D, a residual becomes [rows, cols]."""
    if tuple(y.shape) in ((cols,), (rows, cols)):
        return y
    if y.dim() == 1 or (y.numel() == cols and y.shape[-1] == cols and y.shape != (rows, cols)):
        return y.reshape(cols)
    return y.reshape(rows, cols)


def mm_add(x, w, y):
    return torch.mm(x, w) + y


def mm_add_folded(x, w, y):
    return torch.addmm(c_operand(y, x.shape[0], w.shape[1]), x, w)


def mm_view_add(x, w, y, sizes=SIZES):
    return torch.mm(x, w).view(sizes) + y


def mm_view_add_folded(x, w, y, sizes=SIZES):
    return torch.addmm(c_operand(y, x.shape[0], w.shape[1]), x, w).view(sizes)


def addmm_add(b, x, w, y):
    return torch.addmm(b, x, w) + y


def addmm_add_folded(b, x, w, y):
    return torch.addmm(y.reshape(x.shape[0], w.shape[1]) + b, x, w)


def addmm_view_add(b, x, w, y, sizes=SIZES):
    return torch.addmm(b, x, w).view(sizes) + y


def addmm_view_add_folded(b, x, w, y, sizes=SIZES):
    return torch.addmm(y.reshape(x.shape[0], w.shape[1]) + b, x, w).view(sizes)


FOLDS = Rules("fold_adds", [
    Rewrite("fold_mm_add", mm_add, mm_add_folded, example_inputs=[X, W, R], casts=False),
    Rewrite("fold_mm_view_add", mm_view_add, mm_view_add_folded, example_inputs=[X, W, R3],
            free=("sizes",), casts=False),
    Rewrite("fold_addmm_add", addmm_add, addmm_add_folded, example_inputs=[B, X, W, R], casts=False),
    Rewrite("fold_addmm_view_add", addmm_view_add, addmm_view_add_folded, example_inputs=[B, X, W, R3],
            free=("sizes",), casts=False),
])


def fold_kind(m, allow: set) -> str:
    """'bias' or 'residual' for a matched GEMM + add, or raise Skip(reason)."""
    y, out = m.val("y"), m.outputs[0].meta["val"]
    x, w = m.val("x"), m.val("w")
    rows, cols = x.shape[0], w.shape[1]
    if y.dtype != out.dtype or x.dtype != out.dtype:
        raise Skip("dtype")
    gemm_shape = tuple(m.literals["sizes"]) if "sizes" in m.literals else (rows, cols)
    if tuple(out.shape) != gemm_shape:
        raise Skip("add_broadcasts_gemm_output")
    is_bias = y.dim() >= 1 and y.numel() == cols and y.shape[-1] == cols
    is_residual = tuple(y.shape) == tuple(out.shape)
    if is_bias and "b" not in m.inputs and (y.dim() == 1 or not is_residual) and "bias" in allow:
        return "bias"
    if is_residual and "residual" not in allow:
        raise Skip("residual_disabled")
    if is_residual:
        return "residual"
    raise Skip("not_bias_or_residual")


def fold_adds(gm, c: Counters, allow: set, folded: dict) -> int:
    """Apply the folds allowed (`bias`, `residual`) to `gm` in place; counts into
    `c` and `folded[kind]`; returns the rewrites made."""
    kinds = {}

    def check(m):
        try:
            kinds[id(m)] = fold_kind(m, allow)
        except Skip as e:
            return str(e)
        return None

    done = 0
    for _, m, reason in FOLDS.each(gm, check=check):
        c.count(reason)
        if not reason:
            folded[kinds[id(m)]] += 1
            done += 1
    return done

