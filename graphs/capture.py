"""`capture()`: a model -> a core-aten torch.fx GraphModule with fake-tensor
metadata on every node.

torch.export (non-strict) traces the model; `run_decompositions()` lowers it to
core aten. The result is unlifted (`ep.module()`), so parameters are `get_attr`
nodes a pass can fold, and calling it takes the model's own arguments.

State: a model that writes its inputs or buffers in place (a KV cache, a step
counter) is captured functionally by export, and `ep.module()` writes each new
value back with one `aten.copy_` at the end. `gm.meta["mutated_inputs"]` (flat
input positions) and `gm.meta["mutated_buffers"]` (buffer names) say what the
graph writes; `state.lift_state(gm)` turns the written buffers into trailing inputs,
so the graph holds no reference to the model's state and can be run on copies.
Hugging Face cache types (DynamicCache, StaticCache, ...) are registered with
pytree before export (`hf.register_caches`), so they may be inputs and outputs.
"""
from __future__ import annotations

import os
import re
import traceback
import warnings

import torch
import torch.fx

from . import decompositions, hf
from .state import written_state


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


def capture(module: torch.nn.Module, example_inputs, example_kwargs: dict | None = None, *,
            decompose: bool = True) -> torch.fx.GraphModule:
    """The graph takes the flat pytree leaves of `(example_inputs,
    example_kwargs)` positionally (`gm.meta["in_spec"]` is their structure) and
    returns the flat leaves of the model's output (`gm.meta["out_spec"]`), a
    single value where the model returns one tensor."""
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    module.eval()
    hf.register_caches(module)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ep = torch.export.export(module, args, kwargs, strict=False)
            if decompose:
                ep = decompositions.run(ep)   # core aten minus the ops kept whole (decompositions.py)
    except Exception as e:  # torch raises many types here; all mean "not capturable"
        raise CaptureError(describe_failure(module, e)) from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = ep.module()
    drop_guards(gm)
    flatten_signature(gm)
    describe_writebacks(gm)
    gm.meta["mutated_inputs"], gm.meta["mutated_buffers"] = written_state(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.meta["captured_from"] = type(module).__name__
    missing = check_metadata(gm)
    if missing:
        raise CaptureError(f"captured graph lacks metadata on nodes {missing[:5]}")
    return gm


def drop_guards(gm: torch.fx.GraphModule) -> None:
    """Remove export's input checks (the `_guards_fn` node and the pre-hook
    that checks the pytree calling convention): passes and the executor see
    only the computation, which takes flat inputs (`flatten_signature`).
    Callers check inputs themselves: `passlab.optimize` keys every call by
    its signature and re-specializes."""
    for k, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[k]
            gm._forward_pre_hooks_with_kwargs.pop(k, None)
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
            if hasattr(gm, "_guards_fn"):
                delattr(gm, "_guards_fn")
    gm.graph.lint()
    gm.recompile()


def describe_writebacks(gm: torch.fx.GraphModule) -> None:
    """`ep.module()` writes mutated buffers back with `aten.copy_` nodes that carry
    no metadata; `copy_` returns its destination, so that is their value."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.copy_.default and "val" not in n.meta:
            n.meta["val"] = n.args[0].meta.get("val")


def flatten_signature(gm: torch.fx.GraphModule) -> None:
    """Replace export's pytree calling convention with plain positional inputs
    and outputs, so every pass, clone and executor sees one simple signature.
    The output stays a single tensor where the model returns one."""
    out_spec = getattr(gm, "_out_spec", None)
    gm.meta["out_spec"] = out_spec
    gm.meta["in_spec"] = getattr(gm, "_in_spec", None)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    out = gm.graph.output_node()
    flat = out.args[0]
    if isinstance(flat, (tuple, list)) and len(flat) == 1 and out_spec is not None and out_spec.is_leaf():
        out.args = (flat[0],)
    gm.recompile()


def clone(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with its own graph, sharing parameter tensors.

    Cheap enough to take before every pass (rollback) and after it (snapshot):
    node metadata is copied shallowly, weights are not copied at all.
    """
    g = torch.fx.Graph()
    g._codegen = gm.graph._codegen
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    new = torch.fx.GraphModule(gm, g)
    new.meta.update(gm.meta)
    return new


def fetch_attr(gm: torch.nn.Module, target: str):
    """What a `get_attr` node with this (dotted) target reads from `gm`."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def check_metadata(gm: torch.fx.GraphModule) -> list[str]:
    """Names of nodes without `meta["val"]`. The output node and ops that return
    nothing (runtime asserts) have no value to describe."""
    return [n.name for n in gm.graph.nodes
            if n.op != "output" and "val" not in n.meta and returns_value(n)]


def returns_value(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return not (node.op == "call_function" and schema is not None and len(schema.returns) == 0)


HINTS = [  # (what the error says, the hint): the first that fits wins
    (("not a known type", "pytree"),
     "the model takes or returns a {type} that torch.utils._pytree cannot flatten: register it with "
     "torch.utils._pytree.register_pytree_node (Hugging Face caches: passlab registers every transformers "
     "Cache type for transformers models; for others call transformers.exporters.exporter_dynamo."
     "register_cache_pytrees_for_model(model)), or call the model without it (use_cache=False, or pass a "
     "StaticCache)"),
    (("data-dependent", "data dependent", "GuardOnDataDependent", ".item()", "tolist", "symbolic"),
     "torch.export needs static control flow: data-dependent branches and .item()/.tolist() on tensors "
     "are the usual causes (make the branch a torch.where / torch.cond, or compute the value outside)"),
    (("side effect", "side-effect"),
     "torch.export traces tensors only: Python side effects (globals, hooks, printing) are the usual "
     "cause; move them out of forward"),
]


def describe_failure(module, exc: BaseException) -> str:
    """One readable message: what failed, in which operation, at which user
    line, and a hint that fits the cause (an unknown input/output type, a
    data-dependent branch, a Python side effect)."""
    text = str(exc).strip()
    first = (text.splitlines() or [type(exc).__name__])[0]
    where = user_frame(exc)
    msg = f"could not capture {type(module).__name__}: {type(exc).__name__}: {first}"
    if where:
        msg += f"\n  at {where}"
    for words, hint in HINTS:
        if any(w.lower() in text.lower() for w in words):
            kind = re.search(r"<class '(?:[\w.]*\.)?(\w+)'> in (?:output|input)", text)
            msg += "\n  hint: " + hint.format(type=kind.group(1) if kind else "type")
            break
    else:
        msg += ("\n  hint: torch.export could not trace the model (the error above names the operation); "
                "passlab.optimize needs a model torch.export can capture")
    return msg


def user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch: the user's source line."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    best = None
    e = exc
    while e is not None:
        for fs in traceback.extract_tb(e.__traceback__):
            if not fs.filename.startswith(torch_dir) and not fs.filename.startswith(here):
                best = f"{fs.filename}:{fs.lineno}: {(fs.line or '').strip()}"
        e = e.__cause__ or e.__context__
    if best is None:  # export keeps user frames in the message for data-dependent errors
        for line in str(exc).splitlines():
            if "File " in line and "line" in line and torch_dir not in line:
                return line.strip()
    return best
