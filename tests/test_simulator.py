"""Simulator: collective formulas on hand-computed cases, the two-stream replay,
overlap metrics, and the `passlab simulate` command."""
import pytest
import torch
import torch.fx

from passlab.runtime import simulator
from passlab.runtime.overlap_metrics import overlap_metrics
from passlab.runtime.simulator import Event, Link, collective_time

LINK = Link("test", 1e9, 1e-5)


def test_collective_formulas_by_hand():
    mb = 1_000_000
    # each hop: two latencies (gloo's receive-ready notice, then the data)
    assert collective_time("all_reduce", mb, 4, LINK) == pytest.approx(2 * 3 / 4 * 1e-3 + 12 * 1e-5)
    assert collective_time("all_gather", mb, 8, LINK) == pytest.approx(7 / 8 * 1e-3 + 14 * 1e-5)
    assert collective_time("reduce_scatter", mb, 8, LINK) == pytest.approx(7 / 8 * 1e-3 + 14 * 1e-5)
    assert collective_time("all_to_all", mb, 1024, LINK) == pytest.approx(1023 / 1024 * 1e-3 + 2 * 1e-5)
    assert collective_time("broadcast", mb, 16, LINK) == pytest.approx(1e-3 + 8 * 1e-5)
    assert collective_time("all_reduce", mb, 1, LINK) == 0.0
    assert collective_time("all_reduce", mb, 2, LINK, overhead_s=1e-4) == pytest.approx(1e-3 + 4e-5 + 1e-4)
    with pytest.raises(ValueError):
        collective_time("gossip", mb, 4, LINK)


def test_one_link_table():
    """The run, the passes and the simulator read the same links."""
    from passlab.runtime.distributed import link
    assert simulator.LINKS is link.LINKS and simulator.get_link is link.get_link
    ib = link.resolve("ib-400g", 50e9)
    assert ib.rate_bytes_per_s == pytest.approx(50e9 * 50e9 / 989e12)
    assert simulator.get_link(ib.spec()).bytes_per_s == pytest.approx(ib.bytes_per_s, rel=1e-5)
    assert simulator.get_link(ib.spec()).latency_s == pytest.approx(ib.latency_s, rel=1e-5)


class Parts(simulator.Estimator):
    """Every collective: 1 s of latency, 2 s on the wire."""

    def __init__(self):
        super().__init__({"op_overhead_s": 0.0}, LINK, 2)

    def comm_parts(self, node):
        return 1.0, 2.0


def test_comm_stream_chunks_in_flight_share_one_latency():
    s = simulator.CommStream(Parts(), slots=2)
    assert s.issue("a", 0.0) == (0.0, pytest.approx(3.0))         # 0.5 latency, 2 on the wire, 0.5 latency
    assert s.issue("b", 0.0) == (0.0, pytest.approx(5.0))         # its bytes queue behind a's; latency overlaps
    assert s.issue("c", 0.0) == (pytest.approx(3.0), pytest.approx(7.0))  # both workers busy: starts when a ends
    assert s.last_end == pytest.approx(7.0)
    alone = simulator.CommStream(Parts(), slots=1)
    alone.issue("a", 0.0)
    assert alone.issue("b", 0.0)[1] == pytest.approx(6.0)         # one worker: one after the other


def a2a_nodes(n: int) -> list:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    op = torch.ops._c10d_functional.all_to_all_single.default
    return [g.call_function(op, (x, [1, 1], [1, 1], "0")) for _ in range(n)]


def test_w2_exchanges_after_the_first_move_one_direction_at_a_time():
    """Measured on the delay line: once one rank of a pair issues an all_to_all
    more than about a latency after the other, the two directions run one after
    the other; the first exchange of a step (after a barrier) leaves the ranks
    one wire time apart, so every later one at W=2 pays its wire time twice."""
    a, b, c = a2a_nodes(3)
    s = simulator.CommStream(Parts(), slots=1)
    assert s.issue(a, 0.0)[1] == pytest.approx(3.0)               # 1 latency + 2 on the wire
    assert s.issue(b, 3.0)[1] == pytest.approx(8.0)               # 1 latency + 2 x 2 on the wire
    assert s.issue(c, 8.0)[1] == pytest.approx(13.0)
    assert simulator.pair_serialized(0) == 1.0 and simulator.pair_serialized(5) == 2.0
    wide = Parts()
    wide.world = 4                                                # other peers keep the uplink busy: not serial
    s4 = simulator.CommStream(wide, slots=1)
    s4.issue(a, 0.0)
    assert s4.issue(b, 3.0)[1] == pytest.approx(6.0)


def test_links_and_devices():
    l = simulator.get_link("rate=10gbit,latency=50us")
    assert l.bytes_per_s == pytest.approx(1.25e9) and l.latency_s == pytest.approx(5e-5)
    assert simulator.get_link("ib-400g").bytes_per_s == pytest.approx(50e9)
    with pytest.raises(ValueError):
        simulator.get_link("carrier-pigeon")
    with pytest.raises(ValueError):
        simulator.get_link("latency=5us")
    h100 = simulator.device_profile("h100")
    assert "datasheet" in h100["source"] and h100["matmul_flops_per_s"]["bfloat16"] == 989e12
    with pytest.raises(ValueError):
        simulator.device_profile("tpu9")


class Fixed(simulator.Estimator):
    """Every compute node 1 s, every collective 2 s, no issue cost."""

    def __init__(self):
        super().__init__({"op_overhead_s": 0.0}, LINK, 2)

    def compute(self, node):
        return 1.0 if node.op == "call_function" else 0.0

    def comm_parts(self, node):
        return 0.0, 2.0


def hand_graph(early: bool) -> torch.fx.Graph:
    c10d, aten = torch.ops._c10d_functional, torch.ops.aten
    g = torch.fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    a = g.call_function(aten.mm.default, (x, x))
    if early:
        c = g.call_function(c10d.all_reduce.default, (a, "sum", "0"))
        b = g.call_function(aten.mm.default, (y, y))
    else:
        b = g.call_function(aten.mm.default, (y, y))
        c = g.call_function(c10d.all_reduce.default, (a, "sum", "0"))
    w = g.call_function(c10d.wait_tensor.default, (c,))
    g.output(g.call_function(aten.add.Tensor, (w, b)))
    return g


def test_two_stream_replay_by_hand():
    # mm 0-1 | all_reduce 1-3 beside mm 1-2 | wait until 3 | add 3-4
    sim = simulator.replay(list(hand_graph(early=True).nodes), Fixed())
    assert sim.step_s == pytest.approx(4.0)
    assert sim.compute_s == pytest.approx(3.0) and sim.comm_s == pytest.approx(2.0)
    assert sim.exposed_comm_s == pytest.approx(1.0)
    assert sim.overlap_efficiency == pytest.approx(0.5)
    # issued after the independent mm: nothing hides it
    late = simulator.replay(list(hand_graph(early=False).nodes), Fixed())
    assert late.step_s == pytest.approx(5.0) and late.exposed_comm_s == pytest.approx(2.0)
    assert late.overlap_efficiency == pytest.approx(0.0)


def test_overlap_metrics_by_hand():
    ev = [Event("a", "compute", 0, 4), Event("b", "comm", 3, 6), Event("c", "compute", 5, 7)]
    m = overlap_metrics(ev)
    assert m["comm_s"] == pytest.approx(3) and m["compute_s"] == pytest.approx(6)
    assert m["exposed_comm_s"] == pytest.approx(1) and m["overlap_efficiency"] == pytest.approx(2 / 3)
    assert m["step_s"] == pytest.approx(7)
    chrome = [{"ph": "X", "cat": "compute", "ts": 0, "dur": 10, "pid": 0},
              {"ph": "X", "cat": "comm", "ts": 5, "dur": 10, "pid": 0},
              {"ph": "X", "cat": "comm", "ts": 0, "dur": 10, "pid": 1},
              {"ph": "M", "name": "process_name", "pid": 0}]
    m = overlap_metrics(chrome)
    assert m["ranks"][0]["exposed_comm_s"] == pytest.approx(5e-6)
    assert m["ranks"][1]["overlap_efficiency"] is None
    assert overlap_metrics([])["overlap_efficiency"] is None


def test_simulate_command(capsys):
    from passlab.tools.cli import main
    assert main(["simulate", "ep_moe", "--world-size", "64", "--link", "ib-400g", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "overlap_reorder" in out and "collectives costed at W=64" in out
    assert main(["simulate", "ep_moe", "--world-size", "4", "--link", "nope"]) == 2


def test_predict_scales_with_world():
    from passlab.tools.simulate import predict
    small = predict("tp_mlp", world=2, link="eth-10g", device="h100", pipeline="overlap_reorder")
    big = predict("tp_mlp", world=32, link="eth-10g", device="h100", pipeline="overlap_reorder")
    assert big["steps"][0]["comm_s"] > small["steps"][0]["comm_s"] > 0
    assert big["steps"][1]["exposed_comm_s"] <= big["steps"][0]["exposed_comm_s"]


def test_share_divides_the_machine():
    prof = {"copy_bytes_per_s": 8e9, "matmul_flops_per_s": {"float32": 4e10}, "threads": 1, "cores": 2,
            "op_overhead_s": 1e-5}
    assert simulator.share(prof, 2) is prof
    four = simulator.share(prof, 4)
    assert four["copy_bytes_per_s"] == pytest.approx(4e9) and four["op_overhead_s"] == pytest.approx(2e-5)


def test_compare_a_bench_result():
    from passlab.tools.simulate import compare
    metrics = {"comm_s": 0.01, "compute_s": 0.02, "exposed_comm_s": 0.005, "overlap_efficiency": 0.5}
    ranks = [{"rank": r, "step_s": {"captured": 0.010 + r * 0.002, "overlap_reorder": 0.008},
              "metrics": {"captured": metrics, "overlap_reorder": metrics}} for r in range(2)]
    bench = {"model": "tp_mlp", "preset": "tiny", "world": 2, "pass_link": "rate=10MB;latency=100us",
             "ranks": ranks}
    pred = compare(bench, device="h100")
    rows = pred["steps"]
    assert [r["step"] for r in rows] == ["captured", "overlap_reorder"]
    assert rows[0]["measured_step_s"] == pytest.approx(0.012)          # the slowest rank
    assert rows[0]["error"] == pytest.approx((rows[0]["step_s"] - 0.012) / 0.012)
    assert rows[1]["measured_overlap_efficiency"] == pytest.approx(0.5)


def test_shapley_of_a_bench_with_subsets():
    """Two passes, every subset timed: exact Shapley values add up to the total log gain."""
    import math
    from passlab.tools.distributed_run import shapley_of, subset_key
    from passlab.passes import parse
    steps = parse("overlap_reorder,overlap_chunk")
    assert subset_key(steps, (1,)) == "overlap_chunk (subset)" and subset_key(steps, (0, 1)) == "overlap_chunk"
    times = {"captured": 1.0, "overlap_reorder": 0.9, "overlap_chunk": 0.5, "overlap_chunk (subset)": 0.8}
    ranks = [{"step_s": {k: t * (1 + 0.1 * r) for k, t in times.items()}} for r in range(2)]
    out = shapley_of({"passes": ["overlap_reorder", "overlap_chunk"], "ranks": ranks})
    v = {k: -math.log(t * 1.1) for k, t in times.items()}
    solo_r, solo_c = v["overlap_reorder"] - v["captured"], v["overlap_chunk (subset)"] - v["captured"]
    total = v["overlap_chunk"] - v["captured"]
    assert out["total_log_gain"] == pytest.approx(total)
    assert sum(out["shapley"].values()) == pytest.approx(total)
    assert out["interaction"] == pytest.approx(total - solo_r - solo_c)
    assert out["shapley"]["overlap_reorder"] == pytest.approx(0.5 * solo_r + 0.5 * (total - solo_c))


# ---------------------------------------------------------------- the collective model (issue 25)

def test_compute_slows_while_collectives_are_in_flight():
    """mm 0-1 | all_reduce 1-3 | mm beside it, x`comm_compute_slowdown` | wait | add."""
    for slow, step, compute in ((1.0, 4.0, 3.0), (1.5, 4.0, 3.5), (3.0, 5.0, 5.0)):
        est = Fixed()
        est.profile = {"op_overhead_s": 0.0, "comm_compute_slowdown": slow}
        sim = simulator.replay(list(hand_graph(early=True).nodes), est)
        assert sim.step_s == pytest.approx(step) and sim.compute_s == pytest.approx(compute), slow
    # nothing in flight: nothing slowed
    est = Fixed()
    est.profile = {"op_overhead_s": 0.0, "comm_compute_slowdown": 3.0}
    assert simulator.replay(list(hand_graph(early=False).nodes), est).compute_s == pytest.approx(3.0)


def test_a_burst_of_collectives_completes_in_pairs():
    """gloo's two workers each run one collective at a time, each paying its
    latencies (measured through the delay line: 8 one-element all_to_alls
    issued at once complete in pairs one hop apart), plus the time a collective
    holds its worker (`collective_overhead_s`, fitted to such a burst)."""
    link = Link("t", 1e9, 5e-3)
    est = simulator.Estimator({"op_overhead_s": 0.0, "collective_overhead_s": 1e-3}, link, 2)
    est.comm_parts = lambda node: (2 * link.latency_s + 1e-3, 0.0)
    s = simulator.CommStream(est)
    ends = [s.issue(f"c{i}", 0.0)[1] for i in range(8)]
    assert ends == pytest.approx([11e-3 * (i // 2 + 1) for i in range(8)])


def gemm_graph(rows: int, chunks: int) -> torch.fx.Graph:
    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    x.meta["val"], w.meta["val"] = torch.empty(rows, 64), torch.empty(64, 256)
    outs = []
    for j in range(chunks):
        part = g.call_function(aten.slice.Tensor, (x, 0, j * rows // chunks, (j + 1) * rows // chunks))
        part.meta["val"] = torch.empty(rows // chunks, 64)
        mm = g.call_function(aten.mm.default, (part, w))
        mm.meta["val"] = torch.empty(rows // chunks, 256)
        outs.append(mm)
    g.output(outs)
    return g


def test_gemm_rate_falls_with_rows():
    """A GEMM split in k chunks of rows: each chunk re-reads the weight, so at
    rate(rows) = peak x rows / (rows + half) the k chunks take 2KN(M + k half)/peak."""
    prof = {"copy_bytes_per_s": 1e18, "matmul_flops_per_s": {"float32": 1e9}, "op_overhead_s": 0.0}
    mms = lambda g: [n for n in g.nodes if n.target == torch.ops.aten.mm.default]
    t = lambda g, p: sum(simulator.compute_time(n, p) for n in mms(g))
    for k in (1, 4, 16):
        assert t(gemm_graph(256, k), prof) == pytest.approx(2 * 256 * 64 * 256 / 1e9)    # no fall: same time
        fitted = dict(prof, gemm_rows_half=32.0)
        assert t(gemm_graph(256, k), fitted) == pytest.approx(2 * 64 * 256 * (256 + k * 32) / 1e9)
    assert simulator.rows_efficiency(96, {"gemm_rows_half": 32.0}) == pytest.approx(0.75)
    assert simulator.rows_efficiency(None, {"gemm_rows_half": 32.0}) == 1.0


def measured_profile(payload):
    """Rank target: the overlap passes' run profile on this link for ep_moe (tiny)."""
    from passlab.graphs import capture, load
    from passlab.passes import overlap
    s = load("ep_moe", "tiny")
    gm = capture(s.module, s.example_inputs)
    link = simulator.get_link(payload["link"])
    prof = overlap.run_profile("cpu", s.dtype, link, gm)
    est = simulator.Estimator(prof, link, 2)
    sim = simulator.replay(list(gm.graph.nodes), est)
    return {"profile": prof, "step_s": sim.step_s}


@pytest.mark.distributed
def test_the_collective_model_is_measured_on_the_link():
    """On the delay line (where root can make namespaces; loopback elsewhere):
    every rank gets rank 0's profile, with the collectives' costs and the
    GEMM's rows fall measured there. Values are checked for sense, never timed."""
    from passlab.runtime.distributed import link, spawn
    lk = link.resolve("rate=1gbit,latency=1ms")
    r = spawn(f"{__file__}:measured_profile", {"link": lk.spec()}, 2, timeout=240, link=lk)
    p0, p1 = (x["profile"] for x in r.results)
    assert p0 == p1                                                  # rank 0's numbers, broadcast
    assert p0["collective_overhead_s"] >= 0 and p0["comm_compute_slowdown"] >= 1.0
    burst = p0["collective_burst"]
    assert burst["collectives"] == 8 and burst["median_s"] > 0 and burst["gemm_alone_s"] > 0
    assert p0["gemm_rows_half"] >= 0 and "largest GEMM" in p0["source"] and "in flight" in p0["source"]
    assert all(x["step_s"] > 0 for x in r.results)
