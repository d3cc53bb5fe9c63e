"""`--compiler inductor`: Inductor's optimizations as pipeline items, passlab
passes inside torch.compile (tools/inductor.py, passes/inductor.py).

Fast tests never compile with Inductor (a cold compile costs 15-40 s on the
2-core VM): the switch table against torch._inductor.config, item parsing,
the attribution helpers, the record's schema with the compile stubbed, and
the custom pass on a graph of Inductor's form made by make_fx with Inductor's
decomposition table. The slow ones compile for real, in a private cache dir."""
import itertools
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from passlab.graphs import load
from passlab.passes import PipelineError
from passlab.passes.inductor import InductorPass, InductorPassError, inductor_pass
from passlab.tools import attribution, inductor
from passlab.tools.cli import main

aten = torch.ops.aten
REQUIRED = ["fusion", "inlining", "pattern_matcher", "freezing", "epilogue_fusion", "cpp_wrapper", "max_autotune",
            "cudagraphs"]


# ---------------------------------------------------------------- the switch table

def test_every_switch_sets_real_inductor_config_and_differs_on_and_off():
    known = torch._inductor.config.get_config_copy()
    assert set(REQUIRED) <= set(inductor.SWITCHES)
    for s in inductor.SWITCHES.values():
        assert s.on != s.off, s.name
        for k in {**s.on, **s.off}:
            assert k in known, f"{s.name}: {k} is not a torch._inductor.config value"


def test_default_items_are_the_switches_of_the_device():
    cpu, cuda = inductor.switches_for("cpu"), inductor.switches_for("cuda:0")
    assert "cudagraphs" not in cpu and "max_autotune" in cpu
    assert "cudagraphs" in cuda and "max_autotune" not in cuda
    assert [i.name for i in inductor.parse_items(None, "cpu")] == cpu


def test_items_parse_switches_and_passlab_passes_and_refuse_bad_ones():
    items = inductor.parse_items("fusion,freezing,cleanup,fuse_attention(choose=always)", "cpu")
    assert [i.name for i in items] == ["fusion", "freezing", "cleanup", "fuse_attention(choose=always)"]
    assert items[0].switch is inductor.SWITCHES["fusion"] and not items[0].steps
    assert [s.name for s in items[2].steps] == ["dce", "cse", "remove_noops", "fold_constants"]
    with pytest.raises(PipelineError, match="Inductor switches: fusion"):
        inductor.parse_items("fusion,no_such_thing", "cpu")
    with pytest.raises(PipelineError, match="takes no options"):
        inductor.parse_items("fusion(x=1)", "cpu")
    with pytest.raises(PipelineError, match="cuda only"):
        inductor.parse_items("cudagraphs", "cpu")
    with pytest.raises(PipelineError, match="twice"):
        inductor.parse_items("fusion,fusion", "cpu")


def test_a_configuration_turns_its_items_on_and_every_other_listed_switch_off():
    items = inductor.parse_items("fusion,inlining,fuse_attention", "cpu")
    base = inductor.config_for(items, ())
    assert base == {"max_fusion_size": 1, "realize_opcount_threshold": 0, "realize_acc_reads_threshold": 0,
                    "realize_reads_threshold": 0}
    cfg = inductor.config_for(items, (0, 2))
    assert cfg["max_fusion_size"] == 64 and cfg["realize_opcount_threshold"] == 0
    p = cfg["post_grad_custom_post_pass"]
    assert isinstance(p, torch._inductor.custom_graph_pass.CustomGraphPass) and p.pipeline == "fuse_attention"
    assert p.uuid() == inductor_pass("fuse_attention").uuid() != inductor_pass("cleanup").uuid()


def test_list_switches_shows_each_switch_with_its_config(capsys):
    assert main(["list", "switches"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out
    assert "max_fusion_size=1" in out and "triton.cudagraphs=True" in out


@pytest.mark.parametrize("argv, what", [
    (["--peers"], "--peers does not apply"),
    (["--pipeline", "fusion,bogus"], "unknown pass"),
    (["--max-configs", "0"], "positive"),
])
def test_bad_arguments_exit_2(capsys, argv, what):
    assert main(["run", "mlp", "--compiler", "inductor"] + argv) == 2
    assert what in capsys.readouterr().err


# ---------------------------------------------------------------- attribution helpers

def test_cyclic_orders_put_every_player_at_every_position_twice_on_n_n_minus_1_plus_2_subsets():
    n = 7
    perms = attribution.cyclic_permutations(n, seed=3)
    assert len(perms) == 2 * n and all(sorted(p) == list(range(n)) for p in perms)
    for pos in range(n):
        assert sorted(p[pos] for p in perms) == sorted(list(range(n)) * 2)
    need = attribution.needed_subsets(n, ablate=False, shapley=True, exact_max=6, perms=perms)
    assert len(need) == n * (n - 1) + 2 + 0 or len(need) == n * (n - 1) + 2
    assert len(need) < 2 ** n


def test_sampled_and_budget_cut_shapley_sum_to_the_total_log_gain():
    n = 7
    rnd = [0.3, -0.1, 0.05, 0.2, 0.0, -0.02, 0.11]
    v = {s: sum(rnd[i] for i in s) + (0.1 if {0, 1} <= set(s) else 0.0)
         for r in range(n + 1) for s in itertools.combinations(range(n), r)}
    perms = attribution.cyclic_permutations(n)
    need = attribution.needed_subsets(n, ablate=False, shapley=True, exact_max=6, perms=perms)
    cut = {s: v[s] for s in need[: len(need) // 2]}         # a budget stopped half way
    extra = attribution.attribute(cut, [f"p{i}" for i in range(n)], ablate=False, shapley=True, exact_max=6,
                                  perms=perms)
    assert 0 < extra["shapley_samples"] < 2 * n
    assert sum(extra["shapley"].values()) == pytest.approx(extra["total_log_gain"])
    full = attribution.attribute({s: v[s] for s in need}, [f"p{i}" for i in range(n)], ablate=False,
                                 shapley=True, exact_max=6, perms=perms)
    assert full["shapley_samples"] == 2 * n
    assert full["interaction_matrix"]["p0"]["p0"] == pytest.approx(rnd[0])


def test_exact_shapley_interaction_matrix_finds_the_pair():
    v = {s: (0.1 * len(s)) + (0.4 if {0, 2} <= set(s) else 0.0)
         for r in range(4) for s in itertools.combinations(range(3), r)}
    extra = attribution.attribute(v, ["a", "b", "c"], ablate=True, shapley=True, exact_max=6)
    assert extra["shapley_samples"] is None
    m = extra["interaction_matrix"]
    assert m["a"]["c"] == pytest.approx(0.4) and m["a"]["b"] == pytest.approx(0.0)
    assert extra["interaction"] == pytest.approx(0.4)
    assert sum(extra["shapley"].values()) == pytest.approx(v[(0, 1, 2)] - v[()])


# ---------------------------------------------------------------- the record, compile stubbed

def test_record_has_the_run_schema_with_the_compile_stubbed(monkeypatch, tmp_path):
    """Every configuration 'compiles' to eager with a code text naming its items,
    so the run's bookkeeping (steps, CIs, Shapley, interaction, compile seconds,
    budget) is checked without Inductor; the numbers are eager's."""
    sample = load("mlp", preset="tiny")

    def fake(sample_, cfg, label, inputs):
        fn = attribution.model_call(sample_, lambda *a, **k: sample_.module(*a, **k))
        return inductor.Compiled(fn, 0.01, code=f"def call(args):\n    extern_kernels.mm(x)\n# {label}")
    monkeypatch.setattr(inductor, "compile_config", fake)
    monkeypatch.setattr(inductor.timing, "peak_memory", lambda fn, x, device: (0, "stubbed"))

    def no_export(*a, **k):
        raise RuntimeError("export stubbed out: the run assumes the model writes no inputs")
    monkeypatch.setattr(inductor, "capture", no_export)
    rec = inductor.run(sample, pipeline="fusion,inlining,freezing", shapley=True, ablate=True, budget_s=0.02)
    assert rec["schema"] == 1 and rec["compiler"] == "inductor" and rec["pipeline"] == ["fusion", "inlining",
                                                                                        "freezing"]
    from test_attribution import STEP_FIELDS
    for s in rec["steps"]:
        assert STEP_FIELDS <= set(s) and s["status"] == "ok" and s["changed"]
        assert s["ci_low"] <= s["throughput"] <= s["ci_high"] and s["speedup_vs_eager_ci"]
        assert s["stats"]["config"] and s["launches"] == 1 and s["numerics_ok"]
    assert sum(rec["shapley"].values()) == pytest.approx(rec["total_log_gain"])
    assert rec["interaction"] is not None and set(rec["interaction_matrix"]) == set(rec["pipeline"])
    assert set(rec["ablation"]) == set(rec["pipeline"])
    ind = rec["inductor"]
    assert ind["configs_compiled"] == 8 and all("compile_s" in c for c in ind["configs"])
    assert ind["switches"]["fusion"]["off"] == {"max_fusion_size": 1}
    json.dumps(rec)
    from passlab.tools import report
    from passlab.tools.table import pass_table
    assert "fusion" in pass_table(rec)
    html = open(report.write(rec, None, str(tmp_path / "rep"))).read()
    assert 'id="waterfall"' in html and 'id="shapley"' in html and "interaction-matrix" in html
    # a budget of 2 attribution configurations: whole orders only, the sample count says how many
    cut = inductor.run(sample, pipeline="fusion,inlining,freezing", shapley=True, budget_s=0.02, max_configs=2)
    assert cut["inductor"]["budget"]["reached"] == "--max-configs 2"
    assert cut["shapley"] is None or sum(cut["shapley"].values()) == pytest.approx(cut["total_log_gain"])


# ---------------------------------------------------------------- the custom pass on Inductor's graph form

def attention(x, wq, wk, wv, keep):
    """Written-out attention, as the transformer sample has it."""
    q, k, v = ((x @ w).view(2, 16, 2, 8).transpose(1, 2) for w in (wq, wk, wv))
    s = (q @ k.transpose(-2, -1)) * 0.35
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def post_grad_like():
    """A graph in Inductor's post-grad form: make_fx through Inductor's own
    decomposition table (softmax written out), fake-tensor meta['val'] on every node."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    args = (torch.randn(2, 16, 16), *(torch.randn(16, 16) for _ in range(3)),
            torch.tril(torch.ones(16, 16, dtype=torch.bool)))
    gm = make_fx(attention, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)
    assert not any(n.target == aten._softmax.default for n in gm.graph.nodes)
    return gm, args


def test_fuse_attention_runs_on_inductors_graph_form_in_place():
    gm, args = post_grad_like()
    graph, expected = gm.graph, attention(*args)
    p = inductor_pass("fuse_attention(choose=always)")
    p(gm.graph)
    assert gm.graph is graph                       # Inductor's graph object, rewritten in place
    run = p.runs[-1]
    assert run["softmax_recomposed"] == 1 and run["changed"]
    assert run["steps"][0]["stats"]["rewritten"] == 1
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten._softmax.default not in targets and aten.scaled_dot_product_attention.default not in targets
    assert any("scaled_dot_product" in str(t) for t in targets)     # the op Inductor lowers
    assert all("val" in n.meta for n in gm.graph.nodes if n.op not in ("output",))
    torch.testing.assert_close(gm(*args), expected, rtol=1e-5, atol=1e-5)


def test_an_unused_softmax_goes_back_as_inductor_wrote_it():
    gm, args = post_grad_like()
    before = sorted(str(n.target) for n in gm.graph.nodes)
    p = inductor_pass("dce")                        # recomposes, takes nothing, writes it out again
    p(gm.graph)
    assert sorted(str(n.target) for n in gm.graph.nodes) == before
    torch.testing.assert_close(gm(*args), attention(*args))


def test_a_pass_making_passlab_kernels_is_rolled_back_and_says_why():
    gm, args = post_grad_like()
    code = gm.code
    p = inductor_pass("fuse")
    with pytest.warns(UserWarning, match="Inductor cannot lower.*FusedKernel"):
        p(gm.graph)
    assert gm.code == code and not p.runs[-1]["changed"]
    with pytest.raises(InductorPassError, match="passlab's own pipeline"):
        inductor_pass("fuse", strict=True)(post_grad_like()[0].graph)


def test_the_custom_pass_is_a_cacheable_custom_graph_pass():
    p = inductor_pass("cleanup,fuse_attention")
    assert isinstance(p, InductorPass) and isinstance(p, torch._inductor.custom_graph_pass.CustomGraphPass)
    assert p.uuid() == p.uuid() and "dce,cse,remove_noops,fold_constants,fuse_attention" in p.uuid()
    import pickle
    pickle.dumps(p.uuid())
    with pytest.raises(ValueError, match="empty"):
        inductor_pass("")


# ---------------------------------------------------------------- slow: real Inductor compiles

@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("inductor_cache"))


# the switches another one needs before it can change anything on CPU
CONTEXT = {"epilogue_fusion": ("freezing", "max_autotune"), "max_autotune": ("freezing",)}


class SdpaBlock(torch.nn.Module):
    """Attention written the way Inductor's own SDPA patterns match it
    (`_sfdp_pattern_1`), then an MLP: something for every switch to change."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.fc, self.out = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.matmul(q, k.transpose(-2, -1)).div(4.0).softmax(dim=-1).matmul(v)
        return self.out(F.gelu(self.fc(a))) + x


@pytest.mark.slow
def test_each_cpu_switch_changes_the_generated_code(monkeypatch, inductor_cache):
    """Each switch against the same configuration without it, on top of the
    switches it needs before it can matter on CPU (`CONTEXT`). The transformer
    sample's attention is not one of Inductor's SDPA patterns, so there the
    pattern matcher changes nothing (a finding, shown in its runs); this block's is."""
    from passlab.graphs.sample import Sample
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    torch.manual_seed(0)
    sample = Sample("sdpa_block", SdpaBlock().eval(), (torch.randn(2, 4, 8, 16),))
    names = inductor.switches_for("cpu")
    items = inductor.parse_items(",".join(names), "cpu")
    idx = {n: i for i, n in enumerate(names)}
    codes = {}

    def code(subset):
        subset = tuple(sorted(subset))
        if subset not in codes:
            c = inductor.compile_config(sample, inductor.config_for(items, subset), "+".join(map(str, subset)),
                                        sample.example_inputs)
            assert c.fn is not None, c.error
            inductor.check(c, sample, 1e-4)
            assert c.numerics_ok, (subset, c.max_error)
            codes[subset] = c.code
        return codes[subset]
    for name in names:
        ctx = {idx[n] for n in CONTEXT.get(name, ())}
        assert code(ctx | {idx[name]}) != code(ctx), f"{name} left Inductor's output code as it was"


@pytest.mark.slow
def test_a_passlab_pass_inside_torch_compile_matches_eager_and_hits_the_fx_cache(monkeypatch, inductor_cache):
    from torch._dynamo.utils import counters
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    sample = load("transformer", preset="tiny")
    x = sample.make_inputs(5)
    for attempt in range(2):
        torch._dynamo.reset()
        p = inductor_pass("fuse_attention")
        hits = counters["inductor"]["fxgraph_cache_hit"]
        with torch.no_grad():
            out = torch.compile(sample.module, options={"post_grad_custom_post_pass": p})(*x)
            torch.testing.assert_close(out, sample.module(*x), rtol=1e-4, atol=1e-4)
        if attempt == 0:
            assert p.runs and p.runs[0]["steps"][0]["stats"]["rewritten"] == 2
        else:                                       # same passes, same uuid: Inductor's cache serves it
            assert counters["inductor"]["fxgraph_cache_hit"] > hits and not p.runs


@pytest.mark.slow
def test_cli_run_with_switches_and_a_passlab_pass(tmp_path, monkeypatch, inductor_cache, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    out = tmp_path / "r.json"
    assert main(["run", "transformer", "--compiler", "inductor", "--pipeline", "fusion,inlining,fuse_attention",
                 "--shapley", "--budget", "0.1", "--json", str(out), "--report", str(tmp_path / "rep")]) == 0
    rec = json.loads(out.read_text())
    assert [s["pass"] for s in rec["steps"]] == ["fusion", "inlining", "fuse_attention"]
    fa = rec["steps"][2]
    assert fa["status"] == "ok" and fa["changed"] and fa["numerics_ok"]
    # the pass's own counts, unless Inductor's FX graph cache served this configuration (then no pass ran)
    assert fa["stats"]["fx_graph_cache_hit"] or fa["stats"]["fuse_attention"]["rewritten"] == 2
    assert sum(rec["shapley"].values()) == pytest.approx(rec["total_log_gain"])
    assert rec["interaction"] is not None and rec["inductor"]["configs_compiled"] == 8
    assert math.isfinite(rec["final_speedup_vs_eager"])
    assert (tmp_path / "rep" / "index.html").exists()
