"""`llama_decode`: the llama sample decoding one token per call against a static, preallocated KV cache.

The serving workload: batch 4, one new token per sequence per call, attending
over a context of 256 (bench preset; the llama sample's dimensions). The KV
cache is a pair of buffers per layer, allocated once at the full context
length; each call writes the new token's keys and values at position `pos`
with `index_copy_` (torch.export captures it as a buffer mutation) and attends
over the whole cache with positions after `pos` masked out, so every call has
the same static shapes. Positions before `pos` hold a prefilled context
(random keys/values), so the example call is the last token of a full context.
Throughput is tokens/s: `batch` tokens per call.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from .llama import PRESETS as LLAMA, Attention, RMSNorm, rotate_half
from .sample import Sample

PRESETS = {name: dict(batch=p["batch"], ctx=p["seq"], dim=p["dim"], heads=p["heads"], kv_heads=p["kv_heads"],
                      layers=p["layers"], ffn=p["ffn"], vocab=p["vocab"]) for name, p in LLAMA.items()}


class DecodeAttention(Attention):
    """llama's attention (projections, rotary tables) reading and writing a static KV cache."""

    def __init__(self, dim, heads, kv_heads, ctx, batch):
        super().__init__(dim, heads, kv_heads, ctx)
        self.ctx = ctx
        del self.mask    # causal masking by position instead
        self.register_buffer("k_cache", torch.randn(batch, kv_heads, ctx, self.hd))
        self.register_buffer("v_cache", torch.randn(batch, kv_heads, ctx, self.hd))
        self.register_buffer("positions", torch.arange(ctx).view(1, ctx))

    def forward(self, x, pos):
        B = x.shape[0]
        q = self.q(x).view(B, 1, self.h, self.hd).transpose(1, 2)          # B, h, 1, hd
        k = self.k(x).view(B, 1, self.kvh, self.hd).transpose(1, 2)        # B, kvh, 1, hd
        v = self.v(x).view(B, 1, self.kvh, self.hd).transpose(1, 2)
        cos, sin = self.cos.index_select(0, pos).to(x.dtype), self.sin.index_select(0, pos).to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        rep = self.h // self.kvh
        keys = self.k_cache.repeat_interleave(rep, dim=1)                  # B, h, ctx, hd
        values = self.v_cache.repeat_interleave(rep, dim=1)
        mask = torch.where(self.positions <= pos, 0.0, float("-inf")).to(x.dtype)
        att = (q @ keys.transpose(-2, -1)) / math.sqrt(self.hd) + mask     # B, h, 1, ctx
        att = F.softmax(att.float(), dim=-1).to(x.dtype)
        return self.o((att @ values).transpose(1, 2).reshape(B, 1, -1))


class DecodeBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn, ctx, batch):
        super().__init__()
        self.n1, self.n2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = DecodeAttention(dim, heads, kv_heads, ctx, batch)
        self.gate, self.up = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, pos):
        x = x + self.attn(self.n1(x), pos)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaDecode(nn.Module):
    def __init__(self, vocab, dim, heads, kv_heads, layers, ffn, ctx, batch):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([DecodeBlock(dim, heads, kv_heads, ffn, ctx, batch) for _ in range(layers)])
        self.norm, self.head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, pos):
        """idx: (batch, 1) token ids; pos: (1,) int64, the position written in the cache."""
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, pos)
        return self.head(self.norm(x))


def build(preset, dtype, device):
    p = PRESETS[preset]
    torch.manual_seed(0)
    m = LlamaDecode(p["vocab"], p["dim"], p["heads"], p["kv_heads"], p["layers"], p["ffn"], p["ctx"], p["batch"])
    m = m.eval().to(device, dtype)
    idx = torch.randint(0, p["vocab"], (p["batch"], 1), device=device)
    pos = torch.tensor([p["ctx"] - 1], device=device)    # the last slot: a full context of ctx tokens
    return Sample("llama_decode", m, (idx, pos), unit="tokens", units_per_forward=p["batch"],
                  dtype=dtype, device=device, preset=preset,
                  description=f"Llama decode {p['layers']} layers, B{p['batch']} one token/call, context "
                              f"{p['ctx']} (static KV cache), D{p['dim']}, GQA {p['heads']}/{p['kv_heads']}")
