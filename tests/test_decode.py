"""llama_decode: one token per call against a static KV cache, captured with its
cache writes, numerically equal to eager after the default pipeline."""
import torch

from passlab.graphs import capture, load
from passlab.passes.manager import relative_error
from passlab.runtime.executor import compile_graph
from passlab.tools.runner import run


def cache_slot(sample, pos):
    return [(b.attn.k_cache[:, :, pos].clone(), b.attn.v_cache[:, :, pos].clone()) for b in sample.module.blocks]


def test_shapes_unit_and_the_cache_write_is_captured():
    s = load("llama_decode", "tiny")
    idx, pos = s.example_inputs
    assert idx.shape == (2, 1) and pos.tolist() == [15] and s.unit == "tokens" and s.units_per_forward == 2
    gm = capture(s.module, s.example_inputs)
    writes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(writes) == 2 * len(s.module.blocks)            # k and v of every layer written back
    assert all(n.args[0].op == "get_attr" and "cache" in n.args[0].target for n in writes)


def test_optimized_decode_matches_eager_and_writes_the_cache():
    s = load("llama_decode", "tiny")
    r = run(s, pipeline=None, measure=False)
    assert all(st.status == "ok" for st in r.result.steps), [(st.name, st.error) for st in r.result.steps]
    fast = compile_graph(r.gm)
    pos = int(s.example_inputs[1])
    for seed in (3, 4):
        x = s.make_inputs(seed)
        with torch.no_grad():
            expected = s.module(*x)
            written = cache_slot(s, pos)
            for b in s.module.blocks:                          # forget what eager wrote
                b.attn.k_cache[:, :, pos] = 0
                b.attn.v_cache[:, :, pos] = 0
            got = fast(*x)
        assert relative_error(got, expected) < 1e-4
        for (k0, v0), (k1, v1) in zip(written, cache_slot(s, pos)):   # the optimized graph wrote them again
            assert torch.allclose(k0, k1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)
            assert k1.abs().sum() > 0


def test_positions_after_pos_are_masked_out():
    s = load("llama_decode", "tiny")
    idx = s.example_inputs[0]
    pos = torch.tensor([7])
    with torch.no_grad():
        a = s.module(idx, pos)
        for b in s.module.blocks:
            b.attn.k_cache[:, :, 8:] = torch.randn_like(b.attn.k_cache[:, :, 8:])
            b.attn.v_cache[:, :, 8:] = torch.randn_like(b.attn.v_cache[:, :, 8:])
        same = s.module(idx, pos)
        for b in s.module.blocks:
            b.attn.k_cache[:, :, 3] += 1.0
        other = s.module(idx, pos)
    assert torch.allclose(a, same)
    assert not torch.allclose(a, other)             # positions up to pos do count


def test_bench_preset_is_the_llama_bench_dims():
    from passlab.graphs import llama, llama_decode
    p, q = llama_decode.PRESETS["bench"], llama.PRESETS["bench"]
    assert p["batch"] == 4 and p["ctx"] == 256
    assert all(p[k] == q[k] for k in ("dim", "heads", "kv_heads", "layers", "ffn", "vocab"))
