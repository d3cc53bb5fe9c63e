"""Tables: the per-pass terminal table, simple aligned listings, and Markdown tables for the README."""
from __future__ import annotations


def human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def fmt(v, spec="") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if spec else str(v)


def render(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = [all(looks_numeric(r[i]) for r in rows) for i in range(len(headers))]
    line = lambda cells: "  ".join(c.rjust(w) if numeric[i] and i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def pass_table(record: dict) -> str:
    """One row per step, starting at eager: `eager` (the reference), `capture`
    (the captured graph before any pass: capture's own cost), then each pass.
    `vs prev` is each row over the row above, `vs eager` over eager, with its
    95% CI (paired bootstrap over the timing rounds)."""
    measured = record["baseline"].get("throughput") is not None
    eager = record.get("eager") or {}
    headers = ["pass", "status", "changed", "nodes", "launches", "bytes", "max err", "pass s"]
    if measured:
        headers += [record["baseline"].get("unit") or "units/s", "±95%", "vs prev", "vs eager", "95% CI"]
    b = record["baseline"]
    rows = []
    if measured and eager.get("throughput"):
        rows.append(["eager", "-", "-", "-", "-", "-", "-", "-", fmt(eager["throughput"], ",.0f"), ci(eager),
                     "-", "1.00x", "-"])
    rows.append(["capture", "-", "-", fmt(b.get("nodes")), fmt(b["launches"]), human_bytes(b["bytes"]),
                 fmt(b.get("max_error"), ".1e"), fmt(record.get("capture_seconds"), ".2f")])
    if measured:
        rows[-1] += [fmt(b["throughput"], ",.0f"), ci(b), speed(b.get("speedup_vs_eager")),
                     speed(b.get("speedup_vs_eager")), ratio_ci(b.get("speedup_vs_eager_ci"))]
    for s in record["steps"]:
        r = [s["pass"], s["status"], fmt(s["changed"]), fmt(s.get("nodes")), fmt(s["launches"]),
             human_bytes(s["bytes"]), fmt(s["max_error"], ".1e"), fmt(s["pass_seconds"], ".2f")]
        if measured:
            r += [fmt(s.get("throughput"), ",.0f"), ci(s), speed(s.get("speedup_vs_prev")),
                  speed(s.get("speedup_vs_eager")), ratio_ci(s.get("speedup_vs_eager_ci"))]
        r.append(stats_summary(s.get("stats") or {}))
        rows.append(r)
    out = render(headers + ["stats"], [r if len(r) == len(headers) + 1 else r + [""] for r in rows])
    if record.get("setup_seconds") is not None:
        out += f"\nsetup (capture + passes and their checks): {record['setup_seconds']:.2f} s"
    errors = [f"  {s['pass']}: {s['error']}" for s in record["steps"] if s.get("error")]
    if errors:
        out += "\nrolled back:\n" + "\n".join(errors)
    skipped = [f"  {s['pass']}: " + ", ".join(f"{k}={v}" for k, v in s["stats"]["skipped"].items())
               for s in record["steps"] if isinstance((s.get("stats") or {}).get("skipped"), dict)
               and s["stats"]["skipped"]]
    if skipped:
        out += "\nskipped (where a pass matched but did not rewrite, and why):\n" + "\n".join(skipped)
    subsets = record.get("subset_rollbacks") or {}
    if subsets:
        out += "\nrolled back inside the attribution subsets:\n" + "\n".join(
            f"  {subset}: " + "; ".join(f"{x['pass']}: {x['error']}" for x in bad) for subset, bad in subsets.items())
    return out


def ratio_ci(lo_hi) -> str:
    return "-" if not lo_hi or None in lo_hi else f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}"


def ci(d) -> str:
    tp, lo, hi = d.get("throughput"), d.get("ci_low"), d.get("ci_high")
    if not tp or lo is None or hi is None:
        return "-"
    return f"{100 * (hi - lo) / 2 / tp:.1f}%"


def speed(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def looks_numeric(c: str) -> bool:
    return bool(c) and (c[0].isdigit() or c[0] in "-+.") and c not in ("-",) or c == "-"


def stats_summary(stats: dict, limit: int = 3) -> str:
    """The pass's first few scalar counters, e.g. `groups=12 nodes_fused=40`."""
    items = [f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join(items[:limit])


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)
