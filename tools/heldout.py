"""Held-out models: small models written the way users write them, which no
pass or decomposition choice was tuned on, and the capture check on them.

    python -m passlab.tools.heldout                      # captured graph / eager, every model
    python -m passlab.tools.heldout --variants eager,export,core_aten,captured,optimized
    python -m passlab.tools.heldout --models vit,bert --budget 3

Variants: `eager` the module itself; `export` torch.export's graph before any
decomposition; `core_aten` the full core-aten decomposition as a plain
GraphModule (what a captured graph was before graphs/decompositions.py and
runtime/executor.bind); `captured` `passlab.graphs.capture` run by the
executor (`compile_graph`); `optimized` `passlab.optimize` (default pipeline).
`PASSLAB_MALLOC=system` keeps glibc's allocator defaults for the whole
process (the "before" setting; the executor's `keep_heap` is process-wide).
All are timed in one interleaved run per model (`--clock wall`:
runtime/timing.measure_many; `--clock thread`: this thread's CPU time, for a
busy shared machine), on fresh input sets; ratios are eager's median over the
variant's (> 1: faster than eager), and in brackets the same ratio of the 10th
percentiles (noise only adds time).
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from passlab.graphs import capture, random_like
from passlab.runtime.executor import compile_graph
from passlab.runtime.timing import measure_many


class ViTBlock(nn.Module):
    """Pre-norm ViT block with nn.MultiheadAttention (need_weights=False, as timm-style code calls it)."""

    def __init__(self, d, heads, need_weights=False):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.need_weights = need_weights

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    def __init__(self, d=128, heads=4, depth=2, patch=4, img=32, classes=10, need_weights=False):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2, d) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(d, heads, need_weights) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class Encoder(nn.Module):
    """nn.TransformerEncoder stack (norm_first, GELU, batch_first)."""

    def __init__(self, d=128, heads=4, depth=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(x)


class MixerBlock(nn.Module):
    def __init__(self, tokens, d):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.tok = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.ch = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class TokenMixer(nn.Module):
    def __init__(self, tokens=64, d=128, depth=2):
        super().__init__()
        self.blocks = nn.Sequential(*[MixerBlock(tokens, d) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class DWBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.hardswish(self.bn2(self.pw(F.relu6(self.bn1(self.dw(x))))))


class DepthwiseCNN(nn.Module):
    """MobileNet-style depthwise-separable convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.blocks = nn.Sequential(DWBlock(32, 64, 1), DWBlock(64, 128, 2), DWBlock(128, 128, 1),
                                    DWBlock(128, 256, 2))
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class GatedScan(nn.Module):
    """A linear-recurrence token mixer written with cumsum/exp (no custom kernels)."""

    def __init__(self, d=128, depth=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict(dict(norm=nn.LayerNorm(d), proj=nn.Linear(d, 3 * d),
                                                       out=nn.Linear(d, d))) for _ in range(depth))

    def forward(self, x):
        for l in self.layers:
            v, g, a = l["proj"](l["norm"](x)).chunk(3, dim=-1)
            log_a = -F.softplus(a)                     # decay in (0, 1), in log space
            c = torch.cumsum(log_a, dim=1)
            h = torch.cumsum(torch.exp(-c) * v, dim=1) * torch.exp(c)
            x = x + l["out"](h * F.silu(g))
        return x


class HFWrap(nn.Module):
    def __init__(self, model, field):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, ids):
        return getattr(self.model(input_ids=ids), self.field)


def hf_bert():
    import transformers as tf
    cfg = tf.BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return HFWrap(tf.BertModel(cfg), "last_hidden_state"), (torch.randint(0, 512, (2, 64)),)


def hf_gpt2():
    import transformers as tf
    cfg = tf.GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return HFWrap(tf.GPT2LMHeadModel(cfg), "logits"), (torch.randint(0, 512, (2, 64)),)


MODELS = {  # name -> () -> (module, example inputs); small (fp32, ~0.2-2 ms eager on 2 cores)
    "vit": lambda: (ViT(), (torch.randn(4, 3, 32, 32),)),
    "vit_weights": lambda: (ViT(need_weights=True), (torch.randn(4, 3, 32, 32),)),
    "encoder": lambda: (Encoder(), (torch.randn(4, 64, 128),)),
    "mixer": lambda: (TokenMixer(), (torch.randn(4, 64, 128),)),
    "dwconv": lambda: (DepthwiseCNN(), (torch.randn(4, 3, 64, 64),)),
    "scan": lambda: (GatedScan(), (torch.randn(4, 64, 128),)),
    "bert": hf_bert,
    "gpt2": hf_gpt2,
}


def build(name: str):
    torch.manual_seed(0)
    module, inputs = MODELS[name]()
    return module.eval(), inputs


def variants(module, inputs, names, out_err=sys.stdout):
    out = {}
    for v in names:
        try:
            out[v] = variant(module, inputs, v)
        except Exception as e:   # a variant that cannot be built is reported, the others still run
            print(f"  {v}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", file=out_err)
    return out


def variant(module, inputs, v):
    from passlab.graphs.capture import drop_guards, flatten_signature
    if v == "eager":
        return module
    if v in ("export", "core_aten"):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, inputs, strict=False)
            if v == "core_aten":
                ep = ep.run_decompositions()
            gm = ep.module()
        drop_guards(gm)
        flatten_signature(gm)
        for p in gm.parameters():
            p.requires_grad_(False)
        return gm
    if v == "captured":          # as passlab runs a captured graph: the executor's bound function
        return compile_graph(capture(module, inputs))
    if v == "optimized":
        import passlab
        return passlab.optimize(module, inputs)
    raise ValueError(f"unknown variant {v!r}")


def quantile(xs, q):
    """The q-quantile of the samples: on a shared machine, noise only adds time, so
    a low quantile estimates the undisturbed time better than the median."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def thread_time_many(fns, input_sets, budget_s):
    """Round-robin timing by this thread's CPU time (`time.thread_time_ns`): time
    the scheduler gives other processes is not counted, which keeps ratios
    usable on a machine shared with other jobs. Meaningful with one torch
    thread only (other threads' work is not this thread's time)."""
    import time
    from passlab.runtime.timing import Timing, median_ci
    samples = {k: [] for k in fns}
    spent = 0.0
    with torch.no_grad():
        for k, f in fns.items():
            f(*input_sets[0])
        rnd = 0
        while spent < budget_s * len(fns) or rnd < 30:
            for k, f in fns.items():
                x = input_sets[rnd % len(input_sets)]
                t0 = time.thread_time_ns()
                f(*x)
                dt = (time.thread_time_ns() - t0) * 1e-9
                samples[k].append(dt)
                spent += dt
            rnd += 1
    return {k: Timing(*median_ci(xs), len(xs), "thread_time_ns", 1, xs) for k, xs in samples.items()}


def run(models, names, budget_s=2.0, out=sys.stdout, clock="wall"):
    rows = {}
    for m in models:
        module, inputs = build(m)
        fns = variants(module, inputs, names, out)
        sets = [random_like(inputs, s) for s in range(3)]
        with torch.no_grad():
            ref = first(module(*sets[0]))
            for v, f in fns.items():
                err = (first(f(*sets[0])) - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
                if err > 1e-3:
                    print(f"  {m}/{v}: relative error {err:.2g}", file=out)
        if clock == "thread":
            t = thread_time_many(fns, sets, budget_s)
        else:
            t = measure_many(fns, sets, budget_s=budget_s, target_ci=0.01, min_reps=30)
        base = t["eager"].median_s
        rows[m] = {v: base / t[v].median_s for v in t}
        low = {v: quantile(t["eager"].samples_s, 0.1) / quantile(t[v].samples_s, 0.1) for v in t}
        print(f"{m:12s} eager {base * 1e6:8.0f} us  " +
              "  ".join(f"{v} {rows[m][v]:.2f} (p10 {low[v]:.2f})" if v in rows[m] else f"{v} fails"
                        for v in names if v != "eager"), file=out, flush=True)
    for v in names:
        xs = [rows[m][v] for m in rows if v in rows[m]]
        if v != "eager" and xs:
            print(f"{v}: geomean {math.exp(sum(map(math.log, xs)) / len(xs)):.2f}  worst {min(xs):.2f}", file=out)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m passlab.tools.heldout", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default="eager,core_aten,captured")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per variant and model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall: runtime/timing.measure_many; thread: this thread's CPU time, round-robin "
                         "(for a busy shared machine; implies --threads 1)")
    a = ap.parse_args(argv)
    models, names = a.models.split(","), a.variants.split(",")
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {', '.join(bad)}; known: {', '.join(MODELS)}")
    known = ("eager", "export", "core_aten", "captured", "optimized")
    if any(v not in known for v in names):
        ap.error(f"unknown variant(s) in {a.variants!r}; known: {', '.join(known)}")
    if "eager" not in names:
        names.insert(0, "eager")
    if a.clock == "thread":
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, clock {a.clock}")
    run(models, names, a.budget, clock=a.clock)


if __name__ == "__main__":
    main()
