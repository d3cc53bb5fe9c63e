"""The distributed runtime: launch W ranks (spawn or torchrun), an emulated
interconnect (network namespaces joined by a TUN delay line, or tc), and per-rank compute/comm timelines.

Process, link and timeline mechanics only: what a rank runs (capture, passes,
measurement) is given as a `module:function` target by the tools layer.
"""
from .launch import (DistributedRunFailed, Launched, RankFailure, applied_link, default_backend, run_here, spawn,
                     stage)
from .link import LINKS, PRESETS, Link, get_link, resolve
from .namespaces import Namespace
from .timeline import (Timeline, TracedRun, chrome_trace, link_seconds, mark_transfers, traced,
                       write_chrome_trace)

__all__ = ["spawn", "run_here", "stage", "applied_link", "LINKS", "Link", "get_link", "default_backend", "DistributedRunFailed", "Launched", "RankFailure",
           "PRESETS", "Namespace", "resolve",
           "Timeline", "TracedRun", "traced", "chrome_trace", "write_chrome_trace", "mark_transfers",
           "link_seconds"]
