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

from passlab.runtime.distributed import (DistributedRunFailed, Namespace, chrome_trace, link, mark_transfers,
                                        spawn)
from passlab.tools import cli

pytestmark = pytest.mark.distributed
HERE = os.path.abspath(__file__)
SAMPLES = ("tp_mlp", "ep_moe", "fsdp_mlp")


def namespaces() -> list[str]:
    if os.geteuid() != 0:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ours() -> str:
    return f"passlab-{os.getpid()}"


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


# ---------------------------------------------------------------- tests

def test_samples_match_single_process_reference():
    """One launch on an emulated link: numerics, visible collectives, timeline, namespace gone."""
    r = spawn(f"{HERE}:check_samples", {"models": SAMPLES}, 2, timeout=240, link=link.resolve("rate=1gbit"))
    assert len(r.results) == 2
    assert r.link["emulated"] is (os.geteuid() == 0 and link.unavailable() is None), r.link
    assert ours() not in namespaces()
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
        for c in comm:                          # the transfer lies inside its collective
            assert c["args"]["waiting_us"] >= 0 and c["args"]["transfer_us"] >= 0
    waits = {}
    for evs in events.values():
        for c in (e for e in evs if e["cat"] == "comm"):
            waits.setdefault((c["step"], c["args"]["seq"]), []).append(c["args"]["waiting_us"])
    assert all(len(w) == 2 and min(w) == 0 for w in waits.values())   # the last rank to issue waits for nobody
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


@pytest.mark.slow
def test_cli_run_with_emulated_link_writes_record_and_timeline(tmp_path, capsys):
    tl, js = tmp_path / "t.json", tmp_path / "r.json"
    code = cli.main(["run", "ep_moe", "--world-size", "2", "--link", "rate=200mbit,latency=50us",
                     "--pipeline", "cse", "--timeline", str(tl), "--json", str(js), "--timeout", "180"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "step ms final" in out.out
    rec = json.loads(js.read_text())
    assert rec["world_size"] == 2 and rec["launcher"] == "spawn" and rec["backend"] == "gloo"
    assert [s["pass"] for s in rec["steps"]] == ["cse"]
    assert rec["baseline"]["unit"] == "tokens" and rec["baseline"]["n"] == rec["steps"][0]["n"] == 10
    assert [r["rank"] for r in rec["ranks"]] == [0, 1]
    for r in rec["ranks"]:
        assert r["step_s"]["baseline"] > 0 and r["step_s"]["final"] > 0
        assert r["reference_error"] < 1e-5
        assert r["traced"]["final"]["comm_s"] > 0
    if os.geteuid() == 0 and link.unavailable() is None:
        assert rec["link"]["emulated"] is True, rec["link"]
        assert rec["link"]["rate_bytes_per_s"] == pytest.approx(25e6)
    else:
        assert rec["link"]["emulated"] is False and rec["link"]["reason"]
    check_trace(json.loads(tl.read_text()))
    assert ours() not in namespaces()


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
    assert ours() not in namespaces()


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
    with pytest.raises(DistributedRunFailed) as e:
        spawn(f"{HERE}:misbehave", {}, 2, timeout=8, link=link.resolve("rate=1gbit"))
    msg = str(e.value)
    assert "timed out after 8 s" in msg and "sleeping on purpose" in msg
    assert {(f.rank, f.kind) for f in e.value.failures} == {(0, "timeout"), (1, "timeout")}
    assert ours() not in namespaces()


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
        assert ns.prefix == [] and ns.info["emulated"] is False
        assert "not root" in ns.info["reason"]
        assert ns.info["rate_bytes_per_s"] == pytest.approx(125e6)


@pytest.mark.skipif(os.geteuid() != 0 or link.unavailable() is not None, reason="needs root, ip and tc")
def test_namespace_is_shaped_and_removed():
    with Namespace(link.resolve("rate=80mbit"), 2) as ns:
        assert ns.info["emulated"] is True and ns.name in namespaces()
        q = subprocess.run(ns.prefix + ["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
        assert "tbf" in q and "rate 160Mbit" in q, q
    assert ns.name not in namespaces()


def test_bad_arguments_exit_2_before_launch(capsys):
    assert cli.main(["run", "tp_mlpp", "--world-size", "2"]) == 2
    assert "did you mean 'tp_mlp'" in capsys.readouterr().err
    assert cli.main(["run", "tp_mlp", "--world-size", "2", "--link", "warp-drive"]) == 2
    assert cli.main(["run", "tp_mlp", "--world-size", "2", "--pipeline", "nosuchpass"]) == 2
