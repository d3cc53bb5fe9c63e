"""Measurement and attribution: what each pass contributes.

All graphs of a run — PyTorch eager (always: it is the reference), the
captured baseline, the graph after each pass, the peers (torch.compile default
and with freezing) and, on request, the graphs of pass subsets for
leave-one-out and Shapley — are timed *in one interleaved batch* (paired
rounds), so their ratios are measured under the same machine conditions; each
ratio to eager and to the previous step comes with its paired-bootstrap CI.
Capture is a step of its own: the baseline's `speedup_vs_eager` is what
capturing the model cost (or gained).

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
import torch.utils._pytree as pytree

from passlab.graphs import Sample, fresh_copies
from passlab.passes import CheckNumerics, PassContext, PassManager, TOLERANCE
from passlab.passes.manager import Statistics, VerifyGraph
from passlab.passes.pipeline import parse_items
from passlab.runtime import costmodel, timing
from passlab.runtime.executor import compile_graph, fused_kernels
from passlab.runtime.profiles import get_profile

from .peers import EAGER, EAGER_SETTINGS, PEER_SETTINGS

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
    graphs, key_of_step = step_graphs(result)
    players, subsets, subset_rollbacks = None, {}, {}
    if ablate or shapley:
        players = [name for name, _ in parse_items(pipeline)] if pipeline is not None else [str(s) for s in steps]
        player_steps = [st for _, st in parse_items(pipeline)] if pipeline is not None else [[s] for s in steps]
        subsets, subset_rollbacks = subset_graphs(sample, result, player_steps, device, ablate=ablate,
                                                  shapley=shapley, say=say)
    fns, alias = compile_once({**graphs, **{f"subset{k}": g for k, g in subsets.items()}}, device)
    fns[EAGER] = sample.reference
    peer_info = {}
    if peers:
        peer_info, peer_fns = make_peers(sample, inputs[0], device, say)
        fns.update(peer_fns)

    say(f"timing {len(fns)} graphs interleaved (budget {budget_s:g}s each)")
    t = timing.measure_many(fns, inputs, device=device, budget_s=budget_s, writes=sample.writes,
                            progress=None if bar is None else
                            (lambda msg: bar(*[int(x) for x in msg.split()[1].split("/")], "timing")))
    profile = get_profile(device)
    numbers = numbers_of(t, alias, sample, profile, costmodel.materialized_bytes(graphs["baseline"]))
    energy = timing.EnergyMeter(device)
    costs = memory_and_energy(graphs, alias, fns, inputs[0], sample, energy, device)
    measured = step_numbers(result, graphs, key_of_step, alias, numbers, costs)

    extra = {"energy_source": energy.source, "profile": profile}
    if peers:
        extra["peers"] = {name: ({**numbers(name), **info} if name in fns else info)
                          for name, info in peer_info.items()}
    if players:
        extra.update(subset_numbers(players, subsets, subset_rollbacks, numbers, ablate=ablate, shapley=shapley))
    return measured, extra


def step_graphs(result) -> tuple[dict, dict]:
    """({"baseline": graph, "stepI": graph of each step that changed it}, {step index: the key of its graph})."""
    graphs: dict[str, torch.fx.GraphModule] = {"baseline": result.baseline.snapshot}
    key_of_step: dict[int, str] = {}
    prev = "baseline"
    for i, rec in enumerate(result.steps):
        if rec.changed and rec.status == "ok" and rec.snapshot is not None:
            prev = f"step{i}"
            graphs[prev] = rec.snapshot
        key_of_step[i] = prev
    return graphs, key_of_step


def compile_once(graphs: dict, device: str) -> tuple[dict, dict]:
    """Each distinct graph (by `signature`) compiled once: ({key: runner}, {every key: the key it runs as})."""
    fns, dedup = {}, {}
    for key, gm in graphs.items():
        sig = signature(gm)
        if sig not in dedup:
            dedup[sig] = key
            fns[key] = compile_graph(gm, device)
    return fns, {key: dedup[signature(gm)] for key, gm in graphs.items()}


def numbers_of(t: dict, alias: dict, sample: Sample, profile: dict, base_bytes: int) -> Callable:
    """`numbers(key, gm=None, prev=None)`: a timed graph's throughput, speedups
    (vs eager, vs `prev`, with CIs) and, given its graph, its roofline bound
    and the intermediate bytes it saves."""
    def numbers(key: str, gm=None, prev: str | None = None) -> dict:
        tm = t[alias.get(key, key)]
        d = throughput(tm, sample)
        d["speedup_vs_eager"], *d["speedup_vs_eager_ci"] = timing.speedup(tm, t[EAGER])
        if prev is not None:
            d["speedup_vs_prev_ci"] = list(timing.speedup(tm, t[alias.get(prev, prev)])[1:])
        if gm is not None:
            bound = costmodel.roofline_bound_s(gm, profile, sample.dtype)
            d["bound_s"], d["percent_of_bound"] = bound, 100 * bound / tm.median_s
            d["intermediate_bytes_saved"] = base_bytes - costmodel.materialized_bytes(gm)
        return d
    return numbers


def memory_and_energy(graphs: dict, alias: dict, fns: dict, x: tuple, sample: Sample, energy, device: str) -> dict:
    """{runner key: (peak bytes, how measured, joules per unit or None)}, once per distinct graph."""
    out = {}
    for key in graphs:
        k = alias[key]
        if k not in out:
            once = fresh_copies(x, sample.writes)     # a graph that writes its inputs: copies
            out[k] = timing.peak_memory(fns[k], once, device)
            ej = energy.joules(fns[k], fresh_copies(x, sample.writes), reps=5) if energy.available else None
            out[k] += (None if ej is None else ej / sample.units_per_forward,)
    return out


def step_numbers(result, graphs: dict, key_of_step: dict, alias: dict, numbers: Callable, costs: dict) -> dict:
    """The numbers of the baseline, eager and every step (a step that changed
    nothing has its predecessor's graph, and its numbers)."""
    def with_costs(d: dict, key: str) -> dict:
        d["peak_memory_bytes"], d["memory_method"], d["energy_j_per_unit"] = costs[alias[key]]
        return d
    measured = {"baseline": with_costs(numbers("baseline", graphs["baseline"]), "baseline"),
                "eager": {**numbers(EAGER), "settings": EAGER_SETTINGS}}
    for i in range(len(result.steps)):
        key = key_of_step[i]
        measured[i] = with_costs(numbers(key, graphs[key], prev=key_of_step.get(i - 1, "baseline")), key)
    return measured


def subset_numbers(players: list, subsets: dict, subset_rollbacks: dict, numbers: Callable, *,
                   ablate: bool, shapley: bool) -> dict:
    """Ablation (each player's loss when left out, its gain alone) and/or
    Shapley values with the interaction term, from the log throughput of every
    timed subset of the players."""
    extra = {"subset_rollbacks": {"+".join(players[i] for i in k) or "(none)": bad
                                  for k, bad in subset_rollbacks.items() if bad}}
    v = {k: math.log(numbers(f"subset{k}")["throughput"]) for k in subsets}
    n = len(players)
    full = tuple(range(n))
    if ablate:
        extra["ablation"] = {players[i]: math.exp(v[full] - v[tuple(j for j in full if j != i)]) for i in range(n)}
        extra["solo"] = {players[i]: math.exp(v[(i,)] - v[()]) for i in range(n)}
        extra["players"] = players
    if shapley:
        phi, samples = shapley_values(v, n)
        extra["shapley"] = {players[i]: phi[i] for i in range(n)}
        extra["shapley_samples"] = samples
        extra["interaction"] = (v[full] - v[()]) - sum(v[(i,)] - v[()] for i in range(n))
        extra["players"] = players
    return extra


def subset_graphs(sample, result, player_steps, device, *, ablate, shapley, say):
    """The graph after each needed subset of players (kept in pipeline order),
    and for each subset the passes rolled back or failed inside it."""
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
    check = CheckNumerics(sample.reference, sample.make_inputs, device, tol, mutated=sample.writes)
    ctx = PassContext(device=device, dtype=sample.dtype, example_inputs=sample.flat_inputs, sample=sample)
    out, rolled_back = {}, {}
    for k, subset in enumerate(sorted(need, key=len)):
        steps = [s for i in subset for s in player_steps[i]]
        say(f"subset {k + 1}/{len(need)}: {'+'.join(str(i) for i in subset) or 'none'}")
        pm = PassManager(steps, instruments=[VerifyGraph(), check, Statistics()])
        res = pm.run(result.baseline.snapshot, ctx)
        out[subset] = res.gm
        rolled_back[subset] = [{"pass": r.name, "status": r.status, "error": r.error}
                               for r in res.steps if r.status != "ok"]
    return out, rolled_back


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


def throughput(tm: timing.Timing, sample: Sample) -> dict:
    """A timing as throughput in the sample's unit, with its CI and how it was measured."""
    units = sample.units_per_forward
    return {"throughput": units / tm.median_s, "ci_low": units / tm.ci_high_s, "ci_high": units / tm.ci_low_s,
            "unit": f"{sample.unit}/s", "median_s": tm.median_s, "n": tm.n, "threads": tm.threads,
            "timing_method": tm.method}


def model_call(sample: Sample, fn: Callable) -> Callable:
    """`fn` (a compiled copy of the model, or what passlab.optimize returned)
    called on flat graph inputs the way `sample.reference` calls the model:
    as the model's own (args, kwargs)."""
    if not sample.example_kwargs and all(isinstance(x, torch.Tensor) for x in sample.example_inputs):
        return fn
    spec = sample.in_spec

    def call(*flat):
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        return fn(*args, **kwargs)
    return call


def make_peers(sample: Sample, x: tuple, device: str, say) -> tuple[dict, dict]:
    """PyTorch eager, torch.compile with default settings and torch.compile
    with freezing, each compiled here (its compile time is its first call).

    `options={"freezing": True}` patches inductor's config for that one
    compile only: the later default compile does not freeze."""
    info, fns = {EAGER: {"settings": EAGER_SETTINGS, "compile_s": 0.0}}, {EAGER: sample.reference}
    torch._dynamo.reset()
    for name, (settings, options) in PEER_SETTINGS.items():
        say(f"compiling the {name} peer")
        try:
            compiled = model_call(sample, torch.compile(sample.module, options=options))
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(*x)
            info[name] = {"settings": settings, "compile_s": time.perf_counter() - t0}
            fns[name] = compiled
        except Exception as e:  # a peer that cannot compile is reported, not fatal
            info[name] = {"settings": settings,
                          "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return info, fns
