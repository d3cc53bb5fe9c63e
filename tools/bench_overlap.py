"""`python -m passlab.tools.bench_overlap`: the overlap passes measured on the
emulated link, and the simulator checked against the measurements.

For each distributed sample and world size, one launched run
(`distributed_run.bench`: W gloo ranks in their own network namespaces, joined by the
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

from .bench import write_readme
from .peers import COMPILE, EAGER, FREEZING
from .table import md_table

START, END = "<!-- overlap:start -->", "<!-- overlap:end -->"
MODELS = ["ep_mixtral", "ep_moe", "tp_mlp", "fsdp_mlp"]
WORLDS = [2, 4]
SHAPLEY = {"ep_mixtral"}


def measure(model: str, world: int, link: str, reps: int, say, peers: bool = True) -> dict:
    from . import simulate
    from .distributed_run import bench
    t0 = time.monotonic()
    b = bench(model, "bench", world, link, reps=reps, shapley=model in SHAPLEY, timeout=1800,
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


def timing_of(r: dict, key: str):
    """The paired-round samples of graph `key` (each the slowest rank's) as a Timing, or None."""
    from passlab.runtime.distributed.measure import as_timing
    xs = (r["bench"]["ranks"][0].get("samples_s") or {}).get(key)
    return as_timing(xs) if xs else None


def ratio_vs(r: dict, key: str, ref: str) -> tuple[float, float, float] | None:
    """ref's step over key's (> 1: key faster) and its paired-bootstrap 95% CI (`timing.speedup`)."""
    from passlab.runtime import timing
    a, b = timing_of(r, key), timing_of(r, ref)
    return timing.speedup(a, b) if a and b else None


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
                    "vs_reorder": ratio_vs(r, key, "overlap_reorder"),
                    "rolled_back": (ranks[0]["stats"].get(key) or {}).get("rolled_back"),
                    "max_error_vs_reference": max((x.get("error_vs_reference") or {}).get(key, 0.0)
                                                  for x in ranks)})
    return out


def peers_row(r: dict) -> list[str]:
    """Slowest rank's step of each peer and of the graph after the last overlap pass."""
    ranks = r["bench"]["ranks"]
    step = lambda k: max(x["peer_step_s"][k] for x in ranks)
    ours = max(x["step_s"][[k for k in x["step_s"] if "(subset)" not in k][-1]] for x in ranks)
    eager, comp, frz = step(EAGER), step(COMPILE), step(FREEZING)
    setup = lambda k: max(x["peer_setup_s"][k] for x in ranks)
    return [r["model"], str(r["world"]), f"{eager * 1e3:,.0f}", f"{comp * 1e3:,.0f}", f"{frz * 1e3:,.0f}",
            f"{ours * 1e3:,.0f}", f"{eager / ours:.2f}x", f"{min(comp, frz) / ours:.2f}x",
            f"{setup(COMPILE):.0f} / {setup(FREEZING):.0f}"]


def latency_cell(link: dict) -> str:
    probe = link.get("probe") or {}
    got = probe.get("measured_one_way_s")
    if got is None:
        return f"not measured ({probe.get('reason', link.get('reason', '?'))})"
    return f"{probe['configured_one_way_s'] * 1e3:.1f} / {got * 1e3:.1f} ms ({probe['relative_error'] * 100:+.1f}%)"


def ratio_cell(x: dict, reorder: dict) -> str:
    ci = x.get("vs_reorder")
    if ci is None:
        return f"{reorder['step_s'] / x['step_s']:.2f}x"
    return f"{ci[0]:.2f}x ({ci[1]:.2f}–{ci[2]:.2f})"


def chunk_note(r: dict, rows: list[dict], kind: str, dtype: str) -> str | None:
    """Where chunking does not help (it kept no split, or its gain's CI reaches 1): say so, with
    the simulator's best achievable gain and, where that is small, why (latency-bound)."""
    chunk = next((x for x in rows if x["step"] == "overlap_chunk"), None)
    stats = (r["bench"]["ranks"][0].get("stats") or {}).get("overlap_chunk") or {}
    if chunk is None or not r["model"].startswith("ep_"):
        return None
    ci = chunk.get("vs_reorder")
    if stats.get("split", bool(stats.get("k"))) and (ci is None or ci[1] > 1.0):
        return None
    best = (stats.get("estimate") or {}).get("best_gain_vs_no_split")
    measured = stats.get("measured") or {}
    timed = ", ".join(f"{n} {c['median_s'] * 1e3:,.0f} ms" for n, c in measured.get("candidates", {}).items())
    reorder = next(x for x in rows if x["step"] == "overlap_reorder")
    text = (f"**{r['model']} at W={r['world']} on {kind} ({dtype})**: chunking does not help here: "
            + (f"the measured guard kept no split ({timed})" if measured.get("chosen") == "no split" else
               f"measured {ratio_cell(chunk, reorder)} vs `overlap_reorder`"))
    if best is not None:
        text += f"; the simulator's best achievable gain from chunking is {best:.2f}x"
        if best < 1.1:
            probe = (r["bench"]["link"].get("probe") or {}).get("measured_one_way_s")
            text += (" (latency-bound at this scale: every chunk pays the link's latencies"
                     + (f", {2 * probe * 1e3:.1f} ms per all_to_all here" if probe else "") + ")")
    return text + "."


def markdown(results: list[dict], machine: str, date: str, dtype: str | None = None,
             kind: str | None = None) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1e3:,.0f}"
    kind = kind or machine
    if dtype is None:
        from passlab.graphs.sample import preset_dtype
        dtype = str(preset_dtype("bench", "cpu", None)).replace("torch.", "")
    day = date.split(" ")[0]
    body, errors, targets, notes = [], [], [], []
    for r in results:
        if "error" in r:
            body.append([kind, dtype, day, r["model"], str(r["world"]), "failed: " + r["error"]] + [""] * 8)
            continue
        rows = rows_of(r)
        reorder = next((x for x in rows if x["step"] == "overlap_reorder"), rows[0])
        for x in rows:
            if x["error"] is not None:
                errors.append(abs(x["error"]))
            k = x["k"]
            name = x["step"] + (" (rolled back: slower)" if x.get("rolled_back") else
                                f" k={sorted(set(k.values()))[0]}" if k and len(set(k.values())) == 1 else "")
            body.append([kind, dtype, day, r["model"], str(r["world"]), name, ms(x["step_s"]), ratio_cell(x, reorder),
                         ms(x["comm_s"]), ms(x["exposed_comm_s"]),
                         "-" if x["overlap_efficiency"] is None else f"{x['overlap_efficiency']:.2f}",
                         ms(x["predicted_step_s"]), "-" if x["error"] is None else f"{x['error'] * 100:+.0f}%",
                         f"{x['max_error_vs_reference']:.1e}"])
        if r["model"].startswith("ep_"):
            chunk = next((x for x in rows if x["step"] == "overlap_chunk"), None)
            if chunk:
                cut = 1 - chunk["exposed_comm_s"] / reorder["exposed_comm_s"] if reorder["exposed_comm_s"] else 0
                targets.append([kind, dtype, day, r["model"], str(r["world"]), latency_cell(r["bench"]["link"]),
                                ratio_cell(chunk, reorder), f"{cut * 100:.0f}%",
                                "-" if chunk["overlap_efficiency"] is None else f"{chunk['overlap_efficiency']:.2f}"])
            note = chunk_note(r, rows, kind, dtype)
            if note:
                notes.append(note)
    rounds = next((len(x["bench"]["ranks"][0].get("samples_s", {}).get("captured", ()))
                   for x in results if (x.get("bench") or {}).get("ranks")), 0)
    parts = [f"Measured {date} on {machine} ({kind}), bench presets in {dtype}, one thread per rank (at W=4 four "
             f"ranks share the cores); link `ib-400g` scaled to this machine (bandwidth per FLOP and "
             "latency per FLOP of an H100 on 400 Gbit/s InfiniBand), ranks in their own network namespaces "
             "joined by the TUN delay line; each row the median over "
             + (f"{rounds} paired rounds" if rounds else "the timed steps")
             + " of the slowest rank's step, every graph and peer timed in the same rounds; vs reorder: "
             "with its paired-bootstrap 95% CI; predicted = `passlab simulate --compare` (compute calibrated "
             "once, on the captured graph; the collectives' costs, the compute slowdown beside them and the "
             "GEMM rate by rows as the run measured them).", "",
             md_table(["machine", "dtype", "date", "model", "W", "after", "step ms", "vs reorder", "comm ms",
                       "exposed ms", "overlap eff.", "predicted ms", "error", "max err vs unsharded"], body)]
    if errors:
        parts += ["", f"Simulator on {kind} ({dtype}): median absolute error {statistics.median(errors) * 100:.1f}% "
                      f"over {len(errors)} graphs (worst {max(errors) * 100:.0f}%)."]
    if targets:
        parts += ["", md_table(["machine", "dtype", "date", "model", "W", "one-way latency configured / probed",
                                "chunk vs reorder", "exposed comm cut", "overlap eff."], targets)]
    if notes:
        parts += [""] + ["- " + n for n in notes]
    peer_rows = [[kind, dtype, day] + peers_row(r) for r in results if (r.get("bench") or {}).get("ranks")
                 and r["bench"]["ranks"][0].get("peer_step_s")]
    if peer_rows:
        parts += ["", "Beside eager and torch.compile (default, and `freezing=True`), timed in the same rounds; "
                      "passlab = the captured graph after `overlap_reorder,overlap_chunk`, run op by op:", "",
                  md_table(["machine", "dtype", "date", "model", "W", "eager ms", "compile ms", "freezing ms",
                            "passlab ms", "passlab vs eager", "vs best compile", "compile s / freezing s"],
                           peer_rows)]
    for r in results:
        b = r.get("bench") or {}
        if b.get("shapley"):
            vals = ", ".join(f"`{k}` {v:+.3f}" for k, v in b["shapley"].items())
            parts += ["", f"Shapley values ({r['model']}, W={r['world']}, {kind}, {dtype}, log throughput): {vals}; "
                          f"interaction {b['interaction']:+.3f}; total {b['total_log_gain']:+.3f}."]
    return "\n".join(parts)


def machine_kind() -> str:
    """The processor kind in a few words: vendor family, its bf16 matrix units, VM or not."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    family = next((f for f in ("EPYC", "Xeon", "Ryzen", "Core") if f in name), name.split(" ")[-1] if name else "?")
    vendor = "AMD" if "AMD" in name else "Intel" if "Intel" in name else ""
    units = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 units"
    return f"{vendor} {family} ({units}{', VM' if 'hypervisor' in flags else ''})".strip()


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
    ap.add_argument("--reps", type=int, default=9, help="paired rounds (every graph and peer once a round)")
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
    from passlab.graphs.sample import preset_dtype
    kind, dtype = machine_kind(), str(preset_dtype("bench", "cpu", None)).replace("torch.", "")
    configs = [(m, w) for m in models for w in worlds]
    for i, (model, world) in enumerate(configs, 1):
        say(f"[{i}/{len(configs)}] {model} at W={world} on {args.link}")
        try:
            results.append(measure(model, world, args.link, args.reps, say, peers=args.peers))
            say("  wrote " + ", ".join(os.path.basename(p) for p in write_traces(results[-1], args.out)[::2]))
        except Exception as e:                       # one failed configuration keeps the others
            say(f"  failed: {type(e).__name__}: {e}")
            results.append({"model": model, "world": world, "error": f"{type(e).__name__}: {e}"})
        text = markdown(results, machine, date, dtype, kind)
        write_json({"date": date, "machine": machine, "kind": kind, "dtype": dtype, "link": args.link,
                    "results": results}, os.path.join(args.out, "results.json"))
        atomic_write(os.path.join(args.out, "results.md"), text + "\n")
    print(text)
    if args.write_readme:
        runs = kept_runs({"date": date, "machine": machine, "kind": kind, "dtype": dtype, "results": results})
        write_readme("\n\n".join(markdown(r["results"], r["machine"], r["date"], r["dtype"], r["kind"])
                                  for r in runs), start=START, end=END, heading="## The MoE case study")
        publish_pictures(args.out)
    return 0


DOCS = os.path.join("docs", "case-study")


def kept_runs(run: dict, docs: str = DOCS) -> list[dict]:
    """This run kept as docs/case-study/results-<machine kind>-<dtype>.json (its traces left out),
    replacing the last one of the same kind and dtype; every kind's last run, in name order:
    the README shows each machine kind beside the others."""
    import glob
    import re
    from .record import write_json
    os.makedirs(docs, exist_ok=True)
    slim = dict(run, results=[dict(r, bench=dict(r["bench"], ranks=[{k: v for k, v in x.items() if k != "trace"}
                                                                    for x in r["bench"]["ranks"]]))
                              if r.get("bench") else r for r in run["results"]])
    name = re.sub(r"[^a-z0-9]+", "-", f"{run['kind']}-{run['dtype']}".lower()).strip("-")
    write_json(slim, os.path.join(docs, f"results-{name}.json"))
    runs = []
    for path in sorted(glob.glob(os.path.join(docs, "results-*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def publish_pictures(out: str, docs: str = DOCS) -> None:
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
