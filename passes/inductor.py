"""passlab passes inside torch.compile: Inductor's post-grad custom pass.

    torch.compile(model, options={"post_grad_custom_post_pass": passlab.inductor_pass("fuse_attention")})

`InductorPass(pipeline)` is a `torch._inductor.custom_graph_pass.CustomGraphPass`
(torch >= 2.11): Inductor calls it on its post-grad graph, and its `uuid()`
(the pipeline and the source of passlab's passes) keys Inductor's FX graph
cache, so a cached compile is reused only for the same passes.

Inductor's post-grad graph is functional aten after Inductor's own
decompositions: parameters are placeholders (get_attr constants under
freezing), every node has a fake-tensor `meta["val"]`, softmax is written out
(amax, sub, exp, sum, div). Before the passes run, each written-out softmax is
put back together as one `aten._softmax` node, so that the patterns that look
for it (`fuse_attention`) match; afterwards any softmax no pass took is written
out again as Inductor had it.

The passes run under the pass manager with passlab's graph checks (lint and
the metadata check) plus one for Inductor: every node a pass adds must be an
aten/prims op Inductor can lower. A pass that breaks a check is rolled back,
the graph stays as it was, and the reason is kept in `runs` and warned
(`strict=True` raises `InductorPassError` instead). Passes that make passlab's
own kernels (`fuse`, `fuse_epilogue`, `decode_gemm`: a FusedKernel object is a
Python callable Inductor cannot lower) cannot run here and say so. Numerics
against eager are checked by `passlab run --compiler inductor`, which compiles
the model with and without the pass; this door checks graph form only.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import warnings

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from passlab.graphs import clone, fetch_attr

from .api import PassContext
from .manager import PassManager, PassRejected, Statistics, VerifyGraph
from .pipeline import Step, parse

aten = torch.ops.aten
SUPPORTED_TORCH = "torch >= 2.11"
SOFTMAX = aten._softmax.default
RECOMPOSED = "passlab_recomposed_softmax"


class InductorPassError(RuntimeError):
    """A passlab pass that cannot run on Inductor's graph (strict mode)."""


def lowerable(target) -> bool:
    """Targets Inductor's post-grad graph may hold: ATen / prims overloads and
    the Python operators it handles itself (getitem, symbolic int math)."""
    return isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or \
        getattr(target, "__module__", None) in ("_operator", "operator", "math", "builtins")


class InductorLowerable:
    """Instrument: every call_function target is something Inductor lowers;
    no call_module (Inductor's graph has no submodules to call)."""

    def __init__(self, allowed: set):
        self.allowed = allowed   # targets already in Inductor's graph before the passes

    def after_pass(self, step, gm, ctx, record):
        bad = [n for n in gm.graph.nodes if n.op == "call_module" or
               (n.op == "call_function" and n.target not in self.allowed and not lowerable(n.target))]
        if not bad:
            return
        kinds = sorted({"a passlab FusedKernel (passlab's own generated kernel, run by passlab's executor)"
                        if getattr(n.target, "is_fused_kernel", False) else
                        f"call_module {n.target}" if n.op == "call_module" else
                        f"{getattr(n.target, '__name__', type(n.target).__name__)} (not an aten/prims op)"
                        for n in bad})
        raise PassRejected(f"pass {step.name!r} made nodes Inductor cannot lower: "
                           f"{', '.join(n.name for n in bad[:4])}{' ...' if len(bad) > 4 else ''}: "
                           f"{'; '.join(kinds)}. Run it in passlab's own pipeline (passlab run / "
                           f"passlab.optimize), not inside torch.compile")


# ---------------------------------------------------------------- softmax, written out and back

def recompose_softmax(gm: torch.fx.GraphModule) -> int:
    """div(exp(x - amax(x, d)), sum(exp(...), d)) -> aten._softmax(x, d), where
    every intermediate is used only inside the chain. Returns the count."""
    count = 0
    for div in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.div.Tensor]:
        exp, total = div.args
        if not (isinstance(exp, torch.fx.Node) and isinstance(total, torch.fx.Node)
                and exp.target == aten.exp.default and total.target == aten.sum.dim_IntList
                and total.args[0] is exp and set(exp.users) == {div, total} and len(total.users) == 1):
            continue
        sub = exp.args[0]
        if not (sub.op == "call_function" and sub.target == aten.sub.Tensor and len(sub.users) == 1
                and isinstance(sub.args[1], torch.fx.Node)):
            continue
        x, amax = sub.args
        dims = amax.args[1] if len(amax.args) > 1 else amax.kwargs.get("dim")
        keep = amax.args[2] if len(amax.args) > 2 else amax.kwargs.get("keepdim", False)
        if not (amax.target == aten.amax.default and amax.args[0] is x and len(amax.users) == 1 and keep
                and list(total.args[1]) == list(dims) and len(dims) == 1 and total.args[2:3] == (True,)
                and "val" in div.meta and div.meta["val"].dtype == x.meta["val"].dtype):
            continue
        with gm.graph.inserting_before(div):
            sm = gm.graph.call_function(SOFTMAX, (x, dims[0], False))
        sm.meta.update(div.meta)
        sm.meta[RECOMPOSED] = True
        div.replace_all_uses_with(sm)
        for n in (div, total, exp, sub, amax):
            gm.graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def decompose_softmax(gm: torch.fx.GraphModule) -> int:
    """The recomposed softmaxes no pass took, written out again as Inductor had
    them (fake-tensor values computed in the graph's own fake mode)."""
    from .meta import fake_mode_of
    mode = fake_mode_of(gm)
    count = 0
    for sm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SOFTMAX
               and n.meta.get(RECOMPOSED)]:
        x, dim = sm.args[0], sm.args[1]
        g = gm.graph
        with g.inserting_before(sm):
            amax = g.call_function(aten.amax.default, (x, [dim], True))
            sub = g.call_function(aten.sub.Tensor, (x, amax))
            exp = g.call_function(aten.exp.default, (sub,))
            total = g.call_function(aten.sum.dim_IntList, (exp, [dim], True))
            div = g.call_function(aten.div.Tensor, (exp, total))
        with mode:
            xv = x.meta["val"]
            vals = [torch.amax(xv, [dim], True)]
            vals.append(xv - vals[0])
            vals.append(torch.exp(vals[1]))
            vals.append(torch.sum(vals[2], [dim], True))
            vals.append(vals[2] / vals[3])
        for node, v in zip((amax, sub, exp, total, div), vals):
            node.meta.update({k: w for k, w in sm.meta.items() if k != RECOMPOSED})
            node.meta["val"] = v
        sm.replace_all_uses_with(div)
        g.erase_node(sm)
        count += 1
    if count:
        gm.recompile()
    return count


# ---------------------------------------------------------------- the custom pass

def source_hash(steps) -> str:
    """The source of passlab's passes and runtime (what a rewrite depends on)
    and of any plugin pass in `steps`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(os.path.join(d, f) for sub in ("passes", "runtime", "graphs")
                   for d, _, fs in os.walk(os.path.join(root, sub)) for f in fs if f.endswith((".py", ".h", ".cpp")))
    for s in steps:
        obj = getattr(s.pass_, "fn", type(s.pass_))
        try:
            files.append(inspect.getsourcefile(obj))
        except TypeError:
            pass
    h = hashlib.sha256()
    for f in dict.fromkeys(p for p in files if p):
        with open(f, "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()


class InductorPass(CustomGraphPass):
    """A passlab pipeline as Inductor's `post_grad_custom_post_pass` (or
    `post_grad_custom_pre_pass`). `runs` holds, per graph it ran on, what each
    pass did (the pass manager's step records) and what was rolled back."""

    def __init__(self, pipeline, *, strict: bool = False):
        self.steps = list(pipeline) if isinstance(pipeline, (list, tuple)) and pipeline and \
            all(isinstance(s, Step) for s in pipeline) else parse(pipeline)
        if not self.steps:
            raise ValueError("inductor_pass: the pipeline is empty; name passlab passes, e.g. 'fuse_attention'")
        self.pipeline = ",".join(str(s) for s in self.steps)
        self.strict = strict
        self.runs: list[dict] = []
        self._uuid = None

    def __repr__(self):
        return f"passlab.inductor_pass({self.pipeline!r})"

    def uuid(self) -> str:
        if self._uuid is None:
            self._uuid = f"passlab:{self.pipeline}:{source_hash(self.steps)}"
        return self._uuid

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            raise InductorPassError("passlab.inductor_pass got a graph without its GraphModule; "
                                    "register it as post_grad_custom_post_pass")
        work = clone(gm)
        recomposed = recompose_softmax(work)
        vals = [n.meta.get("val") for n in work.graph.nodes if n.op == "placeholder"]
        tensors = [v for v in vals if isinstance(v, torch.Tensor)]
        floats = [v.dtype for v in tensors if v.dtype.is_floating_point]
        ctx = PassContext(device=str(tensors[0].device) if tensors else "cpu",
                          dtype=max(set(floats), key=floats.count) if floats else torch.float32)
        allowed = {n.target for n in gm.graph.nodes if n.op == "call_function"} | {SOFTMAX}
        pm = PassManager(self.steps, instruments=[VerifyGraph(), InductorLowerable(allowed), Statistics()])
        res = pm.run(work, ctx)
        run = {"steps": [r.as_dict() for r in res.steps], "softmax_recomposed": recomposed,
               "changed": any(r.changed for r in res.steps), "error": None}
        self.runs.append(run)
        problems = [f"{r.name} rolled back on Inductor's graph: {r.error}" for r in res.steps if r.status != "ok"]
        if run["changed"]:
            try:
                decompose_softmax(res.gm)
                run["decomposed"] = decompose_for_inductor(res.gm)
                replace_graph(gm, res.gm)
            except Exception as e:   # the graph Inductor holds is untouched until replace_graph's first write
                run["changed"], run["error"] = False, f"{type(e).__name__}: {e}"
                problems.append(f"the rewritten graph could not be handed back to Inductor ({run['error']}); "
                                "Inductor compiles the graph as it was")
        for msg in problems:
            if self.strict:
                raise InductorPassError(f"passlab.inductor_pass: {msg}")
            warnings.warn(f"passlab.inductor_pass: {msg}", stacklevel=2)


def decompose_for_inductor(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Ops a pass made that Inductor decomposes before its post-grad graph
    (e.g. `scaled_dot_product_attention` -> the CPU flash kernel op) have no
    lowering: each is traced through Inductor's own decomposition table
    (make_fx, on the node's fake values) and inlined in its place."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings
    from torch.fx.experimental.proxy_tensor import make_fx
    import torch.utils._pytree as pytree
    from .meta import fake_mode_of
    table, mode, done = select_decomp_table(), fake_mode_of(gm), {}
    for n in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in table
              and n.target not in lowerings]:
        flat, spec = pytree.tree_flatten((n.args, n.kwargs))
        nodes = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
        if not isinstance(n.meta.get("val"), torch.Tensor):
            raise InductorPassError(f"{n.name}: {n.target} has no lowering in Inductor and returns more than one "
                                    "tensor; passlab cannot hand it back decomposed")

        def call(*tensors, _flat=flat, _nodes=nodes, _spec=spec, _target=n.target):
            full = list(_flat)
            for i, t in zip(_nodes, tensors):
                full[i] = t
            args, kwargs = pytree.tree_unflatten(full, _spec)
            return _target(*args, **kwargs)
        with mode:
            sub = make_fx(call, decomposition_table=table, tracing_mode="real")(*[flat[i].meta["val"] for i in nodes])
        placeholders = [p for p in sub.graph.nodes if p.op == "placeholder"]
        with gm.graph.inserting_before(n):
            out = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, [flat[i] for i in nodes])))
        copy_missing_attrs(gm, sub)
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
        done[str(n.target)] = done.get(str(n.target), 0) + 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def replace_graph(gm: torch.fx.GraphModule, new: torch.fx.GraphModule) -> None:
    """Inductor's graph object must stay the same: its nodes are replaced by
    `new`'s in place, keeping its placeholders (and their node objects) and
    the output node's metadata; attributes `new` reads that `gm` lacks
    (constants a pass made) are copied over."""
    graph = gm.graph
    old_out = next(n for n in reversed(graph.nodes) if n.op == "output")
    out_meta = dict(old_out.meta)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n in reversed(list(graph.nodes)):
        if n.op != "placeholder":
            graph.erase_node(n)
    val_map = dict(zip([n for n in new.graph.nodes if n.op == "placeholder"], placeholders))
    out = graph.graph_copy(new.graph, val_map)
    graph.output(out).meta.update(out_meta)
    copy_missing_attrs(gm, new)
    graph.lint()
    gm.recompile()


def copy_missing_attrs(gm: torch.fx.GraphModule, src: torch.nn.Module) -> None:
    """Attributes `gm`'s get_attr nodes read that `gm` lacks, copied from `src`."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not hasattr_path(gm, n.target):
            set_path(gm, n.target, fetch_attr(src, n.target))


def hasattr_path(obj, target: str) -> bool:
    try:
        fetch_attr(obj, target)
        return True
    except AttributeError:
        return False


def set_path(obj, target: str, value) -> None:
    *owner, leaf = target.split(".")
    for part in owner:
        if not hasattr(obj, part):
            setattr(obj, part, torch.nn.Module())
        obj = getattr(obj, part)
    if isinstance(value, torch.Tensor) and isinstance(obj, torch.nn.Module) and not isinstance(value, torch.nn.Parameter):
        obj.register_buffer(leaf, value)
    else:
        setattr(obj, leaf, value)


def inductor_pass(pipeline, *, strict: bool = False) -> InductorPass:
    """passlab passes as an Inductor custom FX pass (torch >= 2.11):

        torch.compile(model, options={"post_grad_custom_post_pass": passlab.inductor_pass("fuse_attention")})

    `pipeline`: pass names with options, as `--pipeline` takes them. A pass
    that cannot run on Inductor's graph is rolled back with a warning saying
    why (`strict=True`: an InductorPassError)."""
    return InductorPass(pipeline, strict=strict)


__all__ = ["InductorPass", "InductorPassError", "inductor_pass", "recompose_softmax", "decompose_softmax",
           "SUPPORTED_TORCH"]
