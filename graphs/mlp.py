"""`mlp`: stacked Linear + bias + GELU + residual blocks."""
import torch
from torch import nn

from .sample import Sample

PRESETS = {"tiny": dict(batch=8, dim=32, hidden=64, layers=2),
           "bench": dict(batch=2048, dim=512, hidden=2048, layers=4)}


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.GELU()

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class MLP(nn.Module):
    def __init__(self, dim, hidden, layers):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, hidden) for _ in range(layers)])

    def forward(self, x):
        return self.blocks(x)


def build(preset, dtype, device):
    p = PRESETS[preset]
    torch.manual_seed(0)
    m = MLP(p["dim"], p["hidden"], p["layers"]).eval().to(device, dtype)
    x = torch.randn(p["batch"], p["dim"], device=device, dtype=dtype)
    return Sample("mlp", m, (x,), unit="rows", units_per_forward=p["batch"], dtype=dtype,
                  device=device, preset=preset,
                  description=f"{p['layers']} x (Linear {p['dim']}->{p['hidden']}, GELU, Linear, residual)")
