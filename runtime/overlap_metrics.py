"""Overlap metrics from a timeline: exposed communication and overlap efficiency.

A timeline is a list of intervals, each on one rank, of category "compute" or
"comm" (Chrome-trace events: `{"ph": "X", "cat", "ts", "dur", "pid"}` with
microseconds, or `simulator.Event`s with seconds). Per rank:

- communication time C: the union of its comm intervals,
- computation time P: the union of its compute intervals,
- exposed communication: |C minus P|, time when the link works and nothing computes,
- hidden communication: |C intersect P| = C - exposed,
- overlap_efficiency = hidden / min(C, P): 1.0 when the shorter of the two is
  entirely hidden behind the other, 0.0 when they never run at the same time.

The metrics of a step are the means over ranks (step time: the slowest rank).
"""
from __future__ import annotations

from collections import defaultdict


def union(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def intersect(xs, ys) -> list[tuple[float, float]]:
    """Intersection of two sorted disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def normalize(event) -> tuple | None:
    """(rank, category, start_s, end_s) of a Chrome-trace dict or a simulator Event."""
    if isinstance(event, dict):
        cat = event.get("cat") or event.get("args", {}).get("cat")
        if event.get("ph", "X") != "X" or cat not in ("compute", "comm") or "ts" not in event:
            return None
        start = float(event["ts"]) * 1e-6
        return event.get("pid", 0), cat, start, start + float(event.get("dur", 0)) * 1e-6
    stream = getattr(event, "stream", None)
    if stream in ("compute", "comm"):
        return getattr(event, "rank", 0), stream, event.start_s, event.end_s
    return None


def rank_metrics(compute, comm) -> dict:
    c, p = union(comm), union(compute)
    comm_s, compute_s = length(c), length(p)
    hidden = length(intersect(c, p))
    spans = c + p
    step = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0
    denom = min(comm_s, compute_s)
    return {"step_s": step, "compute_s": compute_s, "comm_s": comm_s, "exposed_comm_s": comm_s - hidden,
            "hidden_comm_s": hidden, "overlap_efficiency": hidden / denom if denom > 0 else None}


def overlap_metrics(events) -> dict:
    """Metrics of one step: per rank, and their mean (step time: the slowest rank)."""
    per: dict = defaultdict(lambda: {"compute": [], "comm": []})
    for e in events:
        n = normalize(e)
        if n is not None:
            rank, cat, a, b = n
            per[rank][cat].append((a, b))
    ranks = {r: rank_metrics(v["compute"], v["comm"]) for r, v in sorted(per.items())}
    if not ranks:
        return {"ranks": {}, "step_s": None, "compute_s": None, "comm_s": None, "exposed_comm_s": None,
                "hidden_comm_s": None, "overlap_efficiency": None}
    mean = lambda k: sum(m[k] for m in ranks.values()) / len(ranks)
    effs = [m["overlap_efficiency"] for m in ranks.values() if m["overlap_efficiency"] is not None]
    return {"ranks": ranks, "step_s": max(m["step_s"] for m in ranks.values()),
            "compute_s": mean("compute_s"), "comm_s": mean("comm_s"), "exposed_comm_s": mean("exposed_comm_s"),
            "hidden_comm_s": mean("hidden_comm_s"),
            "overlap_efficiency": sum(effs) / len(effs) if effs else None}
