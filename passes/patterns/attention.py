"""`fuse_attention`: written-out attention -> `aten.scaled_dot_product_attention`.

The pattern is the ordinary PyTorch function

    s = (q @ k.transpose(-2, -1)) * scale          # or / d, or no scale
    s = s.masked_fill(~keep, -inf)                  # or where(...), or s + additive_mask, or no mask
    p = softmax(s.float(), dim=-1).to(q.dtype)      # the casts are optional
    p = dropout(p)                                  # eval: a clone
    out = p @ v                                     # k, v possibly repeat_interleave'd (GQA)

as it looks after capture: `bmm` on views (expand / clone / _unsafe_view
around q, kᵀ, v), a scalar mul/div, `where` / `masked_fill` / `add`,
`_softmax`, maybe `_to_copy` casts, `bmm`. The matcher walks from every
`_softmax` node out to both bmms and proves what SDPA assumes: the scale is a
Python number, the softmax runs over the last dim, the mask broadcasts to the
scores without changing their shape, fills with -inf (or adds), every
intermediate is used only by the next op, and q, k, v share a dtype. Anything
it cannot prove is left alone and counted as `skipped[reason]`.

A mask built from constants only (a registered tril buffer, or Hugging Face's
mask computed from `arange`) is evaluated once at compile time; when it is
exactly causal it is dropped for `is_causal=True`, which lets the flash kernels
skip the masked blocks. Grouped-query head repeats (`expand` of an unsqueezed
k / v, then a reshape) are undone for `enable_gqa=True`. At run time the aten
op picks its kernel: flash attention for CPU, flash / memory-efficient on GPU.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.node import map_arg

from passlab.passes import PassResult, register_pass
from passlab.runtime import autotune

from ..vocabulary import (Counters, Skip, aten, constant_of, erase_dead, expands_nothing, is_cast, passes_value, shape,
                          through_views, users)

SDPA = aten.scaled_dot_product_attention.default
SCALES = {aten.mul.Tensor: lambda c: c, aten.div.Tensor: lambda c: 1.0 / c}
NOT_OPS = {aten.bitwise_not.default, aten.logical_not.default}
CONSTANT_LIMIT = 256    # nodes evaluated to prove a mask causal
DECODE_ROWS = 8         # query rows up to which `decode_attention` (after this pass) takes the SDPA on


def reshape_like(n) -> bool:
    """Ops that keep the elements in logical order (a chain of them is one reshape):
    the vocabulary's reshapes and plain copies, and an expand that expands nothing."""
    return passes_value(n) or expands_nothing(n)


def peel(n):
    return through_views(n, passes=reshape_like)[0]


def through_reshapes(n, want: tuple):
    """The deepest node of shape `want` that reshapes to `n`, or None."""
    producer, passed = through_views(n, passes=reshape_like)
    return next((x for x in reversed(passed + [producer]) if shape(x) == want), None)


def scalar_value(gm, x):
    """A Python number, or the value of a scalar_tensor / 0-d full node / one-element
    constant (what constant folding leaves), else None."""
    if isinstance(x, numbers.Number) and not isinstance(x, bool):
        return float(x)
    t = constant_of(gm, x)
    if t is not None and t.numel() == 1 and t.dtype.is_floating_point:
        return float(t.item())
    if isinstance(x, torch.fx.Node) and x.op == "call_function":
        if x.target == aten.scalar_tensor.default:
            return float(x.args[0])
        if x.target == aten.full.default and list(x.args[0]) in ([], [1]):
            return float(x.args[1])
    return None


@dataclass
class Match:
    bmm1: torch.fx.Node
    bmm2: torch.fx.Node
    softmax: torch.fx.Node
    chain: list                     # bmm1 ... bmm2 (exclusive), each must have one user
    scale: float = 1.0
    mask: torch.fx.Node | None = None
    mask_kind: str = "none"         # none | additive | keep (bool, True = attend) | drop (bool, True = masked)
    mask_nodes: list = field(default_factory=list)   # what only the mask used (erased if dead)
    q: torch.fx.Node | None = None
    k: torch.fx.Node | None = None
    v: torch.fx.Node | None = None
    gqa: bool = False
    is_causal: bool = False


def scores_chain(x):
    """From a node back to bmm1 through reshapes and at most one scalar scale:
    (bmm1, scale, nodes passed) or None when there is no bmm (not attention)."""
    nodes, scale, cur = [], None, x
    while True:
        while reshape_like(cur):
            nodes.append(cur)
            cur = cur.args[0]
        if cur.op == "call_function" and cur.target in SCALES and scale is None:
            a, b = cur.args
            if cur.target == aten.mul.Tensor and isinstance(a, (numbers.Number, torch.fx.Node)) \
                    and not (isinstance(a, torch.fx.Node) and peel(a).target == aten.bmm.default):
                a, b = b, a
            if not isinstance(a, torch.fx.Node):
                return None
            nodes.append(cur)
            scale = (cur, b)
            cur = a
            continue
        if cur.op == "call_function" and cur.target == aten.bmm.default:
            return cur, scale, nodes
        return None


def split_mask(x):
    """(scores node, mask node, kind, fill) for the masking op at `x`, or (x, None, 'none', None)."""
    t, a = x.target, x.args
    if t == aten.add.Tensor and all(isinstance(y, torch.fx.Node) for y in a):
        if scores_chain(a[0]):
            return a[0], a[1], "additive", None
        if scores_chain(a[1]):
            return a[1], a[0], "additive", None
    if t == aten.where.self:
        cond, yes, no = a
        if isinstance(no, torch.fx.Node) and scores_chain(no):
            return no, cond, "drop", yes
        if isinstance(yes, torch.fx.Node) and scores_chain(yes):
            return yes, cond, "keep", no
    if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and scores_chain(a[0]):
        return a[0], a[1], "drop", a[2]
    return x, None, "none", None


def match(gm, sm: torch.fx.Node) -> Match:
    x = sm.args[0]
    upcast = None
    if is_cast(x):
        upcast, x = x, x.args[0]
    scores, mask, kind, fill = split_mask(x)
    found = scores_chain(scores)
    if found is None:
        raise Skip("not_attention")
    bmm1, scale_op, pre = found
    # forward from the softmax to the second bmm
    post, cur = [], sm
    while True:
        us = users(cur)
        if len(us) != 1:
            raise Skip("probs_used_elsewhere" if us else "not_attention")
        nxt = us[0]
        if nxt.target == aten.bmm.default and nxt.args[0] is cur:
            bmm2 = nxt
            break
        if not (reshape_like(nxt) or is_cast(nxt)):
            raise Skip("not_attention")
        post.append(nxt)
        cur = nxt
    chain = [bmm1] + pre[::-1] + ([x] if mask is not None else []) + ([upcast] if upcast else []) + [sm] + post
    m = Match(bmm1, bmm2, sm, chain)
    # --- the proofs
    s4 = x if mask is None else scores
    if len(shape(sm)) != 4:
        raise Skip("not_4d")
    if sm.args[1] not in (-1, 3) or sm.args[2]:
        raise Skip("softmax_dim" if sm.args[1] not in (-1, 3) else "half_to_float")
    B, H, L, S = shape(sm)
    if scale_op is not None:
        node, c = scale_op
        if not isinstance(c, numbers.Number) or isinstance(c, bool):
            raise Skip("scale_not_constant")
        if c == 0:
            raise Skip("scale_zero")
        m.scale = SCALES[node.target](float(c))
    if mask is not None:
        prove_mask(gm, m, mask, kind, fill, shape(s4))
    if shape(s4) != (B, H, L, S):
        raise Skip("scores_shape")
    if any(len(users(n)) != 1 for n in chain):
        raise Skip("intermediate_used_elsewhere")
    # q, kᵀ, v behind their views
    E = shape(bmm1.args[0])[-1]
    Ev = shape(bmm2)[-1]
    q = through_reshapes(bmm1.args[0], (B, H, L, E))
    kt = through_reshapes(bmm1.args[1], (B, H, E, S))
    v = through_reshapes(bmm2.args[1], (B, H, S, Ev))
    if q is None or kt is None or v is None:
        raise Skip("operand_layout")
    if kt.target == aten.permute.default and list(kt.args[1]) == [0, 1, 3, 2]:
        k = kt.args[0]
    elif kt.target == aten.transpose.int and sorted(d % 4 for d in kt.args[1:]) == [2, 3]:
        k = kt.args[0]
    else:
        raise Skip("key_not_transposed")
    k = through_reshapes(k, (B, H, S, E)) or k
    dt = q.meta["val"].dtype
    if k.meta["val"].dtype != dt or v.meta["val"].dtype != dt or bmm2.meta["val"].dtype != dt:
        raise Skip("dtype")
    if upcast is not None and not any(is_cast(n) and n.kwargs.get("dtype") == dt for n in post):
        raise Skip("softmax_cast_not_undone")
    m.q, m.k, m.v = q, k, v
    # grouped-query heads
    kk, vv = unrepeat(k, (B, H, S, E)), unrepeat(v, (B, H, S, Ev))
    if kk is not None and vv is not None and shape(kk)[1] == shape(vv)[1]:
        m.k, m.v, m.gqa = kk, vv, True
    return m


def prove_mask(gm, m: Match, mask, kind, fill, scores_shape):
    if not isinstance(mask, torch.fx.Node) or "val" not in mask.meta:
        raise Skip("mask_not_tensor")
    mval = mask.meta["val"]
    if mval.dim() > 4:
        raise Skip("mask_shape")
    try:
        if tuple(torch.broadcast_shapes(mval.shape, scores_shape)) != scores_shape:
            raise Skip("mask_shape")
    except RuntimeError:
        raise Skip("mask_shape") from None
    if kind == "additive":
        if not mval.dtype.is_floating_point:
            raise Skip("mask_dtype")
    else:
        if mval.dtype != torch.bool:
            raise Skip("mask_dtype")
        if scalar_value(gm, fill) != -math.inf:
            raise Skip("mask_fill_not_neg_inf")
        if isinstance(fill, torch.fx.Node):
            m.mask_nodes.append(fill)
        if kind == "drop" and mask.target in NOT_OPS:
            m.mask_nodes.append(mask)
            mask, kind = mask.args[0], "keep"
    m.mask, m.mask_kind = mask, kind
    value, ancestors = constant_value(gm, mask)
    if value is not None and causal(value, kind, scores_shape):
        m.is_causal, m.mask_nodes = True, m.mask_nodes + ancestors


def causal(value: torch.Tensor, kind: str, shp) -> bool:
    L, S = shp[-2:]
    want = torch.ones(L, S, dtype=torch.bool).tril()
    v = torch.broadcast_to(value, shp)
    if kind == "additive":
        masked = v <= torch.finfo(v.dtype).min / 2
        if not bool(((v == 0) | masked).all()):
            return False
        keep = v == 0
    else:
        keep = v if kind == "keep" else ~v
    return bool((keep == want).all())


def constant_value(gm, node):
    """Evaluate `node` when it depends on constants only: (tensor, nodes evaluated) or (None, [])."""
    seen, stack = {}, [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op == "placeholder" or len(seen) > CONSTANT_LIMIT:
            return None, []
        if n.op == "call_function" and (any(w in str(n.target) for w in ("rand", "empty")) or not isinstance(n.target, torch._ops.OpOverload)):
            return None, []
        seen[n] = None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    env = {}
    for n in sorted(seen, key=order.__getitem__):
        if n.op == "get_attr":
            env[n] = constant_of(gm, n)
            if env[n] is None:
                return None, []
        elif n.op == "call_function":
            env[n] = n.target(*map_arg(n.args, env.__getitem__), **map_arg(n.kwargs, env.__getitem__))
        else:
            return None, []
    out = env[node]
    return (out, list(seen)) if isinstance(out, torch.Tensor) else (None, [])


def unrepeat(x, want):
    """k / v before `repeat_interleave(rep, dim=1)` written as unsqueeze(2)-expand-reshape, or None."""
    B, H = want[:2]
    e = peel(x)
    if e.target != aten.expand.default:
        return None
    es = shape(e)
    if len(es) != 5 or es[0] != B or es[1] * es[2] != H or es[3:] != want[2:]:
        return None
    if shape(e.args[0]) != (B, es[1], 1, *want[2:]):
        return None
    return through_reshapes(e.args[0], (B, es[1], *want[2:]))


def rewrite(gm, m: Match) -> None:
    g = gm.graph
    B, H, L, S = shape(m.softmax)
    Ev = shape(m.bmm2)[-1]
    dt = m.q.meta["val"].dtype
    with g.inserting_before(m.bmm2):
        mask = None
        if m.mask is not None and not m.is_causal:
            mask = m.mask
            if m.mask_kind == "drop":
                mask = g.call_function(aten.logical_not.default, (mask,))
            elif m.mask_kind == "additive" and mask.meta["val"].dtype != dt:
                mask = g.call_function(aten._to_copy.default, (mask,), {"dtype": dt})
        out = g.call_function(SDPA, (m.q, m.k, m.v, mask, 0.0, m.is_causal),
                              {"scale": m.scale, **({"enable_gqa": True} if m.gqa else {})})
        out.meta["fused_from"] = [n.name for n in m.chain + [m.bmm2]]
        rest = []
        for u in users(m.bmm2):
            if u.target in (aten.view.default, aten._unsafe_view.default) and shape(u) == (B, H, L, Ev):
                u.replace_all_uses_with(out)
            else:
                rest.append(u)
        if rest:  # the kernel's output may not be contiguous: reshape, not view
            flat = g.call_function(aten.reshape.default, (out, [B * H, L, Ev]))
            for u in rest:
                u.replace_input_with(m.bmm2, flat)
    operands = [n for a in (*m.bmm1.args, m.bmm2.args[1]) for n in producers(a)]
    erase_dead(g, list(m.bmm2.users) + [m.bmm2] + m.chain[::-1] + operands + m.mask_nodes)


def producers(n, depth: int = 16) -> list:
    """`n` and the single-input ops it was made from (views, permutes, expands):
    candidates for erasure once the bmms that read them are gone."""
    out = []
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and depth:
        out.append(n)
        if len(n.all_input_nodes) != 1:
            break
        n, depth = n.all_input_nodes[0], depth - 1
    return out


def explicit_is_faster(m: Match, device: str) -> bool:
    """Time SDPA against the written-out chain at this match's shapes and mask
    kind (once per shape, cached): on some CPUs (Zen 4, bf16) oneDNN's bmm +
    softmax beats the CPU flash kernel, and with one query row (decoding) and
    an explicit mask the flash kernel costs several times the two bmms. Small
    shapes are timed too: there the per-call cost decides, and it differs."""
    q, k, v = (x.meta["val"] for x in (m.q, m.k, m.v))
    B, H, L, E = q.shape
    if L <= DECODE_ROWS:        # a decode step: `decode_attention` turns the SDPA into its grouped-head form
        return False
    dt = q.dtype
    Q, K, V = (torch.randn(t.shape, dtype=dt, device=device) for t in (q, k, v))
    bias = torch.zeros(L, k.shape[-2], dtype=dt, device=device)
    if m.is_causal or m.mask is not None:
        bias = torch.full((L, k.shape[-2]), float("-inf"), dtype=dt, device=device).triu(1)
    explicit_mask = m.mask is not None and not m.is_causal      # the rewrite passes it as attn_mask
    rep = H // K.shape[1]
    Ke, Ve = (K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)) if rep > 1 else (K, V)
    F = torch.nn.functional
    candidates = {
        "sdpa": lambda: F.scaled_dot_product_attention(Q, K, V, attn_mask=bias if explicit_mask else None,
                                                       is_causal=m.is_causal, scale=m.scale, enable_gqa=rep > 1),
        "explicit": lambda: torch.softmax((Q @ Ke.transpose(-2, -1)) * m.scale + bias, -1) @ Ve,
    }
    key = ("attention", tuple(q.shape), tuple(k.shape), dt, m.is_causal, explicit_mask, device)
    with torch.no_grad():
        return autotune.fastest(key, candidates, device=device) == "explicit"


@register_pass("fuse_attention")
def fuse_attention(gm: torch.fx.GraphModule, ctx, *, choose: str = "measure") -> PassResult:
    """Rewrite matmul-scale-mask-softmax-matmul into scaled_dot_product_attention.

    `choose=measure` (default) keeps the written-out chain where it measured
    faster at the match's shapes on this machine; `choose=always` rewrites
    every proven match."""
    if choose not in ("measure", "always"):
        raise ValueError(f"choose must be 'measure' or 'always', got {choose!r}")
    c, causal_n, gqa_n, other = Counters(), 0, 0, 0
    for sm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten._softmax.default]:
        if getattr(sm, "_erased", False):
            continue
        try:
            m = match(gm, sm)
        except Skip as e:
            if str(e) == "not_attention":   # a softmax elsewhere (MoE router): not a candidate
                other += 1
            else:
                c.matched += 1
                c.skip(str(e), nodes=[sm])
            continue
        c.matched += 1
        if choose == "measure" and explicit_is_faster(m, ctx.device):
            c.skip("explicit_measured_faster", nodes=[sm])
            continue
        rewrite(gm, m)
        c.rewritten += 1
        causal_n += m.is_causal
        gqa_n += m.gqa
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(causal=causal_n, gqa=gqa_n, softmax_not_attention=other))
