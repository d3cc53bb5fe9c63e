"""`tp_mlp`, `ep_moe`, `ep_mixtral`, `fsdp_mlp`: distributed samples written with functional
collectives, so each collective and its wait are nodes of the captured graph.

Each sample is the current rank's shard of a model whose full weights come
from seed 0 on every rank; `module.reference(x)` computes the unsharded result
for this rank's input with those full weights, in one process. Outside a
launched run (no process group yet) a world of one is initialized, so
`passlab show tp_mlp` works on its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
import torch.nn.functional as F

from . import moe
from .sample import Sample

PRESETS = {
    "tp_mlp": {"tiny": dict(batch=8, dim=32, hidden=64, layers=2, chunks=2),
               "bench": dict(batch=512, dim=1024, hidden=4096, layers=2, chunks=2)},
    "ep_moe": {"tiny": dict(batch=2, seq=8, dim=16, ffn=32, experts=4, layers=2),
               "bench": dict(batch=2, seq=128, dim=256, ffn=2048, experts=4, layers=2)},
    # ep_moe at Mixtral-8x7B's FFN width and a prefill's 1024 tokens per rank: per FLOP it moves
    # what Mixtral moves (2/(3F) bytes), so on the scaled links its expert compute is about its
    # all_to_all time and several times their latency; ep_moe's bench (F=2048, 256 tokens) moves
    # 7x more per FLOP and computes less than one link latency per layer
    "ep_mixtral": {"tiny": dict(batch=2, seq=8, dim=16, ffn=32, experts=4, layers=2),
                   "bench": dict(batch=4, seq=256, dim=512, ffn=14336, experts=4, layers=2)},
    "fsdp_mlp": {"tiny": dict(batch=8, dim=32, hidden=64, layers=2),
                 "bench": dict(batch=8192, dim=256, hidden=1024, layers=3)},
}


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, creating a world of one
    (gloo, in-memory store) when none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def group():
    return dist.group.WORLD


all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor   # renamed in torch 2.12


def shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, dim=dim)[rank].contiguous()


def keep_reference(module: nn.Module, full: nn.Module) -> None:
    """Hold the unsharded model without registering it: export must not see it."""
    object.__setattr__(module, "full", full)


# ---------------------------------------------------------------- tensor parallel

class TPBlock(nn.Module):
    """Column-parallel up projection, GELU, row-parallel down projection, all_reduce."""

    def __init__(self, full, rank, size):
        super().__init__()
        self.w_up = nn.Parameter(shard(full.up.weight.t(), 1, rank, size))
        self.b_up = nn.Parameter(shard(full.up.bias, 0, rank, size))
        self.w_down = nn.Parameter(shard(full.down.weight.t(), 0, rank, size))
        self.b_down = nn.Parameter(full.down.bias.detach().clone())

    def forward(self, x):
        partial = F.gelu(x @ self.w_up + self.b_up) @ self.w_down
        return x + funcol.all_reduce(partial, "sum", group()) + self.b_down


class TPMLP(nn.Module):
    """Layers of TP blocks over `chunks` independent micro-batches: each chunk's
    all_reduce can hide behind another chunk's compute."""

    def __init__(self, full, rank, size, chunks):
        super().__init__()
        self.blocks = nn.ModuleList([TPBlock(b, rank, size) for b in full.blocks])
        self.chunks = chunks
        keep_reference(self, full)

    def forward(self, x):
        parts = list(x.chunk(self.chunks, dim=0))
        for block in self.blocks:
            parts = [block(p) for p in parts]
        return torch.cat(parts, dim=0)

    def reference(self, x):
        return self.full(x)


def build_tp_mlp(preset, dtype, device):
    from .mlp import MLP
    p = PRESETS["tp_mlp"][preset]
    rank, size = world()
    check_divisible("tp_mlp", hidden=p["hidden"], world_size=size)
    torch.manual_seed(0)
    full = MLP(p["dim"], p["hidden"], p["layers"]).eval().to(device, dtype)
    m = TPMLP(full, rank, size, p["chunks"]).eval().to(device, dtype)
    m.input_is_replicated = True      # every rank holds the same rows: throughput counts them once
    shape = (p["batch"], p["dim"])
    make = lambda seed: (randn(shape, seed, dtype, device),)   # replicated: same input on every rank
    return Sample("tp_mlp", m, make(0), unit="rows", units_per_forward=p["batch"], dtype=dtype,
                  device=device, preset=preset, input_factory=make,
                  description=f"tensor-parallel MLP over {size} rank(s): {p['layers']} x (column-parallel "
                              f"Linear {p['dim']}->{p['hidden']}, GELU, row-parallel Linear, all_reduce), "
                              f"{p['chunks']} micro-batches")


# ---------------------------------------------------------------- expert parallel

class EPLayer(nn.Module):
    """A MoE layer whose experts are split across ranks: capacity-based dispatch
    into a [experts, capacity, dim] buffer, all_to_all to the experts' ranks,
    local SwiGLU experts, all_to_all back, weighted combine. Capacity is per
    source rank, so a rank's output depends only on its own tokens."""

    def __init__(self, full: moe.MoELayer, rank, size):
        super().__init__()
        self.norm = full.norm
        self.router = full.router
        self.experts = full.w_gate.shape[0]
        self.size = size
        self.w_gate = nn.Parameter(shard(full.w_gate, 0, rank, size))
        self.w_up = nn.Parameter(shard(full.w_up, 0, rank, size))
        self.w_down = nn.Parameter(shard(full.w_down, 0, rank, size))

    def forward(self, x):
        B, T, D = x.shape
        N, E, W = B * T, self.experts, self.size
        C, K = moe.capacity(N, E), moe.TOP_K
        h = self.norm(x).reshape(N, D)
        probs = torch.softmax(self.router(h).float(), dim=-1)
        w, idx = probs.topk(K, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(h.dtype)
        flat_e = idx.reshape(-1)
        onehot = F.one_hot(flat_e, E)
        pos = (onehot.cumsum(0) * onehot).sum(-1) - 1
        keep = pos < C
        slot = torch.where(keep, flat_e * C + pos, torch.full_like(pos, E * C))
        tok = torch.arange(N * K, device=x.device) // K
        src = torch.full((E * C + 1,), N, dtype=torch.long, device=x.device).scatter(0, slot, tok)
        hpad = torch.cat([h, h.new_zeros(1, D)])
        xe = hpad[src[: E * C]]                                       # [E*C, D], expert-major
        xr = funcol.all_to_all_single(xe, None, None, group())        # [W * E/W * C, D] from every rank
        El = E // W
        xl = xr.view(W, El, C, D).transpose(0, 1).reshape(El, W * C, D)
        yl = torch.bmm(F.silu(torch.bmm(xl, self.w_gate)) * torch.bmm(xl, self.w_up), self.w_down)
        yr = yl.view(El, W, C, D).transpose(0, 1).reshape(W * El * C, D)
        ye = funcol.all_to_all_single(yr, None, None, group())       # back to the tokens' ranks
        ye = torch.cat([ye, ye.new_zeros(1, D)])
        y = ye[slot] * (w.reshape(-1, 1) * keep.unsqueeze(-1).to(w.dtype))
        return x + y.view(N, K, D).sum(1).view(B, T, D)


class EPMoE(nn.Module):
    def __init__(self, full: moe.MoE, rank, size):
        super().__init__()
        self.layers = nn.ModuleList([EPLayer(l, rank, size) for l in full.layers])
        keep_reference(self, full)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def reference(self, x):
        return self.full.reference(x)


def build_ep_moe(preset, dtype, device, name="ep_moe"):
    p = PRESETS[name][preset]
    rank, size = world()
    check_divisible(name, experts=p["experts"], world_size=size)
    torch.manual_seed(0)
    full = moe.MoE(p["dim"], p["ffn"], p["experts"], p["layers"]).eval().to(device, dtype)
    m = EPMoE(full, rank, size).eval().to(device, dtype)
    shape = (p["batch"], p["seq"], p["dim"])
    make = lambda seed: (randn(shape, seed * 1009 + rank, dtype, device),)   # each rank its own tokens
    return Sample(name, m, make(0), unit="tokens", units_per_forward=p["batch"] * p["seq"],
                  dtype=dtype, device=device, preset=preset, input_factory=make,
                  description=f"expert-parallel MoE over {size} rank(s): {p['layers']} layers, "
                              f"{p['experts']} SwiGLU experts top-{moe.TOP_K} ({p['experts'] // size} per rank), "
                              f"D{p['dim']} F{p['ffn']}, all_to_all dispatch and combine")


def build_ep_mixtral(preset, dtype, device):
    return build_ep_moe(preset, dtype, device, "ep_mixtral")


# ---------------------------------------------------------------- fully sharded data parallel

class FSDPLinear(nn.Module):
    """Holds 1/W of the weight's rows; all_gathers the whole weight before use."""

    def __init__(self, full: nn.Linear, rank, size):
        super().__init__()
        self.w_shard = nn.Parameter(shard(full.weight, 0, rank, size))
        self.b_shard = nn.Parameter(shard(full.bias, 0, rank, size))

    def forward(self, x):
        w = all_gather(self.w_shard, 0, group())
        b = all_gather(self.b_shard, 0, group())
        return F.linear(x, w, b)


class FSDPBlock(nn.Module):
    def __init__(self, full, rank, size):
        super().__init__()
        self.up, self.down = FSDPLinear(full.up, rank, size), FSDPLinear(full.down, rank, size)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class FSDPMLP(nn.Module):
    def __init__(self, full, rank, size):
        super().__init__()
        self.blocks = nn.ModuleList([FSDPBlock(b, rank, size) for b in full.blocks])
        keep_reference(self, full)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def reference(self, x):
        return self.full(x)


def build_fsdp_mlp(preset, dtype, device):
    from .mlp import MLP
    p = PRESETS["fsdp_mlp"][preset]
    rank, size = world()
    check_divisible("fsdp_mlp", dim=p["dim"], hidden=p["hidden"], world_size=size)
    torch.manual_seed(0)
    full = MLP(p["dim"], p["hidden"], p["layers"]).eval().to(device, dtype)
    m = FSDPMLP(full, rank, size).eval().to(device, dtype)
    shape = (p["batch"], p["dim"])
    make = lambda seed: (randn(shape, seed * 1009 + rank, dtype, device),)   # data parallel: own batch
    return Sample("fsdp_mlp", m, make(0), unit="rows", units_per_forward=p["batch"], dtype=dtype,
                  device=device, preset=preset, input_factory=make,
                  description=f"fully sharded MLP over {size} rank(s): {p['layers']} x (all_gather weights, "
                              f"Linear {p['dim']}->{p['hidden']}, GELU, all_gather, Linear, residual)")


# ----------------------------------------------------------------

def randn(shape, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device, dtype)


def check_divisible(name, world_size, **sizes):
    for k, v in sizes.items():
        if v % world_size:
            raise ValueError(f"{name}: {k}={v} is not divisible by the world size {world_size}")
