"""`moe`: a stack of mixture-of-experts layers (router, softmax top-2 gating,
8 SwiGLU experts, weighted combine).

Dispatch is capacity-based so every shape is static and torch.export captures
it: each expert takes at most `capacity` assignments, in token order; the rest
are dropped (their contribution is zero), exactly as `reference()` does with a
plain loop over experts.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from .sample import Sample

PRESETS = {"tiny": dict(batch=2, seq=8, dim=16, ffn=32, experts=4, layers=2),
           "bench": dict(batch=4, seq=256, dim=512, ffn=1024, experts=8, layers=2)}
TOP_K, CAPACITY_FACTOR = 2, 1.25


def capacity(tokens, experts, top_k=TOP_K, factor=CAPACITY_FACTOR):
    return math.ceil(tokens * top_k / experts * factor)


class MoELayer(nn.Module):
    def __init__(self, dim, ffn, experts):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.router = nn.Linear(dim, experts, bias=False)
        self.w_gate = nn.Parameter(torch.randn(experts, dim, ffn) * dim ** -0.5)
        self.w_up = nn.Parameter(torch.randn(experts, dim, ffn) * dim ** -0.5)
        self.w_down = nn.Parameter(torch.randn(experts, ffn, dim) * ffn ** -0.5)

    def gating(self, h):
        probs = torch.softmax(self.router(h).float(), dim=-1)
        w, idx = probs.topk(TOP_K, dim=-1)
        return (w / w.sum(-1, keepdim=True)).to(h.dtype), idx

    def forward(self, x):
        B, T, D = x.shape
        N, E = B * T, self.w_gate.shape[0]
        C = capacity(N, E)
        h = self.norm(x).reshape(N, D)
        w, idx = self.gating(h)
        flat_e = idx.reshape(-1)                                   # [N*K], token-major
        onehot = F.one_hot(flat_e, E)
        pos = (onehot.cumsum(0) * onehot).sum(-1) - 1              # rank within its expert
        keep = pos < C
        slot = torch.where(keep, flat_e * C + pos, torch.full_like(pos, E * C))
        tok = torch.arange(N * TOP_K, device=x.device) // TOP_K
        src = torch.full((E * C + 1,), N, dtype=torch.long, device=x.device).scatter(0, slot, tok)
        hpad = torch.cat([h, h.new_zeros(1, D)])
        xe = hpad[src[: E * C]].view(E, C, D)
        ye = torch.bmm(F.silu(torch.bmm(xe, self.w_gate)) * torch.bmm(xe, self.w_up), self.w_down)
        ye = torch.cat([ye.reshape(E * C, D), ye.new_zeros(1, D)])
        y = ye[slot] * (w.reshape(-1, 1) * keep.unsqueeze(-1).to(w.dtype))
        return x + y.view(N, TOP_K, D).sum(1).view(B, T, D)

    def reference(self, x):
        """Plain loop over experts with the same capacity rule."""
        B, T, D = x.shape
        N, E = B * T, self.w_gate.shape[0]
        C = capacity(N, E)
        h = self.norm(x).reshape(N, D)
        w, idx = self.gating(h)
        out = torch.zeros_like(h)
        flat_e, flat_w = idx.reshape(-1), w.reshape(-1)
        for e in range(E):
            assigned = (flat_e == e).nonzero().flatten()[:C]
            tokens = assigned // TOP_K
            xe = h[tokens]
            ye = (F.silu(xe @ self.w_gate[e]) * (xe @ self.w_up[e])) @ self.w_down[e]
            out.index_add_(0, tokens, ye * flat_w[assigned].unsqueeze(-1))
        return x + out.view(B, T, D)


class MoE(nn.Module):
    def __init__(self, dim, ffn, experts, layers):
        super().__init__()
        self.layers = nn.ModuleList([MoELayer(dim, ffn, experts) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def reference(self, x):
        for layer in self.layers:
            x = layer.reference(x)
        return x


def build(preset, dtype, device):
    p = PRESETS[preset]
    torch.manual_seed(0)
    m = MoE(p["dim"], p["ffn"], p["experts"], p["layers"]).eval().to(device, dtype)
    x = torch.randn(p["batch"], p["seq"], p["dim"], device=device, dtype=dtype)
    return Sample("moe", m, (x,), unit="tokens", units_per_forward=p["batch"] * p["seq"],
                  dtype=dtype, device=device, preset=preset,
                  description=f"{p['layers']} MoE layers, {p['experts']} SwiGLU experts top-{TOP_K}, "
                              f"D{p['dim']} F{p['ffn']}, capacity factor {CAPACITY_FACTOR}")
