"""Routing pinned to the reference's choice while numerics are checked.

A mixture-of-experts router picks each token's experts with `topk`. A pass that
changes the last bit of anything upstream (a fused attention, a GEMM with a
fused epilogue, a grouped expert GEMM) can flip a choice between two experts
whose scores are tied to within rounding, and then that token's whole output
moves: the numerics check would see a large error where the graph is as right
as eager is. So the check judges MoE graphs this way:

- the reference run (eager, on the check's fresh inputs) records every `topk`
  decision, in call order (`RecordRouting`);
- the candidate graph runs with its own `topk`, and where a row's choice
  differs from the reference's, it takes the reference's experts only if that
  choice is a near tie *in the candidate's own scores*: every score it would
  pick instead is within the check's tolerance (relative to the row's largest
  score) of the score it picked (`PinRouting`). The values returned are the
  candidate's own scores at those experts, so whatever the candidate computed
  wrong upstream still flows into the output.

A choice that differs by more than the tolerance is left as the candidate made
it, so a real error in the router's inputs (a wrong scale, a wrong weight)
still changes the output and fails the check. Where the graph's `topk` calls do
not line up with the reference's (another count or shape), nothing is pinned.
`PinRouting.pinned` counts the rows pinned; the manager reports it.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ROUTING = {aten.topk.default}


def topk_dim(args, kwargs) -> int:
    return kwargs.get("dim", args[2] if len(args) > 2 else -1)


class RecordRouting(TorchDispatchMode):
    """Records the indices of every `topk` run under it, in call order."""

    def __init__(self):
        super().__init__()
        self.decisions: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ROUTING:
            self.decisions.append(out[1].clone())
        return out


class PinRouting(TorchDispatchMode):
    """Replays recorded `topk` choices where the candidate's own choice is a near tie."""

    def __init__(self, decisions: list[torch.Tensor], tolerance: float):
        super().__init__()
        self.decisions, self.tolerance = decisions, tolerance
        self.calls, self.pinned = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in ROUTING:
            return out
        i, self.calls = self.calls, self.calls + 1
        if i >= len(self.decisions):
            return out
        ref = self.decisions[i]
        values, idx = out
        if ref.shape != idx.shape or ref.device != idx.device or torch.equal(ref, idx):
            return out
        return self.pin(args[0], topk_dim(args, kwargs), values, idx, ref)

    def pin(self, scores, dim, values, idx, ref):
        alt = scores.gather(dim, ref)                          # the candidate's scores at the reference's choice
        scale = scores.detach().float().abs().amax(dim, keepdim=True).clamp_min(1e-30)
        close = ((values.float() - alt.float()).abs() <= self.tolerance * scale).all(dim, keepdim=True)
        differs = (idx != ref).any(dim, keepdim=True)
        take = close & differs
        self.pinned += int(take.sum())
        return torch.where(take, alt, values), torch.where(take, ref, idx)
