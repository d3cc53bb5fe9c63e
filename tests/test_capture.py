import importlib.util
import operator

import pytest
import torch

from passlab.graphs import CaptureError, UnknownModelError, capture, check_metadata, load
from passlab.graphs.decompositions import KEEP
from passlab.passes import relative_error

SAMPLES = ["mlp", "transformer", "llama", "moe", "convnet"]
HF = ["hf:gpt2", "hf:llama", "hf:mixtral"]
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")


KEPT = {f"aten.{name}" for name in KEEP}


def is_core_aten(target) -> bool:
    """A core-aten op (torch.Tag.core), one capture keeps whole on purpose
    (decompositions.KEEP), a runtime assert, or getitem on a multi-output op."""
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    return torch.Tag.core in target.tags or str(target) in KEPT or target.name().startswith("aten::_assert")


def test_core_aten_check_can_fail():
    assert is_core_aten(torch.ops.aten.addmm.default) and is_core_aten(torch.ops.aten.silu.default)
    assert not is_core_aten(torch.ops.aten.linear.default)          # decomposed by capture
    assert not is_core_aten(torch.nn.functional.gelu) and not is_core_aten(torch.ops.mkldnn._linear_pointwise.default)


def check_equivalent(sample):
    gm = capture(sample.module, sample.example_inputs)
    assert not check_metadata(gm)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            assert is_core_aten(n.target), f"{n.name}: {n.target} is not core aten"
    for seed in (1, 2):  # fresh inputs, not the example ones
        x = sample.make_inputs(seed)
        with torch.no_grad():
            assert relative_error(gm(*x), sample.module(*x)) < 1e-4
    return gm


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_captures_and_matches_eager(name):
    s = load(name, "tiny")
    assert s.dtype == torch.float32 and s.units_per_forward > 0 and s.unit
    gm = check_equivalent(s)
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "call_function" and "val" in n.meta]
    assert all(hasattr(v, "shape") or isinstance(v, (tuple, list)) for v in vals)


@needs_hf
@pytest.mark.parametrize("name", HF)
def test_hf_captures(name):
    check_equivalent(load(name, "tiny"))


def test_moe_matches_reference_loop():
    s = load("moe", "tiny")
    x = s.make_inputs(7)
    with torch.no_grad():
        assert relative_error(s.module(*x), s.module.reference(*x)) < 1e-5


def test_bench_preset_dtype_follows_machine():
    from passlab.graphs import has_native_bf16
    s = load("mlp", "bench")
    assert s.dtype == (torch.bfloat16 if has_native_bf16() else torch.float32)
    assert load("mlp", "bench", dtype="fp32").dtype == torch.float32


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError) as e:
        load("transfomer")
    assert "transformer" in str(e.value) and "did you mean" in str(e.value)


def test_uncapturable_module_names_the_line():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x - 1

    with pytest.raises(CaptureError) as e:
        capture(Branchy(), (torch.randn(4),))
    msg = str(e.value)
    assert "Branchy" in msg and "test_capture.py" in msg and "x.sum() > 0" in msg


def test_user_file_model(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\n"
                 "def build():\n"
                 "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), (torch.randn(2, 4),)\n")
    s = load(f"{f}:build")
    check_equivalent(s)
    with pytest.raises(UnknownModelError):
        load(f"{f}:nothing")
