"""PyTorch's own OpInfo samples (op_db) through `passlab.optimize(pipeline=
"cleanup,fuse")`: every op passlab fuses, on each of its float32 sample inputs
(the empty ones included), with a pointwise epilogue so the op has something
to fuse with, compared with eager (NaN and inf where eager has them). One
module per op holds all its samples, so one capture and one compiler call
serve them. The fast suite runs a handful of ops; `slow` runs all."""
import pytest
import torch
import torch.utils._pytree as pytree

import kernel_fuzz as kf

pytest.importorskip("expecttest")    # torch.testing._internal needs it (the dev extra installs it)

FAST = ["nn.functional.silu", "amax", "softmax", "maximum", "where", "nn.functional.layer_norm"]
ALL = FAST + ["abs", "add", "sub", "mul", "div", "minimum", "neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid",
              "erf", "reciprocal", "sin", "cos", "floor", "ceil", "trunc", "nn.functional.relu",
              "nn.functional.gelu", "clamp", "clamp_min", "clamp_max", "nn.functional.hardtanh",
              "nn.functional.leaky_relu", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_not",
              "log_softmax", "sum", "mean", "amin", "var", "any", "all", "pow", "true_divide", "rsub", "square",
              "zeros_like", "ones_like", "full_like"]


@pytest.fixture(scope="module")
def op_db():
    from torch.testing._internal.common_methods_invocations import op_db
    out = {}
    for o in op_db:     # the plain variant, else the first (div: no_rounding_mode)
        if o.name not in out or not o.variant_test_name:
            out.setdefault(o.name, o) if o.variant_test_name else out.__setitem__(o.name, o)
    return out


class Samples(torch.nn.Module):
    """op(sample) -> float32 * 2 + 1 for every sample; the samples' tensors are the inputs."""

    def __init__(self, op, samples):
        super().__init__()
        self.op, self.specs = op, []
        self.flat = []
        for s in samples:
            leaves, spec = pytree.tree_flatten((s.input, s.args, s.kwargs))
            slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
            self.specs.append((spec, leaves, slots, len(self.flat)))
            self.flat += [leaves[i] for i in slots]

    def forward(self, *tensors):
        outs = []
        for spec, leaves, slots, at in self.specs:
            leaves = list(leaves)
            for k, i in enumerate(slots):
                leaves[i] = tensors[at + k]
            x, args, kwargs = pytree.tree_unflatten(leaves, spec)
            y = self.op(x, *args, **kwargs)
            for t in (y if isinstance(y, (tuple, list)) else (y,)):
                outs.append(t.to(torch.float32) * 2 + 1)
        return tuple(outs)


def run_op(info, seed=0):
    import passlab
    torch.manual_seed(seed)
    samples = [s for s in info.sample_inputs("cpu", torch.float32)]
    mod = Samples(info.op, samples)
    want = mod(*mod.flat)
    opt = passlab.optimize(mod, mod.flat, pipeline="cleanup,fuse", device="cpu", guard="off", strict=True)
    got = opt(*mod.flat)
    empty = sum(1 for s in samples if s.input.numel() == 0)
    for i, (g, w) in enumerate(zip(got, want)):
        why = kf.compare(g, w)
        assert why is None, f"{info.name} output {i} ({list(w.shape)}): {why}"
    kernels = [n for n in opt.gm.graph.nodes if getattr(n.target, "is_fused_kernel", False)]
    return len(samples), empty, len(kernels)


@pytest.mark.parametrize("name", FAST)
def test_opinfo_fast(op_db, name):
    n, empty, kernels = run_op(op_db[name])
    assert n and kernels > 0, (name, n, kernels)
    if name == "nn.functional.silu":    # the crash: its (1, 0, 3) sample
        assert empty > 0


@pytest.mark.slow
def test_opinfo_all(op_db):
    missing = [n for n in ALL if n not in op_db]
    assert not missing and len(ALL) >= 40, missing
    fused, empties, failures = [], 0, []
    for name in ALL:
        try:
            n, empty, kernels = run_op(op_db[name])
        except Exception as e:  # noqa: BLE001  (every op reported, not only the first)
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            continue
        fused += [name] if kernels else []
        empties += empty
    assert not failures, "\n".join(failures)
    assert len(fused) >= 40 and empties > 0, (sorted(set(ALL) - set(fused)), empties)
