"""The executor: an optimized GraphModule -> a callable for a device.

Unfused ops run through ATen as the graph's generated Python calls them; fused
nodes call their kernel objects, which the executor builds for the device
first (all C++ kernels of a graph in one compiler call).

What the executor adds per call, and what it removes (measured on the held-out
models, `python -m passlab.tools.heldout`, which prints both):

- `bind(gm)`: ONE generated Python function for the whole graph with every
  weight bound once. A GraphModule's own `forward` fetches each weight on
  every call through `nn.Module.__getattr__` (nested: `getattr(self.blocks,
  "0").attn.in_proj_weight`, ~1-3 us each); the bound function takes them as
  pre-filled arguments of a `functools.partial` and skips `nn.Module.__call__`.
- A chain of views that keep the elements in order (view, unsqueeze,
  squeeze, alias) runs as one `view` of the chain's base: the graph keeps
  each step (what the passes wrote and the drawings show), the bound
  function makes one call (a decode step has dozens of such chains).
- ATen calls go straight to each overload's C++ callable (`direct_ops`):
  `torch.ops.aten.view.default(x, ...)` costs an attribute chain and a Python
  frame (`OpOverload.__call__`) before the dispatcher; the bound function
  calls `OpOverload._op` through one global name.
- `keep_heap()`: glibc returns freed blocks of >= 128 KiB to the kernel, so
  every intermediate activation of that size is a fresh `mmap` that faults
  its pages in again on each call (a 1 MiB activation: 256 minor faults; on
  the depthwise-conv model ~1000 faults per call, a third of its time in a
  VM). `keep_heap()` raises glibc's mmap and trim thresholds so freed memory
  stays in the heap and is reused. Process-wide (eager profits as much in
  the same process, so ratios stay fair); `PASSLAB_MALLOC=system` leaves
  glibc's defaults; no effect on other C libraries.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re

import torch
import torch.fx

from passlab.graphs.capture import fetch_attr

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 1 << 30        # blocks below this come from (and go back to) the heap
_HEAP = {"done": False, "ok": False}


def fused_kernels(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "is_fused_kernel", False)]


def compile_graph(gm: torch.fx.GraphModule, device: str = "cpu"):
    """Prepare every fused kernel of `gm` for `device` and return a callable
    taking the graph's flat inputs (`bind(gm)`)."""
    kernels = fused_kernels(gm)
    if kernels:
        from . import codegen
        codegen.build(kernels, device)
    if device == "cpu":
        keep_heap()
    return bind(gm)


def keep_heap() -> bool:
    """Keep freed memory in the process heap (glibc `mallopt`), once per
    process; True when the thresholds are set."""
    if not _HEAP["done"]:
        _HEAP["done"] = True
        if os.environ.get("PASSLAB_MALLOC", "keep") != "system":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):   # not glibc: nothing to tune
                return False
            _HEAP["ok"] = bool(mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)) and \
                bool(mallopt(M_TRIM_THRESHOLD, 2 * HEAP_KEEP_BYTES))
    return _HEAP["ok"]


def bind(gm: torch.fx.GraphModule):
    """One function for the whole graph with its weights bound once.

    Cached on the GraphModule for its current code (a pass that recompiles it
    gets a new one). Graphs with submodule calls or a pytree calling
    convention run as the GraphModule itself."""
    cached = getattr(gm, "_passlab_bound", None)
    if cached is not None and cached[0] is gm.code:
        return cached[1]
    fn = _bind(gm)
    gm._passlab_bound = (gm.code, fn)
    return fn


aten = torch.ops.aten
# views that keep the elements in logical (row-major) order: any chain of them is one `view` of its base
ORDER_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.default,
                         aten.squeeze.dim, aten.squeeze.dims, aten.alias.default})


def is_order_view(n) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in ORDER_VIEWS


def view_chain_base(n: torch.fx.Node):
    """The node a chain of two or more order-keeping views starts from (`n` its last
    view, of a static shape), or None. A view of that base to `n`'s shape exists
    whenever the chain does (each step keeps row-major order), so `view` finds it."""
    if not is_order_view(n) or not is_order_view(n.args[0]):
        return None
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
        return None
    base = n.args[0]
    while is_order_view(base):
        base = base.args[0]
    return base if isinstance(base, torch.fx.Node) else None


def drop_dead_views(g: torch.fx.Graph) -> None:
    """Erase the views nothing reads any more (the inner links of folded chains)."""
    for n in reversed(list(g.nodes)):
        if is_order_view(n) and not n.users:
            g.erase_node(n)


OP_CALL = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.(\w+)\(")


def direct_ops(src: str, scope: dict) -> str:
    """The generated code with every `torch.ops.NS.OP.OVERLOAD(...)` call made
    to the overload's C++ callable (`OpOverload._op`, what its `__call__` calls)
    through one global name: no attribute chain and no Python frame per op
    (about 0.3 us of the ~1.5 us an ATen view costs; dispatch, modes included,
    is the dispatcher's as before)."""
    names: dict[str, str] = {}

    def direct(m: re.Match) -> str:
        qual = m.group(0)[:-1]
        if qual not in names:
            ns, op, overload = m.groups()
            target = getattr(getattr(getattr(torch.ops, ns), op, None), overload, None)
            if not isinstance(target, torch._ops.OpOverload):
                names[qual] = qual
            else:
                names[qual] = f"_pl_{ns}_{op}_{overload}"
                scope[names[qual]] = target._op
        return names[qual] + "("
    return OP_CALL.sub(direct, src)


def _bind(gm: torch.fx.GraphModule):
    if type(gm.graph._codegen) is not torch.fx.graph.CodeGen or \
            any(n.op == "call_module" for n in gm.graph.nodes):
        return gm
    g = torch.fx.Graph()
    env: dict = {}
    consts = []
    for n in gm.graph.nodes:            # weights become leading parameters, filled in once
        if n.op == "get_attr":
            env[n] = g.placeholder(n.name)
            env[n].meta = n.meta
            consts.append(fetch_attr(gm, n.target))
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            base = view_chain_base(n)
            if base is None:
                env[n] = g.node_copy(n, lambda a: env[a])
            else:                       # a chain of views: one view of the chain's base
                env[n] = g.call_function(aten.view.default, (env[base], list(n.meta["val"].shape)))
                env[n].meta = n.meta
    drop_dead_views(g)
    code = g.python_code("self")
    scope = dict(code.globals)
    src = direct_ops(code.src, scope)
    exec(compile(src, f"<passlab bound {gm.__class__.__name__}>", "exec"), scope)
    fn = functools.partial(scope["forward"], None, *consts)
    fn.graph_module = gm
    fn.bound_views = sum(1 for n in g.nodes if is_order_view(n))
    return fn
