"""Graphs in Google AI Edge Model Explorer's JSON graph format.

`collection(graphs)` builds one `graph_builder.GraphCollection` holding several
fx graphs (the captured graph and the graph after a pipeline), so Model
Explorer opens them side by side; `write(...)` saves it as the JSON file its
built-in JSON adapter loads, plus, with node times, `ModelNodeData` files
(`node_data_builder`) of measured time (us) and bytes per node.

- every fx node is a Model Explorer node (id = the fx node name), in the
  namespace of its module (`nn_module_stack`, one layer per module level);
- a fused kernel is a layer of its own (namespace `<module>/<kernel name>`)
  holding the subgraph it replaced, with the kernel itself pinned at the top
  of the layer (its time, bytes, achieved rate, generated source); edges go
  into and out of the replaced ops, so the dataflow reads through the layer;
- edges carry shape and dtype in the producer's output metadata.

Needs the `ai-edge-model-explorer` package (a dev extra: pip install
ai-edge-model-explorer).
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os

import torch
import torch.fx

from passlab.runtime import costmodel

from .draw import module_stack, op_name, value_text


class ExplorerMissing(RuntimeError):
    """The model_explorer package is not installed."""


def modules():
    try:
        from model_explorer import graph_builder, node_data_builder
    except ImportError as e:
        raise ExplorerMissing("Model Explorer's Python package is not installed: pip install ai-edge-model-explorer "
                              f"(or pip install -e '.[dev]') ({e})") from e
    return graph_builder, node_data_builder


def namespace_of(node: torch.fx.Node) -> str:
    """'blocks.0/attn' for a node of module blocks.0.attn: one layer per module level."""
    parts, parent = [], ""
    for path, _typ in module_stack(node):
        if not path:
            continue
        rel = path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path
        parts.append(rel.replace("/", "_"))
        parent = path
    return "/".join(parts)


def tensor_meta(gb, val) -> list:
    ts = costmodel.tensors(val)
    out = []
    for i, t in enumerate(ts):
        out.append(gb.MetadataItem(id=str(i), attrs=[
            gb.KeyValue("shape", str(list(t.shape))), gb.KeyValue("dtype", str(t.dtype).replace("torch.", "")),
            gb.KeyValue("bytes", str(costmodel.nbytes(t)))]))
    return out


def graph(gm: torch.fx.GraphModule, graph_id: str, times=None, device: str = "cpu"):
    """One `graph_builder.Graph` of `gm`; `times`: a `runtime.nodetime.NodeTimes` (attrs only)."""
    gb, _ = modules()
    nodes = []
    source: dict = {}     # fx node name -> (model explorer id, output id)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and n.args[0].name in source \
                and getattr(n.args[0].target, "is_fused_kernel", False):
            source[n.name] = source[(n.args[0].name, n.args[1])]
            continue
        if n.op == "call_function" and getattr(n.target, "is_fused_kernel", False):
            nodes += kernel_nodes(gb, n, source, times, device)
            continue
        me = gb.GraphNode(id=n.name, label=label_of(n), namespace=namespace_of(n) if n.op == "call_function" else
                          namespace_of(next(iter(n.users))) if n.op == "get_attr" and n.users else "")
        me.incomingEdges = edges_into(gb, n.all_input_nodes if n.op != "output" else flat_inputs(n), source)
        me.outputsMetadata = tensor_meta(gb, n.meta.get("val"))
        me.attrs = node_attrs(gb, n, times)
        nodes.append(me)
        source[n.name] = (n.name, "0")
    return gb.Graph(id=graph_id, nodes=nodes)


def flat_inputs(node) -> list:
    out = []
    torch.fx.node.map_arg(node.args, out.append)
    return out


def label_of(n) -> str:
    if n.op == "placeholder":
        return f"input {n.name}"
    if n.op == "get_attr":
        return f"weight {n.target}"
    if n.op == "output":
        return "output"
    return op_name(n.target)


def edges_into(gb, inputs, source) -> list:
    edges = []
    for i, a in enumerate(inputs):
        if isinstance(a, torch.fx.Node) and a.name in source:
            sid, out = source[a.name]
            edges.append(gb.IncomingEdge(sourceNodeId=sid, sourceNodeOutputId=out, targetNodeInputId=str(i)))
    return edges


def node_attrs(gb, n, times) -> list:
    kv = [gb.KeyValue("fx_name", n.name), gb.KeyValue("target", str(n.target))]
    if n.op == "call_function":
        c = costmodel.node_cost(n)
        kv += [gb.KeyValue("est_bytes", f"{c.bytes:,}"), gb.KeyValue("est_flops", f"{c.flops:,}")]
        v = value_text(n.meta.get("val"))
        if v:
            kv.append(gb.KeyValue("value", v))
    if n.meta.get("fused_from"):
        kv.append(gb.KeyValue("fused_from", ", ".join(n.meta["fused_from"])))
    t = times.nodes.get(n.name) if times is not None else None
    if t is not None:
        kv += [gb.KeyValue("measured_us", f"{t.median_s * 1e6:.2f} ({t.ci_low_s * 1e6:.2f}-{t.ci_high_s * 1e6:.2f})"),
               gb.KeyValue("share_of_step", f"{100 * times.share(n.name):.1f}%")]
        if t.achieved_per_s is not None:
            unit = "GB/s" if t.bound == "memory" else "GFLOP/s"
            kv.append(gb.KeyValue("achieved", f"{t.achieved_per_s / 1e9:.2f} {unit}" + (
                f" ({t.percent_of_roofline:.0f}% of the measured roofline)" if t.percent_of_roofline else "")))
    return kv


def kernel_nodes(gb, n, source, times, device) -> list:
    """A fused kernel: a layer holding the ops it replaced, the kernel pinned at its top."""
    k = n.target
    layer = "/".join(p for p in (namespace_of(n) or common_namespace(k), k.name) if p)
    kernel = gb.GraphNode(id=n.name, label=f"kernel {k.name}", namespace=layer,
                          config=gb.GraphNodeConfig(pinToGroupTop=True))
    kernel.attrs = node_attrs(gb, n, times) + [gb.KeyValue("ops", ", ".join(k.ops))]
    try:
        kernel.attrs.append(gb.KeyValue("source", k.source(device)))
    except Exception as e:        # a kernel the printer cannot render here: say so, keep the graph
        kernel.attrs.append(gb.KeyValue("source", f"(not rendered: {type(e).__name__}: {e})"))
    kernel.outputsMetadata = tensor_meta(gb, n.meta.get("val"))
    out = [kernel]
    sub = k.subgraph
    phs = [p for p in sub.graph.nodes if p.op == "placeholder"]
    outer = flat_inputs(n)
    inner_src = {p.name: source.get(o.name) for p, o in zip(phs, outer) if isinstance(o, torch.fx.Node)}
    for m in sub.graph.nodes:
        if m.op != "call_function":
            continue
        mid = f"{n.name}/{m.name}"
        me = gb.GraphNode(id=mid, label=op_name(m.target), namespace=layer)
        for i, a in enumerate(m.all_input_nodes):
            s = inner_src.get(a.name)
            if s is not None:
                me.incomingEdges.append(gb.IncomingEdge(sourceNodeId=s[0], sourceNodeOutputId=s[1],
                                                        targetNodeInputId=str(i)))
        me.outputsMetadata = tensor_meta(gb, m.meta.get("val"))
        me.attrs = [gb.KeyValue("in_kernel", k.name), gb.KeyValue("target", str(m.target))]
        inner_src[m.name] = (mid, "0")
        out.append(me)
    res = sub.graph.output_node().args[0]
    res = list(res) if isinstance(res, (tuple, list)) else [res]
    for i, r in enumerate(res):
        s = inner_src.get(r.name) if isinstance(r, torch.fx.Node) else None
        source[(n.name, i)] = s or (n.name, str(i))
    source[n.name] = source[(n.name, 0)]
    return out


def common_namespace(k) -> str:
    spaces = [namespace_of(m) for m in k.subgraph.graph.nodes if m.op == "call_function" and namespace_of(m)]
    if not spaces:
        return ""
    parts = [s.split("/") for s in spaces]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)


def collection(label: str, graphs: dict, times: dict | None = None, device: str = "cpu"):
    """One GraphCollection of {graph id: GraphModule} (e.g. before and after)."""
    gb, _ = modules()
    times = times or {}
    return gb.GraphCollection(label=label, graphs=[graph(gm, gid, times.get(gid), device)
                                                   for gid, gm in graphs.items()])


def as_json(coll) -> dict:
    from model_explorer.utils import remove_none
    return remove_none(dataclasses.asdict(coll))


def node_data(coll, times: dict, metric: str):
    """ModelNodeData of `metric` ("time_us" measured, or "bytes" by the cost model) for every graph."""
    _, nb = modules()
    data = {}
    for g in coll.graphs:
        nt = times.get(g.id)
        if nt is None:
            continue
        res, shown = {}, {n.id for n in g.nodes}      # a kernel output's getitem is no node of its own
        for name, t in nt.nodes.items():
            v = t.median_s * 1e6 if metric == "time_us" else t.bytes
            if v and name in shown:
                res[name] = nb.NodeDataResult(value=round(v, 3) if metric == "time_us" else int(v))
        data[g.id] = nb.GraphNodeData(results=res, name=f"{metric} ({g.id})", gradient=[
            nb.GradientItem(stop=0, bgColor="#ffffff"), nb.GradientItem(stop=0.5, bgColor="#ffd666"),
            nb.GradientItem(stop=1, bgColor="#d63027")])
    return nb.ModelNodeData(graphsData=data)


def write(path: str, label: str, graphs: dict, times: dict | None = None, device: str = "cpu") -> list[str]:
    """Write the graph collection to `path` (JSON) and, with `times`, its node
    data beside it (`<stem>.time_us.json`, `<stem>.bytes.json`); returns the paths."""
    coll = collection(label, graphs, times, device)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(as_json(coll), f)
    written = [path]
    if times:
        stem = path[:-5] if path.endswith(".json") else path
        for metric in ("time_us", "bytes"):
            p = f"{stem}.{metric}.json"
            node_data(coll, times, metric).save_to_file(p)
            written.append(p)
    return written
