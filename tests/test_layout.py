"""The layout pass: numerics against eager on fresh inputs, the conversions it
proves necessary, metadata strides that match what the graph really produces,
and graphs it must leave alone."""
import pytest
import torch
from torch import nn

from passlab.graphs import capture, clone, load
from passlab.passes import PassContext, PassManager, get_pass, relative_error
from passlab.passes.contract import captured
from passlab.passes.layout import blas_ready, channels_last, count_conversions

aten = torch.ops.aten


def run_layout(gm, device="cpu", **options):
    return get_pass("layout")(clone(gm), PassContext(device=device, options=options))   # the pass, then its end


def check_numerics(gm, reference, inputs, tol=1e-4):
    with torch.no_grad():
        err = relative_error(gm(*inputs), reference(*inputs))
    assert err <= tol, err


def real_strides_match_meta(gm, inputs):
    """Run the graph for real and compare every tensor's strides with meta['val']."""
    seen = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                seen[n] = out
            return out

    with torch.no_grad():
        Record(gm).run(*inputs)
    bad = []
    for n, t in seen.items():
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and any(a != b for a, b, s in zip(t.stride(), v.stride(), t.shape) if s > 1):
            bad.append((n.name, t.stride(), v.stride()))
    assert not bad, bad


def convs(gm):
    return [n for n in gm.graph.nodes if n.target is aten.convolution.default]


# ---------------------------------------------------------------- conv nets

def test_convnet_runs_channels_last_with_one_conversion():
    sample, gm = captured("convnet")
    res = run_layout(gm)
    s = res.stats
    assert s["conversions_before"] == 2 * len(convs(gm))      # every NCHW conv reorders in and out
    assert s["explicit_before"] == 0
    assert s["conversions_after"] == 1 and s["explicit_after"] == 1 and s["implicit_after"] == 0
    assert s["conversion_bytes_after"] < s["conversion_bytes_before"]
    assert s["convs_nhwc"] == len(convs(gm)) and s["weights_nhwc"] == len(convs(gm))
    for c in convs(res.gm):
        assert channels_last(c.args[0].meta["val"]) and channels_last(c.meta["val"])
        assert c.args[1].op == "get_attr" and c.args[1].target.startswith("_layout_nhwc_")
    (entry,) = [n for n in res.gm.graph.nodes if n.target is aten.clone.default]
    assert entry.args[0].op == "placeholder" and entry.kwargs["memory_format"] == torch.channels_last
    for seed in (1, 2):
        check_numerics(res.gm, sample.module, sample.make_inputs(seed))
    real_strides_match_meta(res.gm, sample.make_inputs(3))


def test_parameters_are_not_touched():
    sample, gm = captured("convnet")
    before = {k: (v.stride(), v.clone()) for k, v in gm.named_parameters()}
    run_layout(gm)
    for k, v in gm.named_parameters():
        assert v.stride() == before[k][0] and torch.equal(v, before[k][1])


class FlattenNet(nn.Module):
    """conv -> relu -> flatten over C,H,W: the flatten needs NCHW order back."""

    def __init__(self, out_4d=False):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.out_4d = nn.Linear(8 * 6 * 6, 5), out_4d

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return y if self.out_4d else self.fc(y.flatten(1))


def test_flatten_gets_a_conversion_back():
    torch.manual_seed(0)
    m, x = FlattenNet().eval(), torch.randn(2, 3, 6, 6)
    gm = capture(m, (x,))
    res = run_layout(gm)
    assert res.stats["conversions_in"] == 1 and res.stats["conversions_back"] == 1
    view = next(n for n in res.gm.graph.nodes if n.target is aten.view.default and len(n.args[1]) == 2)
    assert view.args[0].target is aten.clone.default
    assert view.args[0].kwargs["memory_format"] == torch.contiguous_format
    check_numerics(res.gm, m, (torch.randn(2, 3, 6, 6),))
    real_strides_match_meta(res.gm, (x,))


@pytest.mark.parametrize("contiguous_outputs", [True, False])
def test_four_d_output_layout(contiguous_outputs):
    torch.manual_seed(0)
    m, x = FlattenNet(out_4d=True).eval(), torch.randn(2, 3, 6, 6)
    res = run_layout(capture(m, (x,)), contiguous_outputs=contiguous_outputs)
    with torch.no_grad():
        out = res.gm(x)
    assert out.is_contiguous() == contiguous_outputs
    assert channels_last(out) != contiguous_outputs
    assert res.stats["conversions_back"] == int(contiguous_outputs)
    check_numerics(res.gm, m, (torch.randn(2, 3, 6, 6),))


def test_channels_last_off_and_nchw_devices_leave_convnet_alone():
    _, gm = captured("convnet")
    off = run_layout(gm, channels_last=False)
    assert str(off.gm.graph) == str(gm.graph)
    cuda_fp32 = run_layout(gm, device="cuda")          # cuDNN fp32 kernels are NCHW-native
    assert cuda_fp32.stats["skipped"] == {"device_prefers_nchw": len(convs(gm))}
    assert cuda_fp32.stats["conversions_before"] == cuda_fp32.stats["conversions_after"] == 0


# ---------------------------------------------------------------- transformers

@pytest.mark.parametrize("model", ["transformer", "llama", "mlp"])
def test_numerics_and_counts(model):
    sample, gm = captured(model)
    res = run_layout(gm)
    s = res.stats
    assert s["conversions_after"] <= s["conversions_before"]
    assert s["conversion_bytes_after"] <= s["conversion_bytes_before"]
    check_numerics(res.gm, sample.module, sample.make_inputs(11))
    real_strides_match_meta(res.gm, sample.make_inputs(12))


def test_attention_head_copies_are_proved_needed():
    """With B, H > 1 no single bmm reads (B, T, H, hd) data as a (B*H) batch: every copy stays,
    and the pass says why."""
    _, gm = captured("transformer")
    res = run_layout(gm)
    assert res.stats["conversions_after"] == res.stats["conversions_before"] == 8
    assert res.stats["copies_kept"] == {"view_needs_copy": 8}


def test_rotary_output_written_in_the_layout_bmm_needs():
    """llama's rotary `add(q*cos, rotate(q)*sin)` takes its output layout from the strided
    first operand, and a copy follows for bmm; with the operands swapped the add writes
    contiguous q itself and the copy goes (one per layer)."""
    sample, gm = captured("llama")
    res = run_layout(gm)
    assert res.stats["producers_steered"] == 2
    assert res.stats["conversions_before"] == 8 and res.stats["conversions_after"] == 6
    check_numerics(res.gm, sample.module, sample.make_inputs(21))


def test_batch_one_head_merge_copy_is_needed():
    """With one sequence the head split needs no copy (capture already reads q, k, v in
    place); merging heads back interleaves them, which no view can do: that copy stays."""
    sample = load("transformer", "tiny")
    idx = torch.randint(0, 64, (1, 16))
    res = run_layout(capture(sample.module, (idx,)))
    assert res.stats["conversions_before"] == res.stats["conversions_after"] == 2
    assert res.stats["copies_kept"] == {"view_needs_copy": 2}
    check_numerics(res.gm, sample.module, (torch.randint(0, 64, (1, 16)),))


class Copies(nn.Module):
    def forward(self, a, b):
        t = a.transpose(1, 2).contiguous()                       # bmm reads a^T in place: goes
        u = torch.relu(b.transpose(1, 2).contiguous())           # pointwise takes any strides: goes
        f = b.transpose(1, 2).contiguous().view(b.shape[0], -1)  # the flatten needs it: stays
        return torch.bmm(t, b).sum() + u.sum() + f.sum(dim=1).sum()


def test_copies_removed_where_consumers_take_strides():
    a, b = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    gm = capture(Copies(), (a, b))
    res = run_layout(gm)
    assert res.stats["conversions_before"] == 3 and res.stats["conversions_after"] == 1
    assert res.stats["copies_removed"] == 2 and res.stats["copies_kept"] == {"view_needs_copy": 1}
    (bmm,) = [n for n in res.gm.graph.nodes if n.target is aten.bmm.default]
    assert bmm.args[0].target is aten.permute.default
    check_numerics(res.gm, Copies(), (torch.randn(2, 4, 3), torch.randn(2, 4, 5)))
    real_strides_match_meta(res.gm, (a, b))


class Transposes(nn.Module):
    def forward(self, x):
        y = torch.relu(x.transpose(1, 2)).transpose(1, 2)
        z = x.permute(0, 2, 1).permute(0, 2, 1) * 2 + y
        return z.permute(2, 0, 1).permute(0, 2, 1)          # composes to one permute, not identity


def test_needless_transpose_pairs_cancel():
    x = torch.randn(2, 3, 4)
    gm = capture(Transposes(), (x,))
    res = run_layout(gm)
    assert res.stats["transposes_cancelled"] == 2 and res.stats["transposes_composed"] == 1
    perms = [n for n in res.gm.graph.nodes if n.target is aten.permute.default]
    assert len(perms) == 1 and perms[0].args[1] == [2, 1, 0]
    check_numerics(res.gm, Transposes(), (torch.randn(2, 3, 4),), tol=0)


def test_pretransposed_weights():
    sample, gm = captured("transformer")
    res = run_layout(gm, pretranspose=True)
    assert res.stats["weights_pretransposed"] == 13       # q, k, v, proj, fc, out in 2 blocks + the head
    for n in res.gm.graph.nodes:
        if n.target is aten.addmm.default or n.target is aten.mm.default:
            w = n.args[-1]
            assert w.op == "get_attr" and w.meta["val"].is_contiguous()
    check_numerics(res.gm, sample.module, sample.make_inputs(5))


# ---------------------------------------------------------------- the measure and the manager

def test_count_conversions():
    class M(nn.Module):
        def forward(self, a, b):
            t = a.transpose(1, 2).contiguous()              # explicit: permute + clone
            return torch.bmm(t, b[:, ::2, :])              # b's rows strided by 2: still BLAS-ready

    a, b = torch.randn(2, 4, 3), torch.randn(2, 8, 5)
    gm = capture(M(), (a, b))
    c = count_conversions(gm)
    assert (c.explicit, c.implicit) == (1, 0)
    assert c.explicit_bytes == 2 * a.numel() * 4
    gm2 = capture(nn.Identity(), (a,))
    assert count_conversions(gm2).total == 0
    assert blas_ready(torch.empty(3, 4, 5).transpose(1, 2)) and blas_ready(torch.empty(3, 8, 5)[:, ::2])
    assert not blas_ready(torch.empty(3, 4, 5)[:, :, ::2]) and not blas_ready(torch.empty(1, 5).expand(4, 5))


def test_pipeline_keeps_layout_and_reports():
    sample = load("convnet", "tiny")
    gm = capture(sample.module, sample.example_inputs)
    from passlab.passes import CheckNumerics, TOLERANCE
    from passlab.passes.manager import Statistics, VerifyGraph
    check = CheckNumerics(sample.module, sample.make_inputs, "cpu", TOLERANCE[torch.float32])
    out = PassManager("layout", instruments=[VerifyGraph(), check, Statistics()]).run(
        gm, PassContext(sample=sample, example_inputs=sample.example_inputs))
    (step,) = out.steps
    assert step.status == "ok" and step.numerics_ok, step.error
    assert step.stats["conversions_before"] == 12 and step.stats["conversions_after"] == 1


def test_registered_with_options():
    p = get_pass("layout")
    assert {"channels_last", "transposes", "copies", "pretranspose", "contiguous_outputs"} <= set(p.options)


def test_after_fuse_kernels_follow_the_layout():
    """Fused kernels bake strides in; after `fuse` the pass lowers them again for NHWC
    instead of converting back at every kernel."""
    sample = load("convnet", "tiny")
    gm = capture(sample.module, sample.example_inputs)
    fused = get_pass("fuse")(clone(gm), PassContext(sample=sample)).gm
    res = run_layout(fused)
    s = res.stats
    assert s["kernels_relowered"] >= 1
    assert s["conversions_before"] == 12 and s["conversions_after"] == 1
    kernels = [n for n in res.gm.graph.nodes if getattr(n.target, "is_fused_kernel", False)]
    assert kernels and all(channels_last(n.meta["val"]) for n in kernels if n.meta["val"].dim() == 4)
    check_numerics(res.gm, sample.module, sample.make_inputs(4))
