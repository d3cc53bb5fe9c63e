"""A seeded random generator of fused subgraphs for the kernel fuzzer
(tests/test_kernel_fuzz.py), also runnable on its own:

    python tests/kernel_fuzz.py --cases 10000 --seed 0 [--printer cpp|triton]

Each case is a random chain of 2-6 ops the kernel description supports
(pointwise, reductions, softmax, layer_norm, where, casts) over 1-3 inputs of a
random shape (zero-sized, size-1 and 0-d dims included), each input made
non-contiguous, expanded (stride 0), channels-last, sliced (storage offset)
or plain, of a random storage dtype, with NaN, +-inf and -0.0 sprinkled in.
The chain is an aten-level FX graph; the whole graph is handed to the kernel
generator as one `FusedKernel`. A case the description refuses
(`LoweringError`) is a fallback (ATen runs it); any other exception, a crash
or a result that differs from eager is a failure, reported with its seed and
a reproducer line. Cases are built in batches so one compiler call serves a
batch (`codegen.build`).
"""
from __future__ import annotations

import math
import random
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.fx

aten = torch.ops.aten
FLOATS = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float16]
OTHER = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
SPECIAL = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

UNARY = [aten.neg.default, aten.exp.default, aten.abs.default, aten.tanh.default, aten.sigmoid.default,
         aten.relu.default, aten.silu.default, aten.gelu.default, aten.erf.default, aten.sin.default,
         aten.cos.default, aten.floor.default, aten.ceil.default, aten.sqrt.default, aten.log.default,
         aten.rsqrt.default, aten.reciprocal.default]
BINARY = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
          aten.minimum.default]
COMPARE = [aten.gt.Tensor, aten.lt.Tensor, aten.eq.Tensor, aten.ne.Tensor, aten.ge.Scalar, aten.le.Scalar]
# after an inexact value: no jumps (floor), and no op whose relative error blows up where an
# inexact value may sit a few ulps off (log near 1, 1/x and sqrt near 0, sin of a large argument)
DISCONTINUOUS = {aten.floor.default, aten.ceil.default, aten.log.default, aten.sin.default, aten.cos.default,
                 aten.reciprocal.default, aten.rsqrt.default, aten.div.Tensor, aten.sqrt.default}
# ops whose fp32 result the kernel may round differently: approximations (exp, erf, ...) and
# reductions in another order; exact ops (+, *, /, sqrt, max, where, casts) round as eager does
INEXACT = {aten.exp.default, aten.tanh.default, aten.sigmoid.default, aten.silu.default, aten.gelu.default,
           aten.erf.default, aten.sin.default, aten.cos.default, aten.log.default, aten.sum.dim_IntList,
           aten.mean.dim, aten.var.correction, aten._softmax.default, aten._log_softmax.default,
           aten.native_layer_norm.default,
           aten.amax.default, aten.amin.default}   # which of -0.0 and 0.0 a vectorized max keeps
# ATen's max/min of -0.0 and 0.0 keep the first on its scalar path and the second on its vectorized
# one (MAXPS): after them the sign of a zero is not eager's to define, so no 1/x of it
SIGNED_ZERO = {aten.maximum.default, aten.minimum.default, aten.relu.default, aten.clamp.default,
               aten.amax.default, aten.amin.default}
REDUCE = ["amax", "amin", "sum", "mean", "softmax", "log_softmax", "layer_norm", "var"]


@dataclass
class Case:
    seed: int
    inputs: list
    gm: torch.fx.GraphModule
    ops: list = field(default_factory=list)
    layouts: list = field(default_factory=list)

    def repro(self) -> str:
        return f"python tests/kernel_fuzz.py --repro {self.seed}"

    def describe(self) -> str:
        ins = ", ".join(f"{list(t.shape)}:{str(t.dtype)[6:]} stride={t.stride()} off={t.storage_offset()} ({lay})"
                        for t, lay in zip(self.inputs, self.layouts))
        return f"seed {self.seed}: ops [{', '.join(self.ops)}] on ({ins})\n  reproduce: {self.repro()}"


def rand_shape(r: random.Random) -> list:
    rank = r.choice([0, 1, 2, 2, 3, 3, 4])
    dims = [r.choice([1, 1, 2, 3, 4, 5, 7, 8, 16, 17, 33, 64, 100]) for _ in range(rank)]
    if rank and r.random() < 0.12:
        dims[r.randrange(rank)] = 0
    return dims


def fill(r: random.Random, g: torch.Generator, shape, dtype, special: bool = True) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if not dtype.is_floating_point:
        lo, hi = (0, 8) if dtype == torch.uint8 else (-8, 8)
        return torch.randint(lo, hi, shape, generator=g, dtype=dtype)
    t = torch.randn(shape, generator=g) * r.choice([1.0, 1.0, 3.0, 30.0])
    if t.numel() and special and r.random() < 0.3:
        flat = t.view(-1)
        for _ in range(r.randint(1, 3)):
            flat[r.randrange(flat.numel())] = r.choice(SPECIAL)
        if r.random() < 0.15:   # a whole row of -inf (softmax's all-masked row)
            flat[: shape[-1] if shape else 1] = float("-inf")
    return t.to(dtype)


def layout(r: random.Random, t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """`t`'s values in a random memory layout."""
    kind = r.choice(["contiguous", "contiguous", "transposed", "expanded", "channels_last", "sliced", "offset"])
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1), kind
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last), kind
    if kind == "expanded" and t.dim() >= 1:
        d = r.randrange(t.dim())
        idx = [slice(None)] * t.dim()
        idx[d] = slice(0, 1)
        return t[tuple(idx)].expand(t.shape), kind
    if kind == "sliced" and t.dim() >= 1:
        big = torch.empty(list(t.shape[:-1]) + [t.shape[-1] * 2 + 1], dtype=t.dtype)
        big[..., 1::2][..., : t.shape[-1]] = t
        return big[..., 1::2][..., : t.shape[-1]], kind
    if kind == "offset":
        flat = torch.empty(t.numel() + 5, dtype=t.dtype)
        out = flat[5:].view(t.shape)
        out.copy_(t)
        return out, kind
    return t.contiguous(), "contiguous"


def broadcastable(r: random.Random, shape) -> list:
    """A shape that broadcasts against `shape` (trailing dims, some set to 1)."""
    if not shape:
        return []
    keep = r.randint(1, len(shape))
    return [1 if r.random() < 0.3 else s for s in shape[len(shape) - keep:]]


class Gen:
    """Builds one case's graph node by node, running each op eagerly for its meta["val"]."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.graph = torch.fx.Graph()
        self.inputs, self.layouts, self.ops = [], [], []
        self.seed = seed
        self.inexact = set()    # nodes whose value a correct fp32 kernel may round differently than eager
        self.signless = set()   # nodes whose zeros' sign ATen itself leaves to its code path

    def input(self, shape, dtype, special: bool = True) -> torch.fx.Node:
        t, kind = layout(self.r, fill(self.r, self.g, shape, dtype, special))
        node = self.graph.placeholder(f"x{len(self.inputs)}")
        node.meta["val"] = t
        self.inputs.append(t)
        self.layouts.append(kind)
        return node

    def call(self, target, *args, **kwargs) -> torch.fx.Node:
        vals = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        val = target(*vals[0], **vals[1])     # eager may refuse (amax over an empty dim): no node then
        node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = val
        if target in INEXACT or any(a in self.inexact for a in node.all_input_nodes):
            self.inexact.add(node)
        if target in SIGNED_ZERO or any(a in self.signless for a in node.all_input_nodes):
            self.signless.add(node)
        self.ops.append(getattr(target, "__name__", str(target)).replace(".default", ""))
        return node

    def reduce(self, x):
        r, v = self.r, x.meta["val"]
        nd = v.dim()
        if nd == 0:
            return self.call(aten.neg.default, x)
        kind = r.choice(REDUCE)
        if v.dtype != torch.float32 and kind in ("softmax", "log_softmax", "layer_norm", "var", "mean"):
            x = self.call(aten._to_copy.default, x, dtype=torch.float32)
        if kind in ("amax", "amin", "sum", "mean", "var"):
            dims = sorted(r.sample(range(nd), r.randint(1, nd)))
            if kind == "var":
                return self.call(aten.var.correction, x, dims, correction=r.choice([0, 1]), keepdim=True)
            op = {"amax": aten.amax.default, "amin": aten.amin.default, "sum": aten.sum.dim_IntList,
                  "mean": aten.mean.dim}[kind]
            return self.call(op, x, dims, r.random() < 0.7)
        if kind in ("softmax", "log_softmax"):
            op = aten._softmax.default if kind == "softmax" else aten._log_softmax.default
            return self.call(op, x, r.randrange(-nd, nd), False)
        n = r.randint(1, nd)
        shape = list(v.shape[nd - n:])
        # parameters without NaN/inf: ATen's inexact mean decides whether 0 * inf is NaN or inf
        w = self.input(shape, torch.float32, special=False) if r.random() < 0.6 else None
        b = self.input(shape, torch.float32, special=False) if r.random() < 0.5 else None
        out = self.call(aten.native_layer_norm.default, x, shape, w, b, 1e-5)
        return self.call(__import__("operator").getitem, out, 0)

    def step(self, x):
        """One more op on `x`. A step that jumps where its input moves by an ulp
        (floor, a comparison, a cast to an integer) follows only exact values:
        an approximate exp or a reordered sum may land on the other side."""
        r, v = self.r, x.meta["val"]
        roll = r.random()
        fl = v.dtype.is_floating_point
        if x in self.inexact and (0.55 <= roll < 0.72):
            roll = r.random() * 0.55
        if roll < 0.3 and fl:
            ops = [o for o in UNARY if (x not in self.inexact or o not in DISCONTINUOUS)
                   and (x not in self.signless or o not in (aten.reciprocal.default, aten.rsqrt.default))]
            return self.call(r.choice(ops), x)
        if roll < 0.55:
            # no inf to multiply an inexact value with: 0 * inf or tiny * inf is not for fp32 to decide
            other = self.input(broadcastable(r, list(v.shape)), r.choice(FLOATS if fl else [v.dtype, torch.float32]),
                               special=x not in self.inexact)
            a, b = (x, other) if r.random() < 0.7 else (other, x)
            op = r.choice([o for o in BINARY if (x not in self.inexact and x not in self.signless)
                           or o not in DISCONTINUOUS])
            if v.dtype == torch.bool and op is not aten.add.Tensor:
                a = self.call(aten._to_copy.default, a, dtype=torch.float32) if a is x else a
            return self.call(op, a, b)
        if roll < 0.65:
            op = r.choice(COMPARE)
            if op in (aten.ge.Scalar, aten.le.Scalar):
                c = self.call(op, x, r.choice([0.0, 0.5, -1.0]))
            else:
                c = self.call(op, x, self.input(broadcastable(r, list(v.shape)), v.dtype))
            y = self.input(broadcastable(r, list(v.shape)), torch.float32) if r.random() < 0.5 else None
            xf = x if fl else self.call(aten._to_copy.default, x, dtype=torch.float32)
            if y is None:
                return self.call(aten.where.self, c, xf, self.call(aten.neg.default, xf))
            return self.call(aten.where.self, c, xf, y)
        if roll < 0.72:
            dt = r.choice([torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.bool])
            return self.call(aten._to_copy.default, x, dtype=dt)
        if roll < 0.78 and fl:
            lo = r.choice([None, -1.0, 0.0])
            return self.call(aten.clamp.default, x, lo, r.choice([None, 1.0, 2.5]) if lo is not None else 1.0)
        return self.reduce(x)


def make_case(seed: int) -> Case:
    import warnings
    warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
    gen = Gen(seed)
    r = gen.r
    x = gen.input(rand_shape(r), r.choice(FLOATS + FLOATS + OTHER))
    for _ in range(r.randint(2, 6)):
        for _try in range(4):
            try:
                x = gen.step(x)
                break
            except (RuntimeError, IndexError):    # an op eager itself rejects here: draw another
                continue
    if not x.meta["val"].is_floating_point() and r.random() < 0.5:
        x = gen.call(aten._to_copy.default, x, dtype=torch.float32)
    gen.graph.output(x)
    gm = torch.fx.GraphModule(torch.nn.Module(), gen.graph)
    return Case(seed, gen.inputs, gm, gen.ops, gen.layouts)


# ---------------------------------------------------------------- running

LOW = (torch.bfloat16, torch.float16)


class Reference(torch.fx.Interpreter):
    """Eager with the kernel description's arithmetic: every bf16/fp16 value
    computed in fp32 (casts to them too), rounded only where an output is
    stored; integers and bools stay as they are. `wide=True` computes every
    float in fp64 instead: how far fp32 itself is from the exact answer."""

    def __init__(self, gm, wide: bool = False):
        super().__init__(gm)
        self.to = torch.float64 if wide else torch.float32
        self.low = LOW + ((torch.float32,) if wide else ())

    def run_node(self, n):
        if n.op not in ("call_function", "output"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        up = lambda t: t.to(self.to) if isinstance(t, torch.Tensor) and t.dtype in self.low else t   # noqa: E731
        args, kwargs = torch.fx.node.map_aggregate((args, kwargs), up)
        if kwargs.get("dtype") in self.low:
            kwargs = dict(kwargs, dtype=self.to)
        if n.op == "output":
            return args[0].to(n.args[0].meta["val"].dtype)
        out = getattr(self, n.op)(n.target, args, kwargs)
        if n.target is aten.gelu.default:   # ATen: gelu(inf) is inf on its scalar path, NaN on its vectorized one
            out = torch.where(args[0] == float("inf"), args[0], out)
        return out


def kind(t):
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return t.isnan().int() + 2 * (t == float("inf")).int() + 3 * (t == float("-inf")).int()


def rel_error(g, w, where) -> float:
    if not where.any():
        return 0.0
    scale = max(float(w[where].abs().max()), 1.0)    # an output that cancels to ~0 is compared absolutely
    return float((g - w)[where].abs().max()) / scale


def compare(got, want, exact=None) -> str | None:
    """None when `got` matches the reference `want`: NaN, +inf and -inf in the
    same places, finite values within the output dtype's tolerance of the
    largest finite magnitude (at least 1). `exact` (the fp64
    reference) excuses what fp32 itself cannot decide: an element whose
    class (finite, NaN, inf) fp64 sees otherwise, and an error no worse than
    4x eager fp32's own."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {list(got.shape)}:{got.dtype} != eager {list(want.shape)}:{want.dtype}"
    if not want.is_floating_point():
        bad = got != want
        if exact is not None:
            bad &= exact == want
        return None if not bad.any() else f"{int(bad.sum())} of {want.numel()} elements differ " \
            f"(first: got {got[bad][0].item()}, eager {want[bad][0].item()})"
    g, w = got.double(), want.double()
    decided = torch.ones_like(w, dtype=torch.bool) if exact is None else kind(exact.double()) == kind(w)
    bad = (kind(g) != kind(w)) & decided
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        return f"NaN/inf mismatch at flat index {i}: got {g.reshape(-1)[i]}, eager {w.reshape(-1)[i]}"
    fin = (kind(w) == 0) & decided
    err, tol = rel_error(g, w, fin), TOL[want.dtype]
    if err <= tol:
        return None
    if exact is not None:
        x = exact.double()
        if rel_error(g, x, fin) <= 4 * rel_error(w, x, fin) + tol:
            return None
    return f"relative error {err:.3g} > {tol}"


@dataclass
class Outcome:
    cases: int = 0
    ran: int = 0            # run by a generated kernel
    fallback: int = 0       # refused by the description: ATen runs them
    failures: list = field(default_factory=list)
    refused: dict = field(default_factory=dict)


def run_cases(seeds, device: str = "cpu", batch: int = 64, out: Outcome | None = None) -> Outcome:
    """Generate, build (one compiler call per batch) and compare each case with eager."""
    from passlab.runtime import codegen
    from passlab.runtime.kernel import FusedKernel, LoweringError
    out = out or Outcome()
    seeds = list(seeds)
    for at in range(0, len(seeds), batch):
        built = []
        for seed in seeds[at:at + batch]:
            out.cases += 1
            case = make_case(seed)
            try:
                fk = FusedKernel(f"fuzz_{seed}", case.gm)
            except LoweringError as e:
                out.fallback += 1
                why = e.reason
                out.refused[why] = out.refused.get(why, 0) + 1
                continue
            except Exception as e:  # noqa: BLE001 (any other error is a generator bug)
                out.failures.append(f"lowering raised {type(e).__name__}: {e}\n  {case.describe()}")
                continue
            built.append((case, fk))
        try:
            codegen.build([fk for _, fk in built], device)
        except Exception:  # noqa: BLE001  (find the kernels that do not build, one by one)
            for case, fk in built:
                try:
                    codegen.build([fk], device)
                except Exception as e:  # noqa: BLE001
                    out.failures.append(f"build failed: {str(e)[-600:]}\n  {case.describe()}")
            built = [(c, fk) for c, fk in built if device in fk._compiled]
        for case, fk in built:
            want = Reference(case.gm).run(*case.inputs)
            try:
                got = fk._compiled[device](*case.inputs)
            except Exception as e:  # noqa: BLE001
                out.failures.append(f"kernel raised {type(e).__name__}: {e}\n  {case.describe()}")
                continue
            out.ran += 1
            why = compare(got, want)
            if why:     # is it fp32's own limit? ask fp64
                why = compare(got, want, Reference(case.gm, wide=True).run(*case.inputs))
            if why:
                out.failures.append(f"{why}\n  {case.describe()}")
    return out


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="first seed; cases use seed, seed+1, ...")
    p.add_argument("--printer", choices=["cpp", "triton"], default="cpp")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repro", type=int, help="run one seed and print its graph and kernel")
    p.add_argument("--seeds", help="comma-separated seeds to run (instead of --cases/--seed)")
    a = p.parse_args(argv)
    device = "cpu" if a.printer == "cpp" else "triton"
    if device == "triton" and not torch.cuda.is_available():
        import os
        os.environ["TRITON_INTERPRET"] = "1"
    if a.repro is not None:
        case = make_case(a.repro)
        print(case.describe())
        print(case.gm.graph)
        o = run_cases([a.repro], device)
        print("\n".join(o.failures) or ("ok" if o.ran else "refused (fallback)"))
        return 1 if o.failures else 0
    t0 = time.perf_counter()
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else range(a.seed, a.seed + a.cases)
    o = run_cases(seeds, device, a.batch)
    wall = time.perf_counter() - t0
    which = f"seeds {a.seeds}" if a.seeds else f"seeds {a.seed}..{a.seed + a.cases - 1}"
    print(f"{o.cases} cases ({which}, printer {a.printer}): {o.ran} ran a kernel, "
          f"{o.fallback} fallbacks, {len(o.failures)} failures, {wall:.0f} s")
    print("refused:", o.refused)
    for f in o.failures[:30]:
        print("FAIL", f)
    if o.failures:
        print("failing seeds:", ",".join(m.group(1) for f in o.failures if (m := re.search(r"seed (\d+):", f))))
    return 1 if o.failures else 0


if __name__ == "__main__":
    sys.exit(main())
