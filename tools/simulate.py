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
    p.add_argument("--bench", action="store_true",
                   help="measure instead: launch W ranks on the emulated --link and time the captured graph "
                        "and each pass of --pipeline, in one run")
    p.add_argument("--reps", type=int, default=3, help="timed runs per graph (--bench)")
    p.add_argument("--shapley", action="store_true",
                   help="(--bench) also time every subset of the passes: Shapley values and the interaction")
    p.add_argument("--json", default=None, help="write the predictions (or measurements) here")


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
    profile = simulator.device_profile(device, measure=True) if isinstance(device, str) else dict(device)
    if profile.get("device", "").startswith("cpu"):
        profile = simulator.share(simulator.with_overheads(profile), ranks_per_host)
    est = simulator.Estimator(profile, simulator.get_link(link), world)
    options = {"link": link, "device": device if isinstance(device, str) else "cpu", "world": world}
    from passlab.passes import parse
    steps = parse(pipeline)
    for s in steps:
        s.options = {**{k: v for k, v in options.items() if k in s.pass_.options}, **s.options}
    ctx = PassContext(device="cpu", dtype=sample.dtype, example_inputs=sample.example_inputs, sample=sample,
                      world_size=world, device_profile=est.profile)   # the passes decide with what is timed
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
            "link_source": est.link.source, "device": device if isinstance(device, str) else "cpu (given profile)",
            "device_source": est.profile.get("source"),
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
    if link.get("applied"):
        return link["applied"]                  # the link exactly as the run emulated it
    if link.get("emulated") and link.get("rate_bytes_per_s"):
        lat = link.get("latency_s", 0.0) if link.get("latency_emulated") else 0.0
        return f"rate={link['rate_bytes_per_s']:.6g}B;latency={lat:.6g}s"
    return "loopback"


def compare(rec: dict, device: str = "cpu-now") -> dict:
    """Predict the run a distributed run record (`passlab run --world-size W
    --json`) or a `bench()` result describes (same model, world, emulated
    link, pipeline, ranks sharing this machine) beside its measurements."""
    if "pass_link" in rec:
        return compare_bench(rec, device)
    world = rec["world_size"]
    traced = rec.get("ranks") or []
    compute = [r["traced"]["baseline"]["compute_s"] for r in traced if r.get("traced", {}).get("baseline")]
    pred = calibrated(lambda prof: predict(rec["model"], preset=rec["preset"], world=world,
                                           link=link_of_record(rec), device=prof, pipeline=",".join(rec["pipeline"]),
                                           dtype=rec.get("dtype"), ranks_per_host=world),
                      device, sum(compute) / len(compute) if compute else None)
    measured = [rec["baseline"].get("median_s")] + [s.get("median_s") for s in rec["steps"]]
    exposed = {k: sum(r["traced"][k]["exposed_comm_s"] for r in traced) / len(traced)
               for k in ("baseline", "final")} if traced and all("traced" in r for r in traced) else {}
    for i, (row, m) in enumerate(zip(pred["steps"], measured)):
        row["measured_step_s"] = m
        row["error"] = (row["step_s"] - m) / m if m and row.get("step_s") else None
        key = "baseline" if i == 0 else ("final" if i == len(measured) - 1 else None)
        row["measured_exposed_comm_s"] = exposed.get(key)
    pred["compared_with"] = {"link": rec.get("link"), "machine": rec.get("machine")}
    return pred


def compare_bench(b: dict, device: str = "cpu-now") -> dict:
    world, ranks = b["world"], b["ranks"]
    chain = [step.split("(")[0] for step in b.get("passes", [])]
    passes = [k for k in ranks[0]["step_s"] if k != "captured" and (k in chain or not chain)]
    given = {step.split("(")[0]: step for step in b.get("passes", [])}
    chunk = ranks[0].get("stats", {}).get("overlap_chunk") or {}
    ks = set(chunk.get("k", {}).values())
    if "overlap_chunk" in passes and "(" not in given.get("overlap_chunk", ""):
        if len(ks) == 1:
            given["overlap_chunk"] = f"overlap_chunk(k={ks.pop()})"  # the chunks the run chose, not re-chosen
        elif chunk.get("split") == 0:
            given["overlap_chunk"] = "overlap_chunk(k=1)"            # the run kept no split
    pipeline = ",".join(given.get(n, n)[:-1] + f",link={b['pass_link']})" if "(" in given.get(n, n)
                        else f"{n}(link={b['pass_link']})" for n in passes)
    compute = sum(r["metrics"]["captured"]["compute_s"] for r in ranks) / len(ranks)
    pred = calibrated(lambda prof: predict(b["model"], preset=b["preset"], world=world, link=b["pass_link"],
                                           device=prof, pipeline=pipeline, ranks_per_host=world,
                                           dtype=b.get("dtype")),     # the dtype the ranks ran
                      b.get("profile") or device, compute)
    for row, key in zip(pred["steps"], ["captured"] + passes):
        m = max(r["step_s"][key] for r in ranks)
        row["measured_step_s"] = m
        row["error"] = (row["step_s"] - m) / m if m and row.get("step_s") else None
        row["measured_exposed_comm_s"] = sum(r["metrics"][key]["exposed_comm_s"] for r in ranks) / len(ranks)
        effs = [r["metrics"][key]["overlap_efficiency"] for r in ranks if r["metrics"][key]["overlap_efficiency"] is not None]
        row["measured_overlap_efficiency"] = sum(effs) / len(effs) if effs else None
    return pred


def calibrated(predict_with, device: "str | dict", measured_compute_s: float | None) -> dict:
    """`predict_with(profile)` on the device profile scaled so that the captured
    graph's predicted compute equals its measured compute (one factor for all
    compute: copy rate, matmul rate and per-op cost); what the passes change
    (order, chunks, overlap) is then predicted, not fitted. Each row keeps the
    unscaled prediction as `uncalibrated_step_s`."""
    from passlab.runtime import simulator
    profile = simulator.with_overheads(simulator.device_profile(device) if isinstance(device, str) else dict(device))
    raw = predict_with(profile)
    base = raw["steps"][0].get("compute_s")
    if not base or not measured_compute_s:
        return raw
    f = measured_compute_s / base
    scaled = dict(profile, copy_bytes_per_s=profile["copy_bytes_per_s"] / f,
                  matmul_flops_per_s={k: v / f for k, v in profile["matmul_flops_per_s"].items()},
                  op_overhead_s=profile["op_overhead_s"] * f,
                  source=f"{profile.get('source', '')}; compute x{f:.2f}, calibrated on the captured graph's "
                         f"measured compute")
    pred = predict_with(scaled)
    for row, r in zip(pred["steps"], raw["steps"]):
        row["uncalibrated_step_s"] = r.get("step_s")
    pred["calibration"] = {"compute_factor": f, "measured_compute_s": measured_compute_s,
                           "predicted_compute_s": base}
    return pred


def compare_table(pred: dict) -> str:
    from .table import render
    ms = lambda v: "-" if v is None else f"{v * 1e3:.2f}"
    rows = [[r["step"], ms(r.get("step_s")), ms(r.get("measured_step_s")),
             "-" if r.get("error") is None else f"{r['error'] * 100:+.0f}%", ms(r.get("uncalibrated_step_s")),
             ms(r.get("exposed_comm_s")), ms(r.get("measured_exposed_comm_s"))] for r in pred["steps"]]
    errors = sorted(abs(r["error"]) for r in pred["steps"] if r.get("error") is not None)
    tail = f"\nmedian absolute error {errors[len(errors) // 2] * 100:.1f}%" if errors else ""
    return (f"{pred['model']} ({pred['preset']}) at W={pred['world']}, link {pred['link']}, "
            f"{pred['device_source']}\n" + render(["after", "predicted ms", "measured ms", "error",
                                                  "uncalibrated ms", "pred. exposed ms", "meas. exposed ms"], rows)
            + tail)


def bench_table(b: dict) -> str:
    from .table import render
    ranks = b["ranks"]
    base = max(r["step_s"]["captured"] for r in ranks)
    rows = []
    for key in ranks[0]["step_s"]:
        step = max(r["step_s"][key] for r in ranks)
        m = [r["metrics"][key] for r in ranks]
        effs = [v["overlap_efficiency"] for v in m if v["overlap_efficiency"] is not None]
        mean = lambda k: sum(v[k] for v in m) / len(m) * 1e3
        rows.append([key, f"{step * 1e3:.1f}", f"{base / step:.2f}x", f"{mean('comm_s'):.1f}",
                     f"{mean('exposed_comm_s'):.1f}", f"{sum(effs) / len(effs):.2f}" if effs else "-"])
    link = b["link"]
    head = (f"{b['model']} ({b['preset']}) on {b['world']} gloo ranks, {b['threads_per_rank']} thread(s) each on "
            f"{b['cores']} cores; link {link.get('name')} "
            f"({'emulated' if link.get('emulated') else 'NOT emulated: ' + str(link.get('reason'))}), "
            f"passes told {b['pass_link']} ({b.get('pass_link_source') or 'fitted'}); measured")
    return head + "\n" + render(["after", "step ms (slowest rank)", "vs captured", "comm ms", "exposed ms",
                                 "overlap eff."], rows)


def command(args) -> int:
    from .exits import BadArguments, bad_args_errors
    if args.bench:
        from passlab.passes.pipeline import split_items
        from .distributed_run import bench
        b = bench(args.model, args.preset, args.world_size, args.link, reps=args.reps,
                  passes=[i.strip() for i in split_items(args.pipeline) if i.strip()], shapley=args.shapley)
        print(bench_table(b))
        if b.get("shapley"):
            print("Shapley (log throughput): " + ", ".join(f"{k} {v:+.3f}" for k, v in b["shapley"].items())
                  + f"; interaction {b['interaction']:+.3f}; total {b['total_log_gain']:+.3f}")
        if args.json:
            from .record import write_json
            write_json(b, args.json)
        return 0
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
