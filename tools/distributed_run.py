"""`passlab run MODEL --world-size W [--link L] [--timeline FILE] [--timeout S]`.

The parent process checks the arguments, derives the emulated link from this
machine's compute rate, and launches W ranks (`runtime.distributed.spawn`; or,
under torchrun, this process *is* a rank). Every rank loads its shard of the
sample, captures it, runs the pipeline under the pass manager's instruments
(`rank_main`) with the overlap passes told the link exactly as emulated, and
with every pass outcome agreed between the ranks (`agreeing`: a pass or
numerics check that fails on one rank is rolled back on all; graphs that
differ stop the run at once, naming the rank and the pass), times each distinct graph with the same fixed number of
repetitions on every rank (collectives must match), and traces the baseline
and final graphs. Rank 0 gathers everything into one run record: per-pass
rows as in a single-process run, per-rank step times, the link, and the
Chrome-trace timeline.

`bench` (`passlab simulate --bench`) launches the same ranks on another
target, `bench_rank`: the captured graph and each pass of a pipeline applied
on top of the last, every graph (and, on request, every subset of the passes
and the eager/torch.compile peers) timed in the same paired rounds and traced.
"""
from __future__ import annotations

import os
import socket
import sys
import time

import torch

TARGET = "passlab.tools.distributed_run:rank_main"
REPS = {"tiny": (2, 10), "bench": (1, 5)}          # (warm-up, timed repetitions)
TRACE_ITERS = 2


# ---------------------------------------------------------------- inside a rank

def rank_main(p: dict) -> dict:
    import torch.distributed as dist
    from passlab.graphs import capture, load
    from passlab.passes import PipelineFailed, parse
    from passlab.runtime.distributed import applied_link, stage

    from . import record as records
    from .runner import context, make_manager

    rank, world = dist.get_rank(), dist.get_world_size()
    device = p["device"]
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    say = (lambda msg: print(f"passlab: {msg}", file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
    stage("loading the model")
    sample = load(p["model"], p["preset"], dtype=p["dtype"], device=device)
    say(f"capturing {sample.name} ({sample.preset}, {str(sample.dtype).replace('torch.', '')}, {device}) "
        f"on {world} ranks")
    stage("capturing")
    gm = capture(sample.module, sample.example_inputs)
    steps = parse(p["pipeline"])
    names = [str(s) for s in steps]
    link_options(steps, applied_link() or "loopback", world)
    manager = agreeing(make_manager(steps, sample, device, strict=p["strict"], tolerance=p["tolerance"],
                                    progress=lambda i, n, name: (stage(f"pass {name}"), say(f"[{i}/{n}] {name}"))),
                       guard_rounds=p.get("guard_rounds", 0) if world > 1 else 0)
    ctx = context(sample, device)
    ctx.world_size, ctx.rank = world, rank
    out = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads(),
           "device": device, "units_per_forward": sample.units_per_forward, "unit": sample.unit,
           "replicated_input": bool(getattr(sample.module, "input_is_replicated", False)),
           "dtype": str(sample.dtype).replace("torch.", ""), "description": sample.description}
    try:
        result = manager.run(gm, ctx)
    except PipelineFailed as e:
        baseline, recs = e.records
        out["failed"] = str(e)
        out["record"] = records.build(model=sample.name, preset=sample.preset, device=p["device"],
                                      pipeline=names, baseline=baseline, steps=recs)
        return out
    runnable = distinct_graphs(result, device)
    warmup, reps = p["reps"]
    inputs = sample.make_inputs(7)
    stage("timing")
    say(f"timing {', '.join(label(k, result) for k in runnable)} ({warmup} warm-up + {reps} paired rounds "
        "on every rank)")
    out["timings"] = time_graphs(runnable, inputs, device, warmup, reps)
    stage("tracing")
    from passlab.runtime.executor import compile_graph
    compile_graph(result.gm, device)              # the tracer interprets the graph; its kernels must be built
    keys = step_keys(result)
    between = {k: result.steps[k].snapshot for k in runnable if k != "baseline" and keys and k != keys[-1]}
    out.update(trace(result.baseline.snapshot, result.gm, inputs, rank, between))
    out["reference_error"] = reference_error(sample, result.gm)
    out["statuses"] = [s.status for s in result.steps]
    if rank == 0:
        out["record"] = records.build(model=sample.name, preset=sample.preset, device=p["device"],
                                      pipeline=names, baseline=result.baseline, steps=result.steps)
        out["step_keys"] = step_keys(result)
    stage("finished")
    return out


# ---------------------------------------------------------------- ranks agree

class RanksDisagree(RuntimeError):
    """Two ranks hold different graphs after a pass: their collectives would not match."""


def link_options(steps, link: str, world: int) -> None:
    """The passes that estimate communication get the link exactly as the run
    emulates it (and the world size), unless the pipeline gives their own."""
    for s in steps:
        for key, value in (("link", link), ("world", world)):
            if key in s.pass_.options and key not in s.options:
                s.options[key] = value


def agree(what: str, error: str | None, fingerprint: str | None, disagreements: list) -> None:
    """Every rank's outcome of `what`, exchanged; all ranks then act alike:
    raise (the manager rolls the pass back everywhere) where any rank failed,
    and record a disagreement (the pipeline stops everywhere) where the graphs differ."""
    import torch.distributed as dist
    outs = [None] * dist.get_world_size()
    dist.all_gather_object(outs, (error, fingerprint))
    failed = [(r, e) for r, (e, _) in enumerate(outs) if e is not None]
    if failed:
        r, e = failed[0]
        raise RuntimeError(f"{what} failed on rank {r} (rolled back on every rank): {e}")
    odd = [r for r, (_, fp) in enumerate(outs) if fp != outs[0][1]]
    if odd:
        msg = (f"ranks disagree after {what}: rank {odd[0]}'s graph differs from rank 0's "
               f"(their collectives would not match)")
        disagreements.append(msg)
        raise RuntimeError(msg)


def agreeing(manager, guard_rounds: int = 0):
    """The manager with every pass and the numerics check wrapped so that the
    ranks agree on each outcome, and the pipeline stopping on every rank
    (RanksDisagree, naming the rank and the pass) where their graphs differ.
    With `guard_rounds`, a pass that estimates communication and changed the
    graph is timed against the graph before it on the link (`link_guard`) and
    rolled back where it is slower, unless the pass measured its graph against
    that very graph itself (`overlap_chunk`'s confirmation, `baseline_is_input`)."""
    import hashlib
    from passlab.graphs import clone
    from passlab.passes import CheckNumerics
    from passlab.passes.api import Pass
    from passlab.runtime.simulator import collective_kind

    def simulator_collectives(g):
        return any(collective_kind(n) not in (None, "wait") for n in g.graph.nodes)

    class AgreedPass(Pass):
        keeps_meta = True             # the inner pass's own call finished the graph (api.finish)

        def __init__(self, inner):
            self.inner, self.name, self.description, self.options = inner, inner.name, inner.description, inner.options

        def run(self, gm, ctx):
            res, error = None, None
            before = hashlib.sha1(str(gm.graph).encode()).hexdigest()
            guarded = guard_rounds and "link" in self.inner.options and simulator_collectives(gm)
            original = clone(gm) if guarded else None          # passes may rewrite gm in place
            try:
                res = self.inner(gm, ctx)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            code = hashlib.sha1(str(res.gm.graph).encode()).hexdigest() if res is not None else None
            agree(f"pass {self.name}", error, code, disagreements)
            measured_itself = (res.stats.get("measured") or {}).get("baseline_is_input") if res else False
            if guarded and code != before and not measured_itself:
                res.stats["measured_on_link"] = link_guard(self.name, original, res.gm, ctx, guard_rounds)
            return res

    class AgreedNumerics(CheckNumerics):
        def __init__(self, inner):
            self.__dict__.update(inner.__dict__)

        def after_pass(self, step, gm, ctx, record):
            error = None
            try:
                super().after_pass(step, gm, ctx, record)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            agree(f"the numerics check of {step.name}", error, None, disagreements)

    disagreements: list[str] = []
    inner = manager.progress

    def progress(i, n, name):
        if disagreements:             # every rank saw the same gathered outcomes: all stop here
            raise RanksDisagree(disagreements[0])
        if inner:
            inner(i, n, name)
    for step in manager.steps:
        step.pass_ = AgreedPass(step.pass_)
    manager.instruments = [RollBackSlower()] * bool(guard_rounds) + [
        AgreedNumerics(i) if isinstance(i, CheckNumerics) else i for i in manager.instruments]
    manager.progress = progress
    return manager


def distinct_graphs(result, device: str) -> dict:
    """'baseline' and the index of every step whose graph differs from the one
    before, each compiled for the device."""
    from passlab.runtime.executor import compile_graph
    graphs = {"baseline": result.baseline.snapshot}
    for i, s in enumerate(result.steps):
        if s.status == "ok" and s.changed and s.snapshot is not None:
            graphs[i] = s.snapshot
    return {k: compile_graph(g, device) for k, g in graphs.items()}


def step_keys(result) -> list:
    """For each step, the key of the graph it ran: its own if it changed, else the last one."""
    keys, last = [], "baseline"
    for i, s in enumerate(result.steps):
        if s.status == "ok" and s.changed and s.snapshot is not None:
            last = i
        keys.append(last)
    return keys


def label(key, result) -> str:
    return "baseline" if key == "baseline" else f"after {result.steps[key].name}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_graphs(graphs: dict, inputs, device: str, warmup: int, reps: int) -> dict:
    """Every graph timed in `reps` paired rounds on every rank (`measure.time_on_every_rank`:
    each sample the slowest rank's); median, 95% CI and the samples (for CIs on ratios)."""
    from passlab.runtime.distributed.measure import time_on_every_rank
    times = time_on_every_rank(graphs, inputs, rounds=reps, warmup=warmup, device=device)
    return {k: {"median_s": t.median_s, "ci_low_s": t.ci_low_s, "ci_high_s": t.ci_high_s, "n": t.n,
                "samples_s": t.samples_s} for k, t in times.items()}


def link_guard(name: str, before, after, ctx, rounds: int) -> dict:
    """The measured guard of a pass that estimates communication (it has a
    `link` option): its graph and the one before it timed on the emulated link
    on every rank (`measure.compare_on_every_rank`); rank 0 decides. The record
    says `slower` (and the measured `loss`) where the pass's graph is slower by
    the median: `RollBackSlower` then rolls the pass back on every rank."""
    from passlab.runtime.distributed import stage
    from passlab.runtime.distributed.measure import compare_on_every_rank, decide, timing_row
    from passlab.runtime.executor import compile_graph
    stage(f"measuring {name} on the link")
    times = compare_on_every_rank({"before": compile_graph(before, ctx.device),
                                   "after": compile_graph(after, ctx.device)},
                                  tuple(ctx.example_inputs), "before", rounds=rounds, device=ctx.device)
    rounds = times["before"].n
    row = {"before": timing_row(times["before"]), "after": timing_row(times["after"], times["before"]),
           "rounds": rounds, "how": "every rank, paired rounds (more, up to 3x, while the speedup's CI holds 1), "
                                    "slowest rank per round; rank 0 decides"}
    gain, lo, hi = decide(lambda: row["after"]["speedup"])
    row["slower"] = gain < 1.0
    if row["slower"]:
        row["loss"] = (f"slower on the emulated link: {(1 / gain - 1) * 100:+.1f}% (speedup {gain:.2f}x, "
                       f"95% CI {lo:.2f}-{hi:.2f}; {times['after'].median_s * 1e3:.1f} ms vs "
                       f"{times['before'].median_s * 1e3:.1f} ms without it, {rounds} paired rounds on every rank)")
    return row


class RollBackSlower:
    """The first instrument of a distributed run: a pass whose graph measured
    slower on the link than without it (`link_guard`) is rolled back (the
    manager keeps its stats, the measurement among them, and the loss as its error)."""

    def after_pass(self, step, gm, ctx, record):
        measured = record.stats.get("measured_on_link") or {}
        if measured.get("slower"):
            raise SlowerOnTheLink(measured["loss"])


class SlowerOnTheLink(RuntimeError):
    """A distributed pass whose graph measured slower on the link than without it."""


def trace(baseline, final, inputs, rank: int, between: dict | None = None) -> dict:
    """Traced runs of the baseline and final graphs; clock origin at a common barrier.
    Overlap metrics come from the last traced run of each."""
    import torch.distributed as dist
    from passlab.runtime.distributed import Timeline, traced
    from passlab.runtime.overlap_metrics import overlap_metrics
    tl = Timeline(rank)
    dist.barrier()
    origin = time.perf_counter_ns()
    metrics = {}
    steps = [(f"step {k}", g) for k, g in (between or {}).items()]    # graphs of intermediate passes
    for name, g in (("baseline", baseline), *steps, ("final", final)):
        dist.barrier()
        for it in range(TRACE_ITERS):
            traced(g, inputs, tl, f"{name} #{it + 1}")
        chrome = chrome_events([e for e in tl.events if e["step"] == last_run(name)], rank)
        metrics[name] = overlap_metrics(chrome)["ranks"].get(rank, {})
    return {"events": tl.events, "origin_ns": origin, "overlap": metrics}


def chrome_events(events: list[dict], rank: int, zero_ns: int = 0) -> list[dict]:
    """A rank's timeline events as Chrome-trace "X" events (microseconds from
    `zero_ns`), the form `overlap_metrics` reads."""
    return [{"ph": "X", "cat": e["cat"], "name": e.get("name", e["cat"]), "pid": rank,
             "tid": e.get("lane") or e["cat"], "ts": (e["start_ns"] - zero_ns) / 1e3,
             "dur": (e["end_ns"] - e["start_ns"]) / 1e3} for e in events]


def last_run(name: str) -> str:
    return f"{name} #{TRACE_ITERS}"


def reference_error(sample, gm) -> float | None:
    """The final graph against the single-process, unsharded reference."""
    ref = getattr(sample.module, "reference", None)
    if ref is None:
        return None
    from passlab.passes import relative_error
    x = sample.make_inputs(11)
    with torch.no_grad():
        return relative_error(gm(*x), ref(*x))


# ---------------------------------------------------------------- inside a rank: each pass measured (simulate --bench)

BENCH_TARGET = "passlab.tools.distributed_run:bench_rank"
BENCH_PIPELINE = ["overlap_reorder", "overlap_chunk"]


def bench_rank(p: dict) -> dict:
    """Inside a rank: the captured graph, then each pass applied on top of the
    last, each timed (same repetitions on every rank, interleaved) and traced."""
    import torch.distributed as dist
    from passlab.graphs import capture, load
    from passlab.passes import PassContext, parse
    from passlab.passes.overlap import run_profile
    from passlab.runtime.distributed.measure import time_on_every_rank
    from passlab.runtime.simulator import get_link
    rank, world = dist.get_rank(), dist.get_world_size()
    sample = load(p["model"], p["preset"])
    gm = capture(sample.module, sample.example_inputs)
    ctx = PassContext(world_size=world, rank=rank, dtype=sample.dtype, example_inputs=sample.example_inputs,
                      sample=sample)
    link, source = bench_link(p)
    dist.barrier()
    # the profile the overlap passes decide with (rank 0's, broadcast; cached for the passes below)
    profile = run_profile("cpu", sample.dtype, get_link(link), gm)
    steps = parse(",".join(p["passes"]))
    variants, stats = pass_chain(steps, gm, ctx, link, p["reps"])
    if p.get("shapley"):
        variants.update(subset_variants(steps, gm, ctx, link))
    x = sample.make_inputs(3)
    peers, setup_s = bench_peers(sample, x) if p.get("peers") else ({}, {})
    with torch.no_grad():
        # paired rounds on every rank, each sample the slowest rank's: CIs on any ratio (timing.speedup)
        times = time_on_every_rank({**variants, **peers}, x, rounds=p["reps"], warmup=1)
        metrics, traces = trace_variants(variants, x, rank)
        errors = variant_errors(sample, variants)
    out = {"rank": rank, "stats": stats, "metrics": metrics, "trace": traces, "pass_link": link,
           "pass_link_source": source, "profile": profile, "peer_setup_s": setup_s,
           "step_s": {k: times[k].median_s for k in variants}, "peer_step_s": {k: times[k].median_s for k in peers},
           "samples_s": {k: t.samples_s for k, t in times.items()}}
    if errors is not None:
        out["error_vs_reference"] = errors
    return out


def bench_link(p: dict) -> tuple[str, str]:
    """The link the passes are told, and where it comes from: the link as
    emulated (what the ranks really have), else fitted to all_reduce timings,
    else the one given."""
    from passlab.runtime.distributed import applied_link
    link = applied_link()
    if link is not None:
        return link, "the link as emulated"
    if p.get("calibrate", True):
        return calibrate_link(), "fitted to all_reduce timings"
    return p["pass_link"], "given"


def pass_chain(steps, gm, ctx, link: str, reps: int) -> tuple[dict, dict]:
    """Each pass applied on top of the last ({"captured": gm, step name: graph},
    {step name: stats}); as `passlab run` does, a pass whose graph is slower on
    the link than without it (`link_guard`) is rolled back."""
    variants, stats = {"captured": gm}, {}
    for step in steps:
        res = apply_step(step, gm, ctx, link)
        if str(res.gm.graph) != str(gm.graph) and not (res.stats.get("measured") or {}).get("baseline_is_input"):
            res.stats["measured_on_link"] = link_guard(step.name, gm, res.gm, ctx, reps)
            if res.stats["measured_on_link"]["slower"]:
                res.stats["rolled_back"] = res.stats["measured_on_link"]["loss"]
                res.gm = gm
        gm = res.gm
        variants[step.name], stats[step.name] = gm, res.stats
    return variants, stats


def apply_step(step, gm, ctx, link: str):
    from passlab.graphs import clone
    ctx.options = {"link": link, **step.options}
    return step.pass_(clone(gm), ctx)


def subset_variants(steps, captured, ctx, link: str) -> dict:
    """The graph of every subset of the passes that is not a prefix (the chain has those)."""
    out = {}
    for subset in subsets(len(steps)):
        if subset != tuple(range(len(subset))):
            g = captured
            for i in subset:
                g = apply_step(steps[i], g, ctx, link).gm
            out[subset_key(steps, subset)] = g
    return out


def bench_peers(sample, x) -> tuple[dict, dict]:
    """Eager and torch.compile (default, freezing), timed in the same rounds:
    ({name: callable}, {compiled peer: seconds of its first call})."""
    import torch.distributed as dist
    from .attribution import make_peers
    from .peers import EAGER
    dist.barrier()
    info, fns = make_peers(sample, x, "cpu", lambda msg: None)
    return fns, {k: v["compile_s"] for k, v in info.items() if k in fns and k != EAGER}


def trace_variants(variants: dict, x, rank: int) -> tuple[dict, dict]:
    """One traced step of every graph, from its own start: its overlap metrics
    and its Chrome-trace events."""
    import torch.distributed as dist
    from passlab.runtime.distributed import Timeline, traced
    from passlab.runtime.overlap_metrics import overlap_metrics
    metrics, traces = {}, {}
    for name, g in variants.items():
        tl = Timeline(rank)
        dist.barrier()
        traced(g, x, tl, name)
        evs = chrome_events(tl.events, rank, min((e["start_ns"] for e in tl.events), default=0))
        metrics[name] = {k: v for k, v in overlap_metrics(evs).items() if k != "ranks"}
        traces[name] = evs
    return metrics, traces


def variant_errors(sample, variants: dict) -> dict | None:
    """Every graph's largest error against the unsharded reference, relative to its largest value."""
    ref = getattr(sample.module, "reference", None)
    if ref is None:
        return None
    xr = sample.make_inputs(11)
    want = ref(*xr)
    return {k: float((g(*xr) - want).abs().max() / want.abs().max()) for k, g in variants.items()}


def calibrate_link(reps: int = 8, big: int = 1 << 20) -> str:
    """The link as the ranks see it, fitted to the ring all_reduce formula:
    a 1-element all_reduce gives 2(W-1) latencies, a `big`-float one adds
    2(W-1)/W * bytes / bandwidth. Rank 0's fit, broadcast, so every rank
    schedules with the same numbers. Each size's fastest of `reps` calls, a
    barrier before each: the link's floor (a busy machine only adds to it)."""
    import torch.distributed as dist
    from passlab.runtime import timing
    w = dist.get_world_size()
    calls = {"small": lambda t=torch.zeros(1): dist.all_reduce(t),
             "large": lambda t=torch.zeros(big): dist.all_reduce(t)}
    times = timing.measure_lockstep(calls, [()], rounds=reps, warmup=0, before=dist.barrier)
    small, large = min(times["small"].samples_s), min(times["large"].samples_s)
    lat = small / (2 * (w - 1))
    bw = 2 * (w - 1) / w * big * 4 / max(large - small, 1e-9)
    box = [f"rate={bw:.6g}B;latency={lat:.6g}s"]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def subsets(n: int) -> list[tuple]:
    import itertools
    return [c for r in range(1, n + 1) for c in itertools.combinations(range(n), r)]


def subset_key(steps, subset) -> str:
    """The variant a subset of the passes names: the chain's own for a prefix."""
    if subset == tuple(range(len(subset))):
        return steps[len(subset) - 1].name if subset else "captured"
    return "+".join(steps[i].name for i in subset) + " (subset)"

# ---------------------------------------------------------------- rank 0: one record

def assemble(results: list[dict], launched_info: dict, p: dict) -> dict:
    r0 = results[0]
    rec = r0["record"]
    world = len(results)
    rec.update(world_size=world, launcher=launched_info["launcher"], backend=launched_info["backend"],
               link=launched_info["link"], dtype=r0["dtype"], description=r0["description"])
    if any("failed" in r for r in results):
        rec["ranks"] = [{"rank": r["rank"], "failed": r.get("failed")} for r in results]
        return rec
    units = r0["units_per_forward"] * (1 if r0["replicated_input"] else world)
    unit = r0["unit"]

    def measured(key):
        per = [r["timings"][key] for r in results]
        slow = max(per, key=lambda t: t["median_s"])
        return {"throughput": units / slow["median_s"], "ci_low": units / slow["ci_high_s"],
                "ci_high": units / slow["ci_low_s"], "unit": unit, "median_s": slow["median_s"], "n": slow["n"]}

    base = measured("baseline")
    rec["baseline"].update({k: base[k] for k in ("throughput", "ci_low", "ci_high", "unit", "median_s", "n")})
    rec["baseline"]["overlap_efficiency"] = mean_overlap(results, "baseline")
    prev, prev_key = base["throughput"], "baseline"
    keys = r0["step_keys"]
    for i, (s, key) in enumerate(zip(rec["steps"], keys)):
        m = measured(key)
        s.update(throughput=m["throughput"], ci_low=m["ci_low"], ci_high=m["ci_high"], unit=unit,
                 median_s=m["median_s"], n=m["n"], speedup_vs_prev=m["throughput"] / prev,
                 cumulative_speedup=m["throughput"] / base["throughput"])
        paired = paired_speedup(r0["timings"], key, prev_key)
        if paired:
            s["speedup_vs_prev_ci"] = paired[1:]
        s["overlap_efficiency"] = mean_overlap(results, "final" if key == keys[-1] else
                                               "baseline" if key == "baseline" else f"step {key}")
        prev, prev_key = m["throughput"], key
    if rec["steps"]:
        rec["final_speedup"] = rec["steps"][-1]["cumulative_speedup"]
    final_key = keys[-1] if keys else "baseline"
    from passlab.runtime.distributed import chrome_trace, link_seconds, mark_transfers
    events = {r["rank"]: r["events"] for r in results}
    origins = {r["rank"]: r["origin_ns"] for r in results}
    mark_transfers(events, origins)
    for r in results:
        for k, v in r["overlap"].items():
            v["link_s"] = link_seconds(events[r["rank"]], last_run(k))
    rec["ranks"] = [{
        "rank": r["rank"], "host": r["host"], "device": r["device"], "threads": r["threads"],
        "step_s": {"baseline": r["timings"]["baseline"]["median_s"], "final": r["timings"][final_key]["median_s"]},
        "traced": {k: {m: v.get(m) for m in ("step_s", "compute_s", "comm_s", "link_s", "exposed_comm_s",
                                              "hidden_comm_s", "overlap_efficiency")}
                   for k, v in r["overlap"].items()},
        "reference_error": r["reference_error"], "statuses": r["statuses"]} for r in results]
    rec["timeline"] = chrome_trace(events, origin_ns=origins,
                                   metadata={"model": rec["model"], "world_size": world, "link": rec["link"]})
    return rec


def paired_speedup(timings: dict, key, ref) -> tuple | None:
    """ref's step over key's with its paired-bootstrap 95% CI (`timing.speedup` over the paired rounds,
    each sample the slowest rank's); None where they are the same graph or have no samples."""
    from passlab.runtime import timing
    from passlab.runtime.distributed.measure import as_timing
    if key == ref or not timings[key].get("samples_s") or not timings[ref].get("samples_s"):
        return None
    return timing.speedup(as_timing(timings[key]["samples_s"]), as_timing(timings[ref]["samples_s"]))


def mean_overlap(results, which) -> float | None:
    effs = [r["overlap"][which].get("overlap_efficiency") for r in results if r["overlap"].get(which)]
    effs = [e for e in effs if e is not None]
    return sum(effs) / len(effs) if effs else None


# ---------------------------------------------------------------- the command

def payload_of(args) -> dict:
    from passlab.passes.pipeline import available_default
    return {"model": args.model, "preset": args.preset, "dtype": args.dtype, "device": args.device,
            "pipeline": args.pipeline if args.pipeline is not None else available_default(),
            "strict": args.strict, "tolerance": args.tolerance, "reps": REPS[args.preset],
            "guard_rounds": REPS[args.preset][1]}


def timeout_of(args) -> float:
    """--timeout, else 300 s (1800 s for the bench preset: its passes time their candidates on the link)."""
    return args.timeout if args.timeout else 1800.0 if args.preset == "bench" else 300.0


def check_args(args, p: dict) -> None:
    """Bad model, pipeline or link names are exit 2, before any rank starts."""
    from passlab.graphs import catalog, load
    from passlab.passes import parse
    from passlab.runtime.distributed import link
    from .exits import BadArguments, bad_args_errors
    try:
        parse(p["pipeline"])
        name = args.model
        known = {**catalog.SAMPLES, **catalog.DISTRIBUTED}
        if name not in known and not name.startswith("hf:") and ":" not in name:
            load(name, args.preset)                       # raises UnknownModelError with a suggestion
        if args.link:
            link.resolve(args.link, 1.0)
        if args.device.startswith("cuda") and "RANK" not in os.environ:
            gpus = torch.cuda.device_count()
            if gpus < args.world_size:
                raise ValueError(f"--world-size {args.world_size} on --device cuda needs one GPU per rank; "
                                 f"this machine has {gpus} (use torchrun across hosts, or --device cpu)")
    except bad_args_errors() as e:
        raise BadArguments(e) from e
    except ValueError as e:
        raise BadArguments(e) from e


def link_config(args, dtype: str, threads: int):
    return resolve_link(args.link, args.preset, args.device, dtype, threads) if args.link else None


def resolve_link(spec: str, preset: str, device: str, dtype, threads: int):
    """The link a run emulates: a preset scaled to this machine's matmul rate
    at one rank's threads (`link.resolve`), or a given link as it is."""
    from passlab.graphs.sample import preset_dtype
    from passlab.runtime.distributed import link
    if spec in link.PRESETS:
        return link.resolve(spec, link.host_flops(preset_dtype(preset, device, dtype), threads))
    return link.resolve(spec)


def main(args, write_outputs=None) -> int:
    """`write_outputs(args, record, run)`: the CLI's writer of --json/--csv/--report
    (given by the CLI, which this module does not import); None: --json only."""
    from passlab.runtime.distributed import DistributedRunFailed, default_backend, run_here, spawn
    from . import record as records
    from .exits import FAILED
    if write_outputs is None:
        write_outputs = lambda a, rec, run: records.write_json(rec, a.json) if a.json else None
    say = lambda msg: print(f"passlab: {msg}", file=sys.stderr, flush=True)
    p = payload_of(args)
    check_args(args, p)
    backend = default_backend(args.device)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "PASSLAB_DIST_DIR" not in os.environ
    try:
        if torchrun:
            if args.link:
                say("--link is ignored under torchrun: the ranks use the real network")
            t0 = time.monotonic()
            results = run_here(TARGET, p, timeout=timeout_of(args), backend=backend)
            if results is None:
                return 0
            info = {"launcher": "torchrun", "backend": backend, "seconds": time.monotonic() - t0,
                    "link": {"emulated": False, "reason": "launched by torchrun: the real network"}}
        else:
            threads = max(1, (os.cpu_count() or 1) // args.world_size)
            cfg = link_config(args, args.dtype, threads)
            say(f"launching {args.world_size} ranks ({backend}, {threads} thread(s) each)"
                + (f", link {cfg.name}: {cfg.rate_bytes_per_s / 1e6:.3g} MB/s per rank, "
                   f"{cfg.latency_s * 1e6:.3g} us" if cfg else ", plain loopback"))
            launched = spawn(TARGET, p, args.world_size, timeout=timeout_of(args), link=cfg, backend=backend,
                             threads=threads, echo=lambda line: print(f"[rank 0] {line}", file=sys.stderr,
                                                                      flush=True))
            results = launched.results
            info = {"launcher": "spawn", "backend": backend, "seconds": launched.seconds, "link": launched.link}
            if not launched.link.get("emulated"):
                say(f"link NOT emulated: {launched.link.get('reason')}")
            elif not launched.link.get("latency_emulated"):
                say(f"latency NOT emulated ({launched.link.get('latency_reason')}): the passes modelled zero")
    except DistributedRunFailed as e:
        print(f"passlab: error: {e}", file=sys.stderr)
        if args.json:
            records.write_json({"schema": 1, "model": args.model, "preset": args.preset, "status": "failed",
                                "error": str(e), "world_size": args.world_size, "link": e.link,
                                "failures": [vars(f) for f in e.failures]}, args.json)
        return FAILED
    rec = assemble(results, info, p)
    print(summary(rec))
    unwritten = write_outputs(args, rec, None)
    if args.timeline and rec.get("timeline"):
        from passlab.runtime.distributed import write_chrome_trace
        write_chrome_trace(args.timeline, rec["timeline"])
        say(f"wrote {os.path.abspath(args.timeline)} (open in https://ui.perfetto.dev)")
    failed = [r for r in rec.get("ranks", []) if r.get("failed")]
    if failed:
        print(f"passlab: error: {failed[0]['failed']} (--strict)", file=sys.stderr)
        return FAILED
    return FAILED if unwritten else 0


def summary(rec: dict) -> str:
    from .table import pass_table, render
    lines = [pass_table(rec), ""]
    link = rec.get("link", {})
    if link.get("emulated"):
        probe = link.get("probe") or {}
        measured = probe.get("measured_one_way_s")
        lines.append(f"link {link['name']}: {link['rate_bytes_per_s'] / 1e6:.3g} MB/s per rank ({link['method']}); "
                     "one-way latency " + (f"{link['latency_s'] * 1e6:.4g} us configured, "
                                           + (f"{measured * 1e6:.4g} us measured" if measured is not None
                                              else "not measured") if link.get("latency_emulated")
                                           else f"not emulated ({link.get('latency_reason', 'zero')})")
                     + f"; the passes estimated with {link.get('applied')}")
    else:
        lines.append(f"link: not emulated ({link.get('reason')})")
    rows = []
    for r in rec.get("ranks", []):
        if r.get("failed"):
            rows.append([str(r["rank"]), "failed", "-", "-", "-", "-", "-", "-", "-"])
            continue
        t = r["traced"].get("final", {})
        ms = lambda v: "-" if v is None else f"{v * 1e3:.2f}"
        eff = t.get("overlap_efficiency")
        rows.append([str(r["rank"]), ms(r["step_s"]["baseline"]), ms(r["step_s"]["final"]), ms(t.get("compute_s")),
                     ms(t.get("comm_s")), ms(t.get("link_s")), ms(t.get("exposed_comm_s")), "-" if eff is None else f"{eff:.2f}",
                     "-" if r["reference_error"] is None else f"{r['reference_error']:.1e}"])
    if rows:
        lines.append(render(["rank", "step ms base", "step ms final", "compute ms", "comm ms", "link ms",
                             "exposed ms", "overlap", "vs reference"], rows))
        lines.append("(step: median of timed runs; the rest: last traced run of the final graph; comm: issue to "
                     "completion, link: from the last rank's issue to completion)")
    return "\n".join(lines)


# ---------------------------------------------------------------- each pass measured in one run (simulate --bench)

def bench(model: str, preset: str, world: int, link: str, *, reps: int = 5, passes=None,
          timeout: float = 600, shapley: bool = False, peers: bool = False) -> dict:
    """Launch `world` ranks on the emulated `link` and measure the captured
    graph and each overlap pass, in one run (`bench_rank`). The passes are
    told the link's per-rank rate."""
    from passlab.graphs.sample import preset_dtype
    from passlab.runtime.distributed import spawn
    threads = max(1, (os.cpu_count() or 1) // world)
    cfg = resolve_link(link, preset, "cpu", None, threads)
    pass_link = f"rate={cfg.rate_bytes_per_s:.6g}B;latency={cfg.latency_s:.6g}s"
    p = {"model": model, "preset": preset, "passes": passes or BENCH_PIPELINE, "reps": reps, "pass_link": pass_link,
         "peers": peers, "shapley": shapley}
    launched = spawn(BENCH_TARGET, p, world, timeout=timeout, link=cfg, threads=threads)
    r0 = launched.results[0]
    out = {"model": model, "preset": preset, "world": world, "link": launched.link,
           "dtype": str(preset_dtype(preset, "cpu")).replace("torch.", ""),    # as the ranks loaded it
           "pass_link": r0.get("pass_link", pass_link), "pass_link_source": r0.get("pass_link_source"),
           "passes": p["passes"], "profile": r0.get("profile"),
           "threads_per_rank": threads, "cores": os.cpu_count(), "ranks": launched.results}
    if shapley:
        out.update(shapley_of(out))
    return out


def shapley_of(b: dict) -> dict:
    """Shapley values of log-throughput (1 / the slowest rank's step) over the
    bench's passes, exact over every subset, and the interaction term: total
    log gain minus the sum of solo log gains (`attribution.shapley_values`)."""
    import math
    from passlab.passes import parse
    from .attribution import shapley_values
    steps = parse(",".join(b["passes"]))
    step = lambda key: max(r["step_s"][key] for r in b["ranks"])
    v = {(): -math.log(step("captured"))}
    v.update({c: -math.log(step(subset_key(steps, c))) for c in subsets(len(steps))})
    phi, _ = shapley_values(v, len(steps))
    full = tuple(range(len(steps)))
    solo = sum(v[(i,)] - v[()] for i in range(len(steps)))
    return {"shapley": {s.name: x for s, x in zip(steps, phi)}, "interaction": v[full] - v[()] - solo,
            "total_log_gain": v[full] - v[()], "of": "log throughput, slowest rank's step (interleaved)"}
