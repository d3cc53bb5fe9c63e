"""`unbroadcast_gemm`: a batched GEMM by one matrix expanded over the batch becomes one `mm`
over the batch's rows: same values, no per-call copy of the expanded weight."""
import torch

from passlab.graphs import Sample, capture, clone
from passlab.passes import PassContext, get_pass, relative_error
from passlab.runtime.executor import compile_graph

aten = torch.ops.aten


class LastTokenHead(torch.nn.Module):
    """Hugging Face's LM head on the last position: a 3-D matmul of a non-contiguous slice."""

    def __init__(self, d=32, vocab=48):
        super().__init__()
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.mix = torch.nn.Parameter(torch.randn(3, d, d))

    def forward(self, h):
        per_batch = torch.bmm(h, self.mix)                   # a genuinely batched weight: left alone
        return self.head(h[:, -1:, :]), per_batch


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_broadcast_weight_bmm_becomes_one_mm():
    torch.manual_seed(0)
    m = LastTokenHead().eval()
    h = torch.randn(3, 5, 32)
    gm = capture(m, (h,))
    assert any(t == aten.expand.default for t in targets(gm)) and targets(gm).count(aten.bmm.default) == 2
    res = get_pass("unbroadcast_gemm")(clone(gm), PassContext(sample=Sample("head", m, (h,))))
    assert res.stats["rewritten"] == 1 and res.stats["skipped"] == {}
    assert targets(res.gm).count(aten.bmm.default) == 1 and aten.mm.default in targets(res.gm)
    res.gm.graph.lint()
    run = compile_graph(res.gm, "cpu")
    for seed in range(3):
        h = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for got, want in zip(run(h), m(h)):
                assert got.shape == want.shape and relative_error(got, want) < 1e-6
