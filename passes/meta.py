"""Node metadata upkeep: every node carries `meta["val"]` (a fake tensor).

`propagate(gm)` recomputes the metadata of the whole graph from its
placeholders; it runs on fake tensors, so it costs no real compute and
allocates nothing. The framework calls it after every pass that changed the
graph (`api.finish`); a pass calls it (or `refresh`) itself only where it
reads the values of nodes it made before it ends.
"""
from __future__ import annotations

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def fake_mode_of(gm: torch.fx.GraphModule) -> FakeTensorMode:
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if v is not None]) or FakeTensorMode(allow_non_fake_inputs=True)


class _KeepingProp(FakeTensorProp):
    """FakeTensorProp that takes the `meta["val"]` of the nodes in `keep` as it is."""

    def __init__(self, gm, mode, keep):
        super().__init__(gm, mode)
        self.keep = keep

    def run_node(self, n):
        if n in self.keep and "val" in n.meta:
            return n.meta["val"]
        return super().run_node(n)


def propagate(gm: torch.fx.GraphModule, keep=()) -> torch.fx.GraphModule:
    """Recompute every node's `meta["val"]`, except those of the nodes in
    `keep` (a rewrite's untouched copies: a cost estimate needs their shapes,
    which it kept, not a second fake run)."""
    mode = fake_mode_of(gm)
    inputs = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            if v is None:
                raise ValueError(f"placeholder {n.name} has no meta['val']; capture the graph with passlab.graphs.capture")
            inputs.append(v)
    old = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # parameters are real tensors read through get_attr
    try:
        _KeepingProp(gm, mode, set(keep)).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = old
    return gm


def refresh(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Mid-pass: verify the graph, regenerate its code, recompute `meta["val"]`."""
    gm.graph.lint()
    gm.recompile()
    return propagate(gm)
