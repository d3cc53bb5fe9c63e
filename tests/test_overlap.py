"""Overlap passes: structure (collective order kept, waits after their
collectives, no dependency broken), numerics in a one-rank world, and a
two-rank gloo run against the unsharded reference."""
import os
import socket

import pytest
import torch

from passlab.graphs import capture, clone, load
from passlab.passes import PassContext
from passlab.passes import overlap
from passlab.runtime.simulator import collective_kind

MODELS = ["tp_mlp", "ep_moe", "fsdp_mlp"]


@pytest.fixture(scope="module")
def graphs():
    out = {}
    for m in MODELS:
        s = load(m, "tiny")
        out[m] = (s, capture(s.module, s.example_inputs))
    return out


def origin(node):
    return node.meta["overlap_chunk"][0] if "overlap_chunk" in node.meta else node.name


def check_structure(before, after):
    seen = set()
    for n in after.graph.nodes:
        for a in n.all_input_nodes:
            assert a in seen, f"{n.name} reads {a.name} before it is computed"
        if collective_kind(n) == "wait":
            assert collective_kind(n.args[0]) not in (None, "wait")
        seen.add(n)
    order = [n.name for n in before.graph.nodes if collective_kind(n) not in (None, "wait")]
    rank = {name: i for i, name in enumerate(order)}
    got = [rank[origin(n)] for n in after.graph.nodes if collective_kind(n) not in (None, "wait")]
    assert got == sorted(got), "collectives issued in another order"
    after.graph.lint()


def assert_same(s, gm_a, gm_b, tol=1e-5):
    for seed in (1, 2):
        x = s.make_inputs(seed)
        with torch.no_grad():
            a, b = gm_a(*x), gm_b(*x)
        assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


@pytest.mark.parametrize("model", MODELS)
def test_reorder_issues_early_waits_late(graphs, model):
    s, gm = graphs[model]
    res = overlap.overlap_reorder(clone(gm), PassContext(world_size=2), link="eth-10g")
    check_structure(gm, res.gm)
    assert_same(s, gm, res.gm)
    est = res.stats["estimate"]
    assert est["exposed_comm_us_after"] <= est["exposed_comm_us_before"]
    assert res.stats["moved"] > 0
    # every wait now comes after some independent compute where there is any
    calls = [n for n in res.gm.graph.nodes if n.op == "call_function"]
    coll = next(i for i, n in enumerate(calls) if collective_kind(n) not in (None, "wait"))
    wait = next(i for i, n in enumerate(calls) if collective_kind(n) == "wait" and n.args[0] is calls[coll])
    assert wait > coll + 1


@pytest.mark.parametrize("model,k", [("ep_moe", 2), ("ep_moe", 5), ("tp_mlp", 2), ("fsdp_mlp", 2)])
def test_chunk_keeps_numerics_and_order(graphs, model, k):
    s, gm = graphs[model]
    res = overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="eth-10g", k=k)
    check_structure(gm, res.gm)
    assert_same(s, gm, res.gm)
    n_before = len(overlap.collectives(gm.graph.nodes))
    chunks = [n for n in overlap.collectives(res.gm.graph.nodes) if "overlap_chunk" in n.meta]
    assert chunks and all(n.meta["overlap_chunk"][2] == k for n in chunks)
    assert len(overlap.collectives(res.gm.graph.nodes)) == n_before + (k - 1) * res.stats["split"]


def test_chunk_moe_splits_dispatch_experts_and_combine(graphs):
    s, gm = graphs["ep_moe"]
    res = overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="eth-10g", k=2)
    chunked = {n.meta["overlap_chunk"][0] for n in res.gm.graph.nodes if "overlap_chunk" in n.meta}
    assert {"all_to_all_single", "bmm", "bmm_2", "all_to_all_single_1"} <= chunked
    bmms = [n for n in res.gm.graph.nodes if n.target == torch.ops.aten.bmm.default]
    assert len(bmms) == 2 * 6      # 3 expert GEMMs x 2 layers x 2 chunks


def test_chunk_k_must_divide(graphs):
    s, gm = graphs["ep_moe"]
    res = overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="eth-10g", k=7)
    assert res.stats["split"] == 0 and res.stats["skipped"]
    assert_same(s, gm, res.gm)


def test_regroup_keeps_chunk_axis_whole():
    lay = overlap.dims_of([40, 16], 0, 10)                  # 40 = 4 outer x 10 chunked
    assert overlap.regroup(lay, [1, 4, 10, 16]) == ((), ((4, False),), ((10, True),), ((16, False),))
    assert overlap.regroup(lay, [2, 20, 16]) == (((2, False),), ((2, False), (10, True)), ((16, False),))
    assert overlap.regroup(lay, [8, 5, 16]) is None          # would cut the chunk axis
    assert overlap.chunked_shape(lay, 5) == [20, 16]
    assert overlap.split_leading(lay, 2) == (((2, False),), ((2, False), (10, True)))
    assert overlap.split_leading(overlap.dims_of([40, 16], 0, 40), 2) is None


def test_pipeline_with_numerics_instrument():
    from passlab.tools.runner import run
    r = run("ep_moe", pipeline="overlap_reorder,overlap_chunk(k=2)", measure=False)
    assert [s["status"] for s in r.record["steps"]] == ["ok", "ok"]
    assert all(s["numerics_ok"] for s in r.record["steps"])


class MatmulReduceScatter(torch.nn.Module):
    """matmul -> reduce_scatter -> pointwise: the sequence-parallel pattern."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        import torch.distributed._functional_collectives as funcol
        from passlab.graphs.distributed import group
        rs = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
        return torch.nn.functional.gelu(rs(x @ self.w, "sum", 0, group())) * 2


def reduce_scatter_graph():
    from passlab.graphs.distributed import world
    world()
    m = MatmulReduceScatter().eval()
    return m, capture(m, (torch.randn(8, 16),))


def test_chunk_matmul_reduce_scatter():
    m, gm = reduce_scatter_graph()
    res = overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="eth-10g", k=2)
    check_structure(gm, res.gm)
    assert res.stats["k"] == {"reduce_scatter_tensor": 2}
    assert sum(1 for n in res.gm.graph.nodes if n.target == torch.ops.aten.mm.default) == 2
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.allclose(res.gm(x), m(x), atol=1e-5)


# ---------------------------------------------------------------- two ranks, gloo

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_worker(rank, world, port, models, queue):
    import faulthandler, sys
    faulthandler.dump_traceback_later(100, exit=True, file=sys.stderr)
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for model in models:
            s = load(model, "tiny")
            gm = capture(s.module, s.example_inputs)
            ctx = PassContext(world_size=world, rank=rank)
            gm = overlap.overlap_reorder(gm, ctx, link="eth-10g").gm
            gm = overlap.overlap_chunk(gm, ctx, link="eth-10g", k=2).gm
            x = s.make_inputs(5)
            with torch.no_grad():
                got, ref = gm(*x), s.module.reference(*x)
            queue.put((model, rank, float((got - ref).abs().max()), float(ref.abs().max())))
        m, gm = reduce_scatter_graph()                    # the reference: the unchunked graph on the same ranks
        chunked = overlap.overlap_chunk(clone(gm), PassContext(world_size=world, rank=rank), link="eth-10g", k=2).gm
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            got, ref = chunked(x), gm(x)
        queue.put(("reduce_scatter", rank, float((got - ref).abs().max()), float(ref.abs().max())))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_reference():
    models = ["ep_moe", "tp_mlp"]
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=two_rank_worker, args=(r, 2, port, models, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=120) for _ in range(2 * len(models) + 2))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert len(results) == 2 * len(models) + 2
    for model, rank, err, scale in results:
        assert err <= 1e-4 * max(scale, 1.0), (model, rank, err)


def test_chunk_fires_by_default_where_the_estimate_says_it_helps(graphs, monkeypatch):
    """k=0 (the default): the cost model chooses. On a bandwidth-bound link
    the MoE dispatch/combine is split; where latency dominates every chunk's
    transfer, nothing is, and the pass says why."""
    s, gm = graphs["ep_moe"]
    cpu = {"device": "cpu", "copy_bytes_per_s": 1e9, "matmul_flops_per_s": {"float32": 1e8},
           "op_overhead_s": 0.0, "collective_overhead_s": 0.0}       # compute comparable to the transfers
    from passlab.runtime import simulator
    monkeypatch.setattr(simulator, "device_profile", lambda name, measure=False: dict(cpu))
    fast = overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="rate=2MB;latency=0")
    lat = overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="rate=1000GB;latency=50ms")
    assert fast.stats["split"] > 0 and set(fast.stats["k"].values()) <= {2, 4, 8}, fast.stats
    est = fast.stats["estimate"]
    assert est["step_us_after"] < est["step_us_before"] and est["link"] == "rate=2MB;latency=0"
    check_structure(gm, fast.gm)
    assert_same(s, gm, fast.gm)
    assert lat.stats["split"] == 0 and lat.stats["skipped"] == {"no estimated gain": 4}, lat.stats


def test_default_pipeline_runs_the_overlap_passes():
    from passlab.passes.pipeline import DEFAULT_PIPELINE
    names = DEFAULT_PIPELINE.split(",")
    assert names[-3:-1] == ["overlap_reorder", "overlap_chunk"]     # then write_in_place, which must run last
    assert names[-1] == "write_in_place"
    s = load("mlp", "tiny")                    # no collectives: both leave the graph alone
    gm = capture(s.module, s.example_inputs)
    for p in (overlap.overlap_reorder, overlap.overlap_chunk):
        res = p(clone(gm), PassContext())
        assert res.changed is False and res.stats == {"collectives": 0}


# ---------------------------------------------------------------- the measured guard on the link

def slowed_chunks(payload):
    """Rank target: ep_moe (tiny) through overlap_reorder and overlap_chunk(k=2)
    under the run's agreement and link guard, with every chunked graph made
    slower (a sleep per call) where it is timed: the chunk factor's own
    confirmation must keep "no split", and a split forced past it (confirm=off)
    must be rolled back by the link guard."""
    import time as _time
    import torch.distributed as dist
    from passlab.passes import PassManager, parse
    from passlab.runtime import executor
    from passlab.tools.distributed_run import agreeing
    real = executor.compile_graph

    def slowed(gm, device="cpu"):
        run = real(gm, device)
        if not any("overlap_chunk" in n.meta for n in gm.graph.nodes):
            return run

        def slow(*args):
            _time.sleep(payload["delay_s"])
            return run(*args)
        return slow
    executor.compile_graph = slowed
    s = load("ep_moe", "tiny")
    gm = capture(s.module, s.example_inputs)
    ctx = PassContext(world_size=dist.get_world_size(), rank=dist.get_rank(), example_inputs=s.flat_inputs,
                      sample=s)
    out = {}
    for name, pipeline in (("confirmed", "overlap_chunk(k=2)"), ("forced", "overlap_chunk(k=2,confirm=off)")):
        res = agreeing(PassManager(parse(pipeline), instruments=[]), guard_rounds=3).run(clone(gm), ctx)
        rec = res.steps[0]
        out[name] = {"status": rec.status, "error": rec.error, "stats": {k: v for k, v in rec.stats.items()
                                                                          if k != "traceback"},
                     "split_in_final": sum("overlap_chunk" in n.meta for n in res.gm.graph.nodes)}
    return out


@pytest.mark.distributed
def test_a_chunking_slower_on_the_link_is_never_the_graph_that_runs():
    from passlab.runtime.distributed import link, spawn
    r = spawn(f"{os.path.abspath(__file__)}:slowed_chunks", {"delay_s": 0.2}, 2, timeout=240,
              link=link.resolve("rate=1gbit,latency=1ms"))
    for out in r.results:
        conf, forced = out["confirmed"], out["forced"]
        # the chunk factor confirmed on the link: "no split" measured faster, kept, candidates on record
        m = conf["stats"]["measured"]
        assert m["chosen"] == "no split" and conf["split_in_final"] == 0, m
        assert m["baseline_is_input"] is False          # given the captured order: the link guard times it too
        assert set(m["candidates"]) == {"no split", "estimate's choice k=2"} and m["rounds"] in (5, 10, 15)
        assert all(c["n"] == m["rounds"] and len(c["speedup"]) == 3 for c in m["candidates"].values())
        assert conf["stats"]["split"] == 0 and "slower on the link than no split (measured)" in conf["stats"]["skipped"]
        # forced past it: rolled back by the link guard, the measured loss in its error and stats
        assert forced["status"] == "rolled_back" and forced["split_in_final"] == 0, forced
        assert forced["error"].startswith("SlowerOnTheLink: slower on the emulated link: +"), forced["error"]
        guard = forced["stats"]["measured_on_link"]
        assert {"slower", "after", "rounds"} <= set(guard) and len(guard["after"]["speedup"]) == 3   # on record
        assert forced["stats"]["split"] > 0          # what the pass did is still on record
    assert r.results[0]["forced"]["error"] == r.results[1]["forced"]["error"]   # rank 0 decided for both


def test_confirm_option_checked():
    s = load("ep_moe", "tiny")
    gm = capture(s.module, s.example_inputs)
    with pytest.raises(ValueError, match="confirm='maybe'; use auto, on or off"):
        overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="eth-10g", confirm="maybe")
    with pytest.raises(ValueError, match="confirm=on times the candidates on every rank"):
        overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="eth-10g", confirm="on")
    # outside a multi-rank process group nothing is timed: the estimate decides
    res = overlap.overlap_chunk(clone(gm), PassContext(world_size=2), link="eth-10g", k=2)
    assert "measured" not in res.stats and res.stats["split"] > 0
