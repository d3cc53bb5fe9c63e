"""`write_in_place`: a functional state update plus its write-back -> the update in place."""
from __future__ import annotations

import copy

import torch

import passlab
from passlab.graphs import capture, load
from passlab.passes import get_pass
from passlab.tools.runner import context

aten = torch.ops.aten


class Cache(torch.nn.Module):
    """Writes one row of a cache buffer at `pos`, reads the whole updated cache, bumps a counter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.randn(6, 4))
        self.register_buffer("steps", torch.zeros(1))

    def forward(self, x, pos):
        before = self.cache.sum()                 # the old value, read before the update
        self.cache.index_copy_(0, pos, x)
        self.steps.add_(1)
        return self.cache * 2 + before


def test_update_runs_in_place_and_state_is_eagers():
    m = Cache().eval()
    twin = copy.deepcopy(m)
    x, pos = torch.randn(1, 4), torch.tensor([3])
    fast = passlab.optimize(m, (x, pos), pipeline="cleanup,write_in_place", guard="off")
    step = fast.record["steps"][-1]
    assert step["pass"] == "write_in_place" and step["status"] == "ok" and step["stats"]["rewritten"] == 1
    targets = [n.target for n in fast.gm.graph.nodes if n.op == "call_function"]
    assert aten.index_put_.default in targets          # the cache row written in place
    assert targets.count(aten.copy_.default) == 1      # only the counter (a pointwise add) is written back
    for p in (pos, torch.tensor([0]), torch.tensor([5])):       # the user's state after each call is eager's
        xi = torch.randn(1, 4)
        torch.testing.assert_close(fast(xi, p), twin(xi, p))
        torch.testing.assert_close(m.cache, twin.cache)
        torch.testing.assert_close(m.steps, twin.steps)


def test_reader_of_the_old_value_after_the_update_blocks_it():
    m = Cache().eval()
    gm = capture(m, (torch.randn(1, 4), torch.tensor([3])))
    g = gm.graph
    upd = next(n for n in g.nodes if n.target in (aten.index_put.default, aten.index_copy.default))
    cache = upd.args[0]
    with g.inserting_after(upd):                 # a reader of the old cache placed after the update
        late = g.call_function(aten.mul.Tensor, (cache, 1.0))
    out = g.output_node()
    out.args = ((*out.args[0], late) if isinstance(out.args[0], tuple) else (out.args[0], late),)
    gm.recompile()
    res = get_pass("write_in_place")(gm, context(load("mlp", "tiny"), "cpu"))
    assert res.stats["skipped"].get("old_value_read_after_update") == 1


def test_decode_step_keeps_eagers_cache():
    sample = load("llama_decode", "tiny")
    m = sample.module
    twin = copy.deepcopy(m)
    fast = passlab.optimize(m, sample.example_inputs, guard="off")
    step = next(s for s in fast.record["steps"] if s["pass"] == "write_in_place")
    assert step["status"] == "ok" and step["stats"]["rewritten"] == 2 * len(m.blocks)
    idx, pos = sample.example_inputs
    for p in (pos, pos - 1):
        torch.testing.assert_close(fast(idx, p), twin(idx, p), rtol=1e-4, atol=1e-4)
        for a, b in zip(m.buffers(), twin.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class ReturnsCache(torch.nn.Module):
    """Returns the cache it updated (as Hugging Face's StaticCache outputs do): the write-back is an output."""

    def forward(self, x, pos, cache):
        cache.index_copy_(0, pos, x)
        return cache.sum(0), cache


def test_update_of_a_returned_input():
    m = ReturnsCache().eval()
    x, pos = torch.randn(1, 3), torch.tensor([2])
    cache, twin = torch.zeros(5, 3), torch.zeros(5, 3)
    fast = passlab.optimize(m, (x, pos, cache.clone()), pipeline="write_in_place", guard="off")
    assert fast.record["steps"][-1]["status"] == "ok", fast.record["steps"][-1]["error"]
    for p in (pos, torch.tensor([4])):
        xi = torch.randn(1, 3)
        got, want = fast(xi, p, cache), m(xi, p, twin)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(cache, twin)


class FirstFill(torch.nn.Module):
    """A static cache's first fill, as the prefill graph captures it: a fresh zeros buffer with
    rows written at the positions (`index_put`); a second fresh buffer is also read directly."""

    def forward(self, k, pos):
        cache = torch.zeros(2, 9, 4)
        cache[:, pos] = k
        other = torch.zeros(2, 9, 4)
        other[:, pos] = k * 2
        return cache, other + 1, other


def test_update_of_a_fresh_buffer_runs_in_place():
    m = FirstFill()
    k, pos = torch.randn(2, 3, 4), torch.tensor([0, 4, 8])
    gm = capture(m, (k, pos))
    res = get_pass("write_in_place")(gm, context(load("mlp", "tiny"), "cpu"))
    assert res.stats["fresh_buffers"] == 2
    targets = [n.target for n in res.gm.graph.nodes if n.op == "call_function"]
    assert aten.index_put.default not in targets and targets.count(aten.index_put_.default) == 2
    for p in (pos, torch.tensor([1, 2, 3]), torch.tensor([-1, 0, 5])):
        xi = torch.randn(2, 3, 4)
        for got, want in zip(res.gm(xi, p), m(xi, p)):
            assert torch.equal(got, want)
    out = res.gm(k, pos)
    assert out[0] is not out[2] and not torch.equal(out[1], out[2])     # two buffers, not one reused
