"""The launcher: runs a function on W ranks and gathers their results on rank 0.

On one host `spawn()` starts W worker processes (`python -m
passlab.runtime.distributed DIR`), inside the emulated link's network
namespace when there is one, with the torchrun environment (RANK, WORLD_SIZE,
MASTER_ADDR, ...), so the same worker runs under torchrun on several hosts
(`run_here()`). Each worker initializes the process group (gloo on CPU, NCCL on
GPU), calls the target `module:function` with the payload, and the results are
gathered on rank 0.

A run never hangs and never ends silently: a rank that raises, exits or is
killed ends the whole run, with that rank's traceback (or the tail of its
stderr); a run that outlives `timeout` is killed, naming the ranks still
running and the stage each had reached.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from .link import Link
from .namespaces import Namespace
from .relay import die_with_parent

GRACE_S = 1.0            # after a failure, how long the other ranks get to report theirs
TAIL_LINES = 25


class DistributedRunFailed(RuntimeError):
    """A rank failed or the run timed out; `failures` has one entry per rank that did."""

    def __init__(self, msg: str, failures: list["RankFailure"], link: dict | None = None):
        super().__init__(msg)
        self.failures, self.link = failures, link or {}


@dataclass
class RankFailure:
    rank: int
    kind: str                  # error | exit | signal | timeout
    message: str
    detail: str = ""           # traceback or stderr tail
    stage: str = ""

    def __str__(self):
        where = f" (stage: {self.stage})" if self.stage else ""
        text = f"rank {self.rank}: {self.message}{where}"
        return text + ("\n" + indent(self.detail) if self.detail else "")


@dataclass
class Launched:
    results: list              # one per rank, gathered on rank 0
    link: dict
    seconds: float
    world_size: int
    backend: str
    launcher: str = "spawn"
    extra: dict = field(default_factory=dict)


def default_backend(device: str = "cpu") -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target: str, payload, world_size: int, *, timeout: float = 300.0, link: Link | None = None,
          backend: str = "gloo", threads: int | None = None,
          echo: Callable[[str], None] | None = None) -> Launched:
    """Run `target(payload)` on `world_size` local ranks; raise DistributedRunFailed on any failure."""
    if world_size < 1:
        raise ValueError("world size must be at least 1")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    work = tempfile.mkdtemp(prefix="passlab-dist-")
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        with open(os.path.join(work, "payload.pkl"), "wb") as f:
            pickle.dump(payload, f)
        with Namespace(link, world_size) as ns:
            env = dict(os.environ, WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                       MASTER_ADDR=ns.master_addr, MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME=ns.ifname,
                       NCCL_SOCKET_IFNAME=ns.ifname, PASSLAB_DIST_DIR=work, PASSLAB_DIST_TARGET=target,
                       PASSLAB_DIST_BACKEND=backend, PASSLAB_DIST_TIMEOUT=str(timeout),
                       PASSLAB_THREADS=str(threads), OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                       PASSLAB_PARENT_PID=str(os.getpid()))
            applied = ns.applied()
            env["PASSLAB_DIST_LINK"] = applied.spec() if applied else ""
            if ns.info.get("latency_emulated") and world_size > 1:
                env["PASSLAB_PROBE_LATENCY"] = repr(ns.link.latency_s)
            for r in range(world_size):
                cmd = ns.prefix(r) + [sys.executable, "-m", "passlab.runtime.distributed", work]
                out = open(os.path.join(work, f"rank{r}.log"), "wb")
                procs.append(subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
                out.close()
            watch(procs, work, timeout, echo, ns.info)
            with open(os.path.join(work, "results.pkl"), "rb") as f:
                results = pickle.load(f)
            probe = None
            if read(work, "probe.pkl.done"):
                with open(os.path.join(work, "probe.pkl"), "rb") as f:
                    probe = pickle.load(f)
            info = dict(ns.info, applied=applied.spec() if applied else None, removed_stale=ns.removed_stale)
            if probe:
                info["probe"] = probe
            elif ns.info.get("emulated"):
                info["probe"] = {"measured_one_way_s": None, "reason": "latency not emulated: nothing to probe"
                                 if not ns.info.get("latency_emulated") else "one rank: no peer to probe"}
            return Launched(results, info, time.monotonic() - t0, world_size, backend)
    finally:
        kill(procs)
        shutil.rmtree(work, ignore_errors=True)


def watch(procs, work, timeout, echo, link_info) -> None:
    """Wait for every rank; on the first failure or at the deadline kill them all and raise."""
    deadline = time.monotonic() + timeout
    failed_at: dict[int, float] = {}
    echoed = 0
    while True:
        if echo:
            echoed = echo_new(os.path.join(work, "rank0.log"), echoed, echo)
        codes = [p.poll() for p in procs]
        now = time.monotonic()
        for r, c in enumerate(codes):
            if c not in (None, 0) and r not in failed_at:
                failed_at[r] = now
        if all(c == 0 for c in codes):
            return
        if failed_at and (now - min(failed_at.values()) > GRACE_S or all(c is not None for c in codes)):
            kill(procs)
            order = sorted(failed_at, key=failed_at.get)
            failures = [describe(r, procs[r].returncode, work) for r in order]
            others = [r for r in range(len(procs)) if r not in failed_at and codes[r] is None]
            msg = f"distributed run failed: {failures[0]}"
            if len(failures) > 1:
                msg += "".join(f"\nthen rank {f.rank}: {f.message}" for f in failures[1:])
            if others:
                msg += f"\nranks {', '.join(map(str, others))} were still running and were stopped"
            raise DistributedRunFailed(msg, failures, link_info)
        if now > deadline:
            kill(procs)
            running = [r for r, c in enumerate(codes) if c is None]
            failures = [RankFailure(r, "timeout", f"still running after {timeout:g} s",
                                    tail(os.path.join(work, f"rank{r}.log")), read(work, f"rank{r}.stage"))
                        for r in running]
            msg = (f"distributed run timed out after {timeout:g} s (--timeout): rank(s) "
                   f"{', '.join(map(str, running))} did not finish\n" + "\n".join(map(str, failures)))
            raise DistributedRunFailed(msg, failures, link_info)
        time.sleep(0.05)


def describe(rank: int, code: int, work: str) -> RankFailure:
    stage = read(work, f"rank{rank}.stage")
    tb = read(work, f"rank{rank}.error")
    if tb:
        last = tb.strip().splitlines()[-1]
        return RankFailure(rank, "error", f"raised {last}", tb.rstrip(), stage)
    log = tail(os.path.join(work, f"rank{rank}.log"))
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return RankFailure(rank, "signal", f"killed by {name}", log, stage)
    return RankFailure(rank, "exit", f"exited with code {code} without a Python exception "
                                     "(os._exit, a crash, or a library abort)", log, stage)


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def echo_new(path: str, offset: int, echo) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        echo(line)
    return offset + end


def read(work: str, name: str) -> str:
    try:
        with open(os.path.join(work, name)) as f:
            return f.read()
    except OSError:
        return ""


def tail(path: str, n: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# ---------------------------------------------------------------- inside a rank

def applied_link() -> str | None:
    """Inside a spawned rank: the link as the run emulates it ('rate=..;latency=..',
    latency 0 where none is applied), or None where nothing is emulated."""
    return os.environ.get("PASSLAB_DIST_LINK") or None


def stage(text: str) -> None:
    """Note what this rank is doing, so a timeout can say where it hung."""
    work = os.environ.get("PASSLAB_DIST_DIR")
    rank = os.environ.get("RANK", "0")
    if work:
        with open(os.path.join(work, f"rank{rank}.stage"), "w") as f:
            f.write(text)


def resolve_target(spec: str) -> Callable:
    """'package.module:function' or 'path/to/file.py:function'."""
    mod, _, fn = spec.rpartition(":")
    if mod.endswith(".py"):
        s = importlib.util.spec_from_file_location(f"passlab_target_{abs(hash(mod))}", mod)
        m = importlib.util.module_from_spec(s)
        s.loader.exec_module(m)
    else:
        m = importlib.import_module(mod)
    return getattr(m, fn)


def init_process_group(backend: str, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))


def gather(result):
    """Every rank's result, on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(result, out, dst=0)
    return out


def run_here(target: str | Callable, payload, *, timeout: float = 300.0, backend: str = "gloo"):
    """Under torchrun: this process is one rank. Returns all results on rank 0, None elsewhere."""
    init_process_group(backend, timeout)
    fn = resolve_target(target) if isinstance(target, str) else target
    return gather(fn(payload))


def probe(work: str, rank: int, configured_s: float) -> None:
    """The latency probe between ranks 0 and 1 (latency.probe_latency); rank 0 leaves it in `work`."""
    import torch.distributed as dist
    from .latency import probe_latency
    from .relay import address
    result = probe_latency(rank, address(1), configured_s, dist.barrier) if rank in (0, 1) else None
    if rank not in (0, 1):
        dist.barrier()
    dist.barrier()
    if rank == 0:
        with open(os.path.join(work, "probe.pkl"), "wb") as f:
            pickle.dump(result, f)
        with open(os.path.join(work, "probe.pkl.done"), "w") as f:
            f.write("1")


def worker_main(work: str) -> None:
    rank = int(os.environ["RANK"])
    try:
        parent = os.environ.get("PASSLAB_PARENT_PID")
        die_with_parent(int(parent) if parent else None)       # a killed launcher takes its ranks along
        import torch
        torch.set_num_threads(int(os.environ.get("PASSLAB_THREADS", "1")))
        stage("init_process_group")
        init_process_group(os.environ.get("PASSLAB_DIST_BACKEND", "gloo"),
                           float(os.environ.get("PASSLAB_DIST_TIMEOUT", "300")))
        if os.environ.get("PASSLAB_PROBE_LATENCY"):
            stage("probing the link's latency")
            probe(work, rank, float(os.environ["PASSLAB_PROBE_LATENCY"]))
        with open(os.path.join(work, "payload.pkl"), "rb") as f:
            payload = pickle.load(f)
        fn = resolve_target(os.environ["PASSLAB_DIST_TARGET"])
        stage("running")
        result = fn(payload)
        stage("gathering results on rank 0")
        results = gather(result)
        stage("final barrier")
        import torch.distributed as dist
        dist.barrier()          # nobody exits while another rank still reads from it
        stage("done")
        if rank == 0:
            tmp = os.path.join(work, "results.pkl.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(results, f)
            os.replace(tmp, os.path.join(work, "results.pkl"))
    except BaseException:
        tb = traceback.format_exc()
        with open(os.path.join(work, f"rank{rank}.error"), "w") as f:
            f.write(tb)
        sys.stderr.write(tb)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)       # skip interpreter teardown: a process group's threads must not delay the exit

