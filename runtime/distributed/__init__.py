"""The distributed runtime: launch W ranks (spawn or torchrun), an emulated
interconnect (network namespace + tc), and per-rank compute/comm timelines.

Process, link and timeline mechanics only: what a rank runs (capture, passes,
measurement) is given as a `module:function` target by the tools layer.
"""
from .launch import DistributedRunFailed, Launched, RankFailure, default_backend, run_here, spawn, stage
from .link import PRESETS, LinkConfig, LinkPreset, Namespace, resolve
from .timeline import (Timeline, TracedRun, chrome_trace, link_seconds, mark_transfers, traced,
                       write_chrome_trace)

__all__ = ["spawn", "run_here", "stage", "default_backend", "DistributedRunFailed", "Launched", "RankFailure",
           "PRESETS", "LinkPreset", "LinkConfig", "Namespace", "resolve",
           "Timeline", "TracedRun", "traced", "chrome_trace", "write_chrome_trace", "mark_transfers",
           "link_seconds"]
