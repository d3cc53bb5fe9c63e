"""The benchmark runner: the standard matrix (samples x pipelines x peers),
each model measured in one interleaved run, and the README's results table
regenerated from it.

    python -m passlab.tools.bench [--models transformer,llama] [--budget 3]
                                  [--out out/bench] [--write-readme]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

from . import record as records
from .progress import Progress
from .runner import run
from .table import render

MODELS = ["transformer", "llama", "moe", "convnet", "mlp"]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def bench_model(model: str, budget: float, pipeline: str | None, say) -> dict:
    r = run(model, preset="bench", pipeline=pipeline, budget_s=budget, peers=True, ablate=True,
            progress=say)
    return r.record


def speed(rec, key):
    b = rec["baseline"]["throughput"]
    if key == "final":
        v = rec["steps"][-1]["throughput"] if rec["steps"] else b
    elif key == "baseline":
        v = b
    else:
        v = (rec.get("peers") or {}).get(key, {}).get("throughput")
    return v


def spread(d) -> str:
    if not d or not d.get("throughput") or d.get("ci_low") is None:
        return "-"
    return f"±{100 * (d['ci_high'] - d['ci_low']) / 2 / d['throughput']:.1f}%"


def summary_table(recs: list[dict]) -> str:
    rows = []
    for rec in recs:
        eager = speed(rec, "eager")
        comp = speed(rec, "torch.compile")
        base, final = speed(rec, "baseline"), speed(rec, "final")
        last = rec["steps"][-1] if rec["steps"] else rec["baseline"]
        rows.append([rec["model"], rec.get("dtype", "?"), rec["baseline"]["unit"] or "",
                     f"{eager:,.0f}" if eager else "-",
                     f"{comp:,.0f} ({comp / eager:.2f}x)" if comp and eager else "-",
                     f"{base:,.0f} ({base / eager:.2f}x)" if eager else f"{base:,.0f}",
                     f"{final:,.0f} ({final / eager:.2f}x) {spread(last)}" if eager else f"{final:,.0f}",
                     f"{final / base:.2f}x",
                     f"{rec['baseline']['launches']} → {last['launches']}",
                     f"{last.get('percent_of_bound', 0):.0f}%"])
    return render(["model", "dtype", "unit", "eager", "torch.compile", "captured (unfused)", "passlab",
                   "passlab/captured", "launches", "% of bound"], rows)


def contribution_table(rec: dict) -> str:
    solo, abl = rec.get("solo") or {}, rec.get("ablation") or {}
    rows = [[p, f"{solo.get(p, float('nan')):.2f}x", f"{abl.get(p, float('nan')):.2f}x"]
            for p in rec.get("players") or []]
    return render(["pass", "alone (vs captured)", "in full pipeline (leave-one-out)"], rows)


def markdown(recs: list[dict], machine: dict, date: str) -> str:
    def md(table: str) -> str:
        lines = table.splitlines()
        head, body = lines[0], lines[2:]
        cells = lambda l: [c.strip() for c in re.split(r"\s{2,}", l.strip())]
        h = cells(head)
        out = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        out += ["| " + " | ".join(cells(l)) + " |" for l in body]
        return "\n".join(out)

    parts = [f"Measured {date} on {machine['cpu']} ({machine['cores']} cores, {machine['threads']} threads), "
             f"torch {machine['torch']}; bf16 matrix units: {machine['bf16_matrix_units']}. Throughput is the "
             "median of interleaved repetitions with its 95% CI; all numbers of a row come from one run. "
             "torch.compile runs with default settings (inductor, no freezing).", "", md(summary_table(recs))]
    for rec in recs:
        if rec.get("players"):
            parts += ["", f"**{rec['model']}** — each pass alone and in the full pipeline:", "",
                      md(contribution_table(rec))]
    return "\n".join(parts)


def write_readme(text: str, path: str = "README.md") -> None:
    with open(path) as f:
        readme = f.read()
    block = f"{START}\n{text}\n{END}"
    if START in readme and END in readme:
        readme = readme[:readme.index(START)] + block + readme[readme.index(END) + len(END):]
    else:
        readme += "\n## Results\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(readme)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passlab.tools.bench")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--pipeline", default=None)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    prog = Progress()
    recs = []
    models = args.models.split(",")
    for i, m in enumerate(models):
        prog.message(f"=== {m} ({i + 1}/{len(models)})")
        try:
            rec = bench_model(m, args.budget, args.pipeline, prog.message)
        except Exception as e:  # one failing model must not lose the others
            prog.message(f"{m} failed: {type(e).__name__}: {e}")
            continue
        records.write_json(rec, os.path.join(args.out, f"{m}.json"))
        recs.append(rec)
        print(summary_table([rec]), flush=True)
    if not recs:
        return 1
    date = datetime.date.today().isoformat()
    text = markdown(recs, recs[0]["machine"], date)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    if args.write_readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
