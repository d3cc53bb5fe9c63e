"""Distributed runtime: samples against their single-process references at W=2
(gloo), the CLI with an emulated link and a timeline, a killed rank and a hung
rank ending the run with the rank's error, the namespace removed every time.

Every launch passes a timeout, so a broken rank can never hang the suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from passlab.runtime.distributed import namespaces as emulation
from passlab.runtime.distributed import (DistributedRunFailed, Namespace, chrome_trace, link, mark_transfers,
                                        spawn)
from passlab.tools import cli

pytestmark = pytest.mark.distributed
HERE = os.path.abspath(__file__)
SAMPLES = ("tp_mlp", "ep_moe", "fsdp_mlp")


EMULATES = os.geteuid() == 0 and emulation.unavailable() is None


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ours() -> list[str]:
    """This process's namespaces still listed (passlab-<pid> or passlab-<pid>-<rank>)."""
    if not EMULATES:
        return []
    return [n for n in namespaces() if n == f"passlab-{os.getpid()}" or n.startswith(f"passlab-{os.getpid()}-")]


def check_link_removed(info: dict) -> None:
    """Where the run emulated a link, the namespaces it names exist no more;
    where it could not, the record says why."""
    if not EMULATES:
        assert info["emulated"] is False and info["reason"], info
        return
    made = info.get("namespaces") or [info.get("namespace")]
    assert info["emulated"] is True and made and all(made), info
    left = namespaces()
    assert not [n for n in made if n in left], (made, left)
    assert not ours()


# ---------------------------------------------------------------- rank targets (run in the children)

def check_samples(payload):
    """Eager shard, captured graph and traced run against the unsharded reference."""
    import torch.distributed as dist
    from passlab.graphs import capture, load
    from passlab.passes import relative_error
    from passlab.runtime.distributed import Timeline, traced
    out = {"origin_ns": time.perf_counter_ns(), "events": []}
    for name in payload["models"]:
        s = load(name, "tiny")
        gm = capture(s.module, s.example_inputs)
        x = s.make_inputs(3)
        ref = s.module.reference(*x)
        tl = Timeline(dist.get_rank())
        out[name] = {"eager": relative_error(s.module(*x), ref), "graph": relative_error(gm(*x), ref),
                     "traced": relative_error(traced(gm, x, tl, name), ref),
                     "ops": sorted({str(n.target) for n in gm.graph.nodes if "c10d" in str(n.target)}),
                     "comm_events": sum(e["cat"] == "comm" for e in tl.events),
                     "input_sum": float(x[0].sum())}
        out["events"] += tl.events
    return out


def misbehave(payload):
    import torch.distributed as dist
    from passlab.runtime.distributed import stage
    dist.barrier()
    if dist.get_rank() == 1:
        stage("sleeping on purpose")
        time.sleep(600)
    dist.barrier()
    return "unreachable"


def rank_dependent(payload):
    """A pass that fails, or builds another graph, on rank 1 only, under the run's agreement."""
    import torch.distributed as dist
    from passlab.graphs import capture, load
    from passlab.passes import PassContext, PassManager
    from passlab.passes.api import Pass
    from passlab.passes.pipeline import Step
    from passlab.tools.distributed_run import agreeing

    class RankDependent(Pass):
        name, description, options = "rank_dependent", "differs on rank 1", {}

        def run(self, gm, ctx):
            if dist.get_rank() == 1:
                if payload["mode"] == "raise":
                    raise ValueError("only rank 1 objects")
                x = next(n for n in gm.graph.nodes if n.op == "placeholder")
                with gm.graph.inserting_after(x):
                    gm.graph.call_function(torch.ops.aten.clone.default, (x,))
                gm.recompile()
            return gm
    s = load("tp_mlp", "tiny")
    gm = capture(s.module, s.example_inputs)
    res = agreeing(PassManager([Step(RankDependent())], instruments=[])).run(gm, PassContext(world_size=2))
    return [(r.status, r.error) for r in res.steps]


# ---------------------------------------------------------------- tests


def test_ranks_agree_on_a_rollback_and_fail_fast_where_graphs_differ():
    r = spawn(f"{HERE}:rank_dependent", {"mode": "raise"}, 2, timeout=120)
    for steps in r.results:                   # rolled back on every rank, naming the rank that failed
        assert steps[0][0] == "rolled_back" and "failed on rank 1" in steps[0][1], steps
        assert "only rank 1 objects" in steps[0][1]
    with pytest.raises(DistributedRunFailed) as e:
        spawn(f"{HERE}:rank_dependent", {"mode": "graph"}, 2, timeout=300)
    msg = str(e.value)
    assert "RanksDisagree" in msg and "after pass rank_dependent: rank 1's graph differs" in msg, msg
    assert "timed out" not in msg                  # seen when it happened, not at the deadline

def test_samples_match_single_process_reference():
    """One launch on an emulated link: numerics, visible collectives, timeline, namespace gone."""
    r = spawn(f"{HERE}:check_samples", {"models": SAMPLES}, 2, timeout=240, link=link.resolve("rate=1gbit"))
    assert len(r.results) == 2
    check_link_removed(r.link)
    for rank, res in enumerate(r.results):
        for name in SAMPLES:
            m = res[name]
            assert m["eager"] < 1e-5 and m["graph"] < 1e-5 and m["traced"] < 1e-5, (rank, name, m)
            assert m["comm_events"] >= 2, (rank, name)
    ops = {name: r.results[0][name]["ops"] for name in SAMPLES}
    assert "_c10d_functional.all_reduce.default" in ops["tp_mlp"]
    assert "_c10d_functional.all_to_all_single.default" in ops["ep_moe"]
    assert "_c10d_functional.all_gather_into_tensor.default" in ops["fsdp_mlp"]
    assert all("_c10d_functional.wait_tensor.default" in o for o in ops.values())
    # tensor parallel replicates the input; expert parallel gives every rank its own tokens
    assert r.results[0]["tp_mlp"]["input_sum"] == r.results[1]["tp_mlp"]["input_sum"]
    assert r.results[0]["ep_moe"]["input_sum"] != r.results[1]["ep_moe"]["input_sum"]
    events = {i: res["events"] for i, res in enumerate(r.results)}
    origins = {i: res["origin_ns"] for i, res in enumerate(r.results)}
    mark_transfers(events, origins)
    for rank, evs in events.items():
        comm = [e for e in evs if e["cat"] == "comm"]
        links = [e for e in evs if e["cat"] == "link"]
        assert len(links) == len(comm)          # every collective matched across ranks
        by_key = {(t["step"], t["lane"], t["end_ns"]): t for t in links}
        for c in comm:                          # waiting, then the transfer, make up the collective
            t = by_key[(c["step"], c["lane"], c["end_ns"])]
            dur_us = (c["end_ns"] - c["start_ns"]) / 1e3
            assert c["args"]["waiting_us"] + c["args"]["transfer_us"] == pytest.approx(dur_us, abs=0.01)
            assert t["start_ns"] == pytest.approx(c["start_ns"] + c["args"]["waiting_us"] * 1e3, abs=10)
    check_trace(json.loads(json.dumps(chrome_trace(events, origin_ns=origins))))


def check_trace(trace):
    """Valid Chrome trace: both ranks, each with compute and comm lanes and events."""
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):
        cats = {e["cat"] for e in spans if e["pid"] == rank}
        assert {"compute", "comm", "step"} <= cats, (rank, cats)
        lanes = {e["args"]["name"] for e in trace["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == rank}
        assert {"compute", "comm"} <= lanes
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert all({"name", "ph", "pid", "tid", "ts", "dur"} <= set(e) for e in spans)


def test_single_process_world_of_one():
    from passlab.graphs import capture, load
    from passlab.passes import relative_error
    s = load("tp_mlp", "tiny")
    gm = capture(s.module, s.example_inputs)
    x = s.make_inputs(5)
    assert relative_error(gm(*x), s.module.reference(*x)) < 1e-5
    assert any("all_reduce" in str(n.target) for n in gm.graph.nodes)


def test_cli_two_ranks_on_a_delayed_link(tmp_path, capsys, monkeypatch):
    """The fast success path `make test` runs: two ranks, a link with real
    latency, the overlap passes told the link as emulated, record and trace."""
    monkeypatch.delenv("PASSLAB_LINK", raising=False)
    env_before = dict(os.environ)
    tl, js = tmp_path / "t.json", tmp_path / "r.json"
    code = cli.main(["run", "ep_moe", "--world-size", "2", "--link", "rate=200mbit,latency=5ms",
                     "--pipeline", "cse,overlap_reorder,overlap_chunk", "--timeline", str(tl), "--json", str(js),
                     "--timeout", "240"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "step ms final" in out.out
    assert dict(os.environ) == env_before            # nothing leaks into this process's environment
    rec = json.loads(js.read_text())
    assert rec["world_size"] == 2 and rec["launcher"] == "spawn" and rec["backend"] == "gloo"
    assert [s["pass"] for s in rec["steps"]] == ["cse", "overlap_reorder", "overlap_chunk"]
    assert rec["baseline"]["unit"] == "tokens" and rec["baseline"]["n"] == rec["steps"][0]["n"] == 10
    assert [r["rank"] for r in rec["ranks"]] == [0, 1]
    for r in rec["ranks"]:
        assert r["step_s"]["baseline"] > 0 and r["step_s"]["final"] > 0
        assert r["reference_error"] < 1e-5
        assert r["traced"]["final"]["comm_s"] > 0
        assert r["statuses"][0] == "ok" and set(r["statuses"]) <= {"ok", "rolled_back"}
    lk = rec["link"]
    assert lk["rate_bytes_per_s"] == pytest.approx(25e6)
    estimate = rec["steps"][1]["stats"]["estimate"]
    for s in rec["steps"]:               # paired rounds: a CI on every step's ratio to the graph before it
        lo, hi = s["speedup_vs_prev_ci"] or (s["speedup_vs_prev"], s["speedup_vs_prev"])
        assert lo <= s["speedup_vs_prev"] <= hi
    for s in rec["steps"][1:]:          # the overlap passes measured on the link; a slower one rolled back
        guard = s["stats"].get("measured_on_link")
        itself = (s["stats"].get("measured") or {}).get("baseline_is_input")     # measured against its input
        if (s["changed"] or s["status"] == "rolled_back") and not itself:
            assert guard and guard["rounds"] in (10, 20, 30) and len(guard["after"]["speedup"]) == 3, s
        if s["status"] == "rolled_back":
            assert guard["slower"] and s["error"].startswith("SlowerOnTheLink: slower on the emulated link"), s
    if EMULATES:
        assert lk["method"] == "tun-relay" and lk["latency_emulated"] is True, lk
        probe = lk["probe"]
        assert probe["configured_one_way_s"] == pytest.approx(5e-3)
        assert probe["measured_one_way_s"] > 2.5e-3, probe     # the relay really held the packets
        assert lk["applied"] == "rate=2.5e+07B;latency=0.005s"
    else:
        assert lk["applied"] is None and lk["latency_emulated"] is False
    assert estimate["link"] == (lk["applied"] or "loopback")    # the passes estimated with the link as emulated
    check_trace(json.loads(tl.read_text()))
    check_link_removed(lk)


def test_killed_rank_fails_the_run_with_its_error(tmp_path, capsys):
    model = tmp_path / "dying.py"
    model.write_text(
        "import os, torch, torch.distributed as dist\n"
        "def build():\n"
        "    if dist.is_initialized() and dist.get_rank() == 1:\n"
        "        os._exit(7)\n"
        "    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)\n")
    js = tmp_path / "r.json"
    code = cli.main(["run", f"{model}:build", "--world-size", "2", "--link", "rate=100mbit",
                     "--pipeline", "cse", "--timeout", "120", "--json", str(js)])
    err = capsys.readouterr().err
    assert code == 1
    assert "rank 1" in err and "exited with code 7" in err, err[-2000:]
    assert "timed out" not in err                  # seen when it died, not at the deadline
    rec = json.loads(js.read_text())
    assert rec["status"] == "failed" and rec["failures"][0]["rank"] == 1
    assert not ours()


@pytest.mark.slow
def test_raising_rank_shows_its_traceback(tmp_path, capsys):
    model = tmp_path / "raising.py"
    model.write_text(
        "import torch, torch.distributed as dist\n"
        "def build():\n"
        "    if dist.get_rank() == 0:\n"
        "        raise RuntimeError('rank zero refuses')\n"
        "    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)\n")
    code = cli.main(["run", f"{model}:build", "--world-size", "2", "--pipeline", "cse", "--timeout", "120"])
    err = capsys.readouterr().err
    assert code == 1
    assert "rank 0: raised RuntimeError: rank zero refuses" in err
    assert "Traceback" in err and "raising.py" in err


def test_hung_rank_times_out_and_names_its_stage():
    # 40 s: rank 1 must reach its sleep before the deadline even on a loaded 2-core machine
    with pytest.raises(DistributedRunFailed) as e:
        spawn(f"{HERE}:misbehave", {}, 2, timeout=40, link=link.resolve("rate=1gbit"))
    msg = str(e.value)
    assert "timed out after 40 s" in msg and "sleeping on purpose" in msg
    assert {(f.rank, f.kind) for f in e.value.failures} == {(0, "timeout"), (1, "timeout")}
    check_link_removed(e.value.link)


# ---------------------------------------------------------------- links, without launching

def test_link_presets_keep_the_target_ratio():
    host = 50e9
    ib = link.resolve("ib-400g", host)
    assert ib.rate_bytes_per_s == pytest.approx(host * 50e9 / 989e12)
    assert ib.latency_s == pytest.approx(5e-6 * 989e12 / host)
    nv, eth = link.resolve("nvlink-h100", host), link.resolve("eth-10g", host)
    assert nv.rate_bytes_per_s / eth.rate_bytes_per_s == pytest.approx(450 / 1.25)
    given = link.resolve("rate=1gbit,latency=50us")
    assert given.rate_bytes_per_s == pytest.approx(125e6) and given.latency_s == pytest.approx(50e-6)
    for bad in ("nosuchlink", "rate=fast", "latency=5us", "rate=1gbit,jitter=1ms"):
        with pytest.raises(ValueError):
            link.resolve(bad, host)
    with pytest.raises(ValueError):
        link.resolve("ib-400g")          # a preset needs the host's compute rate


def test_without_privileges_the_run_says_link_not_emulated(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with Namespace(link.resolve("rate=1gbit"), 2) as ns:
        assert ns.prefix(0) == [] and ns.info["emulated"] is False and ns.applied() is None
        assert "not root" in ns.info["reason"]
        assert ns.info["rate_bytes_per_s"] == pytest.approx(125e6)


@pytest.mark.skipif(not EMULATES, reason="needs root, ip and tc")
def test_namespaces_joined_by_the_relay_and_removed():
    with Namespace(link.resolve("rate=80mbit,latency=1ms"), 2) as ns:
        assert ns.info["emulated"] is True and ns.info["method"] == "tun-relay", ns.info
        assert ns.info["latency_emulated"] is True
        assert set(ns.names) == {f"{ns.name}-0", f"{ns.name}-1"} <= set(namespaces())
        addr = subprocess.run(ns.prefix(1) + ["ip", "-4", "addr", "show", "dev", "pl0"], capture_output=True,
                              text=True).stdout
        assert "10.77.0.2/24" in addr, addr
        assert ns.master_addr == "10.77.0.1" and ns.ifname == "pl0"
        assert ns.applied().spec() == "rate=1e+07B;latency=0.001s"
        rmem = subprocess.run(ns.prefix(0) + ["cat", "/proc/sys/net/ipv4/tcp_rmem"], capture_output=True,
                              text=True).stdout.split()
        assert int(rmem[1]) == emulation.socket_buffer_bytes(ns.link) >= 4 << 20, rmem   # the BDP from the start
        relay = ns.relay
        assert relay.poll() is None
    assert not set(ns.names) & set(namespaces()) and relay.poll() is not None


@pytest.mark.skipif(not EMULATES, reason="needs root, ip and tc")
def test_tbf_fallback_says_latency_not_emulated(monkeypatch):
    monkeypatch.setattr(emulation.Namespace, "tun_relay", lambda self: (_ for _ in ()).throw(OSError("no TUN here")))
    with Namespace(link.resolve("rate=80mbit,latency=1ms"), 2) as ns:
        assert ns.info["method"] == "tc-tbf" and ns.info["latency_emulated"] is False
        assert "no TUN here" in ns.info["latency_reason"]
        q = subprocess.run(ns.prefix(0) + ["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
        assert "tbf" in q and "rate 160Mbit" in q, q
        assert ns.applied().latency_s == 0.0 and ns.applied().bytes_per_s == pytest.approx(1e7)
    assert ns.name not in namespaces()


@pytest.mark.skipif(not EMULATES, reason="needs root, ip and tc")
def test_stale_namespaces_of_dead_runs_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f"passlab-{dead.pid}", f"passlab-{dead.pid}-1"]
    for name in stale:
        subprocess.run(["ip", "netns", "add", name], check=True)
    mine = f"passlab-{os.getpid()}-9"            # a live run's namespace stays
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        removed = emulation.remove_stale()
        assert set(stale) <= set(removed) and mine not in removed
        assert not set(stale) & set(namespaces()) and mine in namespaces()
    finally:
        for name in stale + [mine]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_ranks_die_with_their_parent(tmp_path):
    """PR_SET_PDEATHSIG: a rank whose launcher is killed ends too."""
    import signal
    import sys
    pidfile = tmp_path / "child.pid"
    child = ("import os, time; from passlab.runtime.distributed.relay import die_with_parent; "
             f"die_with_parent({{ppid}}); open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c",
                               "import os, subprocess, sys, time\n"
                               f"c = {child!r}.replace('{{ppid}}', str(os.getpid()))\n"
                               "subprocess.Popen([sys.executable, '-c', c])\n"
                               "time.sleep(120)\n"])
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(pidfile.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while emulation.alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)       # not our child; reaped by init
            except ChildProcessError:
                pass
            time.sleep(0.1)
        assert not emulation.alive(pid) or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_delay_line_meters_rate_and_holds_packets():
    from passlab.runtime.distributed import relay
    reads, writes = zip(*(os.pipe() for _ in range(2)))
    line = relay.DelayLine(list(writes), rate=1000.0, latency=0.5)

    def packet(dst: int, size: int, tos: int = 0) -> bytes:
        return bytes([0x45, tos]) + bytes(14) + bytes(int(x) for x in relay.address(dst).split(".")) + bytes(size - 20)
    line.receive(0, packet(1, 100), now=10.0)                 # 0.1 s on the uplink, then 0.5 s
    line.receive(0, packet(1, 100), now=10.0)                 # behind the first on the same uplink
    line.receive(1, packet(0, 100, relay.PROBE_TOS), now=10.0)  # the probe mark skips the delay, not the rate
    assert [round(q[0], 6) for q in sorted(line.queue)] == [10.1, 10.6, 10.7]
    line.deliver(10.65)
    assert len(os.read(reads[1], 1000)) == 100 and len(os.read(reads[0], 1000)) == 100
    assert len(line.queue) == 1
    line.deliver(10.7)
    assert not line.queue
    for fd in reads + writes:
        os.close(fd)


def tcp_segment(dst: int, payload: int) -> bytes:
    from passlab.runtime.distributed import relay
    ip = bytes([0x45, 0]) + (40 + payload).to_bytes(2, "big") + bytes(5) + bytes([6]) + bytes(6) \
        + bytes(int(x) for x in relay.address(dst).split("."))
    return ip + bytes(12) + bytes([0x50]) + bytes(7) + bytes(payload)


def test_delay_line_acks_skip_the_data_queue():
    """A pure TCP ack is held for the latency but not queued behind its rank's data; a
    segment with payload is."""
    from passlab.runtime.distributed import relay
    assert relay.pure_ack(tcp_segment(1, 0)) and not relay.pure_ack(tcp_segment(1, 60))
    line = relay.DelayLine([-1, -1], rate=1000.0, latency=0.5)
    line.receive(1, tcp_segment(0, 960), now=0.0)            # 1 s of data on rank 1's uplink
    line.receive(1, tcp_segment(0, 0), now=0.0)              # its ack for rank 0's data
    line.receive(1, tcp_segment(0, 60), now=0.0)             # more data: behind the first
    assert [round(q[0], 6) for q in sorted(line.queue)] == [0.5, 1.5, 1.6]


def test_bad_arguments_exit_2_before_launch(capsys):
    assert cli.main(["run", "tp_mlpp", "--world-size", "2"]) == 2
    assert "did you mean 'tp_mlp'" in capsys.readouterr().err
    assert cli.main(["run", "tp_mlp", "--world-size", "2", "--link", "warp-drive"]) == 2
    assert cli.main(["run", "tp_mlp", "--world-size", "2", "--pipeline", "nosuchpass"]) == 2
