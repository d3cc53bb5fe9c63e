"""The HTML report of a run: one self-contained page (inline SVG, CSS and JS;
no network) that shows what each pass changed and what it contributed.

`write(record, run, out_dir)` reads the run record (CONTRACT.md) and, where the
run got that far, its snapshots (`run.result.baseline` / `.steps`): the pass
table, a waterfall of throughput from eager (the reference) through capture
and each pass to final, Shapley values and the
interaction term, the roofline position, side-by-side before/after drawings of
every pass (wheel zoom, drag pan), the generated kernel sources, and the
per-rank timeline of a distributed run. Charts are SVG written here; graphs
come from `draw` (Graphviz), collapsed by module depth when large.
"""
from __future__ import annotations

import html
import json
import math
import os
import re

from . import draw
from .nodetime import heat_of, us
from .record import clean, write_json

ASSETS = os.path.join(os.path.dirname(__file__), "report_assets")
GRAPH_MAX_NODES = 160     # boxes per drawing before it collapses by module depth
esc = html.escape


# ---------------------------------------------------------------- formatting

def num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) and abs(v) < 10000:
        return str(v)
    v = float(v)
    if not math.isfinite(v):
        return "–"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.{digits}g}{suffix}"
    return f"{v:.{digits}g}"


def bytes_text(v) -> str:
    return "–" if v is None else draw.human_bytes(int(v))


def speed(v) -> str:
    return "–" if v is None else f"{v:.3f}×"


def seconds(v) -> str:
    if v is None:
        return "–"
    return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"


def usec(v) -> str:
    return "–" if v is None else f"{us(v)} µs"


def svg_text(x, y, text, anchor="start", cls="", extra="") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}" {extra}>{esc(str(text))}</text>'


def nice_ticks(hi: float, n: int = 5) -> list[float]:
    if hi <= 0:
        return [0.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(hi / step) + 2) if i * step <= hi * 1.05 + 1e-12]


# ---------------------------------------------------------------- charts

def waterfall_svg(labels: list[str], values: list[float | None], errs: list[tuple | None], unit: str,
                  higher_is_better: bool = True) -> str:
    """Baseline bar, one floating bar per pass from the previous value to its
    own (green: better, red: worse), and the final bar."""
    vals, prev = [], None
    for v in values:
        vals.append(v if v is not None else prev)
        prev = vals[-1] if vals[-1] is not None else prev
    known = [v for v in vals if v is not None]
    if not known:
        return '<p class="note">nothing measured</p>'
    top = max(known + [e[1] for e in errs if e and e[1] is not None]) * 1.08
    bw, gap, left, h, bottom = 62, 16, 70, 260, 70
    n = len(labels) + 1
    width = left + n * (bw + gap) + 20
    y = lambda v: 20 + h * (1 - v / top)
    out = [f'<svg class="chart" id="waterfall" viewBox="0 0 {width} {h + bottom + 20}" width="{width}" '
           f'height="{h + bottom + 20}" xmlns="http://www.w3.org/2000/svg">']
    for t in nice_ticks(top):
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e5e7eb"/>')
        out.append(svg_text(left - 6, y(t) + 4, num(t), "end"))
    out.append(svg_text(12, 14, unit, "start", extra='font-weight="bold"'))
    prev = None
    for i, (lab, v) in enumerate(zip(labels, vals)):
        x = left + i * (bw + gap) + gap / 2
        if v is None:
            continue
        if i == 0 or prev is None:
            y0, y1, color = y(v), y(0), "#7f8c9d"
        else:
            better = (v > prev) == higher_is_better
            color = "#9aa3ad" if v == prev or values[i] is None else ("#2e8b57" if better else "#c0392b")
            y0, y1 = min(y(v), y(prev)), max(y(v), y(prev))
            y1 = max(y1, y0 + 1.5)
            out.append(f'<line x1="{x - gap:.1f}" x2="{x:.1f}" y1="{y(prev):.1f}" y2="{y(prev):.1f}" '
                       f'stroke="#555" stroke-dasharray="3,2"/>')
        tip = f"{lab}: {num(values[i], 4) if values[i] is not None else 'not measured'} {unit}"
        if i and prev:
            tip += f" ({v / prev:.3f}× previous)"
        out.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bw}" height="{y1 - y0:.1f}" fill="{color}" rx="2">'
                   f'<title>{esc(tip)}</title></rect>')
        e = errs[i] if i < len(errs) else None
        if e and e[0] is not None and e[1] is not None and values[i] is not None:
            cx = x + bw / 2
            out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(e[1]):.1f}" y2="{y(e[0]):.1f}" stroke="#222"/>')
            for ev in e:
                out.append(f'<line x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{y(ev):.1f}" y2="{y(ev):.1f}" stroke="#222"/>')
        note = num(v, 3) if i == 0 else (f"{v / prev:.3f}×" if prev else num(v))
        out.append(svg_text(x + bw / 2, y0 - 5, note, "middle"))
        out.append(svg_text(x + bw / 2, h + 36, short(lab, 11), "middle",
                            extra=f'transform="rotate(-30 {x + bw / 2:.1f} {h + 36})"'))
        prev = v
    final = vals[-1]
    if final is not None:
        x = left + (n - 1) * (bw + gap) + gap / 2
        first = next(v for v in vals if v is not None)
        out.append(f'<rect x="{x:.1f}" y="{y(final):.1f}" width="{bw}" height="{y(0) - y(final):.1f}" '
                   f'fill="#2f6db5" rx="2"><title>final: {esc(num(final, 4))} {esc(unit)}</title></rect>')
        out.append(svg_text(x + bw / 2, y(final) - 5, f"{final / first:.3f}×" if first else num(final), "middle",
                            extra='font-weight="bold"'))
        out.append(svg_text(x + bw / 2, h + 36, "final", "middle",
                            extra=f'transform="rotate(-30 {x + bw / 2:.1f} {h + 36})"'))
    out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#333"/>')
    out.append("</svg>")
    return "".join(out)


def short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def hbars_svg(rows: list[tuple[str, float, str, str]], fmt_value, center: float = 0.0, svg_id: str = "") -> str:
    """Horizontal bars from `center` (label, value, colour, tooltip); diverging
    when values fall on both sides."""
    if not rows:
        return ""
    lo = min(center, *(v for _, v, _, _ in rows))
    hi = max(center, *(v for _, v, _, _ in rows))
    span = (hi - lo) or 1.0
    lw, bw, rh = 200, 460, 24
    width, height = lw + bw + 110, len(rows) * rh + 28
    x = lambda v: lw + bw * (v - lo) / span
    out = [f'<svg class="chart" id="{svg_id}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for i, (label, v, color, tip) in enumerate(rows):
        yy = 8 + i * rh
        x0, x1 = sorted((x(center), x(v)))
        out.append(svg_text(lw - 8, yy + 15, short(label, 30), "end"))
        out.append(f'<rect x="{x0:.1f}" y="{yy + 3}" width="{max(x1 - x0, 1):.1f}" height="{rh - 8}" fill="{color}" rx="2">'
                   f'<title>{esc(tip)}</title></rect>')
        out.append(svg_text(max(x1, x(center)) + 6, yy + 15, fmt_value(v)))
    out.append(f'<line x1="{x(center):.1f}" x2="{x(center):.1f}" y1="4" y2="{height - 18}" stroke="#333"/>')
    out.append("</svg>")
    return "".join(out)


def pct_gain(logv: float) -> str:
    return f"{100 * (math.exp(logv) - 1):+.1f}%"


# ---------------------------------------------------------------- timeline

def timeline_events(tl) -> list[dict]:
    events = tl.get("traceEvents", []) if isinstance(tl, dict) else list(tl or [])
    out, open_ = [], {}
    for e in events:
        ph = e.get("ph", "X")
        key = (e.get("pid"), e.get("tid"), e.get("name"))
        if ph == "X" and "dur" in e:
            out.append(e)
        elif ph == "B":
            open_[key] = e
        elif ph == "E" and key in open_:
            b = open_.pop(key)
            out.append({**b, "ph": "X", "dur": e["ts"] - b["ts"]})
    return [e for e in out if isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))]


COMM = re.compile(r"all_reduce|all_gather|reduce_scatter|all_to_all|broadcast|send|recv|wait|comm|nccl|gloo", re.I)


CATEGORY_COLOURS = {"compute": "#4a90c2", "comm": "#8e5ea2", "link": "#c0392b", "wait": "#e67e22", "step": "#b8c0cc"}
MAX_EVENTS = 4000


def lane_names(tl) -> dict:
    events = tl.get("traceEvents", []) if isinstance(tl, dict) else list(tl or [])
    return {(str(e.get("pid", 0)), str(e.get("tid", 0))): (e.get("args") or {}).get("name")
            for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}


def timeline_svg(tl) -> str:
    """One lane per rank and stream: compute blue, communication purple,
    waiting on communication orange; times in ms from the first event."""
    events = sorted(timeline_events(tl), key=lambda e: e["ts"])
    if not events:
        return '<p class="note">the timeline holds no complete events</p>'
    note = ""
    if len(events) > MAX_EVENTS:
        note = (f'<p class="note">{len(events)} events: drawing the first {MAX_EVENTS} '
                f'(the full trace is in the run record; open it in Perfetto).</p>')
        events = events[:MAX_EVENTS]
    names = lane_names(tl)
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e["dur"] for e in events)
    lanes = sorted({(str(e.get("pid", 0)), str(e.get("tid", 0))) for e in events},
                   key=lambda k: (int(k[0]) if k[0].isdigit() else k[0], k[1]))
    lw, width, lh = 150, 1100, 26
    height = len(lanes) * lh + 40
    sx = lambda t: lw + (width - lw - 10) * (t - t0) / max(t1 - t0, 1e-9)
    out = [f'<svg class="chart" id="timeline" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for t in nice_ticks((t1 - t0) / 1e3, 8):
        xx = sx(t0 + t * 1e3)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="4" y2="{height - 22}" stroke="#eceff3"/>')
        out.append(svg_text(xx, height - 8, f"{t:g} ms", "middle"))
    for i, (pid, tid) in enumerate(lanes):
        yy = 6 + i * lh
        lane = names.get((pid, tid)) or (tid if tid not in ("0", "None") else "")
        out.append(svg_text(lw - 8, yy + 16, f"rank {pid}" + (f" · {lane}" if lane else ""), "end"))
        out.append(f'<rect x="{lw}" y="{yy}" width="{width - lw - 10}" height="{lh - 4}" fill="#f7f8fa"/>')
        for e in events:
            if (str(e.get("pid", 0)), str(e.get("tid", 0))) != (pid, tid):
                continue
            colour = CATEGORY_COLOURS.get(e.get("cat")) or \
                (CATEGORY_COLOURS["comm"] if COMM.search(str(e.get("name", ""))) else CATEGORY_COLOURS["compute"])
            x0, x1 = sx(e["ts"]), sx(e["ts"] + e["dur"])
            tip = f"{e.get('name')} ({e.get('cat', '')}): {e['dur'] / 1e3:.3g} ms at {(e['ts'] - t0) / 1e3:.3g} ms"
            out.append(f'<rect x="{x0:.2f}" y="{yy + 2}" width="{max(x1 - x0, 0.8):.2f}" height="{lh - 8}" '
                       f'fill="{colour}" opacity="0.85"><title>{esc(tip)}</title></rect>')
    out.append("</svg>")
    return note + "".join(out)


# ---------------------------------------------------------------- graphs

def inline_svg(dot_text: str, prefix: str) -> str:
    """Graphviz SVG for inlining: no prolog, no fixed size (the pane sizes it),
    ids prefixed so that several drawings can share one page."""
    svg = draw.svg_element(dot_text)
    svg = re.sub(r'<svg width="[^"]*" height="[^"]*"', f'<svg id="{prefix}" preserveAspectRatio="xMidYMin meet"', svg,
                 count=1)
    svg = re.sub(r'\bid="(?!' + re.escape(prefix) + r'")', f'id="{prefix}-', svg)
    svg = re.sub(r'<!--.*?-->', "", svg, flags=re.S)
    return svg


def pane(title: str, body: str) -> str:
    return ('<div class="pane"><div class="bar"><span>' + esc(title) + '</span><span>'
            '<button data-zoom="in" title="zoom in">+</button><button data-zoom="out" title="zoom out">−</button>'
            '<button data-zoom="reset" title="fit (or double-click)">fit</button></span></div>'
            f'<div class="zoom">{body}</div></div>')


def heat(times) -> dict:
    """draw.build's `times` / `step_s` from a record's node times (empty without)."""
    secs, step = heat_of(times)
    return {"times": secs, "step_s": step} if secs else {}


def graph_pair(before, after, key: str, label_before: str, label_after: str, times_before=None,
               times_after=None) -> tuple[str, str]:
    """Side-by-side drawings with the diff marked; both at the same module depth;
    with node times (a record's `node_times` entries) as a heat colour and label."""
    d = draw.diff(before, after)
    hb, ha = heat(times_before), heat(times_after)
    b = draw.build(before, marks=d.marks_before(), max_nodes=GRAPH_MAX_NODES, params=False, **hb)
    a = draw.build(after, marks=d.marks_after(), depth=b.depth, max_nodes=GRAPH_MAX_NODES, params=False,
                   origin=before, **ha)
    if b.depth is None and a.depth is not None:
        b = draw.build(before, marks=d.marks_before(), depth=a.depth, params=False, **hb)
    try:
        left, right = inline_svg(b.dot(), f"g{key}b"), inline_svg(a.dot(), f"g{key}a")
    except RuntimeError as e:   # no Graphviz, or it failed: the DOT text still tells the story
        left = f'<p class="note">{esc(str(e))}</p><pre>{esc(b.dot())}</pre>'
        right = f'<pre>{esc(a.dot())}</pre>'
    note = d.summary() + (f"; drawings collapsed to module depth {b.depth}" if b.depth is not None else "")
    return (f'<div><label class="muted"><input type="checkbox" class="link" checked> zoom and pan both sides together'
            f'</label><div class="pair">{pane(label_before, left)}{pane(label_after, right)}</div></div>', note)


def single_graph(gm, key: str, label: str, times=None) -> str:
    d = draw.build(gm, max_nodes=GRAPH_MAX_NODES, params=False, **heat(times))
    try:
        body = inline_svg(d.dot(), f"g{key}")
    except RuntimeError as e:
        body = f'<p class="note">{esc(str(e))}</p><pre>{esc(d.dot())}</pre>'
    return f'<div class="pair" style="grid-template-columns:1fr">{pane(label, body)}</div>'


def kernels_of(gm) -> list:
    if gm is None:
        return []
    seen, out = set(), []
    for n in gm.graph.nodes:
        k = n.target
        if n.op == "call_function" and getattr(k, "is_fused_kernel", False) and id(k) not in seen:
            seen.add(id(k))
            out.append(k)
    return out


def kernel_source(k, device: str) -> str:
    try:
        return k.source(device)
    except Exception as e:  # a broken printer must not lose the report
        return f"// {device} source generation failed: {type(e).__name__}: {e}"


def kernel_block(k, device: str) -> str:
    """The kernel's description and both printers' output, the run's device first."""
    name = getattr(k, "name", "kernel")
    ops = list(getattr(k, "ops", []) or [])
    first = "cuda" if device.startswith("cuda") else "cpu"
    sources = {d: kernel_source(k, d) for d in (first, "cpu" if first == "cuda" else "cuda")}
    try:
        desc = k.describe()
    except Exception as e:
        desc = f"(describe failed: {type(e).__name__}: {e})"
    for src in sources.values():
        if desc.endswith(src):
            desc = desc[: -len(src)].rstrip()
    printers = "".join(
        f'<details{" open" if d == first else ""}><summary>{"Triton (cuda)" if d == "cuda" else "C++ (cpu)"}'
        f'</summary><pre>{esc(src)}</pre></details>' for d, src in sources.items())
    return (f'<details id="kernel-{esc(name)}"><summary><b>{esc(name)}</b> — {len(ops)} ops: '
            f'{esc(", ".join(ops[:10]))}{" …" if len(ops) > 10 else ""}</summary>'
            f'<pre>{esc(desc)}</pre>{printers}</details>')


# ---------------------------------------------------------------- sections

def header(rec: dict) -> str:
    m = rec.get("machine") or {}
    title = f"passlab — {rec.get('model', '?')} ({rec.get('preset', '?')})"
    sub = [rec.get("description") or "", f"device {rec.get('device', '?')}",
           f"dtype {rec.get('dtype', '?')}", m.get("gpu") or m.get("cpu") or "",
           f"{m.get('cores', '?')} cores, {m.get('threads', '?')} threads" if m else "",
           f"torch {m.get('torch', '?')}" if m else "", m.get("date", "")]
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in
                   (("summary", "summary"), ("passes-table", "table"), ("attribution", "attribution"),
                    ("graphs", "graphs"), ("kernels", "kernels"), ("timeline", "timeline")))
    return (f'<header><h1>{esc(title)}</h1><div class="sub">{esc(" · ".join(s for s in sub if s))}</div>'
            f'<div class="sub">pipeline: {esc(", ".join(rec.get("pipeline") or []) or "(empty)")}</div>'
            f'<nav>{nav}</nav></header>')


def summary(rec: dict) -> str:
    b, steps = rec.get("baseline") or {}, rec.get("steps") or []
    last = next((s for s in reversed(steps) if s.get("status") == "ok"), None) or (steps[-1] if steps else b)
    final_tp = next((s.get("throughput") for s in reversed(steps) if s.get("throughput")), b.get("throughput"))
    unit = b.get("unit") or next((s.get("unit") for s in steps if s.get("unit")), None) or "units/s"
    eager = rec.get("eager") or {}
    vs_eager = speed(rec.get("final_speedup_vs_eager"))
    if rec.get("final_speedup_vs_eager_ci"):
        vs_eager += " ({:.3f}–{:.3f})".format(*rec["final_speedup_vs_eager_ci"])
    cards = [("eager throughput (reference)", f"{num(eager.get('throughput'))} {unit}" if eager.get("throughput")
              else "not measured"),
             ("captured throughput", f"{num(b.get('throughput'))} {unit}" if b.get("throughput") else "not measured"),
             ("final throughput", f"{num(final_tp)} {unit}" if final_tp else "not measured"),
             ("final speedup vs eager (95% CI)", vs_eager),
             ("final speedup vs captured", speed(rec.get("final_speedup"))),
             ("setup (capture + passes)", seconds(rec.get("setup_seconds"))),
             ("kernel launches (est.)", f"{num(b.get('launches'))} → {num(last.get('launches'))}"),
             ("bytes moved (est.)", f"{bytes_text(b.get('bytes'))} → {bytes_text(last.get('bytes'))}"),
             ("graph nodes", f"{num(b.get('nodes'))} → {num(last.get('nodes'))}")]
    failed = [s for s in steps if s.get("status") != "ok"]
    html_ = '<div class="cards">' + "".join(f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
                                            for k, v in cards) + "</div>"
    if failed:
        html_ += "<p class='bad'>" + "<br>".join(f"{esc(s['pass'])}: {esc(s.get('status'))} — {esc(str(s.get('error')))}"
                                                 for s in failed) + "</p>"
    labels = ["baseline"] + [s["pass"] for s in steps]
    if b.get("throughput"):
        vals = [b.get("throughput")] + [s.get("throughput") if s.get("status") == "ok" else None for s in steps]
        errs = [(b.get("ci_low"), b.get("ci_high"))] + [(s.get("ci_low"), s.get("ci_high")) for s in steps]
        if eager.get("throughput"):    # eager is the reference: capture is the first measured step
            labels, vals = ["eager", "capture"] + labels[1:], [eager["throughput"]] + vals
            errs = [(eager.get("ci_low"), eager.get("ci_high"))] + errs
        chart = waterfall_svg(labels, vals, errs, unit)
        cap = ("Measured throughput from PyTorch eager (the reference) through capture and each pass "
               "(median; whiskers: 95% confidence interval), each bar floating from the previous step: green "
               "gains, red losses; the final bar is labelled with its speedup over the first."
               if eager.get("throughput") else
               "Measured throughput after each pass (median; whiskers: 95% confidence interval), "
               "each bar floating from the previous step: green gains, red losses.")
    else:
        vals = [b.get("launches")] + [s.get("launches") for s in steps]
        chart = waterfall_svg(labels, vals, [], "kernel launches (static estimate)", higher_is_better=False)
        cap = ("Throughput was not measured (--no-measure): the waterfall shows the cost model's estimated "
               "kernel launches instead — an estimate, not a measurement.")
    return (f'<section id="summary"><h2>Summary</h2>{html_}<h3>Waterfall</h3>'
            f'<p class="note">{cap}</p>{chart}</section>')


def stats_text(stats: dict) -> str:
    parts = []
    for k, v in (stats or {}).items():
        if k == "traceback":
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {vv}" for kk, vv in list(v.items())[:6])
            parts.append(f"{k} {{{v}}}")
        elif isinstance(v, (list, tuple)):
            parts.append(f"{k}: {len(v)} items")
        else:
            parts.append(f"{k}: {v}")
    return "; ".join(parts)


def folded(text: str, n: int = 90) -> str:
    if len(text) <= n:
        return esc(text)
    return f"<details><summary>{esc(text[:n])}…</summary>{esc(text)}</details>"


def pass_table(rec: dict) -> str:
    b, steps = rec.get("baseline") or {}, rec.get("steps") or []
    has_bound = any(d.get("percent_of_bound") is not None for d in [b, *steps])
    cols = ["pass", "status", "changed", "throughput", "±95%", "vs prev", "cumul.", "vs eager (95% CI)", "launches",
            "bytes", "FLOPs", "nodes", "max err", "numerics", "pass s"] + (["% of bound"] if has_bound else []) + ["stats"]
    eager = rec.get("eager") or {}
    rows = []
    if eager.get("throughput"):
        tp, lo, hi = eager["throughput"], eager.get("ci_low"), eager.get("ci_high")
        ci = f"{100 * (hi - lo) / 2 / tp:.1f}%" if lo is not None and hi is not None else "–"
        rows.append('<tr class="ok"><td class="l">eager (reference)</td><td>ok</td><td>–</td>'
                    f'<td>{num(tp)}</td><td>{ci}</td><td>–</td><td>–</td><td>{speed(1.0)}</td>'
                    + "<td>–</td>" * (7 + has_bound) + f'<td class="stats">{esc(str(eager.get("settings") or ""))}</td></tr>')
    for i, s in enumerate([dict(b, **{"pass": "capture" if eager.get("throughput") else "baseline", "status": "ok",
                                      "speedup_vs_prev": b.get("speedup_vs_eager")})] + steps):
        tp, lo, hi = s.get("throughput"), s.get("ci_low"), s.get("ci_high")
        ci = f"{100 * (hi - lo) / 2 / tp:.1f}%" if tp and lo is not None and hi is not None else "–"
        sp = s.get("speedup_vs_prev")
        cls = "" if sp is None else ("good" if sp > 1.005 else "bad" if sp < 0.995 else "")
        ve, ve_ci = s.get("speedup_vs_eager"), s.get("speedup_vs_eager_ci")
        ve_text = speed(ve) + (" ({:.3f}–{:.3f})".format(*ve_ci) if ve is not None and ve_ci else "")
        cells = [f'<td class="l"><a href="#pass-{i}">{esc(s["pass"])}</a></td>', f'<td>{esc(str(s.get("status")))}</td>',
                 f'<td>{"–" if i == 0 else num(s.get("changed"))}</td>', f'<td>{num(tp)}</td>', f"<td>{ci}</td>",
                 f'<td class="{cls}">{speed(sp)}</td>',
                 f'<td>{speed(s.get("cumulative_speedup") if i else (1.0 if tp else None))}</td>',
                 f'<td>{ve_text}</td>',
                 f'<td>{num(s.get("launches"))}</td>', f'<td>{bytes_text(s.get("bytes"))}</td>', f'<td>{num(s.get("flops"))}</td>',
                 f'<td>{num(s.get("nodes"))}</td>',
                 f'<td>{"–" if s.get("max_error") is None else format(s["max_error"], ".1e")}</td>',
                 f'<td>{num(s.get("numerics_ok"))}</td>', f'<td>{"–" if i == 0 else format(s.get("pass_seconds") or 0, ".3f")}</td>']
        if has_bound:
            cells.append(f'<td>{"–" if s.get("percent_of_bound") is None else format(s["percent_of_bound"], ".1f") + "%"}</td>')
        cells.append(f'<td class="stats">{folded(stats_text(s.get("stats")))}'
                     f'{"<br>" + esc(s["error"]) if s.get("error") else ""}</td>')
        rows.append(f'<tr class="{esc(str(s.get("status")))}">' + "".join(cells) + "</tr>")
    unit = b.get("unit") or "units/s"
    head = "".join(f"<th>{esc(c if c != 'throughput' else f'throughput ({unit})')}</th>" for c in cols)
    return (f'<section id="passes-table"><h2>Passes</h2><div style="overflow-x:auto"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div><p class="note">launches, bytes and FLOPs are static '
            f'estimates of the cost model; throughput is measured (median, 95% CI).</p></section>')


def roofline(rec: dict) -> str:
    b, steps = rec.get("baseline") or {}, rec.get("steps") or []
    rows = [("baseline", b)] + [(s["pass"], s) for s in steps]
    rows = [(n, s) for n, s in rows if s.get("percent_of_bound") is not None]
    if not rows:
        return ""
    bars = [(n, min(float(s["percent_of_bound"]), 100.0), "#2f6db5" if n != "baseline" else "#7f8c9d",
             f"{n}: measured {seconds(s.get('median_s'))}, bound {seconds(s.get('bound_s'))} "
             f"({float(s['percent_of_bound']):.1f}% of the bound)") for n, s in rows]
    chart = hbars_svg(bars, lambda v: f"{v:.1f}%", svg_id="roofline")
    return ('<section id="roofline"><h2>Against the roofline</h2><p class="note">The roofline bound is an estimate: '
            'GEMM FLOPs at the machine\'s measured matmul rate plus every other byte at its measured copy bandwidth. '
            'A bar is the bound as a percentage of the measured time (100% = running at the bound).</p>'
            f'{chart}</section>')


def times_table(nt: dict, names: list[str]) -> str:
    step = nt["step"]["median_s"]
    head = "".join(f"<th>{h}</th>" for h in ("node", "op", "time", "95% CI", "share of step", "bytes",
                                             "achieved", "% of roofline"))
    rows = []
    for name in names:
        t = nt["nodes"][name]
        unit = "GB/s" if t["bound"] == "memory" else "GFLOP/s"
        rate = f'{t["achieved_per_s"] / 1e9:,.2f} {unit}' if t.get("achieved_per_s") else "-"
        roof = f'{t["percent_of_roofline"]:.0f}%' if t.get("percent_of_roofline") is not None else "-"
        rows.append(f'<tr><td>{esc(name)}</td><td>{esc(t["op"])}</td><td>{usec(t["median_s"])}</td>'
                    f'<td>{usec(t["ci_low_s"])}–{usec(t["ci_high_s"])}</td>'
                    f'<td>{100 * t["median_s"] / step:.1f}%</td><td>{bytes_text(t["bytes"])}</td><td>{rate}</td>'
                    f'<td>{roof}</td></tr>')
    return f'<div style="overflow-x:auto"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def node_times(rec: dict) -> str:
    """Measured time per node (`passlab run --node-times`): the captured and the
    final graph, the slowest nodes with their share of the step, every fused
    kernel against the measured roofline, and the full per-node table."""
    nts = rec.get("node_times") or {}
    if not nts:
        return ""
    final = sorted((k for k in nts if k.startswith("step")), key=lambda k: int(k[4:]))
    parts = ['<section id="node-times"><h2>Measured time per node</h2>']
    for key, label in [("baseline", "captured graph")] + ([(final[-1], "final graph")] if final else []):
        nt = nts[key]
        by_time = sorted(nt["nodes"], key=lambda n: -nt["nodes"][n]["median_s"])
        kernels = [n for n in by_time if nt["nodes"][n]["kernel"]]
        parts.append(f'<h3>{esc(label)}</h3><p class="note">step {usec(nt["step"]["median_s"])} (the plain run, '
                     f'median of {nt["step"]["n"]}); the node times sum to {usec(nt["node_sum_s"])} = '
                     f'{100 * nt["coverage"]:.0f}% of it; {esc(nt["method"])}, timed interleaved with the plain '
                     f'run. Roofline: copy {bytes_text(nt["roofline"].get("copy_bytes_per_s") or 0)}/s, matmul '
                     f'{(nt["roofline"].get("matmul_flops_per_s") or 0) / 1e9:,.0f} GFLOP/s '
                     f'({esc(str(nt["roofline"].get("dtype")))}), measured on this machine.</p>'
                     f'<h4>slowest nodes</h4>{times_table(nt, by_time[:12])}')
        if kernels:
            parts.append(f'<h4>fused kernels against the roofline</h4>{times_table(nt, kernels)}')
        parts.append(f'<details><summary>every node ({len(by_time)})</summary>{times_table(nt, list(nt["nodes"]))}'
                     '</details>')
    return "".join(parts) + "</section>"


def diff_table(d: dict) -> str:
    """A pass's removed / added / replaced nodes with their measured time before and after."""
    rows = [(k, e) for k in ("replaced", "removed", "added") for e in d.get(k) or []]
    if not rows:
        return ""
    body = "".join(f'<tr><td>{k}</td><td>{esc(e["name"])}</td><td>{esc(e["op"])}</td>'
                   f'<td>{esc(", ".join(e["replaces"][:8]) + (" …" if len(e["replaces"]) > 8 else ""))}</td>'
                   f'<td>{usec(e["before_s"])}</td><td>{usec(e["after_s"])}</td></tr>' for k, e in rows[:60])
    more = f'<p class="note">{len(rows) - 60} more in the run record.</p>' if len(rows) > 60 else ""
    return ('<details class="diff"><summary>graph diff: ' + ", ".join(f'{len(d.get(k) or [])} {k}' for k in
            ("removed", "added", "replaced")) + '</summary><div style="overflow-x:auto"><table><thead><tr><th>change'
            '</th><th>node</th><th>op</th><th>replaces</th><th>before</th><th>after</th></tr></thead>'
            f'<tbody>{body}</tbody></table></div>{more}</details>')


def attribution(rec: dict) -> str:
    parts = []
    sh, inter = rec.get("shapley"), rec.get("interaction")
    if sh:
        rows = [(k, float(v), "#2e8b57" if v >= 0 else "#c0392b",
                 f"{k}: Shapley value {v:+.4f} in log-throughput ({pct_gain(v)})") for k, v in sh.items()]
        if inter is not None:
            rows.append(("interaction", float(inter), "#d68910",
                         f"total log gain minus the sum of solo log gains: {inter:+.4f}"))
        total = sum(sh.values())
        parts.append("<h3>Shapley values (log-throughput)</h3><p class='note'>Each pass's average marginal gain over "
                     f"all orders in which it could join the others; they sum to the total log gain {total:+.4f} "
                     f"(×{math.exp(total):.3f}). <b>interaction</b> &gt; 0: the passes give more together than alone; "
                     f"&lt; 0: they overlap or get in each other's way.</p>"
                     + hbars_svg(rows, lambda v: f"{v:+.3f} ({pct_gain(v)})", svg_id="shapley"))
    elif inter is not None:
        parts.append(f"<p>interaction term: {inter:+.4f}</p>")
    if rec.get("shapley_method"):
        parts.append(f"<p class='note'>Shapley: {esc(str(rec['shapley_method']))}</p>")
    if rec.get("interaction_matrix"):
        parts.append(interaction_matrix(rec["interaction_matrix"]))
    ab = rec.get("ablation")
    if ab:
        rows = [(k, float(v), "#2e8b57" if v >= 1 else "#c0392b", f"without {k}, the pipeline is ×{v:.3f} slower")
                for k, v in ab.items()]
        parts.append("<h3>Leave-one-out</h3><p class='note'>Full pipeline over the pipeline without the pass "
                     "(&gt; 1: the pass is needed).</p>" + hbars_svg(rows, lambda v: f"×{v:.3f}", center=1.0, svg_id="ablation"))
    subsets = rec.get("subset_rollbacks") or {}
    if subsets:
        parts.append("<h3>Rolled back inside the subsets</h3><p class='note'>Passes that were rolled back while "
                     "building a subset's graph: that subset measured without them.</p><ul class='note'>"
                     + "".join(f"<li>{esc(k)}: " + "; ".join(f"{esc(x['pass'])}: {esc(str(x['error']))}" for x in v)
                               + "</li>" for k, v in subsets.items()) + "</ul>")
    peers = rec.get("peers")
    if peers:
        b = rec.get("baseline") or {}
        final = next((s.get("throughput") for s in reversed(rec.get("steps") or []) if s.get("throughput")), None)
        rows = [("passlab baseline (op by op)", b.get("throughput"), "#7f8c9d", "captured graph, op by op"),
                ("passlab final", final, "#2f6db5",
                 f"after the pipeline; setup {seconds(rec.get('setup_seconds'))}")]
        for name, p in peers.items():
            p = p or {}
            rows.append((name, p.get("throughput"), "#8e5ea2", f"{name}: {p.get('settings', '')}"
                         + (f"; compile {seconds(p['compile_s'])}" if p.get("compile_s") else "")
                         + (f" — {p.get('error')}" if p.get("error") else "")))
        ok = [(n, float(v), c, f"{t}: {num(v, 4)}") for n, v, c, t in rows if v]
        settings = "".join(f"<li>{esc(n)}: {esc(str((p or {}).get('settings') or ''))}"
                           + (f"; compile time {esc(seconds((p or {})['compile_s']))}" if (p or {}).get("compile_s")
                              else "")
                           + (f" — <b>failed</b>: {esc(str(p['error']))}" if (p or {}).get("error") else "")
                           + "</li>" for n, p in peers.items())
        settings += f"<li>passlab: setup (capture + passes and their checks) {esc(seconds(rec.get('setup_seconds')))}</li>"
        parts.append("<h3>Peers (measured in the same run)</h3>" + hbars_svg(ok, num, svg_id="peers")
                     + f"<ul class='note'>{settings}</ul>")
    if not parts:
        parts.append("<p class='note'>No attribution in this run: add <code>--shapley</code> (Shapley values and the "
                     "interaction term), <code>--ablate</code> (leave-one-out) or <code>--peers</code>.</p>")
    return '<section id="attribution"><h2>Attribution</h2>' + "".join(parts) + "</section>"


def interaction_matrix(m: dict) -> str:
    """Pairwise interactions (log-throughput) as a coloured table: green, the
    pair gains more together than apart; red, less; the diagonal is each
    item's solo gain."""
    names = list(m)
    vals = [abs(v) for row in m.values() for v in row.values() if v is not None]
    top = max(vals, default=0.0) or 1.0

    def cell(v, diag):
        if v is None:
            return '<td class="muted">–</td>'
        a = min(abs(v) / top, 1.0)
        colour = f"rgba(46,139,87,{a:.2f})" if v >= 0 else f"rgba(192,57,43,{a:.2f})"
        style = f"background:{colour}" + (";font-style:italic" if diag else "")
        return f'<td style="{style}" title="{esc(pct_gain(v))}">{v:+.3f}</td>'
    head = "".join(f"<th>{esc(short(n, 14))}</th>" for n in names)
    rows = "".join(f'<tr><th class="l">{esc(a)}</th>' + "".join(cell(m[a].get(b), a == b) for b in names) + "</tr>"
                   for a in names)
    return ("<h3>Interaction matrix (log-throughput)</h3><p class='note'>Off the diagonal: v(a,b) − v(a) − v(b) + "
            "v(none), what the pair gains together beyond their solo gains (&gt; 0 they help each other, &lt; 0 "
            "they overlap); on the diagonal (italic): each item's solo gain. – : a subset not measured.</p>"
            f'<table id="interaction-matrix"><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>')


def graphs(rec: dict, run) -> tuple[str, list]:
    steps = rec.get("steps") or []
    result = getattr(run, "result", None)
    if result is None or getattr(result, "baseline", None) is None or result.baseline.snapshot is None:
        return ('<section id="graphs"><h2>Graphs</h2><p class="note">No graph snapshots reached the report: a '
                'distributed run keeps its graphs on the ranks, an Inductor run (--compiler inductor) keeps them '
                'inside torch.compile (each configuration\'s kernel count and compile time are in the table), '
                'and a run that failed early has none (see the table '
                f'above). <code>passlab show {esc(str(rec.get("model", "MODEL")))} --after PASSES --format svg</code> '
                'draws any step.</p></section>', [])
    device = rec.get("device") or "cpu"
    out = ['<section id="graphs"><h2>What each pass changed</h2><div class="legend">' + draw.legend_html()
           + '</div><p class="note">Left: the graph before the pass, with what it removes or fuses marked; '
           'right: after it, with what it added and fused. Wheel to zoom, drag to pan, double-click to fit; '
           'hover a box or an edge for details (shapes, bytes, module).</p>']
    base = result.baseline.snapshot
    node_times = rec.get("node_times") or {}
    diffs = {d["step"]: d for d in rec.get("pass_diffs") or []}
    out.append(f'<h3 id="pass-0">Captured graph</h3>'
               f'{single_graph(base, "0", "baseline (captured, core aten)", node_times.get("baseline"))}')
    prev, prev_key = base, "baseline"
    shapley = rec.get("shapley") or {}
    recs = list(getattr(result, "steps", []) or [])
    for i, s in enumerate(steps, start=1):
        r = recs[i - 1] if i - 1 < len(recs) else None
        status = s.get("status")
        sp = s.get("speedup_vs_prev")
        head = (f'<div class="pass-head"><h3 id="pass-{i}">{i}. {esc(s["pass"])}</h3>'
                f'<span class="badge {esc(str(status))}">{esc(str(status))}</span>'
                f'<span class="badge {"same" if not s.get("changed") else ""}">{"changed" if s.get("changed") else "no change"}</span>'
                + (f'<span class="badge">{speed(sp)} vs previous</span>' if sp else "")
                + (f'<span class="badge">Shapley {pct_gain(shapley[s["pass"]])}</span>'
                   if s["pass"] in shapley else "")
                + f'<span class="muted">{esc(stats_text(s.get("stats")))}</span></div>')
        out.append(head)
        snap = getattr(r, "snapshot", None) if r is not None else None
        if status != "ok":
            out.append(f'<p class="bad">{esc(str(status).replace("_", " "))}: {esc(str(s.get("error")))}</p>')
            tb = (s.get("stats") or {}).get("traceback")
            if tb:
                out.append(f"<details><summary>traceback</summary><pre>{esc(tb)}</pre></details>")
            continue
        if not s.get("changed") or snap is None:
            out.append('<p class="note">The pass left the graph as it was.</p>')
            continue
        pair, note = graph_pair(prev, snap, str(i), f"before {s['pass']}", f"after {s['pass']}",
                                node_times.get(prev_key), node_times.get(f"step{i - 1}"))
        if i - 1 in diffs:
            pair += diff_table(diffs[i - 1])
        before_names = {getattr(k, "name", None) for k in kernels_of(prev)}
        made = [k for k in kernels_of(snap) if getattr(k, "name", None) not in before_names]
        links = ", ".join(f'<a href="#kernel-{esc(k.name)}">{esc(k.name)}</a>' for k in made)
        out.append(f'<p class="note">{esc(note)}' + (f"; new kernels: {links}" if made else "") + "</p>" + pair)
        prev, prev_key = snap, f"step{i - 1}"
    out.append("</section>")
    final = getattr(result, "gm", None) or prev
    kernels = kernels_of(final)
    ks = ('<section id="kernels"><h2>Generated kernels</h2>'
          + (f'<p class="note">{len(kernels)} fused kernels in the final graph: one kernel description, '
             f'printed as C++ (cpu) and Triton (cuda); this run used {esc(device)}.</p>'
             + "".join(kernel_block(k, device) for k in kernels) if kernels else
             '<p class="note">No fused kernels in the final graph.</p>') + "</section>")
    return "".join(out) + ks, kernels


def timeline(rec: dict) -> str:
    tl = rec.get("timeline")
    if not tl:
        return ""
    return ('<section id="timeline"><h2>Timeline</h2><p class="note">One lane per rank (and stream); '
            'blue: compute, purple: communication, orange: compute waiting on communication, grey: '
            'whole steps. Hover for names and durations.</p>'
            f'{timeline_svg(tl)}</section>')


def page(rec: dict, run) -> str:
    css = open(os.path.join(ASSETS, "report.css")).read()
    js = open(os.path.join(ASSETS, "report.js")).read()
    body_graphs, _ = graphs(rec, run)
    data = json.dumps(clean(rec), indent=1).replace("</", "<\\/")
    parts = [header(rec), "<main>", summary(rec), pass_table(rec), roofline(rec), node_times(rec), attribution(rec),
             timeline(rec),
             body_graphs,
             f'<section><details><summary>run record (JSON)</summary><pre>{esc(data)}</pre></details></section>',
             "</main>"]
    title = f"passlab report: {rec.get('model', '')} ({rec.get('preset', '')})"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{css}</style></head>'
            f'<body>{"".join(parts)}<script>{js}</script></body></html>\n')


def write(record: dict, run, out_dir: str) -> str:
    """Write `out_dir/index.html` (and the record as run.json beside it);
    returns the page's path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "index.html")
    text = page(record, run)
    from passlab.runtime.codegen import atomic_write
    atomic_write(path, text)
    write_json(record, os.path.join(out_dir, "run.json"))
    return path
