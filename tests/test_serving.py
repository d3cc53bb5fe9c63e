"""Serving as users run it: state written in place (caches, counters) is never
touched by passlab's checks and timing, Hugging Face caches keep their type,
generate through HF's torch.compile recipe gives eager's tokens, capture
failures say what to do, and the `--generate` run mode works end to end."""
import copy
import json

import pytest
import torch

import passlab
from passlab.graphs import capture, CaptureError, clone
from passlab.graphs.state import lift_state, written_state
from passlab.passes.manager import CheckNumerics

tf = pytest.importorskip("transformers")


class Stateful(torch.nn.Module):
    """Bumps a step counter, writes a cache row (buffers) and advances a
    position it is given (an input), all in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(6, 8))
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, pos):
        self.count.add_(1)
        self.cache.index_copy_(0, pos, x)
        pos.add_(1)
        return self.lin(x) * self.count + self.cache.sum(0)


@pytest.mark.parametrize("guard", ["measure", "off"])
def test_state_after_calls_is_eagers(guard):
    torch.manual_seed(0)
    m = Stateful().eval()
    e = copy.deepcopy(m)
    x, pos = torch.randn(1, 8), torch.tensor([0])
    pos_e = pos.clone()
    opt = passlab.optimize(m, (x, pos), guard=guard)
    # optimize itself (numerics check, guard timing, eager reference) left the state alone
    assert int(m.count) == 0 and int(pos) == 0 and not m.cache.any()
    with torch.no_grad():
        for _ in range(3):
            y, ye = opt(x, pos), e(x, pos_e)
            torch.testing.assert_close(y, ye)
            assert int(m.count) == int(e.count) and torch.equal(pos, pos_e)
            torch.testing.assert_close(m.cache, e.cache)
    assert int(m.count) == 3
    assert opt.record["writes_state"] == {"inputs": [1], "buffers": ["count", "cache"]}


def test_state_when_guard_picks_eager_or_captured():
    """Whatever the guard runs, the user's state moves once per call."""
    m = Stateful().eval()
    x, pos = torch.randn(1, 8), torch.tensor([0])
    opt = passlab.optimize(m, (x, pos), pipeline="cleanup")
    spec = opt.current
    for chosen in ("eager", "captured"):
        before = int(m.count)
        if chosen == "eager":
            spec.fast = lambda *a: m(*a)
        else:
            from passlab.tools.optimize import graph_runner
            spec.fast = graph_runner(spec.result.baseline.snapshot, "cpu", spec.gm.meta.get("out_spec"), m,
                                     spec.gm.meta["lifted_state"])
        opt.use(spec)
        with torch.no_grad():
            opt(x, pos)
        assert int(m.count) == before + 1


def test_state_through_the_backend_is_eagers():
    """torch.compile(backend="passlab"): dynamo passes the buffers as graph
    inputs; the check and the guard run on copies, the call writes the user's."""
    torch.manual_seed(0)
    m = Stateful().eval()
    e = copy.deepcopy(m)
    x, pos = torch.randn(1, 8), torch.tensor([0])
    pos_e = pos.clone()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="passlab", options={"pipeline": "cleanup,fuse"})
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x, pos), e(x, pos_e))
            assert int(m.count) == int(e.count) and torch.equal(pos, pos_e)
            torch.testing.assert_close(m.cache, e.cache)
    torch._dynamo.reset()


def test_written_state_and_lift():
    gm = capture(Stateful(), (torch.randn(1, 8), torch.tensor([0])))
    assert written_state(gm) == ([1], ["count", "cache"])
    assert lift_state(gm) == ["count", "cache"]
    assert gm.meta["mutated_inputs"] == [1, 2, 3]
    assert not any(n.op == "get_attr" and n.target in ("count", "cache") for n in gm.graph.nodes)
    assert not hasattr(gm, "count")
    gm.graph.lint()


def test_numerics_check_compares_what_a_graph_writes():
    """A rewrite that drops a cache write is caught; the reference ran on copies."""
    gm = capture(Stateful(), (torch.randn(1, 8), torch.tensor([0])))
    lift_state(gm)
    state = [torch.zeros((), dtype=torch.int64), torch.zeros(6, 8)]
    inputs = (torch.randn(1, 8), torch.tensor([2]), *state)
    ref = clone(gm)
    check = CheckNumerics(ref, lambda seed: inputs, "cpu", 1e-4, mutated=gm.meta["mutated_inputs"])
    assert check.error(gm) == 0.0
    assert int(inputs[1]) == 2 and int(inputs[2]) == 0 and not inputs[3].any()   # copies were written
    bad = clone(gm)
    for n in list(bad.graph.nodes):     # drop the cache's write-back
        if n.op == "call_function" and n.target is torch.ops.aten.copy_.default and n.args[0].name == "state_cache":
            bad.graph.erase_node(n)
    bad.recompile()
    assert check.error(bad) > 1e-4


def test_capture_failure_hints_fit_the_cause():
    class Box:
        def __init__(self, t):
            self.t = t

    class ReturnsBox(torch.nn.Module):
        def forward(self, x):
            return Box(x + 1)

    class Branches(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError) as e:
        capture(ReturnsBox(), (torch.randn(2),))
    msg = str(e.value)
    assert "Box" in msg and "register_pytree_node" in msg and "use_cache=False" in msg
    assert "static control flow" not in msg
    with pytest.raises(CaptureError) as e:
        capture(Branches(), (torch.randn(2),))
    assert "static control flow" in str(e.value) and "register_pytree_node" not in str(e.value)


# ---------------------------------------------------------------- Hugging Face decoders

def greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("arch,options", [("llama", None),     # default pipeline, check and guard on
                                          ("mixtral", {"pipeline": "cleanup", "guard": "off"})])
def test_hf_recipe_generate_gives_eagers_tokens(arch, options):
    """HF's documented recipe: a static cache, model.forward compiled with the
    passlab backend (numerics check and measured guard on)."""
    from passlab.tools import serve
    from passlab.tools.optimize import dynamo_backend
    model, ids = serve.causal_lm(arch, "tiny", new_tokens=8)
    ids = ids[:1, :8]
    want = greedy(model, ids)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="passlab", options=options)
    got = greedy(model, ids)
    assert torch.equal(got, want)
    assert greedy(model, ids).equal(want)          # and again, the same cache reused
    assert dynamo_backend.last.record["writes_state"]["inputs"]   # the decode graph writes the cache
    torch._dynamo.reset()


def test_gpt2_default_dynamic_cache_keeps_type_and_updates_the_given_cache():
    from passlab.tools import serve
    model, ids = serve.causal_lm("gpt2", "tiny")
    ids = ids[:1, :8]
    opt = passlab.optimize(model, (ids,), pipeline="cleanup")
    with torch.no_grad():
        out, ref = opt(ids), model(ids)
        assert type(out) is type(ref) and type(out.past_key_values) is tf.DynamicCache
        torch.testing.assert_close(out.logits, ref.logits)
        nxt = ref.logits[:, -1:].argmax(-1)
        given = out.past_key_values
        step = opt(nxt, cache=given)
        ref_step = model(nxt, cache=ref.past_key_values)
    assert step.past_key_values is given and given.get_seq_length() == ids.shape[1] + 1
    torch.testing.assert_close(step.logits, ref_step.logits)
    torch.testing.assert_close(given.layers[0].keys, ref.past_key_values.layers[0].keys)


def test_static_cache_decode_step_writes_the_given_cache_once():
    """passlab.optimize on a decode step called with a StaticCache: the cache
    it is given is written once per call, as eager writes it, and returned."""
    from passlab.tools import serve
    model, ids = serve.causal_lm("llama", "tiny", new_tokens=4)
    sample = serve.decode_sample(model, ids, new_tokens=4)
    kw = sample.example_kwargs
    cache, cache_e = kw["cache"], copy.deepcopy(kw["cache"])
    opt = passlab.optimize(model, (), example_kwargs=kw, pipeline="cleanup,fuse")
    assert int(cache.layers[0].cumulative_length) == ids.shape[1]     # optimize wrote nothing
    with torch.no_grad():
        out = opt(**kw)
        ref = model(**{**kw, "cache": cache_e})
    assert out.past_key_values is cache and int(cache.layers[0].cumulative_length) == ids.shape[1] + 1
    torch.testing.assert_close(out.logits, ref.logits)
    for a, b in zip(cache.layers, cache_e.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)


def test_generate_run_mode_tiny(tmp_path, monkeypatch):
    """`passlab run hf:llama --generate N` end to end: contenders with TTFT and
    decode tokens/s, tokens/J or n/a, each pass on the decode step; the bench
    row's table renders from it."""
    from passlab.tools import cli, serve
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PASSLAB_GUARD", "off")      # the guard under generate: test_hf_recipe_generate_...
    out = tmp_path / "serve.json"
    rc = cli.main(["run", "hf:llama", "--generate", "2", "--budget", "0.02", "--pipeline", "cleanup",
                   "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    c = rec["contenders"]
    assert set(c) == {"eager", "passlab"}
    for name in c:
        assert c[name]["ttft_s"] > 0 and c[name]["decode_tokens_per_s"] > 0
        assert c[name]["same_tokens_as_eager"]
        tpj = c[name]["tokens_per_joule"]
        assert isinstance(tpj, float) or tpj.startswith("n/a")
    steps = rec["decode_step"]["steps"]
    assert [s["pass"] for s in steps] == ["dce", "cse", "remove_noops", "fold_constants"]
    assert all(s.get("speedup_vs_prev") for s in steps)
    assert "decode tok/s" in serve.markdown([{**rec, "status": "ok"}])


def test_generate_flag_refuses_non_decoders(capsys):
    from passlab.tools import cli
    assert cli.main(["run", "transformer", "--generate", "2"]) == 2
    assert "hf:ARCH" in capsys.readouterr().err


def test_bench_writes_the_serving_block(tmp_path, monkeypatch):
    """make bench's serving rows go into their own README block."""
    from passlab.tools import bench, serve
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(f"# x\n\n{bench.START}\nold\n{bench.END}\n\n{serve.START}\nold\n{serve.END}\n")
    c = {"ttft_s": 0.01, "ttft_speedup_vs_eager": [1.0, 1.0, 1.0], "decode_tokens_per_s": 100.0,
         "decode_speedup_vs_eager": [1.0, 1.0, 1.0], "tokens_per_joule": serve.NO_COUNTER,
         "same_tokens_as_eager": True, "setup_s": 0.1}
    row = {"model": "serve:llama", "status": "ok", "dtype": "float32", "batch": 2, "prompt_tokens": 16,
           "new_tokens": 4, "contenders": {"eager": c, "passlab": {**c, "decode_tokens_per_s": 150.0}},
           "decode_step": {"steps": [{"pass": "fuse", "status": "ok", "changed": True, "speedup_vs_prev": 1.2,
                                      "speedup_vs_eager": 1.5}]}}
    ap, args = bench.parse_args(["--models", "serve:llama", "--quick", "--out", str(tmp_path / "out"),
                                 "--write-readme"])
    (tmp_path / "out").mkdir()
    bench.publish([row], args, "", ["serve:llama"])
    readme = (tmp_path / "README.md").read_text()
    block = readme[readme.index(serve.START):readme.index(serve.END)]
    assert "| serve:llama |" in block and "150" in block and "n/a: no counter here" in block
    assert "| fuse | ok | yes | 1.20x | 1.50x |" in block
    assert f"{bench.START}\nold\n{bench.END}" in readme          # the main table is left as it was


def test_specializations_are_bounded_then_the_model_runs(monkeypatch):
    """Shapes that keep changing (a growing cache) cost at most SPECIALIZE_LIMIT
    specializations; later new signatures run the model itself, warned once."""
    from passlab.tools import optimize as opt_mod
    monkeypatch.setattr(opt_mod, "SPECIALIZE_LIMIT", 2)
    m = torch.nn.Linear(4, 4).eval()
    opt = passlab.optimize(m, (torch.randn(1, 4),), pipeline="cleanup", guard="off")
    with torch.no_grad():
        opt(torch.randn(2, 4))
        with pytest.warns(UserWarning, match="SPECIALIZE_LIMIT"):
            x = torch.randn(3, 4)
            torch.testing.assert_close(opt(x), m(x))
        opt(torch.randn(5, 4))
    assert len(opt.history) == 2
