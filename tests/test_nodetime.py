"""Measured time per node (runtime/nodetime.py, tools/nodetime.py), the heat on
drawings, the per-pass graph diff (tools/passdiff.py), why-not-fused
(tools/explain.py) and their report sections. Timings are never asserted:
only that every node is timed, the numbers are well-formed, and the
instrumented run computes what the graph computes."""
import json
import operator

import pytest
import torch

from passlab.runtime.nodetime import Instrumented, measure_nodes
from passlab.runtime.executor import compile_graph
from passlab.tools import draw, explain, nodetime, passdiff, report
from passlab.tools.cli import main
from passlab.tools.show import graph_after

PROFILE = {"copy_bytes_per_s": 10e9, "matmul_flops_per_s": {"float32": 50e9, "bfloat16": 50e9}}


@pytest.fixture(scope="module")
def mlp():
    sample, gm, result = graph_after("transformer", "tiny", None, "cpu", "cleanup,fuse")
    times = nodetime.time_graphs(sample, nodetime.run_graphs(result), budget_s=0.05, profile=PROFILE)
    return sample, gm, result, times


def test_every_node_is_timed_and_the_instrumented_run_computes_the_graph(mlp):
    sample, gm, result, times = mlp
    nt = times[nodetime.step_key(result, len(result.steps) - 1)]
    calls = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    assert list(nt.nodes) == calls
    assert all(t.median_s >= 0 and t.ci_low_s <= t.median_s <= t.ci_high_s for t in nt.nodes.values())
    assert nt.step.n >= 7 and nt.coverage > 0 and nt.node_sum_s > 0
    x = sample.make_inputs(5)
    torch.testing.assert_close(Instrumented(gm)(*x), compile_graph(gm)(*x), rtol=0, atol=0)
    kernels = [t for t in nt.nodes.values() if t.kernel]
    assert kernels and all(t.bound == "memory" and t.achieved_per_s and t.percent_of_roofline for t in kernels)
    gemm = nt.nodes["addmm"]
    assert gemm.bound == "compute" and gemm.flops > 0
    d = nt.as_dict()
    json.dumps(d)
    assert set(d) >= {"step", "nodes", "coverage", "node_sum_s", "method", "roofline"}
    text = nodetime.text(nt, "transformer")
    assert "share" in text and "% of the step" in text and "fused kernels" in text


@pytest.mark.slow
def test_writes_and_multi_output_kernels_are_timed():
    """llama's fused RMSNorm/rotary kernels (getitems of multi-output kernels) run node by node as in the graph."""
    sample, gm, _ = graph_after("llama", "tiny", None, "cpu", "cleanup,fuse")
    assert any(n.target is operator.getitem and getattr(n.args[0].target, "is_fused_kernel", False)
               for n in gm.graph.nodes)
    x = sample.make_inputs(3)
    torch.testing.assert_close(Instrumented(gm)(*x), compile_graph(gm)(*x), rtol=0, atol=0)
    nt = measure_nodes(gm, [x], budget_s=0.02, min_reps=3, profile=PROFILE)
    assert len(nt.nodes) == sum(1 for n in gm.graph.nodes if n.op == "call_function")


def test_heat_colour_and_label_on_drawings(mlp):
    sample, gm, result, times = mlp
    nt = times[nodetime.step_key(result, len(result.steps) - 1)]
    dot = draw.to_dot(gm, times=nt.seconds(), step_s=nt.step.median_s)
    assert "measured time per node" in dot and dot.count(" µs · ") + dot.count(" ms · ") >= len(nt.nodes) - 2
    assert draw.heat_colour(0) == "#ffffff" and draw.heat_colour(1) == "#d63027"
    plain = draw.to_dot(gm)
    assert " µs" not in plain
    collapsed = draw.build(gm, depth=1, times=nt.seconds(), step_s=nt.step.median_s)
    assert any(i.seconds for i in collapsed.items if i.kind == "module")


def test_pass_diff_lists_removed_added_and_replaced_with_times(mlp):
    sample, gm, result, times = mlp
    diffs = {d.name: d for d in passdiff.run_diffs(result, times)}
    fuse = diffs["fuse"]
    replaced = fuse.of("replaced")
    assert replaced and not fuse.of("removed")
    for e in replaced:
        node = next(n for n in gm.graph.nodes if n.name == e.name)
        olds = {r for r in e.replaces if not r.startswith("getitem")}     # a multi-output op's getitems go too
        assert olds <= set(node.meta["fused_from"]) and e.after_s is not None and e.before_s is not None
    cleanup = [d for d in diffs.values() if d.name in ("dce", "remove_noops", "fold_constants", "cse")]
    assert any(d.of("removed") for d in cleanup)
    assert all(e.before_s is not None for d in cleanup for e in d.of("removed"))
    json.dumps([d.as_dict() for d in diffs.values()])
    text = passdiff.text(fuse)
    assert "replaced" in text and "total" in text and "measured step" in text
    bare = passdiff.pass_diff(result.baseline.snapshot, gm)
    assert bare.before_step_s is None and all(e.before_s is None for e in bare.entries)


def test_show_diff_and_its_errors(capsys, tmp_path):
    assert main(["show", "transformer", "--after", "cleanup,fuse", "--diff", "fuse"]) == 0
    out = capsys.readouterr().out
    assert "pass fuse" in out and "replaced" in out
    assert main(["show", "transformer", "--after", "cleanup,fuse", "--diff", "layout"]) == 2
    assert "not in the pipeline" in capsys.readouterr().err
    assert main(["show", "transformer", "--after", "cleanup,fuse", "--diff", "fuse", "--format", "dot",
                 "-o", str(tmp_path / "d.dot")]) == 0
    assert "digraph" in (tmp_path / "d.dot").read_text()


def test_declines_are_recorded_resolved_forced_and_measured(mlp):
    sample, gm, result, times = mlp
    fuse = next(s for s in result.steps if s.name == "fuse")
    recorded = fuse.stats["declined"]
    assert {d["reason"] for d in recorded} >= {"single_op"}
    assert sum(fuse.stats["skipped"].values()) >= len(recorded)
    items = explain.declines(result, PROFILE)
    single = [d for d in items if d.reason == "single_op"]
    assert single and all(d.holders and d.est_bytes_saved is not None for d in single)
    gemm = explain.Decline(single[0].step, "fuse", "made_up", ["addmm"], holders=["addmm", "addmm_1"])
    pattern = explain.Decline(0, "fuse_attention", "not_attention", ["addmm"], holders=["addmm"])
    explain.measure(sample, result, [single[0], gemm, pattern], budget_s=0.02)
    assert single[0].legal and single[0].speedup and len(single[0].speedup_ci) == 2
    assert single[0].max_error is not None and single[0].max_error <= 1e-5
    assert gemm.legal is False and gemm.why_not == "not_fusible_op"
    assert pattern.legal is False and gemm.speedup is None
    text = explain.text(items)
    assert "single_op" in text and "est. saving" in text


def test_explain_command_writes_json(tmp_path, capsys):
    out = tmp_path / "why.json"
    assert main(["explain", "transformer", "--after", "cleanup,fuse", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["declines"] and {"reason", "nodes", "est_bytes_saved", "legal", "flagged"} <= set(data["declines"][0])
    assert "single_op" in capsys.readouterr().out
    assert main(["explain", "transformer", "--top", "-1"]) == 2


def test_report_has_node_times_and_pass_diffs(mlp):
    sample, gm, result, times = mlp
    rec = {"model": "transformer", "steps": [], "node_times": {k: t.as_dict() for k, t in times.items()},
           "pass_diffs": [d.as_dict() for d in passdiff.run_diffs(result, times)]}
    html = report.node_times(rec)
    assert 'id="node-times"' in html and "captured graph" in html and "final graph" in html
    assert "fused kernels against the roofline" in html and "% of roofline" in html
    d = report.diff_table(rec["pass_diffs"][-1])
    assert "graph diff:" in d and "replaced" in d
    assert report.node_times({"model": "transformer"}) == ""
