"""Inputs of any shape: Sample kwargs, fresh inputs that keep integer ranges
and masks, `file.py:fn` returning kwargs, numerics over output pytrees."""
import textwrap

import pytest
import torch

from passlab.graphs import Sample, capture, load, random_like
from passlab.graphs.catalog import UnknownModelError
from passlab.passes.manager import relative_error
from passlab.tools import runner


def test_random_like_keeps_integer_ranges_and_masks():
    ids = torch.tensor([[3, 17, 5, 9], [0, 2, 11, 4]])
    ones = torch.ones(2, 4, dtype=torch.long)
    zero_one = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])
    fmask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    flag = torch.tensor([True, False])
    x = torch.randn(2, 4)
    inputs = (ids, {"attention_mask": ones, "m": zero_one, "f": fmask, "b": flag}, [x, 3, None])
    for seed in range(5):
        ids2, d, (x2, three, none) = random_like(inputs, seed)
        assert ids2.dtype == ids.dtype and ids2.min() >= 0 and ids2.max() <= 17
        assert torch.equal(d["attention_mask"], ones)                  # all-ones masks stay all ones
        assert set(d["m"].unique().tolist()) <= {0, 1} and d["m"].dtype == zero_one.dtype
        assert set(d["f"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(d["b"], flag)
        assert x2.shape == x.shape and not torch.equal(x2, x)
        assert three == 3 and none is None
    draws = torch.stack([random_like((ids,), s)[0] for s in range(20)])
    assert draws.max() > 11                    # ids range over the example's [min, max], not one value
    assert random_like((ids,), 0, vocab_size=1000)[0].max() > 17        # a declared vocabulary widens it


def test_sample_with_kwargs_flat_and_reference():
    class M(torch.nn.Module):
        def forward(self, x, mask=None, *, scale=1.0):
            return {"y": x * mask * scale}
    x, mask = torch.randn(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    s = Sample("m", M(), (x,), example_kwargs={"mask": mask, "scale": 2.0})
    assert len(s.flat_inputs) == 3 and s.flat_inputs[0] is x
    flat = s.make_inputs(1)
    args, kwargs = s.make_call(1)
    assert torch.equal(flat[0], args[0]) and torch.equal(flat[1], kwargs["mask"]) and flat[2] == 2.0
    assert torch.equal(s.reference(*flat)["y"], M()(*args, **kwargs)["y"])
    gm = capture(s.module, s.example_inputs, s.example_kwargs)
    assert relative_error(gm(*flat), s.reference(*flat)) == 0.0


def test_plain_samples_keep_their_make_inputs():
    s = load("mlp", "tiny")
    x = s.make_inputs(3)
    assert isinstance(x, tuple) and len(x) == len(s.example_inputs)
    assert all(a.shape == b.shape for a, b in zip(x, s.example_inputs))
    assert s.reference(*x).shape == s.module(*x).shape


def test_relative_error_flattens_pytrees():
    a = torch.randn(3)
    assert relative_error((a, a * 2), {"x": a, "y": (None, a * 2)}) == 0.0
    assert relative_error((a,), {"x": a, "y": a}) == float("inf")     # missing output
    assert relative_error([a + 1], {"x": a}) > 0.1


def write(tmp_path, body):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent(body))
    return str(f)


def test_file_fn_may_return_kwargs(tmp_path):
    path = write(tmp_path, """
        import torch
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.e = torch.nn.Embedding(10, 8)
            def forward(self, ids, attention_mask=None):
                return {"h": self.e(ids) * attention_mask[..., None]}
        def build():
            return M(), (torch.randint(0, 10, (2, 4)),), {"attention_mask": torch.ones(2, 4)}
        def bad():
            return M(), (torch.randint(0, 10, (2, 4)),), ["not", "a", "dict"]
    """)
    s = load(f"{path}:build")
    assert set(s.example_kwargs) == {"attention_mask"}
    r = runner.run(s, pipeline="dce,cse,fuse", measure=False)
    assert [st["status"] for st in r.record["steps"]] == ["ok"] * 3
    with pytest.raises(UnknownModelError, match="example_kwargs"):
        load(f"{path}:bad")


BERT = """
    import torch
    from transformers import BertConfig, BertModel
    def build():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
        ids = torch.randint(0, 64, (2, 8))
        return BertModel(cfg).eval(), (ids,), {"attention_mask": torch.ones(2, 8, dtype=torch.long)}
"""


@pytest.mark.parametrize("pipeline", ["dce,cse,fold_constants,fuse",
                                      pytest.param(None, marks=pytest.mark.slow)])   # None: the default
def test_hf_bert_through_file_fn_has_no_pass_rolled_back(tmp_path, pipeline):
    pytest.importorskip("transformers")
    s = load(f"{write(tmp_path, BERT)}:build")
    assert s.vocab_size == 64
    r = runner.run(s, pipeline=pipeline, measure=False)
    bad = [(st["pass"], st["error"]) for st in r.record["steps"] if st["status"] != "ok"]
    assert bad == []
    assert all(st["numerics_ok"] in (True, None) for st in r.record["steps"])
