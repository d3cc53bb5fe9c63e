"""`capture()`: a model -> a core-aten torch.fx GraphModule with fake-tensor
metadata on every node.

torch.export (non-strict) traces the model; `run_decompositions()` lowers it to
core aten. The result is unlifted (`ep.module()`), so parameters are `get_attr`
nodes a pass can fold, and calling it takes the model's own arguments.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.fx


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


def capture(module: torch.nn.Module, example_inputs, *, decompose: bool = True) -> torch.fx.GraphModule:
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    module.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, strict=False)
            if decompose:
                ep = ep.run_decompositions()
    except Exception as e:  # torch raises many types here; all mean "not capturable"
        raise CaptureError(describe_failure(module, e)) from e
    gm = ep.module()
    drop_guards(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.meta["captured_from"] = type(module).__name__
    check_metadata(gm)
    return gm


def drop_guards(gm: torch.fx.GraphModule) -> None:
    """Remove export's `_guards_fn` input check: passes and the executor see
    only the computation, and the shapes are static anyway."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
            if hasattr(gm, "_guards_fn"):
                delattr(gm, "_guards_fn")
    gm.graph.lint()
    gm.recompile()


def check_metadata(gm: torch.fx.GraphModule) -> list[str]:
    """Names of nodes without `meta["val"]` (output node excepted)."""
    return [n.name for n in gm.graph.nodes if n.op != "output" and "val" not in n.meta]


def describe_failure(module, exc: BaseException) -> str:
    """One readable message: what failed, in which operation, at which user line."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = user_frame(exc)
    msg = f"could not capture {type(module).__name__}: {type(exc).__name__}: {first}"
    if where:
        msg += f"\n  at {where}"
    msg += ("\n  hint: torch.export needs static control flow; data-dependent branches, "
            "Python side effects and .item()/.tolist() on tensors are the usual causes")
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
