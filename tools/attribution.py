"""Measurement and attribution: what each pass contributes.

All graphs of a run — the captured baseline, the graph after each pass, the
peers (eager, torch.compile) and, on request, the graphs of pass subsets for
leave-one-out and Shapley — are timed *in one interleaved batch*, so their
ratios are measured under the same machine conditions.

Contribution is attributed in log-throughput: Shapley values over the
pipeline's items (an alias such as `cleanup` is one item), exact for up to 8
items and sampled by random permutations beyond; `interaction` is the total
log gain minus the sum of each item's solo log gain.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from typing import Callable

import torch

from passlab.graphs import Sample
from passlab.passes import CheckNumerics, PassContext, PassManager, TOLERANCE
from passlab.passes.manager import Statistics, VerifyGraph
from passlab.passes.pipeline import parse_items
from passlab.runtime import costmodel, timing
from passlab.runtime.executor import compile_graph, fused_kernels
from passlab.runtime.profiles import get_profile

EXACT_SHAPLEY_MAX = 8


def signature(gm) -> str:
    """Two graphs with the same signature run the same code."""
    return str(gm.graph) + "".join(k.name for k in fused_kernels(gm))


def measure_run(sample: Sample, result, steps, *, device: str = "cpu", budget_s: float = 2.0,
                ablate: bool = False, shapley: bool = False, peers: bool = False,
                pipeline: str | None = None, say: Callable[[str], None] | None = None,
                bar: Callable[[int, int, str], None] | None = None):
    """Returns (measured, extra): `measured` maps "baseline" and each step index
    to its numbers; `extra` holds shapley / interaction / ablation / peers."""
    say = say or (lambda m: None)
    inputs = [sample.make_inputs(seed) for seed in (11, 12, 13)]
    graphs: dict[str, torch.fx.GraphModule] = {"baseline": result.baseline.snapshot}
    key_of_step: dict[int, str] = {}
    prev = "baseline"
    for i, rec in enumerate(result.steps):
        if rec.changed and rec.status == "ok" and rec.snapshot is not None:
            prev = f"step{i}"
            graphs[prev] = rec.snapshot
        key_of_step[i] = prev

    subsets = {}
    players = None
    if ablate or shapley:
        players = [name for name, _ in parse_items(pipeline)] if pipeline is not None else [str(s) for s in steps]
        player_steps = [st for _, st in parse_items(pipeline)] if pipeline is not None else [[s] for s in steps]
        subsets = subset_graphs(sample, result, player_steps, device, ablate=ablate, shapley=shapley, say=say)

    fns, dedup = {}, {}
    for key, gm in list(graphs.items()) + [(f"subset{k}", g) for k, g in subsets.items()]:
        sig = signature(gm)
        if sig in dedup:
            continue
        dedup[sig] = key
        fns[key] = compile_graph(gm, device)
    alias = {key: dedup[signature(gm)] for key, gm in list(graphs.items()) +
             [(f"subset{k}", g) for k, g in subsets.items()]}

    peer_info = {}
    if peers:
        peer_info, peer_fns = make_peers(sample, inputs[0], device, say)
        fns.update(peer_fns)

    say(f"timing {len(fns)} graphs interleaved (budget {budget_s:g}s each)")
    t = timing.measure_many(fns, inputs, device=device, budget_s=budget_s,
                            progress=None if bar is None else
                            (lambda msg: bar(*[int(x) for x in msg.split()[1].split("/")], "timing")))
    profile = get_profile(device)
    base_bytes = costmodel.materialized_bytes(graphs["baseline"])
    energy = timing.EnergyMeter(device)

    def numbers(key: str, gm=None) -> dict:
        tm = t[alias.get(key, key)]
        units = sample.units_per_forward
        d = {"throughput": units / tm.median_s, "ci_low": units / tm.ci_high_s, "ci_high": units / tm.ci_low_s,
             "unit": f"{sample.unit}/s", "median_s": tm.median_s, "n": tm.n, "threads": tm.threads,
             "timing_method": tm.method}
        if gm is not None:
            bound = costmodel.roofline_bound_s(gm, profile, sample.dtype)
            d["bound_s"], d["percent_of_bound"] = bound, 100 * bound / tm.median_s
            d["intermediate_bytes_saved"] = base_bytes - costmodel.materialized_bytes(gm)
        return d

    measured = {"baseline": numbers("baseline", graphs["baseline"])}
    mem_cache = {}
    for key, gm in graphs.items():
        k = alias[key]
        if k not in mem_cache:
            mem_cache[k] = timing.peak_memory(fns[k], inputs[0], device)
            ej = energy.joules(fns[k], inputs[0], reps=5) if energy.available else None
            mem_cache[k] += (None if ej is None else ej / sample.units_per_forward,)
    measured["baseline"]["peak_memory_bytes"], measured["baseline"]["memory_method"], \
        measured["baseline"]["energy_j_per_unit"] = mem_cache["baseline"]
    for i in range(len(result.steps)):
        key = key_of_step[i]
        gm = graphs[key]
        measured[i] = numbers(key, gm)
        measured[i]["peak_memory_bytes"], measured[i]["memory_method"], measured[i]["energy_j_per_unit"] = \
            mem_cache[alias[key]]

    extra = {"energy_source": energy.source, "profile": profile}
    if peers:
        extra["peers"] = {name: ({**numbers(name), **info} if name in fns else info)
                          for name, info in peer_info.items()}
    if players:
        v = {k: math.log(numbers(f"subset{k}")["throughput"]) for k in subsets}
        n = len(players)
        full = tuple(range(n))
        if ablate:
            extra["ablation"] = {players[i]: math.exp(v[full] - v[tuple(j for j in full if j != i)])
                                 for i in range(n)}
            extra["solo"] = {players[i]: math.exp(v[(i,)] - v[()]) for i in range(n)}
            extra["players"] = players
        if shapley:
            phi, samples = shapley_values(v, n)
            extra["shapley"] = {players[i]: phi[i] for i in range(n)}
            extra["shapley_samples"] = samples
            extra["interaction"] = (v[full] - v[()]) - sum(v[(i,)] - v[()] for i in range(n))
            extra["players"] = players
    return measured, extra


def subset_graphs(sample, result, player_steps, device, *, ablate, shapley, say):
    """The graph after each needed subset of players (kept in pipeline order)."""
    n = len(player_steps)
    need: set[tuple] = {(), tuple(range(n))}
    if ablate:
        need |= {tuple(j for j in range(n) if j != i) for i in range(n)}
        need |= {(i,) for i in range(n)}
    if shapley:
        if n <= EXACT_SHAPLEY_MAX:
            need |= {c for r in range(n + 1) for c in itertools.combinations(range(n), r)}
        else:
            need |= {c for p in permutations(n) for c in prefixes(p)}
            need |= {(i,) for i in range(n)}
    tol = TOLERANCE.get(sample.dtype, 1e-4)
    check = CheckNumerics(sample.module, sample.make_inputs, device, tol)
    ctx = PassContext(device=device, dtype=sample.dtype, example_inputs=sample.example_inputs, sample=sample)
    out = {}
    for k, subset in enumerate(sorted(need, key=len)):
        steps = [s for i in subset for s in player_steps[i]]
        say(f"subset {k + 1}/{len(need)}: {'+'.join(str(i) for i in subset) or 'none'}")
        pm = PassManager(steps, instruments=[VerifyGraph(), check, Statistics()])
        out[subset] = pm.run(result.baseline.snapshot, ctx).gm
    return out


def permutations(n: int, count: int | None = None, seed: int = 0):
    rng = random.Random(seed)
    count = count or max(32, 4 * n)
    for _ in range(count):
        p = list(range(n))
        rng.shuffle(p)
        yield tuple(p)


def prefixes(perm):
    return [tuple(sorted(perm[:k])) for k in range(len(perm) + 1)]


def shapley_values(v: dict[tuple, float], n: int) -> tuple[list[float], int | None]:
    """Exact Shapley values of v over n players (sampled beyond EXACT_SHAPLEY_MAX:
    then the second value is the number of permutations sampled)."""
    phi = [0.0] * n
    if n <= EXACT_SHAPLEY_MAX:
        for i in range(n):
            others = [j for j in range(n) if j != i]
            for r in range(n):
                w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                for s in itertools.combinations(others, r):
                    phi[i] += w * (v[tuple(sorted(s + (i,)))] - v[s])
        return phi, None
    perms = list(permutations(n))
    for p in perms:
        for k, i in enumerate(p):
            phi[i] += v[tuple(sorted(p[:k + 1]))] - v[tuple(sorted(p[:k]))]
    return [x / len(perms) for x in phi], len(perms)


def make_peers(sample: Sample, x: tuple, device: str, say) -> tuple[dict, dict]:
    """PyTorch eager and torch.compile (default settings), with compile time."""
    info, fns = {}, {}
    eager = sample.module
    info["eager"] = {"settings": "torch.no_grad(), module.eval()"}
    fns["eager"] = eager
    say("compiling the torch.compile peer (default settings)")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(sample.module)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(*x)
        info["torch.compile"] = {"settings": "torch.compile(model) defaults (inductor, mode=None, no freezing)",
                                 "compile_s": time.perf_counter() - t0}
        fns["torch.compile"] = compiled
    except Exception as e:  # a peer that cannot compile is reported, not fatal
        info["torch.compile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return info, {k: v for k, v in fns.items()}
