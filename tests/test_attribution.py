import itertools
import json
import math
import subprocess
import os
import sys

import pytest
import torch

from passlab.passes import register_pass, unregister_pass
from passlab.runtime.timing import Timing, measure_many, median_ci, speedup
from passlab.tools.attribution import shapley_values
from passlab.tools.peers import FREEZING
from passlab.tools.runner import run

STEP_FIELDS = {"pass", "changed", "status", "error", "throughput", "ci_low", "ci_high", "unit", "speedup_vs_prev",
               "cumulative_speedup", "launches", "bytes", "flops", "peak_memory_bytes", "max_error", "numerics_ok",
               "pass_seconds", "stats", "overlap_efficiency", "energy_j_per_unit", "speedup_vs_eager",
               "speedup_vs_eager_ci", "speedup_vs_prev_ci"}


def has_measurement(d) -> bool:
    """The schema's measured fields are filled and ordered (a structure check, not a speed check)."""
    return d["ci_low"] is not None and 0 < d["ci_low"] <= d["throughput"] <= d["ci_high"]


def test_median_ci_brackets_the_median():
    xs = [float(i) for i in range(1, 102)]
    med, lo, hi = median_ci(xs)
    assert med == 51.0 and lo < med < hi
    assert hi - lo < 25  # ~ 2*1.96*sqrt(n)/2 ranks wide


def test_shapley_of_additive_game_is_each_players_value():
    gains = [0.3, -0.1, 0.5]
    v = {s: sum(gains[i] for i in s) for r in range(4) for s in itertools.combinations(range(3), r)}
    phi, samples = shapley_values(v, 3)
    assert samples is None
    assert phi == pytest.approx(gains)


def test_shapley_splits_pure_interaction_evenly_and_sums_to_total():
    # only the pair (0, 1) together gains; player 2 is a dummy
    v = {s: (1.0 if {0, 1} <= set(s) else 0.0) for r in range(4) for s in itertools.combinations(range(3), r)}
    phi, _ = shapley_values(v, 3)
    assert phi == pytest.approx([0.5, 0.5, 0.0])
    assert sum(phi) == pytest.approx(v[(0, 1, 2)] - v[()])


def test_sampled_shapley_beyond_eight_players_is_efficient():
    n = 9
    gains = [0.1 * i for i in range(n)]
    v = {}
    for r in range(n + 1):
        for s in itertools.combinations(range(n), r):
            v[s] = sum(gains[i] for i in s)
    phi, samples = shapley_values(v, n)
    assert samples and samples >= 32
    assert phi == pytest.approx(gains)


def test_interleaved_timing_orders_a_slow_and_a_fast_function():
    a = torch.randn(256, 256)
    fns = {"fast": lambda x: x + 1, "slow": lambda x: x @ x @ x @ x}
    t = measure_many(fns, [(a,)], budget_s=0.2, min_reps=5)
    assert t["slow"].median_s > t["fast"].median_s
    assert all(tm.n >= 5 and tm.ci_low_s <= tm.median_s <= tm.ci_high_s for tm in t.values())


def test_every_contender_stays_in_the_rotation_until_all_are_done():
    a = torch.randn(128, 128)
    calls = {"steady": 0}

    def steady(x):          # converges at once: identical work every call
        calls["steady"] += 1
        return x + 1

    slow = lambda x: x @ x @ x
    t = measure_many({"steady": steady, "slow": slow}, [(a,)], budget_s=0.2, min_reps=5, target_ci=1e-9)
    # the slow one never meets a 1e-9 CI: it runs out its budget, and the steady one is timed in every round
    assert set(t["steady"].rounds) == set(t["slow"].rounds) and len(set(t["slow"].rounds)) >= 2
    assert len(t["steady"].rounds) == t["steady"].n


def test_a_contender_slower_on_every_sample_leaves_the_rotation_when_asked():
    """drop_slower: a contender whose fastest sample is over `factor` x another's slowest
    stops being timed after a few samples (the guard wants the fastest only); the others
    go on; without it every contender stays."""
    import time as _time
    a = torch.randn(64, 64)
    calls = {"slow": 0}

    def slow(x):
        calls["slow"] += 1
        _time.sleep(0.06)           # over the 50 ms chunk: one call per round
        return x + 1

    fns = {"fast": lambda x: x + 1, "slow": slow}
    t = measure_many(fns, [(a,)], budget_s=0.3, min_reps=9, target_ci=1e-9, drop_slower=2.0, warmup=1)
    assert t["slow"].n == 3 and calls["slow"] == 4                   # one warm-up, three samples
    assert t["fast"].n > t["slow"].n and t["slow"].median_s > 2 * t["fast"].median_s
    calls["slow"] = 0
    t = measure_many(fns, [(a,)], budget_s=0.05, min_reps=5, target_ci=1e-9, warmup=1)
    assert t["slow"].n >= 5


def test_speedup_is_the_ratio_of_medians_with_a_paired_ci():
    rounds = [r for r in range(40) for _ in range(3)]
    noise = [1.0 + 0.3 * ((r * 7) % 5) for r in rounds]        # a round-wide disturbance hits both alike
    ref = Timing(0, 0, 0, len(rounds), "t", 1, [2e-3 * k for k in noise], rounds)
    new = Timing(0, 0, 0, len(rounds), "t", 1, [1e-3 * k for k in noise], rounds)
    for tm in (ref, new):
        tm.median_s, tm.ci_low_s, tm.ci_high_s = median_ci(tm.samples_s)
    point, lo, hi = speedup(new, ref)
    assert point == pytest.approx(2.0) and lo <= point <= hi
    assert hi - lo < 0.3                       # paired: the shared noise does not widen the ratio's CI much
    unpaired = speedup(Timing(new.median_s, 0, 0, new.n, "t", 1, new.samples_s),
                       Timing(ref.median_s, 0, 0, ref.n, "t", 1, ref.samples_s))
    assert unpaired[0] == pytest.approx(2.0) and unpaired[1] <= 2.0 <= unpaired[2]


def test_record_measures_eager_and_every_ratio_to_it_is_consistent():
    r = run("mlp", pipeline="cse,dce", budget_s=0.05)
    rec = r.record
    eager = rec["eager"]
    assert has_measurement(eager) and eager["speedup_vs_eager"] == 1.0
    b = rec["baseline"]
    for d in [b] + rec["steps"]:
        assert d["speedup_vs_eager"] == pytest.approx(d["throughput"] / eager["throughput"])
        lo, hi = d["speedup_vs_eager_ci"]
        assert lo <= d["speedup_vs_eager"] <= hi
    for prev, s in zip([b] + rec["steps"], rec["steps"]):
        assert s["speedup_vs_prev"] == pytest.approx(s["throughput"] / prev["throughput"])
        lo, hi = s["speedup_vs_prev_ci"]
        assert lo <= s["speedup_vs_prev"] <= hi
    assert rec["final_speedup_vs_eager"] == rec["steps"][-1]["speedup_vs_eager"]
    assert rec["final_speedup_vs_eager_ci"] == rec["steps"][-1]["speedup_vs_eager_ci"]
    assert rec["setup_seconds"] >= rec["capture_seconds"] > 0
    from passlab.tools.table import pass_table
    lines = pass_table(rec).splitlines()
    assert lines[2].startswith("eager") and lines[3].startswith("capture") and "vs eager" in lines[0]


def test_peers_are_eager_and_both_torch_compiles_with_compile_time():
    r = run("mlp", pipeline="dce", budget_s=0.05, peers=True)
    peers = r.record["peers"]
    assert set(peers) == {"eager", "torch.compile", FREEZING}
    assert "freezing" in peers[FREEZING]["settings"] and "no freezing" in peers["torch.compile"]["settings"]
    for name in ("torch.compile", FREEZING):
        p = peers[name]
        assert p.get("error") is None, p
        assert p["compile_s"] > 0 and has_measurement(p)
        assert p["speedup_vs_eager"] == pytest.approx(p["throughput"] / r.record["eager"]["throughput"])
    import torch._inductor.config as inductor_config
    assert inductor_config.freezing is False        # the freezing peer's option did not leak


def test_subsets_record_the_passes_rolled_back_inside_them():
    @register_pass("t_attr_raises")
    def raises(gm, ctx):
        raise RuntimeError("broken on purpose")
    try:
        r = run("mlp", pipeline="dce,t_attr_raises", budget_s=0.02, ablate=True)
    finally:
        unregister_pass("t_attr_raises")
    rb = r.record["subset_rollbacks"]
    assert set(rb) == {"t_attr_raises", "dce+t_attr_raises"}
    assert all(x == [{"pass": "t_attr_raises", "status": "rolled_back",
                      "error": "RuntimeError: broken on purpose"}] for x in rb.values())
    from passlab.tools.table import pass_table
    assert "rolled back inside the attribution subsets:\n  t_attr_raises: t_attr_raises: RuntimeError" in \
        pass_table(r.record)


def test_run_record_has_every_field_with_shapley_and_ablation():
    r = run("mlp", pipeline="cse,dce", budget_s=0.05, ablate=True, shapley=True)
    rec = r.record
    assert rec["schema"] == 1 and rec["model"] == "mlp" and rec["pipeline"] == ["cse", "dce"]
    assert has_measurement(rec["baseline"])
    for s in rec["steps"]:
        assert STEP_FIELDS <= set(s)
        assert has_measurement(s) and s["numerics_ok"]
    assert set(rec["shapley"]) == {"cse", "dce"} and set(rec["ablation"]) == {"cse", "dce"}
    total = math.log(rec["steps"][-1]["throughput"] / rec["baseline"]["throughput"])
    # Shapley values are efficient up to measurement: the subsets are timed separately
    assert isinstance(rec["interaction"], float)
    assert all(math.isfinite(v) for v in rec["shapley"].values())


def test_cli_json_and_csv(tmp_path):
    j, c = tmp_path / "r.json", tmp_path / "r.csv"
    p = subprocess.run([sys.executable, "-m", "passlab.tools.cli", "run", "mlp", "--pipeline", "dce",
                        "--budget", "0.05", "--json", str(j), "--csv", str(c)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rec = json.loads(j.read_text())
    assert rec["steps"][0]["pass"] == "dce" and rec["machine"]["threads"] >= 1
    lines = c.read_text().splitlines()
    assert lines[0].startswith("pass,status") and lines[1].startswith("baseline") and lines[2].startswith("dce")


def test_mlir_peer_counts_elementwise_groups():
    from passlab.tools import mlir_peer
    if not mlir_peer.available():
        pytest.skip("torch-mlir not installed")
    from passlab.graphs import capture, load
    s = load("mlp", "tiny")
    gm = capture(s.module, s.example_inputs)
    c = mlir_peer.compare(s, gm, gm)
    assert c["elementwise_loops_after"] < c["elementwise_loops_before"]  # MLIR fused something
    assert c["passlab_before"] == 4  # 2 blocks x (gelu, add)


def test_autotune_picks_the_faster_candidate_once():
    from passlab.runtime import autotune
    autotune.clear()
    a = torch.randn(128, 128)
    calls = {"slow": 0}

    def slow():
        calls["slow"] += 1
        return a @ a @ a @ a @ a

    assert autotune.fastest("k", {"slow": slow, "fast": lambda: a + 1}) == "fast"
    n = calls["slow"]
    assert autotune.fastest("k", {"slow": slow, "fast": lambda: a + 1}) == "fast" and calls["slow"] == n


def test_autotune_choices_are_kept_on_disk_per_machine(monkeypatch):
    """A second process (here: the in-memory choices forgotten) reads the choice instead of timing again;
    PASSLAB_AUTOTUNE=fresh times it anew; a stored answer that is no candidate is measured again."""
    import json
    from passlab.runtime import autotune
    autotune.clear()
    a = torch.randn(64, 64)
    calls = {"slow": 0}

    def slow():
        calls["slow"] += 1
        return a @ a @ a @ a

    cands = {"slow": slow, "fast": lambda: a + 1}
    assert autotune.fastest(("disk", (64, 64), torch.float32), cands) == "fast" and calls["slow"] > 0
    stored = json.load(open(autotune.path("cpu")))
    assert stored == {repr(("disk", (64, 64), torch.float32)): "fast"}
    autotune._CHOICES.clear(), autotune._LOADED.clear()          # as a new process starts
    calls["slow"] = 0
    assert autotune.fastest(("disk", (64, 64), torch.float32), cands) == "fast" and calls["slow"] == 0
    assert autotune.fastest(("disk", (64, 64), torch.float32), {"slow": slow, "other": lambda: a + 1}) \
        == "other" and calls["slow"] > 0
    monkeypatch.setenv("PASSLAB_AUTOTUNE", "fresh")
    autotune._CHOICES.clear(), autotune._LOADED.clear()
    calls["slow"] = 0
    assert autotune.fastest(("disk", (64, 64), torch.float32), cands) == "fast" and calls["slow"] > 0
    autotune.clear()
    assert not os.path.exists(autotune.path("cpu"))
