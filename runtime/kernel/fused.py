"""`FusedKernel`, the target of a fused node: the subgraph it replaced, its
description and generated sources; calling it runs the compiled kernel."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from ..costmodel import Cost, nbytes, tensors
from ..opclass import op_name
from .ir import Kernel
from .materialize import lower


# ---------------------------------------------------------------- the fused-node target

def op_names(gm: torch.fx.GraphModule) -> list[str]:
    """The ops a kernel's subgraph calls, by overload (`add.Tensor`, `addmm`)."""
    return [op_name(n, overload=True) for n in gm.graph.nodes
            if n.op == "call_function" and n.target is not operator.getitem]


@dataclass(eq=False)
class FusedKernel:
    """The target of a fused node: the subgraph it replaced, its description and
    generated sources; calling it runs the compiled kernel (or, on fake
    tensors, the subgraph)."""
    name: str
    subgraph: torch.fx.GraphModule
    kernel: Kernel = None
    is_fused_kernel: bool = True
    ops: list = field(default_factory=list)
    _compiled: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kernel is None:
            self.kernel = lower(self.subgraph)
        self.ops = op_names(self.subgraph)
        self.__name__ = self.name
        self._sources = {}

    @property
    def multi_output(self):
        return isinstance(self.subgraph.graph.output_node().args[0], (tuple, list))

    def source(self, device: str = "cpu") -> str:
        dev = "cuda" if str(device).startswith("cuda") else "cpu"
        if dev not in self._sources:
            from .. import codegen
            self._sources[dev] = codegen.printer(dev).render(self)
        return self._sources[dev]

    def describe(self) -> str:
        k = self.kernel
        io = ", ".join(f"{b.name}{list(b.shape)}:{str(b.dtype).replace('torch.', '')}" for b in k.inputs)
        oo = ", ".join(f"{list(b.shape)}:{str(b.dtype).replace('torch.', '')}" for b in k.outputs)
        kind = "reduction" if k.reductions else "pointwise"
        head = (f"== {self.name}: {kind} kernel, {len(self.ops)} ops ({', '.join(self.ops)})\n"
                f"   iteration space {k.sizes}, inner dims {k.inner} (outer {k.m_size} x inner {k.r_size})\n"
                f"   inputs {io}\n   outputs {oo}\n   bytes in+out {k.bytes_moved():,}")
        return head + "\n" + self.source("cpu")

    def cost(self, node) -> Cost:
        out = tensors(node.meta.get("val"))
        flops = sum(1 for v in self.kernel.values if v.op not in ("load", "const")) * self.kernel.m_size * \
            max(1, self.kernel.r_size)
        moved = nbytes(out) + sum(nbytes(a.meta.get("val")) for a in node.all_input_nodes)
        return Cost(flops, moved, 1)

    def __call__(self, *inputs):
        run = self._compiled.get(inputs[0].device.type) if inputs else None
        if run is not None and not _is_fake(inputs):
            return run(*inputs)
        if _is_fake(inputs) or not inputs:
            return self.subgraph(*inputs)
        from .. import codegen
        dev = inputs[0].device.type
        codegen.build([self], dev)
        return self._compiled[dev](*inputs)

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_compiled"] = {}
        return d

    def __repr__(self):
        return f"FusedKernel({self.name}: {', '.join(self.ops)})"


def _is_fake(inputs):
    """Any fake or meta tensor among the inputs, or a fake-tensor mode active (shape
    propagation calling a kernel whose inputs are all real constants: its outputs would
    be fake). Checked on every call: a plain loop, the fake-tensor class imported once."""
    fake = _FAKE[0]
    if fake is None:
        from torch._subclasses.fake_tensor import FakeTensor
        fake = _FAKE[0] = FakeTensor
    Tensor = torch.Tensor
    for x in inputs:
        if isinstance(x, Tensor) and (isinstance(x, fake) or x.is_meta):
            return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


_FAKE = [None]
