"""`passlab simulate MODEL --world-size W --link L --device D`: predicted step
time and exposed communication of a distributed sample, before and after each
pass of a pipeline (default: the overlap passes).

The graph is captured in this process under torch's fake process group, so W
can be any size; where the sample's shapes cannot be split W ways (4 experts
over 256 ranks), it is captured at the largest world that divides them and its
per-rank shapes are kept (weak scaling), while collectives are costed at W.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

DEFAULT_PIPELINE = "overlap_reorder,overlap_chunk"


def add_command(sub) -> None:
    p = sub.add_parser("simulate", help="predict the step time of a distributed graph at W ranks")
    p.add_argument("model")
    p.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--link", default="ib-400g", help="link preset or rate=..,latency=..")
    p.add_argument("--device", default="h100", help="cpu (this machine, measured) or h100, h200, a100 (datasheet)")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    p.add_argument("--ranks-per-host", type=int, default=1,
                   help="ranks sharing this machine's cores (cpu devices): each gets its share")
    p.add_argument("--compare", default=None, metavar="RECORD",
                   help="a `passlab run --world-size W --json` record: predict its run and print the error")
    p.add_argument("--json", default=None, help="write the predictions here")


def fake_world(world: int) -> None:
    """A fake process group of `world` ranks in this process (collectives are
    traced, never run)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def capture_at(model: str, preset: str, world: int, dtype=None):
    """(graph, sample, capture world): the largest power-of-two world <= `world`
    whose shard shapes the sample accepts."""
    from passlab.graphs import capture, load
    w, last = world, None
    while w >= 1:
        fake_world(w)
        try:
            sample = load(model, preset, dtype=dtype)
            return capture(sample.module, sample.example_inputs), sample, w
        except ValueError as e:
            last = e
            w = w // 2 if w & (w - 1) == 0 else 1 << (w.bit_length() - 1)
    raise last


def predict(model: str, *, preset: str = "tiny", world: int = 8, link: str = "ib-400g", device: str = "h100",
            pipeline: str = DEFAULT_PIPELINE, dtype=None, ranks_per_host: int = 1) -> dict:
    """Predictions for the captured graph and after each pass of `pipeline`."""
    from passlab.passes import PassContext, PassManager
    from passlab.passes.manager import Snapshot, VerifyGraph
    from passlab.runtime import simulator
    try:
        gm, sample, cap = capture_at(model, preset, world, dtype)
    finally:                      # leave no fake world behind for later loads in this process
        if dist.is_initialized():
            dist.destroy_process_group()
    profile = simulator.device_profile(device, measure=True)
    if device.startswith("cpu"):
        profile = simulator.share(profile, ranks_per_host)
    est = simulator.Estimator(profile, simulator.get_link(link), world)
    options = {"link": link, "device": device, "world": world}
    from passlab.passes import parse
    steps = parse(pipeline)
    for s in steps:
        s.options = {**{k: v for k, v in options.items() if k in s.pass_.options}, **s.options}
    ctx = PassContext(device="cpu", dtype=sample.dtype, example_inputs=sample.example_inputs, sample=sample,
                      world_size=world)
    result = PassManager(steps, instruments=[VerifyGraph(), Snapshot()]).run(gm, ctx)
    graphs = [("captured", result.baseline.snapshot, None)] + [
        (st.name, rec.snapshot, rec) for st, rec in zip(steps, result.steps)]
    rows = []
    for name, g, rec in graphs:
        sim = simulator.replay(list(g.graph.nodes), est) if g is not None else None
        row = {"step": name, **(sim.as_dict() if sim else {})}
        if rec is not None:
            row.update(status=rec.status, error=rec.error, stats=rec.stats)
        rows.append(row)
    return {"model": model, "preset": preset, "world": world, "capture_world": cap, "link": str(est.link),
            "link_source": est.link.source, "device": device, "device_source": est.profile.get("source"),
            "pipeline": pipeline, "steps": rows}


def table(pred: dict) -> str:
    from .table import render
    us = lambda v: "-" if v is None else f"{v * 1e6:,.1f}"
    rows = []
    for r in pred["steps"]:
        eff = r.get("overlap_efficiency")
        rows.append([r["step"], us(r.get("step_s")), us(r.get("compute_s")), us(r.get("comm_s")),
                     us(r.get("exposed_comm_s")), "-" if eff is None else f"{eff:.2f}",
                     r.get("status", "")])
    head = (f"{pred['model']} ({pred['preset']}) at W={pred['world']} on {pred['device']} "
            f"[{pred['device_source']}], link {pred['link']}; estimates")
    if pred["capture_world"] != pred["world"]:
        head += f"\n(per-rank shapes captured at W={pred['capture_world']}, collectives costed at W={pred['world']})"
    return head + "\n" + render(["after", "step us", "compute us", "comm us", "exposed us", "overlap eff.",
                                 "status"], rows)


def link_of_record(rec: dict) -> str:
    link = rec.get("link") or {}
    if link.get("emulated") and link.get("rate_bytes_per_s"):
        lat = link.get("latency_s", 0.0) if link.get("latency_emulated") else 0.0
        return f"rate={link['rate_bytes_per_s']:.6g}B;latency={lat:.6g}s"
    return "loopback"


def compare(rec: dict, device: str = "cpu-now") -> dict:
    """Predict the run a distributed run record describes (same model, world,
    emulated link, pipeline, ranks sharing this machine) beside its measurements."""
    world = rec["world_size"]
    pred = predict(rec["model"], preset=rec["preset"], world=world, link=link_of_record(rec), device=device,
                   pipeline=",".join(rec["pipeline"]), dtype=rec.get("dtype"), ranks_per_host=world)
    measured = [rec["baseline"].get("median_s")] + [s.get("median_s") for s in rec["steps"]]
    traced = rec.get("ranks") or []
    exposed = {k: sum(r["traced"][k]["exposed_comm_s"] for r in traced) / len(traced)
               for k in ("baseline", "final")} if traced and all("traced" in r for r in traced) else {}
    for i, (row, m) in enumerate(zip(pred["steps"], measured)):
        row["measured_step_s"] = m
        row["error"] = (row["step_s"] - m) / m if m and row.get("step_s") else None
        key = "baseline" if i == 0 else ("final" if i == len(measured) - 1 else None)
        row["measured_exposed_comm_s"] = exposed.get(key)
    pred["compared_with"] = {"link": rec.get("link"), "machine": rec.get("machine")}
    return pred


def compare_table(pred: dict) -> str:
    from .table import render
    ms = lambda v: "-" if v is None else f"{v * 1e3:.2f}"
    rows = [[r["step"], ms(r.get("step_s")), ms(r.get("measured_step_s")),
             "-" if r.get("error") is None else f"{r['error'] * 100:+.0f}%", ms(r.get("exposed_comm_s")),
             ms(r.get("measured_exposed_comm_s"))] for r in pred["steps"]]
    return (f"{pred['model']} ({pred['preset']}) at W={pred['world']}, link {pred['link']}, "
            f"{pred['device_source']}\n" + render(["after", "predicted ms", "measured ms", "error",
                                                  "pred. exposed ms", "meas. exposed ms"], rows))


def command(args) -> int:
    from .cli import BadArguments, bad_args_errors
    if args.compare:
        with open(args.compare) as f:
            pred = compare(json.load(f), device=args.device if args.device.startswith("cpu") else "cpu-now")
        print(compare_table(pred))
        if args.json:
            from .record import write_json
            write_json(pred, args.json)
        return 0
    try:
        pred = predict(args.model, preset=args.preset, world=args.world_size, link=args.link, device=args.device,
                       pipeline=args.pipeline, dtype=args.dtype, ranks_per_host=args.ranks_per_host)
    except bad_args_errors() as e:
        raise BadArguments(e) from e
    except ValueError as e:
        raise BadArguments(e) from e
    print(table(pred))
    if args.json:
        from .record import write_json
        write_json(pred, args.json)
        print(f"passlab: wrote {os.path.abspath(args.json)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- measured, for validation

def spawn_measure(model: str, preset: str, world: int, steps: int = 5, link: str = "loopback",
                  timeout_s: float = 300) -> dict:
    """Run the captured graph and the graphs after overlap_reorder and
    overlap_chunk on `world` gloo ranks over this machine's loopback, in one
    run, interleaved; rank 0's step times and timeline metrics per variant."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=measure_worker, args=(r, world, port, model, preset, steps, link, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


class Recorder(torch.fx.Interpreter):
    """Runs a graph node by node and records compute and comm intervals; a
    collective's transfer spans issue to the end of its wait when the wait
    blocked, else issue + its duration measured alone (`alone`)."""

    def __init__(self, gm, alone=None, sync=False):
        super().__init__(gm)
        self.events, self.issued, self.alone, self.sync = [], {}, alone or {}, sync
        self.took: dict = {}

    def run_node(self, n):
        import time
        from passlab.runtime.simulator import Event, collective_kind
        kind = collective_kind(n)
        t0 = time.perf_counter()
        out = super().run_node(n)
        if kind not in (None, "wait") and self.sync:
            torch.ops._c10d_functional.wait_tensor(out)
        t1 = time.perf_counter()
        if kind == "wait":
            start = self.issued.get(n.args[0], t0)
            end = t1 if t1 - t0 > 20e-6 else start + self.alone.get(n.args[0].name, 0.0)
            self.events.append(Event(n.args[0].name, "comm", start, max(end, start)))
        elif kind is not None:
            self.issued[n] = t0
            self.took[n.name] = t1 - t0
        elif n.op == "call_function":
            self.events.append(Event(n.name, "compute", t0, t1))
        return out


def measure_worker(rank, world, port, model, preset, steps, link, queue):
    import statistics
    import time
    from passlab.graphs import capture, clone, load
    from passlab.passes import PassContext
    from passlab.passes import overlap
    from passlab.runtime.overlap_metrics import overlap_metrics
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sample = load(model, preset)
        gm = capture(sample.module, sample.example_inputs)
        ctx = PassContext(world_size=world, rank=rank)
        reordered = overlap.overlap_reorder(clone(gm), ctx, link=link).gm
        chunk = overlap.overlap_chunk(clone(reordered), ctx, link=link)
        variants = {"captured": gm, "overlap_reorder": reordered, "overlap_chunk": chunk.gm}
        x = sample.make_inputs(1)
        times = {k: [] for k in variants}
        metrics = {}
        with torch.no_grad():
            for g in variants.values():
                g(*x)
            for _ in range(steps):
                for name, g in variants.items():
                    dist.barrier()
                    t = time.perf_counter()
                    g(*x)
                    times[name].append(time.perf_counter() - t)
            for name, g in variants.items():
                dist.barrier()
                alone = Recorder(g, sync=True)
                alone.run(*x)
                dist.barrier()
                rec = Recorder(g, alone=alone.took)
                rec.run(*x)
                metrics[name] = {k: v for k, v in overlap_metrics(rec.events).items() if k != "ranks"}
        if rank == 0:
            queue.put({"model": model, "preset": preset, "world": world, "chunk_stats": chunk.stats,
                       "step_s": {k: statistics.median(v) for k, v in times.items()}, "timeline": metrics})
    finally:
        dist.destroy_process_group()
