"""`python -m passlab.tools.bench_overlap`: the overlap passes measured on the
emulated link, and the simulator checked against the measurements.

For each distributed sample and world size, one launched run
(`simulate.bench`: W gloo ranks in their own network namespaces, joined by the
TUN delay line at the link preset scaled to this machine) times the captured
graph and the graph after each overlap pass in one interleaved batch and
traces each; then `simulate.compare_bench` predicts the same graphs (the
chunk factors the run chose; compute calibrated once, on the captured graph)
and the error is predicted / measured - 1. Every configuration is written as
soon as it ends (JSON and markdown), so an interrupted run keeps what it
measured; `--write-readme` puts the tables into the README's overlap block.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from .bench import md_table, write_readme

START, END = "<!-- overlap:start -->", "<!-- overlap:end -->"
MODELS = ["ep_mixtral", "ep_moe", "tp_mlp", "fsdp_mlp"]
WORLDS = [2, 4]
SHAPLEY = {"ep_mixtral"}


def measure(model: str, world: int, link: str, reps: int, say, peers: bool = True) -> dict:
    from . import simulate
    t0 = time.monotonic()
    b = simulate.bench(model, "bench", world, link, reps=reps, shapley=model in SHAPLEY, timeout=1800,
                       peers=peers)
    say(f"  measured in {time.monotonic() - t0:.0f} s; predicting")
    pred = simulate.compare_bench(b)
    return {"model": model, "world": world, "bench": b, "prediction": pred}


def lane_name(tid) -> str:
    """The timeline's lanes: 0 the step, 1 compute, 2.. one per collective in flight."""
    return {0: "step", 1: "compute"}.get(tid, f"comm {tid - 1}" if isinstance(tid, int) else str(tid))


def write_traces(r: dict, out: str) -> list[str]:
    """Per graph: the traced step of every rank as a Chrome trace (Perfetto) and drawn (SVG)."""
    from passlab.runtime.codegen import atomic_write
    from .report import timeline_svg
    paths = []
    traces = [x.get("trace") or {} for x in r["bench"]["ranks"]]
    for key in traces[0] if traces else ():
        name = key.replace(" (subset)", "-alone").replace("+", "-")
        stem = os.path.join(out, f"{r['model']}-w{r['world']}-{name}")
        tl = {"traceEvents": [dict(e, tid=lane_name(e.get("tid"))) for t in traces for e in t.get(key, [])],
              "displayTimeUnit": "ms"}
        atomic_write(stem + ".trace.json", json.dumps(tl))
        atomic_write(stem + ".svg", timeline_svg(tl))
        paths += [stem + ".trace.json", stem + ".svg"]
    return paths


def rows_of(r: dict) -> list[dict]:
    """One row per graph: measured (slowest rank's step; means over ranks) and predicted."""
    b, pred = r["bench"], r["prediction"]
    ranks = b["ranks"]
    keys = [k for k in ranks[0]["step_s"] if "(subset)" not in k]
    out = []
    for key, p in zip(keys, pred["steps"]):
        m = [x["metrics"][key] for x in ranks]
        effs = [v["overlap_efficiency"] for v in m if v["overlap_efficiency"] is not None]
        out.append({"step": key, "step_s": max(x["step_s"][key] for x in ranks),
                    "comm_s": statistics.mean(v["comm_s"] for v in m),
                    "exposed_comm_s": statistics.mean(v["exposed_comm_s"] for v in m),
                    "overlap_efficiency": statistics.mean(effs) if effs else None,
                    "predicted_step_s": p.get("step_s"), "error": p.get("error"),
                    "k": (ranks[0]["stats"].get(key) or {}).get("k") if key != "captured" else None,
                    "max_error_vs_reference": max((x.get("error_vs_reference") or {}).get(key, 0.0)
                                                  for x in ranks)})
    return out


def peers_row(r: dict) -> list[str]:
    """Slowest rank's step of each peer and of the graph after the last overlap pass."""
    ranks = r["bench"]["ranks"]
    step = lambda k: max(x["peer_step_s"][k] for x in ranks)
    ours = max(x["step_s"][[k for k in x["step_s"] if "(subset)" not in k][-1]] for x in ranks)
    eager, comp, frz = step("eager"), step("torch.compile"), step("torch.compile freezing")
    setup = lambda k: max(x["peer_setup_s"][k] for x in ranks)
    return [r["model"], str(r["world"]), f"{eager * 1e3:,.0f}", f"{comp * 1e3:,.0f}", f"{frz * 1e3:,.0f}",
            f"{ours * 1e3:,.0f}", f"{eager / ours:.2f}x", f"{min(comp, frz) / ours:.2f}x",
            f"{setup('torch.compile'):.0f} / {setup('torch.compile freezing'):.0f}"]


def latency_cell(link: dict) -> str:
    probe = link.get("probe") or {}
    got = probe.get("measured_one_way_s")
    if got is None:
        return f"not measured ({probe.get('reason', link.get('reason', '?'))})"
    return f"{probe['configured_one_way_s'] * 1e3:.1f} / {got * 1e3:.1f} ms ({probe['relative_error'] * 100:+.1f}%)"


def markdown(results: list[dict], machine: str, date: str) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1e3:,.0f}"
    body, errors, targets = [], [], []
    for r in results:
        if "error" in r:
            body.append([r["model"], str(r["world"]), "failed: " + r["error"]] + [""] * 8)
            continue
        rows = rows_of(r)
        reorder = next((x for x in rows if x["step"] == "overlap_reorder"), rows[0])
        for x in rows:
            if x["error"] is not None:
                errors.append(abs(x["error"]))
            k = x["k"]
            name = x["step"] + (f" k={sorted(set(k.values()))[0]}" if k and len(set(k.values())) == 1 else "")
            body.append([r["model"], str(r["world"]), name, ms(x["step_s"]), f"{reorder['step_s'] / x['step_s']:.2f}x",
                         ms(x["comm_s"]), ms(x["exposed_comm_s"]),
                         "-" if x["overlap_efficiency"] is None else f"{x['overlap_efficiency']:.2f}",
                         ms(x["predicted_step_s"]), "-" if x["error"] is None else f"{x['error'] * 100:+.0f}%",
                         f"{x['max_error_vs_reference']:.1e}"])
        if r["model"].startswith("ep_"):
            chunk = next((x for x in rows if x["step"] == "overlap_chunk"), None)
            if chunk:
                cut = 1 - chunk["exposed_comm_s"] / reorder["exposed_comm_s"] if reorder["exposed_comm_s"] else 0
                targets.append([r["model"], str(r["world"]), latency_cell(r["bench"]["link"]),
                                f"{reorder['step_s'] / chunk['step_s']:.2f}x", f"{cut * 100:.0f}%",
                                "-" if chunk["overlap_efficiency"] is None else f"{chunk['overlap_efficiency']:.2f}"])
    from passlab.graphs.sample import preset_dtype
    dtype = str(preset_dtype("bench", "cpu", None)).replace("torch.", "")
    parts = [f"Measured {date} on {machine}, bench presets in {dtype}, one thread per rank (at W=4 four "
             f"ranks share the cores); link `ib-400g` scaled to this machine (bandwidth per FLOP and "
             "latency per FLOP of an H100 on 400 Gbit/s InfiniBand), ranks in their own network namespaces "
             "joined by the TUN delay line; each row the slowest rank's median step of one interleaved run; "
             "predicted = `passlab simulate --compare` (compute calibrated once, on the captured graph).", "",
             md_table(["model", "W", "after", "step ms", "vs reorder", "comm ms", "exposed ms", "overlap eff.",
                       "predicted ms", "error", "max err vs unsharded"], body)]
    if errors:
        parts += ["", f"Simulator: median absolute error {statistics.median(errors) * 100:.1f}% over "
                      f"{len(errors)} graphs (worst {max(errors) * 100:.0f}%)."]
    if targets:
        parts += ["", md_table(["model", "W", "one-way latency configured / probed", "chunk vs reorder",
                                "exposed comm cut", "overlap eff."], targets)]
    peer_rows = [peers_row(r) for r in results if (r.get("bench") or {}).get("ranks")
                 and r["bench"]["ranks"][0].get("peer_step_s")]
    if peer_rows:
        parts += ["", "Beside eager and torch.compile (default, and `freezing=True`), timed in the same rounds; "
                      "passlab = the captured graph after `overlap_reorder,overlap_chunk`, run op by op:", "",
                  md_table(["model", "W", "eager ms", "compile ms", "freezing ms", "passlab ms", "passlab vs eager",
                            "vs best compile", "compile s / freezing s"], peer_rows)]
    for r in results:
        b = r.get("bench") or {}
        if b.get("shapley"):
            vals = ", ".join(f"`{k}` {v:+.3f}" for k, v in b["shapley"].items())
            parts += ["", f"Shapley values ({r['model']}, W={r['world']}, log throughput): {vals}; "
                          f"interaction {b['interaction']:+.3f}; total {b['total_log_gain']:+.3f}."]
    return "\n".join(parts)


def machine_name() -> str:
    import platform
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passlab.tools.bench_overlap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--worlds", default=",".join(map(str, WORLDS)))
    ap.add_argument("--link", default="ib-400g")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="leave out eager and torch.compile (default: timed beside the passes)")
    ap.add_argument("--out", default="out/bench-overlap")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    from .exits import BadArguments
    from passlab.graphs import catalog
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in catalog.DISTRIBUTED]
    if unknown:
        raise BadArguments(f"not distributed samples: {', '.join(unknown)} (known: {', '.join(catalog.DISTRIBUTED)})")
    worlds = [int(w) for w in args.worlds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    say = lambda m: print(m, file=sys.stderr, flush=True)
    from passlab.runtime.codegen import atomic_write
    from .record import write_json
    date, machine, results = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine_name(), []
    configs = [(m, w) for m in models for w in worlds]
    for i, (model, world) in enumerate(configs, 1):
        say(f"[{i}/{len(configs)}] {model} at W={world} on {args.link}")
        try:
            results.append(measure(model, world, args.link, args.reps, say, peers=args.peers))
            say("  wrote " + ", ".join(os.path.basename(p) for p in write_traces(results[-1], args.out)[::2]))
        except Exception as e:                       # one failed configuration keeps the others
            say(f"  failed: {type(e).__name__}: {e}")
            results.append({"model": model, "world": world, "error": f"{type(e).__name__}: {e}"})
        text = markdown(results, machine, date)
        write_json({"date": date, "machine": machine, "link": args.link, "results": results},
                   os.path.join(args.out, "results.json"))
        atomic_write(os.path.join(args.out, "results.md"), text + "\n")
    print(text)
    if args.write_readme:
        write_readme(text, start=START, end=END, heading="## The MoE case study")
        publish_pictures(args.out)
    return 0


def publish_pictures(out: str, docs: str = os.path.join("docs", "case-study")) -> None:
    """The README's pictures: ep_mixtral at W=2, every graph's trace and drawing."""
    import glob
    import shutil
    os.makedirs(docs, exist_ok=True)
    for path in glob.glob(os.path.join(out, "ep_mixtral-w2-*")):
        shutil.copy(path, docs)


if __name__ == "__main__":
    from .exits import BAD_ARGS, BadArguments
    try:
        sys.exit(main())
    except BadArguments as e:
        print(f"passlab: {e}", file=sys.stderr)
        sys.exit(BAD_ARGS)
