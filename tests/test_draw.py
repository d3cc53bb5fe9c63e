"""Drawings: every sample draws to DOT and SVG; fused groups are clusters,
layout copies and diff marks show; large graphs collapse by module depth."""
import operator
import re
import shutil

import pytest
import torch
import torch.fx

from passlab.graphs import capture, clone, load
from passlab.passes.meta import propagate
from passlab.runtime import costmodel
from passlab.tools import draw

SAMPLES = ["mlp", "transformer", "llama", "moe", "convnet"]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")


class FakeKernel:
    """Stands in for runtime.kernel.FusedKernel: the same interface, runs its subgraph."""
    is_fused_kernel = True

    def __init__(self, name, subgraph):
        self.name = self.__name__ = name
        self.__module__ = __name__
        self.subgraph = subgraph
        self.ops = [draw.op_name(n.target) for n in subgraph.graph.nodes if n.op == "call_function"]

    def __call__(self, *inputs):
        return self.subgraph(*inputs)

    def source(self, device):
        return f"// {self.name}: {', '.join(self.ops)}\n" + self.subgraph.code

    def describe(self):
        return f"{self.name}: {' -> '.join(self.ops)}"

    def cost(self, node):
        return costmodel.Cost(0, costmodel.nbytes(node.meta.get("val")), 1)


def fake_fuse(gm: torch.fx.GraphModule, names: list[str], kernel_name: str) -> torch.fx.Node:
    """Replace the nodes `names` (in graph order) by one fused call, the way the
    fusion engine does: subgraph of the replaced ops, getitem per extra output."""
    g = gm.graph
    nodes = [n for n in g.nodes if n.name in names]
    group = set(nodes)
    inputs = []
    for n in nodes:
        inputs += [a for a in n.all_input_nodes if a not in group and a not in inputs]
    outputs = [n for n in nodes if any(u not in group for u in n.users)]
    sub, env = torch.fx.Graph(), {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    kernel = FakeKernel(kernel_name, torch.fx.GraphModule(torch.nn.Module(), sub))
    with g.inserting_after(nodes[-1]):
        fused = g.call_function(kernel, tuple(inputs))
    fused.meta["fused_from"] = [n.name for n in nodes]
    if len(outputs) == 1:
        outputs[0].replace_all_uses_with(fused, delete_user_cb=lambda u: u not in group)
    else:
        prev = fused
        for i, o in enumerate(outputs):
            with g.inserting_after(prev):
                prev = g.call_function(operator.getitem, (fused, i))
            o.replace_all_uses_with(prev, delete_user_cb=lambda u: u not in group)
    for n in reversed(nodes):
        g.erase_node(n)
    g.lint()
    gm.recompile()
    propagate(gm)
    return fused


@pytest.fixture(scope="module")
def graphs():
    out = {}
    for name in SAMPLES:
        s = load(name, "tiny")
        out[name] = (s, capture(s.module, s.example_inputs))
    return out


@pytest.fixture
def fused_mlp():
    s = load("mlp", "tiny")
    before = capture(s.module, s.example_inputs)
    after = clone(before)
    fake_fuse(after, ["addmm", "gelu"], "k_addmm_gelu")
    fake_fuse(after, ["add", "addmm_2"], "k_add_addmm")      # two outputs: add is used later too
    return s, before, after


def dot_nodes(dot: str) -> set[str]:
    return set(re.findall(r'^\s*"([^"]+)" \[label=', dot, re.M))


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_draws_to_dot(graphs, name):
    _, gm = graphs[name]
    dot = draw.to_dot(gm, title=name, max_nodes=None)
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "assert" not in str(n.target)]
    drawn = dot_nodes(dot)
    assert {n.name for n in calls} <= drawn, "every op is a box (no collapse on tiny graphs)"
    some = next(n for n in calls if costmodel.tensors(n.meta.get("val")) and n.users)
    assert draw.value_text(some.meta["val"]) in dot, "edges carry shape and dtype"
    assert "KiB" in dot or " B," in dot, "bytes in the tooltips"


@needs_dot
@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_draws_to_svg(graphs, tmp_path, name):
    _, gm = graphs[name]
    path = draw.write(gm, str(tmp_path / f"{name}.svg"), fmt="svg")
    text = open(path).read()
    assert "<svg" in text and text.count('class="node"') >= sum(1 for n in gm.graph.nodes if n.op == "call_function")


@needs_dot
def test_png_and_dot_formats(graphs, tmp_path):
    _, gm = graphs["mlp"]
    png = draw.write(gm, str(tmp_path / "g.png"), fmt="png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    dot = draw.write(gm, str(tmp_path / "g.dot"), fmt="dot")
    assert open(dot).read().startswith("digraph")


def test_colours_follow_op_class(graphs):
    _, gm = graphs["mlp"]
    dot = draw.to_dot(gm)
    gemm_fill = draw.STYLE[draw.OpClass.GEMM][0]
    pw_fill = draw.STYLE[draw.OpClass.POINTWISE][0]
    assert re.search(rf'"addmm" \[[^\]]*fillcolor="{gemm_fill}"', dot)
    assert re.search(rf'"gelu" \[[^\]]*fillcolor="{pw_fill}"', dot)


def test_layout_copies_highlighted(graphs):
    _, gm = graphs["transformer"]
    clones = [n for n in gm.graph.nodes if draw.is_layout_conversion(n)]
    assert clones, "the transformer's attention has contiguous copies"
    dot = draw.to_dot(gm)
    for n in clones:
        assert re.search(rf'"{n.name}" \[[^\]]*color="{draw.LAYOUT_COLOR}"', dot)
    plain = [n for n in gm.graph.nodes if n.op == "call_function" and not draw.is_layout_conversion(n)]
    assert not re.search(rf'"{plain[0].name}" \[[^\]]*color="{draw.LAYOUT_COLOR}"', dot)


def test_channels_last_edges_are_tagged():
    x = torch.empty(2, 8, 4, 4).to(memory_format=torch.channels_last)
    assert draw.value_text(x) == "2×8×4×4 f32 NHWC"
    assert draw.value_text(torch.empty(2, 8, 4, 4)) == "2×8×4×4 f32"
    assert "channels_last" in draw.value_tooltip(x) and "1.0 KiB" in draw.value_tooltip(x)


def test_collectives_highlighted():
    c10d = torch.ops._c10d_functional
    g = torch.fx.Graph()
    x = g.placeholder("x")
    ar = g.call_function(c10d.all_reduce.default, (x, "sum", "0"))
    w = g.call_function(c10d.wait_tensor.default, (ar,))
    g.output(w)
    for n in (x, ar, w):
        n.meta["val"] = torch.empty(4, 8)
    dot = draw.to_dot(torch.fx.GraphModule(torch.nn.Module(), g))
    for n in (ar, w):
        assert re.search(rf'"{n.name}" \[.*shape="hexagon".*penwidth="3"', dot)
    assert f'"x" -> "{ar.name}" [label="4×8 f32"' in dot


def test_fused_group_is_a_cluster_with_its_ops(fused_mlp):
    _, _, after = fused_mlp
    dot = draw.to_dot(after)
    fused = [n for n in after.graph.nodes if getattr(n.target, "is_fused_kernel", False)]
    assert len(fused) == 2
    for n in fused:
        assert f'subgraph "cluster_{n.name}"' in dot
        assert n.target.name in dot
        for inner in n.target.subgraph.graph.nodes:
            if inner.op == "call_function":
                assert f'"{n.name}/{inner.name}"' in dot
    # the multi-output kernel's getitems are not boxes: edges leave the inner producers
    getitems = [n for n in after.graph.nodes if n.target is operator.getitem]
    assert getitems and not any(f'"{g.name}" [' in dot for g in getitems)
    k2 = next(n for n in fused if n.target.name == "k_add_addmm")
    assert f'"{k2.name}/add" -> "add_1"' in dot
    # drawn as one box when not expanded
    flat = draw.to_dot(after, expand_fused=False)
    assert "cluster_" not in flat and "k_addmm_gelu" in flat


def test_real_fusion_engine_groups_are_clusters(graphs):
    from passlab.passes import PassManager, parse
    from passlab.tools.runner import context
    s, gm = graphs["transformer"]
    result = PassManager(parse("fuse")).run(gm, context(s, "cpu"))
    fused = [n for n in result.gm.graph.nodes if getattr(n.target, "is_fused_kernel", False)]
    assert fused, "the fusion engine fuses the tiny transformer's layer norms and softmaxes"
    dot = draw.to_dot(result.gm, max_nodes=None)
    for n in fused:
        assert f'subgraph "cluster_{n.name}"' in dot and n.target.name in dot
    d = draw.diff(gm, result.gm)
    assert set(d.fused) == {n.name for n in fused}
    before = draw.to_dot(gm, marks=d.marks_before(), max_nodes=None)
    for old in n.meta["fused_from"]:
        assert re.search(rf'"{old}" \[.*fused by this pass', before)


def test_diff_marks_removed_added_fused(fused_mlp):
    _, before, after = fused_mlp
    d = draw.diff(before, after)
    assert set(d.fused) == {n.name for n in after.graph.nodes if getattr(n.target, "is_fused_kernel", False)}
    assert sorted(o for v in d.fused.values() for o in v) == ["add", "addmm", "addmm_2", "gelu"]
    assert d.removed == [] and d.added == [], "a fused kernel's getitems belong to it"
    dot_before = draw.to_dot(before, marks=d.marks_before())
    assert re.search(r'"gelu" \[.*style="filled,rounded,dashed"', dot_before)
    assert "fused by this pass" in dot_before

    # a pass that deletes a node: it is drawn as a red dashed ghost in the combined diff
    pruned = clone(after)
    out = pruned.graph.output_node()
    add_1 = out.args[0]
    out.args = (add_1.args[0],)
    pruned.graph.eliminate_dead_code()
    pruned.recompile()
    d2 = draw.diff(after, pruned)
    assert "add_1" in d2.removed and "addmm_3" in d2.removed
    combined = draw.diff_dot(after, pruned)
    assert '"removed/add_1"' in combined and 'style="dashed", color="#c0392b"' in combined


def test_collapse_by_module_depth(graphs):
    _, gm = graphs["transformer"]
    full = draw.build(gm, max_nodes=None)
    d1 = draw.build(gm, depth=1)
    assert d1.depth == 1 and len(d1.items) < len(full.items) / 5
    labels = " ".join(i.label for i in d1.items)
    assert "blocks.0" in labels and "blocks.1" in labels
    # the params of a block collapse into it
    assert not any(i.kind == "param" and i.id.startswith("blocks_0") for i in d1.items)
    d2 = draw.build(gm, depth=2)
    assert len(d1.items) < len(d2.items) < len(full.items)
    auto = draw.build(gm, max_nodes=40)
    assert auto.depth is not None and len(auto.items) <= 40
    assert "collapsed to module depth" in auto.dot()


@needs_dot
def test_collapsed_fused_graph_renders(fused_mlp, tmp_path):
    _, before, after = fused_mlp
    svg = draw.svg_element(draw.diff_dot(before, after, depth=2))
    assert svg.startswith("<svg") and "blocks.0" in svg and "k_add_addmm" in svg


@needs_dot
def test_show_command_draws(tmp_path, capsys):
    from passlab.tools import cli
    for fmt in ("dot", "svg"):
        out = tmp_path / f"mlp.{fmt}"
        assert cli.main(["show", "mlp", "--after", "cse", "--format", fmt, "-o", str(out)]) == 0
        assert open(out).read().lstrip().startswith("digraph" if fmt == "dot" else "<?xml")


def test_missing_graphviz_is_a_clear_error(monkeypatch, graphs):
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    with pytest.raises(draw.GraphvizMissing, match="apt-get install graphviz"):
        draw.render("digraph { a }", "svg")
