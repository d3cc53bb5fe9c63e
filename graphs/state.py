"""State a graph writes in place, and running it on copies of that state.

A model that updates a KV cache, bumps a step counter or advances a position
tensor in place is captured functionally by torch.export; `ep.module()` then
writes every new value back with one `aten.copy_` at the end of the graph.
`written_state(gm)` reads those write-backs (capture stores them as
`gm.meta["mutated_inputs"]` and `gm.meta["mutated_buffers"]`).

The rule passlab keeps: a graph that writes state is never run on the user's
tensors for a check or a timing. `stateful(sample, gm)` lifts the buffers the
graph writes into trailing graph inputs (`lift_state`) and gives the sample
that checks and times it: its reference calls the model with those buffers
passed in (`torch.func.functional_call`), so eager writes copies too, and
`sample.writes` names the inputs every run gets fresh copies of
(`fresh_copies`). On a real call the user's own buffers are passed: the one
write-back then lands where eager's would.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx
import torch.utils._pytree as pytree

from .sample import Sample


def written_state(gm: torch.fx.GraphModule) -> tuple[list[int], list[str]]:
    """What the graph writes in place: (flat input positions, buffer names),
    from the `copy_` write-backs `ep.module()` puts at the end."""
    inputs = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    pos, bufs = [], []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.copy_.default:
            dst = n.args[0]
            if dst in inputs and inputs[dst] not in pos:
                pos.append(inputs[dst])
            elif dst.op == "get_attr" and dst.target not in bufs:
                bufs.append(dst.target)
    return sorted(pos), bufs


def lift_state(gm: torch.fx.GraphModule) -> list[str]:
    """Turn every buffer the graph writes into a trailing input (in
    `gm.meta["mutated_buffers"]` order) and drop the graph's reference to it.
    Callers pass the buffers' current tensors: the user's on a real call,
    copies for checks and timing. Updates `gm.meta["mutated_inputs"]`; returns
    the lifted names (none: the graph is unchanged)."""
    names = list(gm.meta.get("mutated_buffers") or [])
    if not names:
        return []
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last, n_inputs = placeholders[-1], len(placeholders)
    for name in names:
        with graph.inserting_after(last):
            ph = graph.placeholder(f"state_{name.replace('.', '_')}")
        reads = [n for n in graph.nodes if n.op == "get_attr" and n.target == name]
        ph.meta.update(reads[0].meta if reads else {})
        for n in reads:
            n.replace_all_uses_with(ph)
            graph.erase_node(n)
        last = ph
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        elif hasattr(mod, leaf):
            delattr(mod, leaf)
    graph.lint()
    gm.recompile()
    gm.meta["mutated_inputs"] = sorted(set(gm.meta.get("mutated_inputs") or [])
                                       | set(range(n_inputs, n_inputs + len(names))))
    gm.meta["mutated_buffers"], gm.meta["lifted_state"] = [], names
    return names


def fresh_copies(inputs, positions) -> list:
    """`inputs` with those at `positions` (what a graph writes in place) cloned:
    a run on them leaves the originals as they were."""
    out = list(inputs)
    for i in positions:
        out[i] = out[i].clone()
    return out


class WithState(torch.nn.Module):
    """`model` called on flat inputs followed by the buffers it writes, passed
    in explicitly (functional_call): eager runs on whatever state it is given,
    never on the model's own buffers."""

    def __init__(self, model: torch.nn.Module, in_spec: pytree.TreeSpec, n_inputs: int, names: list[str]):
        super().__init__()
        self.model, self.in_spec, self.n_inputs, self.names = model, in_spec, n_inputs, list(names)

    def forward(self, *flat):
        args, kwargs = pytree.tree_unflatten(list(flat[:self.n_inputs]), self.in_spec)
        state = dict(zip(self.names, flat[self.n_inputs:]))
        return torch.func.functional_call(self.model, state, args, kwargs, strict=False, tie_weights=False)


def live_state(model: torch.nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The model's current tensors for the lifted buffer names (looked up on
    every call: a buffer the user replaced is the one written)."""
    return [model.get_buffer(n) for n in names]


def stateful(sample: Sample, gm: torch.fx.GraphModule, *, lift: bool = True) -> Sample:
    """The sample to check and time `gm` with. Where `gm` writes buffers, they
    are lifted into trailing inputs (`lift_state`) and the sample's module
    takes them the same way (`WithState`), with copies of their values now as
    example and fresh inputs; `writes` names every input the graph writes. A
    graph that writes nothing gets the sample as it is. `lift=False` leaves
    the buffers in the graph (`passlab run` on passlab's own samples, whose
    graphs keep the model's calling convention) and marks written inputs only."""
    names = lift_state(gm) if lift else []
    writes = tuple(gm.meta.get("mutated_inputs") or ())
    if not names:
        return dataclasses.replace(sample, writes=writes) if writes else sample
    flat = sample.flat_inputs
    pristine = tuple(t.detach().clone() for t in live_state(sample.module, names))

    def factory(seed: int) -> tuple:
        return tuple(sample.make_inputs(seed)) + tuple(t.clone() for t in pristine)
    return dataclasses.replace(sample, module=WithState(sample.module, sample.in_spec, len(flat), names),
                               example_inputs=tuple(flat) + pristine, example_kwargs={},
                               input_factory=factory, writes=writes)
