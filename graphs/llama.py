"""`llama`: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP."""
import math

import torch
from torch import nn
import torch.nn.functional as F

from .sample import Sample

PRESETS = {"tiny": dict(batch=2, seq=16, dim=32, heads=4, kv_heads=2, layers=2, ffn=64, vocab=64),
           "bench": dict(batch=4, seq=256, dim=512, heads=8, kv_heads=2, layers=4, ffn=1376, vocab=2048)}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, seq):
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        ang = torch.outer(torch.arange(seq).float(), inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())
        self.register_buffer("mask", torch.full((seq, seq), float("-inf")).triu(1))

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.kvh, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.kvh, self.hd).transpose(1, 2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.h // self.kvh
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd) + self.mask[:T, :T].to(x.dtype)
        att = F.softmax(att.float(), dim=-1).to(x.dtype)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn, seq):
        super().__init__()
        self.n1, self.n2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, seq)
        self.gate, self.up = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, vocab, dim, heads, kv_heads, layers, ffn, seq):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, kv_heads, ffn, seq) for _ in range(layers)])
        self.norm, self.head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def build(preset, dtype, device):
    p = PRESETS[preset]
    torch.manual_seed(0)
    m = Llama(p["vocab"], p["dim"], p["heads"], p["kv_heads"], p["layers"], p["ffn"], p["seq"])
    m = m.eval().to(device, dtype)
    idx = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), device=device)
    return Sample("llama", m, (idx,), unit="tokens", units_per_forward=p["batch"] * p["seq"],
                  dtype=dtype, device=device, preset=preset,
                  description=f"Llama {p['layers']} layers, B{p['batch']} T{p['seq']} D{p['dim']}, "
                              f"GQA {p['heads']}/{p['kv_heads']}, SwiGLU {p['ffn']}")
