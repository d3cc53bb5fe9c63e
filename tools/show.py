"""`passlab show`: a model's captured graph as text (op histogram, node count,
parameters, FLOPs), after any passes, with every node (`--graph`: op, dtype,
shape, users), fused kernels' sources (`--kernels`), or drawn."""
from __future__ import annotations

import sys

import torch

from passlab.graphs import capture, load
from passlab.runtime import costmodel

from .table import human_bytes, render


def graph_after(model, preset, dtype, device, after):
    sample = load(model, preset, dtype=dtype, device=device)
    gm = capture(sample.module, sample.example_inputs, sample.example_kwargs)
    result = None
    if after:
        from .runner import context, make_manager
        from passlab.passes import parse
        result = make_manager(parse(after), sample, device).run(gm, context(sample, device))
        gm = result.gm
    return sample, gm, result


def summary(sample, gm) -> str:
    c = costmodel.graph_cost(gm)
    params = sum(p.numel() for p in sample.module.parameters())
    hist = costmodel.op_histogram(gm)
    lines = [f"{sample.name} ({sample.preset}): {sample.description}",
             f"dtype {str(sample.dtype).replace('torch.', '')}, inputs "
             + ", ".join(str(tuple(t.shape)) for t in sample.example_inputs if hasattr(t, "shape")),
             f"nodes {sum(1 for n in gm.graph.nodes if n.op == 'call_function')}, parameters {params:,}, "
             f"est. FLOPs {c.flops:,}, est. launches {c.launches}, est. bytes {human_bytes(c.bytes)}", "",
             render(["op", "count"], [[k, str(v)] for k, v in hist.items()])]
    return "\n".join(lines)


def target_name(n) -> str:
    if n.op in ("placeholder", "get_attr", "output"):
        return n.op if n.op != "get_attr" else f"get_attr {n.target}"
    t = n.target
    if getattr(t, "is_fused_kernel", False):
        return f"kernel {t.name}"
    if isinstance(t, torch._ops.OpOverload):
        return str(t).replace("aten.", "", 1).replace(".default", "")
    return getattr(t, "__name__", str(t))


def value_text(v) -> tuple[str, str]:
    """(dtype, shape) of a node's meta["val"]; tuples list each element."""
    if isinstance(v, torch.Tensor):
        return str(v.dtype).replace("torch.", ""), "x".join(map(str, v.shape)) or "scalar"
    if isinstance(v, (tuple, list)):
        parts = [value_text(x) for x in v if isinstance(x, torch.Tensor)]
        return ",".join(p[0] for p in parts), " ".join(f"({p[1]})" for p in parts)
    return ("-", "-") if v is None else (type(v).__name__, str(v))


def graph_text(gm) -> str:
    """Every node in order: name, op, dtype, shape, and who reads it (asserts marked)."""
    rows = []
    for n in gm.graph.nodes:
        dtype, shp = value_text(n.meta.get("val"))
        if n.op == "output":
            dtype = shp = ""
        rows.append([n.name, target_name(n), dtype, shp, ", ".join(u.name for u in n.users) or "-"])
    return render(["node", "op", "dtype", "shape", "users"], rows)


def kernels_text(gm) -> str:
    from passlab.runtime.executor import fused_kernels
    ks = fused_kernels(gm)
    if not ks:
        return "no fused kernels (run with --after ...,fuse)"
    return "\n\n".join(k.describe() for k in ks)


def main(args) -> int:
    after = args.after
    if getattr(args, "diff", None) and not after:
        from passlab.passes.pipeline import available_default
        after = available_default()
    sample, gm, result = graph_after(args.model, args.preset, args.dtype, args.device, after)
    if result is not None:
        for s in result.steps:
            if s.status != "ok":
                print(f"passlab: pass {s.name} rolled back: {s.error}", file=sys.stderr)
    measured = measure_setup(args, sample, gm)
    if getattr(args, "diff", None):
        return show_diff(args, sample, result, measured)
    if args.format == "model-explorer":
        return show_explorer(args, sample, gm, result, measured, after)
    times = measured(gm) if measured else None
    if args.format != "text":
        from . import draw
        heat = {"times": times.seconds(), "step_s": times.step.median_s} if times else {}
        try:
            path = draw.write(gm, args.output or f"{sample.name}.{args.format}", fmt=args.format, depth=args.depth,
                              **heat)
        except RuntimeError as e:  # Graphviz missing or failing
            print(f"passlab: error: {e}", file=sys.stderr)
            return 1
        print(f"passlab: wrote {path}", file=sys.stderr)
        return 0
    text = summary(sample, gm)
    if getattr(args, "graph", False):
        text += "\n\n" + graph_text(gm)
    if args.kernels:
        text += "\n\n" + kernels_text(gm)
    if getattr(args, "mlir", False):
        text += "\n\n" + mlir_text(sample, result, gm)
    if times is not None:
        from . import nodetime
        text += "\n\n" + nodetime.text(times, "measured time per node")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def mlir_text(sample, result, gm) -> str:
    from . import mlir_peer
    if not mlir_peer.available():
        return "MLIR cross-check: torch-mlir is not installed (pip install -e '.[mlir]')"
    before = result.baseline.snapshot if result is not None else gm
    c = mlir_peer.compare(sample, before, gm)
    return (f"elementwise/reduction loop nests — MLIR linalg-fuse-elementwise-ops: "
            f"{c['elementwise_loops_before']} -> {c['elementwise_loops_after']}; "
            f"passlab: {c['passlab_before']} -> {c['passlab_after']} kernels")


def measure_setup(args, sample, gm):
    """With --measure: a function timing a graph's nodes on this sample's inputs; else None."""
    if not getattr(args, "measure", False):
        return None
    from passlab.graphs import stateful
    from . import nodetime
    sample = stateful(sample, gm, lift=False)
    budget = 0.5 if args.preset == "tiny" else 2.0
    return lambda g: nodetime.time_graphs(sample, {"g": g}, device=args.device, budget_s=budget)["g"]


def show_diff(args, sample, result, measured) -> int:
    """`passlab show MODEL --diff PASS`: what the pass removed, added and replaced (measured times with --measure)."""
    from . import passdiff
    from .nodetime import run_graphs, step_key
    from .exits import BadArguments
    try:
        i = passdiff.find_step(result, args.diff)
    except ValueError as e:
        raise BadArguments(e) from e
    graphs = run_graphs(result)
    before = graphs[step_key(result, i - 1)]
    after = graphs[step_key(result, i)]
    tb, ta = (measured(before), measured(after)) if measured else (None, None)
    pd = passdiff.pass_diff(before, after, step=i, name=result.steps[i].name, times_before=tb, times_after=ta)
    if args.format in ("svg", "png", "dot"):
        from . import draw
        heat = {"times": ta.seconds(), "step_s": ta.step.median_s} if ta else {}
        dot = draw.diff_dot(before, after, depth=args.depth, title=f"{args.diff}: " + draw.diff(before, after).summary(),
                            **heat)
        path = args.output or f"{sample.name}-{args.diff}.{args.format}"
        try:
            data = dot.encode() if args.format == "dot" else draw.render(dot, args.format)
        except RuntimeError as e:
            print(f"passlab: error: {e}", file=sys.stderr)
            return 1
        with open(path, "wb") as f:
            f.write(data)
        print(f"passlab: wrote {path}", file=sys.stderr)
    out = passdiff.text(pd)
    if args.output and args.format == "text":
        with open(args.output, "w") as f:
            f.write(out + "\n")
    else:
        print(out)
    return 0


def show_explorer(args, sample, gm, result, measured, after) -> int:
    """`--format model-explorer`: the captured graph and the graph after the pipeline in one collection."""
    from . import explorer
    graphs = {"captured": result.baseline.snapshot if result is not None else gm}
    if result is not None:
        graphs[f"after {after}"] = gm
    times = {k: measured(g) for k, g in graphs.items()} if measured else None
    try:
        paths = explorer.write(args.output or f"{sample.name}.json", sample.name, graphs, times, args.device)
    except explorer.ExplorerMissing as e:
        print(f"passlab: error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(f"passlab: wrote {p}", file=sys.stderr)
    return 0
