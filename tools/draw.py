"""Graphviz drawings of fx graphs: what a pass did, at a glance.

Nodes are coloured by op class, fused groups are clusters labelled with their
kernel (holding the ops they replaced), edges carry shape and dtype (bytes in
the tooltip), and layout conversions and collectives stand out. A graph too
large to read collapses by module hierarchy (`nn_module_stack`) to a depth
chosen so that at most `max_nodes` boxes remain. `diff()` compares two
snapshots by node name: what a pass removed, added and fused.

Drawings are DOT text; SVG and PNG come from the real Graphviz `dot` binary.
"""
from __future__ import annotations

import html
import operator
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx

from passlab.graphs.capture import returns_value
from passlab.runtime import costmodel
from passlab.runtime.opclass import OpClass, op_class, op_name

aten = torch.ops.aten

# fill colour, border colour, shape: one line per class
STYLE = {
    OpClass.POINTWISE: ("#d6eaf8", "#5d8aa8", "box"),
    OpClass.BROADCAST: ("#e8f5d0", "#7a9a4a", "box"),
    OpClass.VIEW: ("#f2f2f2", "#b0b0b0", "box"),
    OpClass.REDUCTION: ("#fde2bd", "#c98a2b", "box"),
    OpClass.GEMM: ("#f5b7b1", "#b03a2e", "box"),
    OpClass.COLLECTIVE: ("#d7bde2", "#6c3483", "hexagon"),
    OpClass.FUSED: ("#fff3b0", "#c9a100", "box"),
    OpClass.OPAQUE: ("#d5d8dc", "#566573", "box"),
    "placeholder": ("#ffffff", "#333333", "ellipse"),
    "output": ("#ffffff", "#333333", "ellipse"),
    "param": ("#fafafa", "#999999", "note"),
    "module": ("#e8e4f3", "#5b4a8b", "box3d"),
}
LAYOUT_COLOR = "#e74c3c"
MARKS = {  # how diff marks look: border colour, style, tooltip prefix
    "added": ("#1e8449", "bold", "added by this pass"),
    "removed": ("#c0392b", "dashed", "removed by this pass"),
    "fused": ("#d35400", "bold", "made by fusion"),
    "fused_into": ("#d35400", "dashed", "fused by this pass"),
    "changed": ("#8e44ad", "bold", "module changed by this pass"),
}
MARK_WORDS = {"added": "added", "removed": "removed", "fused": "new fused", "fused_into": "fused away"}
FUSED_CLUSTER = ("#fffbe6", "#c9a100")
EXPAND_FUSED_MAX = 48   # a fused group with more inner ops is drawn as one box
DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
          torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}


class GraphvizMissing(RuntimeError):
    """The `dot` binary is not installed."""


# ---------------------------------------------------------------- value text

def value_text(val) -> str:
    ts = costmodel.tensors(val)
    if not ts:
        return ""
    parts = ["×".join(str(d) for d in t.shape) + " " + DTYPES.get(t.dtype, str(t.dtype).replace("torch.", ""))
             + layout_tag(t) if t.dim() else "scalar " + DTYPES.get(t.dtype, str(t.dtype)) for t in ts]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def layout_tag(t) -> str:
    """' NHWC' for channels-last activations: the layout pass's work shows on the edges."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return " NHWC"
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return " NDHWC"
    return ""


def value_tooltip(val) -> str:
    ts = costmodel.tensors(val)
    if not ts:
        return ""
    out = []
    for t in ts:
        layout = "contiguous" if t.is_contiguous() else f"strides {tuple(t.stride())}"
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            layout = "channels_last"
        out.append(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}, {human_bytes(costmodel.nbytes(t))}, {layout}")
    return "; ".join(out)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def is_layout_conversion(node: torch.fx.Node) -> bool:
    """A copy whose purpose is a memory layout: clone/_to_copy with a
    memory_format, or a node a layout pass tagged."""
    if node.meta.get("layout_conversion"):
        return True
    if node.op != "call_function":
        return False
    if node.target in (aten.clone.default, aten._to_copy.default):
        mf = node.kwargs.get("memory_format")
        return mf is not None and mf != torch.preserve_format
    return "contiguous" in str(node.target)


def module_stack(node: torch.fx.Node) -> tuple:
    """((path, type), ...) from the root module down to the node's module."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for v in stack.values():
        path, typ = (v if isinstance(v, tuple) else (str(v), ""))[:2]
        typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
        out.append((path, typ.rsplit(".", 1)[-1]))
    return tuple(out)


def common_prefix(stacks: list[tuple]) -> tuple:
    if not stacks:
        return ()
    first = stacks[0]
    n = min(len(s) for s in stacks)
    i = 0
    while i < n and all(s[i] == first[i] for s in stacks):
        i += 1
    return first[:i]


# ---------------------------------------------------------------- diff

@dataclass
class GraphDiff:
    """Node-level difference between two snapshots, by node name."""
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    fused: dict[str, list[str]] = field(default_factory=dict)   # new fused node -> original names
    kept: list[str] = field(default_factory=list)

    def marks_before(self) -> dict[str, str]:
        into = {old: new for new, olds in self.fused.items() for old in olds}
        m = {n: "removed" for n in self.removed}
        m.update({n: "fused_into" for n in into})
        return m

    def marks_after(self) -> dict[str, str]:
        m = {n: "added" for n in self.added}
        m.update({n: "fused" for n in self.fused})
        return m

    def summary(self) -> str:
        into = sum(len(v) for v in self.fused.values())
        return (f"{len(self.removed)} removed, {len(self.added)} added, "
                f"{len(self.fused)} fused groups from {into} nodes, {len(self.kept)} kept")


def signature_of(node: torch.fx.Node) -> tuple:
    return (node.op, str(node.target))


def diff(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> GraphDiff:
    old = {n.name: n for n in before.graph.nodes if n.op != "output"}
    new = {n.name: n for n in after.graph.nodes if n.op != "output"}
    d = GraphDiff()
    for name, n in new.items():
        if name in old and signature_of(old[name]) == signature_of(n):
            d.kept.append(name)
        elif n.meta.get("fused_from") or getattr(n.target, "is_fused_kernel", False):
            olds = list(dict.fromkeys(list(n.meta.get("fused_from") or []) + fused_from_subgraph(n)))
            d.fused[name] = [o for o in olds if o in old and o not in new]
        elif not (n.target is operator.getitem and n.args[0].name in d.fused):
            d.added.append(name)
    into = {o for olds in d.fused.values() for o in olds}
    d.removed = [name for name, n in old.items()
                 if (name not in new or signature_of(new[name]) != signature_of(n)) and name not in into]
    return d


def fused_from_subgraph(node: torch.fx.Node) -> list[str]:
    sub = getattr(node.target, "subgraph", None)
    if sub is None:
        return []
    return [n.name for n in sub.graph.nodes if n.op == "call_function"]


# ---------------------------------------------------------------- the drawing model

@dataclass
class Item:
    id: str
    label: str
    tooltip: str
    kind: object                 # an OpClass, or "placeholder" / "param" / "output" / "module"
    stack: tuple = ()
    cluster: str | None = None   # id of the fused group drawn around it
    mark: str | None = None
    layout: bool = False
    ops: list = field(default_factory=list)
    seconds: float | None = None  # measured time (a fused kernel's split evenly over its drawn ops)


@dataclass
class Edge:
    src: str
    dst: str
    val: object = None
    ghost: bool = False


@dataclass
class Drawing:
    """What `to_dot` draws; `depth` is the module depth it collapsed to (None: none)."""
    items: list[Item]
    edges: list[Edge]
    clusters: dict[str, str]     # cluster id -> label
    title: str = ""
    depth: int | None = None
    total_nodes: int = 0
    step_s: float | None = None  # the measured step the items' times are shares of

    def heat_max(self) -> float:
        """The largest drawn time (a fused cluster counts whole): the top of the heat scale."""
        per = {}
        for i in self.items:
            if i.seconds is not None:
                per[i.cluster or i.id] = per.get(i.cluster or i.id, 0.0) + i.seconds
        return max(per.values(), default=0.0)

    def dot(self) -> str:
        return emit(self)


def flat_nodes(args) -> list:
    out = []
    torch.fx.node.map_aggregate(args, lambda a: out.append(a))
    return out


class Builder:
    """Walks the graph once: one item per node (a fused node becomes a cluster
    of its subgraph's ops), one edge per tensor read."""

    def __init__(self, gm: torch.fx.GraphModule, marks: dict[str, str], params: bool, expand_fused: bool,
                 times: dict[str, float] | None = None):
        self.gm, self.marks, self.params, self.expand_fused = gm, marks, params, expand_fused
        self.times = times or {}
        self.items: dict[str, Item] = {}
        self.edges: list[Edge] = []
        self.clusters: dict[str, str] = {}
        self.source: dict[tuple, str] = {}      # (node name, output index or None) -> drawn item id
        self.skip: set[str] = set()

    def build(self) -> None:
        for node in self.gm.graph.nodes:
            if (node.op == "get_attr" and not self.params) or not returns_value(node):
                self.skip.add(node.name)
            elif node.op == "call_function" and getattr(node.target, "is_fused_kernel", False):
                self.fused(node)
            elif node.op == "call_function" and node.target is operator.getitem \
                    and node.args[0].name in self.clusters and (node.args[0].name, node.args[1]) in self.source:
                self.source[(node.name, None)] = self.source[(node.args[0].name, node.args[1])]
            else:
                self.plain(node)

    def src(self, node: torch.fx.Node) -> str | None:
        if node.name in self.skip:
            return None
        return self.source.get((node.name, None))

    def connect(self, inputs, dst: str) -> None:
        for a in inputs:
            if isinstance(a, torch.fx.Node):
                s = self.src(a)
                if s is not None:
                    self.edges.append(Edge(s, dst, a.meta.get("val")))

    def plain(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder":
            kind, label = "placeholder", f"{node.name}\n{value_text(node.meta.get('val'))}"
        elif node.op == "get_attr":
            kind, label = "param", f"{node.target}\n{value_text(node.meta.get('val'))}"
        elif node.op == "output":
            kind, label = "output", "output"
        else:
            kind = op_class(node)
            op = op_name(node.target)
            label = node.name if node.name.startswith(op) else f"{node.name}\n{op}"
        layout = is_layout_conversion(node)
        if layout:
            label = "⇄ " + label + "\nlayout copy"
        tip = [f"{node.op} {node.name}: {node.target}", value_tooltip(node.meta.get("val"))]
        if node.kwargs:
            tip.append("kwargs: " + ", ".join(f"{k}={v}" for k, v in node.kwargs.items()))
        stack = module_stack(node)
        if stack:
            tip.append("module: " + (stack[-1][0] or "(root)") + f" ({stack[-1][1]})")
        ops = [op_name(node.target)] if node.op == "call_function" else []
        self.items[node.name] = Item(node.name, label, "\n".join(t for t in tip if t), kind, stack,
                                     mark=self.marks.get(node.name), layout=layout, ops=ops,
                                     seconds=self.times.get(node.name))
        self.source[(node.name, None)] = node.name
        self.connect(node.all_input_nodes if node.op != "output" else flat_nodes(node.args), node.name)

    def fused(self, node: torch.fx.Node) -> None:
        k = node.target
        sub = getattr(k, "subgraph", None)
        inner = [n for n in sub.graph.nodes if n.op == "call_function"] if sub is not None else []
        stack = module_stack(node) or common_prefix([module_stack(n) for n in inner if module_stack(n)])
        kname = getattr(k, "name", node.name)
        ops = list(getattr(k, "ops", None) or [op_name(n.target) for n in inner])
        fused_from = node.meta.get("fused_from") or []
        tip = f"fused kernel {kname}: {len(ops)} ops ({', '.join(ops[:12])}{' ...' if len(ops) > 12 else ''})" + \
              (f"\nfused from: {', '.join(fused_from[:20])}" if fused_from else "") + \
              "\n" + value_tooltip(node.meta.get("val"))
        mark = self.marks.get(node.name)
        if not self.expand_fused or sub is None or not inner or len(inner) > EXPAND_FUSED_MAX:
            summary = " · ".join(f"{c}×{o}" if c > 1 else o for o, c in Counter(ops).most_common(4))
            self.items[node.name] = Item(node.name, f"{kname}\n{len(ops)} ops: {summary}", tip, OpClass.FUSED,
                                         stack, mark=mark, ops=ops, seconds=self.times.get(node.name))
            self.source[(node.name, None)] = node.name
            self.connect(node.all_input_nodes, node.name)
            return
        cid = node.name
        self.clusters[cid] = f"{kname} ({len(inner)} ops)"
        share = self.times[node.name] / len(inner) if node.name in self.times else None
        outer_inputs = flat_nodes(node.args)
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(outer_inputs) != len(phs):
            outer_inputs = list(node.all_input_nodes)
        ph_src = {ph.name: outer for ph, outer in zip(phs, outer_inputs)}
        local: dict[str, str] = {}
        for n in inner:
            iid = f"{cid}/{n.name}"
            local[n.name] = iid
            op = op_name(n.target)
            self.items[iid] = Item(iid, n.name if n.name.startswith(op) else f"{n.name}\n{op}",
                                   f"{n.name}: {n.target} (in {kname})\n{value_tooltip(n.meta.get('val'))}\n{tip}",
                                   op_class(n), stack, cluster=cid, mark=mark, layout=is_layout_conversion(n), ops=[op],
                                   seconds=share)
            for a in n.all_input_nodes:
                if a.name in local:
                    self.edges.append(Edge(local[a.name], iid, a.meta.get("val")))
                elif a.name in ph_src and isinstance(ph_src[a.name], torch.fx.Node):
                    s = self.src(ph_src[a.name])
                    if s is not None:
                        self.edges.append(Edge(s, iid, ph_src[a.name].meta.get("val")))
        out = sub.graph.output_node().args[0]
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        for i, o in enumerate(outs):
            if not isinstance(o, torch.fx.Node):
                continue
            if o.name in local:
                target = local[o.name]
            elif o.name in ph_src and isinstance(ph_src[o.name], torch.fx.Node):
                target = self.src(ph_src[o.name])
            else:
                continue
            self.source[(node.name, i)] = target
        if not isinstance(out, (tuple, list)):
            self.source[(node.name, None)] = self.source.get((node.name, 0))


def build(gm: torch.fx.GraphModule, *, depth: int | None = None, title: str | None = None,
          marks: dict[str, str] | None = None, params: bool = True, expand_fused: bool = True,
          max_nodes: int | None = 250, ghosts: torch.fx.GraphModule | None = None,
          origin: torch.fx.GraphModule | None = None, times: dict[str, float] | None = None,
          step_s: float | None = None) -> Drawing:
    """The drawing model of `gm`. depth None: collapse only when more than
    `max_nodes` boxes would be drawn, to the deepest module level that fits.
    `times`: measured seconds by node name (`runtime.nodetime`), drawn as a heat
    colour and a label (share of `step_s`, the measured step)."""
    b = Builder(gm, marks or {}, params, expand_fused, times)
    b.build()
    place_stackless(b, gm, origin if origin is not None else ghosts)
    if ghosts is not None:
        add_ghosts(b, ghosts, marks or {})
    items, edges = list(b.items.values()), b.edges
    total = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    if depth is None and max_nodes and len(items) > max_nodes:
        depth = auto_depth(items, edges, max_nodes)
    d = Drawing(items, edges, dict(b.clusters), title or "", None, total, step_s)
    if depth is not None:
        d = collapse(d, depth)
    return d


def place_stackless(b: Builder, gm: torch.fx.GraphModule, origin: torch.fx.GraphModule | None) -> None:
    """Nodes a pass made without `nn_module_stack` go to the module of what
    they replaced (`fused_from`, looked up in `origin`) or else of their
    neighbours, so that collapsing keeps them with their module."""
    old = {n.name: module_stack(n) for n in origin.graph.nodes} if origin is not None else {}
    for node in gm.graph.nodes:
        item = b.items.get(node.name)
        if item is None or item.stack or item.kind in ("placeholder", "output", "param"):
            continue
        stacks = [old[o] for o in node.meta.get("fused_from") or [] if old.get(o)]
        if not stacks:
            stacks = [module_stack(n) for n in list(node.all_input_nodes) + list(node.users) if module_stack(n)]
        item.stack = common_prefix(stacks)


def add_ghosts(b: Builder, before: torch.fx.GraphModule, marks: dict[str, str]) -> None:
    """Draw the nodes `before` had and the new graph lost (marked "removed")
    with dashed edges to whatever of their neighbours is still drawn."""
    gone = [n for n in before.graph.nodes if marks.get(n.name) == "removed"]
    ids = {}
    for n in gone:
        gid = f"removed/{n.name}"
        ids[n.name] = gid
        kind = "param" if n.op == "get_attr" else ("placeholder" if n.op == "placeholder" else op_class(n))
        b.items[gid] = Item(gid, f"{n.name}\n{op_name(n.target)}" if n.op == "call_function" else n.name,
                            f"removed: {n.name} ({n.target})\n{value_tooltip(n.meta.get('val'))}", kind,
                            module_stack(n), mark="removed", layout=is_layout_conversion(n),
                            ops=[op_name(n.target)] if n.op == "call_function" else [])
    for n in gone:
        for a in n.all_input_nodes:
            s = ids.get(a.name) or b.source.get((a.name, None))
            if s is not None:
                b.edges.append(Edge(s, ids[n.name], a.meta.get("val"), ghost=True))
        for u in n.users:
            if u.name not in ids and (u.name, None) in b.source and b.source[(u.name, None)]:
                b.edges.append(Edge(ids[n.name], b.source[(u.name, None)], n.meta.get("val"), ghost=True))


# ---------------------------------------------------------------- collapsing

def group_key(item: Item, depth: int):
    if item.kind in ("placeholder", "output") or len(item.stack) <= depth:
        return None
    return item.stack[depth]


def groups_of(d: Drawing, depth: int) -> dict[str, object]:
    """item id -> module (path, type) it collapses into; parameters follow their users."""
    key = {i.id: group_key(i, depth) for i in d.items}
    users: dict[str, set] = {}
    for e in d.edges:
        users.setdefault(e.src, set()).add(key.get(e.dst))
    for i in d.items:
        if i.kind == "param":
            us = users.get(i.id, set())
            key[i.id] = next(iter(us)) if len(us) == 1 else None
    return key


def visible_count(items, edges, depth) -> int:
    key = groups_of(Drawing(items, edges, {}), depth)
    return len({k for k in key.values() if k is not None}) + sum(1 for k in key.values() if k is None)


def auto_depth(items, edges, max_nodes) -> int:
    deepest = max((len(i.stack) for i in items), default=1)
    best = 1
    for depth in range(1, deepest + 1):
        if visible_count(items, edges, depth) <= max_nodes:
            best = depth
    return best


def collapse(d: Drawing, depth: int) -> Drawing:
    key = groups_of(d, depth)
    members: dict[object, list[Item]] = {}
    for i in d.items:
        if key[i.id] is not None:
            members.setdefault(key[i.id], []).append(i)
    rep = {i.id: (f"module:{key[i.id][0]}" if key[i.id] is not None else i.id) for i in d.items}
    items = [i for i in d.items if key[i.id] is None]
    for (path, typ), ms in members.items():
        ops = Counter(o for m in ms for o in m.ops)
        fused = {m.cluster or m.id for m in ms if m.kind == OpClass.FUSED or m.cluster}
        marks = Counter(m.mark for m in ms if m.mark)
        top = ", ".join(f"{c} {o}" for o, c in ops.most_common(3))
        label = f"{path or '(model)'}\n{typ}\n{sum(ops.values())} ops" + (f", {len(fused)} fused" if fused else "")
        layouts = sum(1 for m in ms if m.layout)
        if layouts:
            label += f"\n{layouts} layout cop{'y' if layouts == 1 else 'ies'}"
        if marks:
            label += "\n" + ", ".join(f"{c} {MARK_WORDS[k]}" for k, c in marks.items())
        tip = f"module {path} ({typ}), collapsed at depth {depth}\n" + \
              ", ".join(f"{o}×{c}" for o, c in ops.most_common()) + (f"\ntop: {top}" if top else "")
        mark = "changed" if marks else None
        secs = [m.seconds for m in ms if m.seconds is not None]
        items.append(Item(f"module:{path}", label, tip, "module", (), mark=mark,
                          layout=any(m.layout for m in ms), ops=list(ops.elements()),
                          seconds=sum(secs) if secs else None))
    seen, edges = {}, []
    for e in d.edges:
        s, t = rep[e.src], rep[e.dst]
        if s == t:
            continue
        if (s, t) in seen:
            seen[(s, t)].val = None if seen[(s, t)].val is not e.val else e.val
            continue
        seen[(s, t)] = Edge(s, t, e.val, e.ghost)
        edges.append(seen[(s, t)])
    clusters = {c: l for c, l in d.clusters.items() if any(i.cluster == c for i in items)}
    return Drawing(items, edges, clusters, d.title, depth, d.total_nodes, d.step_s)


# ---------------------------------------------------------------- DOT text

def q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def attrs(**kw) -> str:
    return "[" + ", ".join(f"{k}={q(v)}" for k, v in kw.items() if v is not None) + "]"


HEAT = ((255, 255, 255), (255, 214, 102), (214, 48, 39))   # 0 -> half -> the slowest drawn node


def heat_colour(x: float) -> str:
    """White through amber to red for x in [0, 1]."""
    x = min(1.0, max(0.0, x))
    (a, b), f = ((HEAT[0], HEAT[1]), 2 * x) if x < 0.5 else ((HEAT[1], HEAT[2]), 2 * x - 1)
    return "#" + "".join(f"{round(p + (q - p) * f):02x}" for p, q in zip(a, b))


def time_text(seconds: float, step_s: float | None) -> str:
    us = seconds * 1e6
    t = f"{us / 1e3:.3g} ms" if us >= 1000 else f"{us:.0f} µs" if us >= 100 else f"{us:.1f} µs"
    return t + (f" · {100 * seconds / step_s:.1f}%" if step_s else "")


def node_line(i: Item, hot: float = 0.0, step_s: float | None = None) -> str:
    fill, border, shape = STYLE.get(i.kind, STYLE[OpClass.OPAQUE])
    style, pen, tip = "filled,rounded" if shape == "box" else "filled", "1", i.tooltip
    label = i.label
    if i.seconds is not None and hot > 0 and not i.cluster:
        fill = heat_colour(i.seconds / hot)
        label += "\n" + time_text(i.seconds, step_s)
        tip = f"measured {time_text(i.seconds, step_s)} of the step\n{tip}"
    small = i.kind in (OpClass.VIEW, "param")
    if i.layout:
        border, pen = LAYOUT_COLOR, "3"
    if i.kind == OpClass.COLLECTIVE:
        pen = "3"
    if i.mark in MARKS:
        border, mstyle, why = MARKS[i.mark]
        style += "," + mstyle
        pen = "3"
        tip = f"[{why}]\n{tip}"
        if i.mark == "removed":
            fill = "#fdecea"
    return f"  {q(i.id)} " + attrs(label=label, tooltip=tip, shape=shape, style=style, fillcolor=fill,
                                   color=border, penwidth=pen, fontsize="8" if small else None,
                                   height="0.25" if small else None) + ";"


def edge_line(e: Edge) -> str:
    text = value_text(e.val)
    tip = value_tooltip(e.val)
    return f"  {q(e.src)} -> {q(e.dst)} " + attrs(label=text or None, tooltip=tip or " ",
                                                    style="dashed" if e.ghost else None,
                                                    color="#c0392b" if e.ghost else None) + ";"


def emit(d: Drawing) -> str:
    title = d.title
    if d.depth is not None:
        title = (title + "\n" if title else "") + f"collapsed to module depth {d.depth} ({d.total_nodes} nodes)"
    hot = d.heat_max()
    if hot > 0:
        title = (title + "\n" if title else "") + "measured time per node" + \
            (f" (· its share of the {time_text(d.step_s, None)} step)" if d.step_s else "") + "; white → red: slowest"
    lines = ["digraph passlab {",
             "  graph " + attrs(rankdir="TB", fontname="Helvetica", fontsize="12", labelloc="t",
                                 label=title or None, nodesep="0.25", ranksep="0.3", tooltip=" ") + ";",
             "  node " + attrs(fontname="Helvetica", fontsize="10", margin="0.08,0.03", height="0.3") + ";",
             "  edge " + attrs(fontname="Helvetica", fontsize="8", color="#555555", fontcolor="#555555",
                               arrowsize="0.6") + ";"]
    by_cluster: dict[str | None, list[Item]] = {}
    for i in d.items:
        by_cluster.setdefault(i.cluster, []).append(i)
    lines += [node_line(i, hot, d.step_s) for i in by_cluster.pop(None, [])]
    for cid, its in by_cluster.items():
        lines.append(f"  subgraph {q('cluster_' + cid)} {{")
        mark = its[0].mark
        fill, border = FUSED_CLUSTER
        color, pen = (MARKS[mark][0], "2.5") if mark in MARKS else (border, "1.5")
        label = "⚡ " + d.clusters.get(cid, cid)
        secs = [i.seconds for i in its if i.seconds is not None]
        if secs and hot > 0:
            fill = heat_colour(sum(secs) / hot)
            label += "\n" + time_text(sum(secs), d.step_s)
        lines.append("    graph " + attrs(label=label, style="rounded,filled",
                                           fillcolor=fill, color=color, penwidth=pen, fontsize="10",
                                           tooltip=its[0].tooltip.split("\n", 2)[-1]) + ";")
        lines += ["  " + node_line(i) for i in its]
        lines.append("  }")
    lines += [edge_line(e) for e in d.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def legend_html() -> str:
    """The colour key as HTML (the report shows it once for all drawings)."""
    cells = []
    for k, (fill, border, _) in STYLE.items():
        name = k.value if isinstance(k, OpClass) else k
        cells.append(f'<span class="key" style="background:{fill};border-color:{border}">{html.escape(name)}</span>')
    cells.append(f'<span class="key" style="border:3px solid {LAYOUT_COLOR}">layout copy</span>')
    for k, (color, style, why) in MARKS.items():
        css = "dashed" if style == "dashed" else "solid"
        cells.append(f'<span class="key" style="border:3px {css} {color}">{html.escape(why)}</span>')
    return " ".join(cells)


# ---------------------------------------------------------------- API

def to_dot(gm: torch.fx.GraphModule, depth: int | None = None, title: str | None = None, **kw) -> str:
    """DOT text of `gm`; `times=` / `step_s=` (measured seconds by node name) add the heat."""
    return build(gm, depth=depth, title=title, **kw).dot()


def diff_dot(before: torch.fx.GraphModule, after: torch.fx.GraphModule, depth: int | None = None,
             title: str | None = None, **kw) -> str:
    """One drawing of the change: `after`, with what it added and fused marked
    and what `before` had and lost drawn dashed in red."""
    d = diff(before, after)
    marks = {**d.marks_before(), **d.marks_after()}
    return build(after, depth=depth, title=title or d.summary(), marks=marks, ghosts=before, **kw).dot()


def dot_binary() -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing("Graphviz's `dot` is not installed (apt-get install graphviz, brew install graphviz); "
                              "use --format dot to write the DOT text instead")
    return exe


def render(dot: str, fmt: str = "svg", timeout: float = 300.0) -> bytes:
    """Lay out and render DOT text with the `dot` binary."""
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"cannot render format {fmt!r}: svg, png, pdf (or write dot)")
    try:
        p = subprocess.run([dot_binary(), f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"Graphviz took more than {timeout:g}s; draw with a smaller --depth") from e
    if p.returncode != 0:
        raise RuntimeError(f"Graphviz failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()[:500]}")
    return p.stdout


def svg_element(dot: str) -> str:
    """Rendered SVG without its XML prolog, ready to inline in HTML."""
    text = render(dot, "svg").decode()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def write(gm: torch.fx.GraphModule, path: str, fmt: str = "svg", depth: int | None = None,
          title: str | None = None, **kw) -> str:
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    dot = to_dot(gm, depth=depth, title=title, **kw)
    if fmt == "dot":
        with open(path, "w") as f:
            f.write(dot)
    else:
        data = render(dot, fmt)
        with open(path, "wb") as f:
            f.write(data)
    return path
