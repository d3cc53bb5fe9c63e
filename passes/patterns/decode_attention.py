"""`decode_attention`: attention of a few query rows (a decode step) over a
key/value cache -> two batched GEMMs with the query heads of each key/value
head stacked as rows, no copy of the cache:

    scaled_dot_product_attention(q [B, H, L, D], k [B, G, S, D], v, mask, scale, enable_gqa)
        -> s = bmm(q.view(B*G, R*L, D), k.view(B*G, S, D)^T) * scale    (R = H / G)
           s = s.view(B, H, L, S) + mask        (or where(mask, s, -inf))
           p = softmax(s.float(), -1).to(q.dtype)
           out = bmm(p.view(B*G, R*L, S), v.view(B*G, S, D)).view(B, H, L, D)

With one query row per head, the CPU SDPA kernels (flash, with an explicit
mask) spend most of their time on per-head overhead (measured on llama_decode,
Zen 4, bf16: 360 us per call against about 50 us for this form), and written-out
attention with `repeat_kv` copies the cache once per call. Here the R query heads
that share a key/value head are the rows of one GEMM over that head's keys, so
the cache is read once, in place. Keys and values that reach the SDPA through
`repeat_kv` (unsqueeze-expand-reshape: a copy of the cache per query head, what
Hugging Face's sdpa attention passes where it does not ask for `enable_gqa`)
are read before that copy, and the copy is gone. Legal for L <= 8 rows, no dropout, not
`is_causal` (a decode step's mask is explicit), 4-D contiguous q, keys and
values whose (batch, head) dims merge into one, and H a multiple of G. At each
shape it is timed against SDPA (`autotune`) and used only where faster
(`choose=always` rewrites every match).
"""
from __future__ import annotations

import torch
import torch.fx

from passlab.passes import PassResult, register_pass
from passlab.runtime import autotune

from ..vocabulary import Counters, Skip, aten, erase_dead, passes_value
from .attention import unrepeat

SDPA = aten.scaled_dot_product_attention.default
MAX_ROWS = 8
ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def arguments(n: torch.fx.Node) -> dict:
    a = dict(DEFAULTS)
    a.update(zip(ARGS, n.args))
    a.update(n.kwargs)
    return a


def mergeable(t) -> bool:
    """Batch and head dims of a [B, G, S, D] tensor merge into one (a view), rows contiguous."""
    return t.stride(-1) == 1 and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))


def match(n: torch.fx.Node) -> dict:
    a = arguments(n)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qv, kv, vv = (x.meta["val"] for x in (q, k, v))
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise Skip("not_4d")
    B, H, L, D = qv.shape
    G, S = kv.shape[1], kv.shape[2]
    if L > MAX_ROWS:
        raise Skip("not_decode")
    repeated = (k, v)
    if G == H:          # repeat_kv's copies: read the cache before them
        k0, v0 = unrepeat(k, tuple(kv.shape)), unrepeat(v, tuple(vv.shape))
        if k0 is not None and v0 is not None and k0.meta["val"].shape[1] == v0.meta["val"].shape[1]:
            k, v = k0, v0
            kv, vv = k.meta["val"], v.meta["val"]
            G = kv.shape[1]
    if a["dropout_p"] != 0.0 or a["is_causal"]:
        raise Skip("dropout_or_causal")
    if H % G or vv.shape[1] != G or kv.shape[0] != B or vv.shape[0] != B or vv.shape[2] != S:
        raise Skip("heads")
    if not qv.is_contiguous() or not mergeable(kv) or not mergeable(vv):
        raise Skip("layout")
    if len({qv.dtype, kv.dtype, vv.dtype}) != 1 or not qv.dtype.is_floating_point:
        raise Skip("dtype")
    if mask is not None:
        mv = mask.meta["val"]
        try:
            fits = mv.dim() <= 4 and torch.broadcast_shapes(tuple(mv.shape), (B, H, L, S)) == (B, H, L, S)
        except RuntimeError:
            fits = False
        if not fits:
            raise Skip("mask_shape")
    scale = a["scale"] if a["scale"] is not None else D ** -0.5
    return dict(q=q, k=k, v=v, mask=mask, scale=float(scale), B=B, H=H, L=L, D=D, G=G, S=S,
                repeated=[x for x in repeated if x not in (k, v)])


def explicit(q, k, v, mask, scale, B, H, L, D, G, S):
    """The rewrite's computation, eagerly: what the graph runs (and what is timed)."""
    R = H // G
    s = torch.bmm(q.reshape(B * G, R * L, D), k.reshape(B * G, S, D).transpose(1, 2)) * scale
    s = s.view(B, H, L, S)
    if mask is not None:
        s = torch.where(mask, s, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return torch.bmm(p.view(B * G, R * L, S), v.reshape(B * G, S, D)).view(B, H, L, D)


def explicit_faster(m: dict, device: str) -> bool:
    qv, kv, mv = m["q"].meta["val"], m["k"].meta["val"], m["mask"].meta["val"] if m["mask"] is not None else None
    dt = qv.dtype
    q, k, v = (torch.randn(tuple(t.shape), dtype=dt, device=device) for t in (qv, kv, m["v"].meta["val"]))
    mask = None
    if mv is not None:
        mask = torch.rand(tuple(mv.shape), device=device) > 0.3 if mv.dtype == torch.bool else \
            torch.zeros(tuple(mv.shape), dtype=mv.dtype, device=device)
    dims = {k_: m[k_] for k_ in ("B", "H", "L", "D", "G", "S")}
    gqa = m["H"] != m["G"]
    candidates = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=m["scale"],
                                                                         enable_gqa=gqa),
        "explicit": lambda: explicit(q, k, v, mask, m["scale"], **dims),
    }
    key = ("decode_attention", tuple(qv.shape), tuple(kv.shape), dt, None if mv is None else (tuple(mv.shape), mv.dtype),
           device)
    with torch.no_grad():
        return autotune.fastest(key, candidates, device=device) == "explicit"


def rewrite(g: torch.fx.Graph, n: torch.fx.Node, m: dict) -> None:
    B, H, L, D, G, S = (m[x] for x in ("B", "H", "L", "D", "G", "S"))
    R, dt = H // G, m["q"].meta["val"].dtype
    c = g.call_function
    with g.inserting_before(n):
        qg = c(aten.view.default, (m["q"], [B * G, R * L, D]))
        kg = c(aten.view.default, (m["k"], [B * G, S, D]))
        kt = c(aten.permute.default, (kg, [0, 2, 1]))
        s = c(aten.mul.Tensor, (c(aten.bmm.default, (qg, kt)), m["scale"]))
        s = c(aten.view.default, (s, [B, H, L, S]))
        mask = m["mask"]
        if mask is not None:
            if mask.meta["val"].dtype == torch.bool:
                s = c(aten.where.ScalarOther, (mask, s, float("-inf")))
            else:
                s = c(aten.add.Tensor, (s, mask))
        p = c(aten._to_copy.default, (s,), {"dtype": torch.float32})
        p = c(aten._softmax.default, (p, -1, False))
        p = c(aten._to_copy.default, (p,), {"dtype": dt})
        p = c(aten.view.default, (p, [B * G, R * L, S]))
        vg = c(aten.view.default, (m["v"], [B * G, S, D]))
        out = c(aten.view.default, (c(aten.bmm.default, (p, vg)), [B, H, L, D]))
    n.replace_all_uses_with(out)
    g.erase_node(n)
    erase_dead(g, m["repeated"], upstream=lambda x: passes_value(x) or x.target == aten.expand.default)


@register_pass("decode_attention")
def decode_attention(gm: torch.fx.GraphModule, ctx, *, choose: str = "measure") -> PassResult:
    """SDPA with <= 8 query rows (decode) -> grouped-head bmm + softmax + bmm over the cache in place."""
    if choose not in ("measure", "always"):
        raise ValueError(f"choose must be 'measure' or 'always', got {choose!r}")
    c, g = Counters(), gm.graph
    for n in [n for n in g.nodes if n.op == "call_function" and n.target == SDPA]:
        m = c.attempt(match, n, not_candidates=("not_decode",))      # prefill attention is not a candidate
        if m is None:
            continue
        if choose == "measure" and not explicit_faster(m, ctx.device):
            c.skip("sdpa_measured_faster", nodes=[n])
            continue
        rewrite(g, n, m)
        c.rewritten += 1
    return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict())
