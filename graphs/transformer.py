"""`transformer`: GPT-style decoder blocks with attention written out op by op
(matmul, scale, causal mask, softmax, matmul) so fusion passes have work."""
import math

import torch
from torch import nn

from .sample import Sample

PRESETS = {"tiny": dict(batch=2, seq=16, dim=32, heads=4, layers=2, vocab=64),
           "bench": dict(batch=4, seq=256, dim=512, heads=8, layers=4, vocab=2048)}


class Attention(nn.Module):
    def __init__(self, dim, heads, seq):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("causal", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))

    def forward(self, x):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, self.hd).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
        att = att.masked_fill(~self.causal[:T, :T], float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, D)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim, heads, seq):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, seq)
        self.fc, self.out, self.act = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.GELU()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, dim, heads, layers, seq):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, seq) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def build(preset, dtype, device):
    p = PRESETS[preset]
    torch.manual_seed(0)
    m = GPT(p["vocab"], p["dim"], p["heads"], p["layers"], p["seq"]).eval().to(device, dtype)
    idx = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), device=device)
    return Sample("transformer", m, (idx,), unit="tokens", units_per_forward=p["batch"] * p["seq"],
                  dtype=dtype, device=device, preset=preset,
                  description=f"GPT {p['layers']} layers, B{p['batch']} T{p['seq']} D{p['dim']}, "
                              f"{p['heads']} heads, explicit causal attention")
