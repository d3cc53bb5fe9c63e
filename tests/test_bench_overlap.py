"""The overlap benchmark's tables from a result of the shape `distributed_run.bench`
and `simulate.compare_bench` return (no launch: the launch itself is tested
in test_distributed and test_simulator), and its argument errors."""
from __future__ import annotations

import pytest

from passlab.tools import bench_overlap
from passlab.tools.exits import BadArguments


def metrics(comm, exposed, compute, eff):
    return {"comm_s": comm, "exposed_comm_s": exposed, "compute_s": compute, "overlap_efficiency": eff}


def result(model="ep_mixtral", world=2):
    ranks = [{"rank": r, "step_s": {"captured": 10.0, "overlap_reorder": 9.0 + r, "overlap_chunk": 5.0},
              "metrics": {"captured": metrics(4.0, 4.0, 5.0, 0.0), "overlap_reorder": metrics(4.0, 4.0, 5.0, 0.0),
                          "overlap_chunk": metrics(5.0, 1.0, 4.5, 0.9)},
              "stats": {"overlap_chunk": {"k": {"a2a": 8, "a2a_2": 8}}},
              "error_vs_reference": {"captured": 0.0, "overlap_reorder": 0.0, "overlap_chunk": 1e-7}}
             for r in range(world)]
    link = {"probe": {"configured_one_way_s": 0.05, "measured_one_way_s": 0.051, "relative_error": 0.02}}
    pred = {"steps": [{"step": "captured", "step_s": 9.0, "error": -0.1},
                      {"step": "overlap_reorder", "step_s": 9.0, "error": -0.1},
                      {"step": "overlap_chunk", "step_s": 5.5, "error": 0.1}]}
    return {"model": model, "world": world, "bench": {"ranks": ranks, "link": link, "shapley": {
        "overlap_reorder": 0.08, "overlap_chunk": 0.6}, "interaction": -0.02, "total_log_gain": 0.66},
        "prediction": pred}


def test_rows_take_the_slowest_rank_and_the_run_chunk_factor():
    rows = bench_overlap.rows_of(result())
    assert [r["step"] for r in rows] == ["captured", "overlap_reorder", "overlap_chunk"]
    assert rows[1]["step_s"] == 10.0                      # rank 1's 10 s, not rank 0's 9 s
    assert rows[2]["k"] == {"a2a": 8, "a2a_2": 8} and rows[2]["max_error_vs_reference"] == 1e-7


def test_markdown_has_the_targets_the_error_and_shapley():
    text = bench_overlap.markdown([result(), {"model": "tp_mlp", "world": 4, "error": "RuntimeError: boom"}],
                                  "a machine", "2026-12-03")
    assert "| ep_mixtral | 2 | overlap_chunk k=8 | 5,000 | 2.00x |" in text
    assert "median absolute error 10.0% over 3 graphs" in text
    assert "50.0 / 51.0 ms (+2.0%)" in text and "| 2.00x | 75% | 0.90 |" in text   # chunk vs reorder, cut
    assert "interaction -0.020" in text and "failed: RuntimeError: boom" in text


def test_peers_beside_the_final_graph():
    r = result()
    for x in r["bench"]["ranks"]:
        x["peer_step_s"] = {"eager": 8.0, "torch.compile": 6.0, "torch.compile(freezing)": 4.0 + x["rank"]}
        x["peer_setup_s"] = {"torch.compile": 30.0, "torch.compile(freezing)": 20.0}
    assert bench_overlap.peers_row(r) == ["ep_mixtral", "2", "8,000", "6,000", "5,000", "5,000", "1.60x", "1.00x",
                                          "30 / 20"]
    assert "| ep_mixtral | 2 | 8,000 | 6,000 | 5,000 | 5,000 | 1.60x |" in bench_overlap.markdown([r], "m", "d")


def test_unknown_model_is_a_bad_argument(tmp_path):
    with pytest.raises(BadArguments, match="not distributed samples: mlp"):
        bench_overlap.main(["--models", "mlp", "--out", str(tmp_path)])


def test_traces_written_per_graph_and_drawn(tmp_path):
    import json
    r = result()
    for x in r["bench"]["ranks"]:
        x["trace"] = {"captured": [{"ph": "X", "cat": "compute", "name": "mm", "pid": x["rank"], "tid": "compute",
                                    "ts": 0.0, "dur": 5.0}],
                      "overlap_chunk (subset)": [{"ph": "X", "cat": "comm", "name": "a2a", "pid": x["rank"],
                                                  "tid": "comm", "ts": 1.0, "dur": 2.0}]}
    paths = bench_overlap.write_traces(r, str(tmp_path))
    assert [p.split("/")[-1] for p in paths] == ["ep_mixtral-w2-captured.trace.json", "ep_mixtral-w2-captured.svg",
                                                 "ep_mixtral-w2-overlap_chunk-alone.trace.json",
                                                 "ep_mixtral-w2-overlap_chunk-alone.svg"]
    tl = json.load(open(paths[0]))
    assert sorted(e["pid"] for e in tl["traceEvents"]) == [0, 1]          # both ranks in one trace
    svg = open(paths[1]).read()
    assert svg.startswith("<svg") and "rank 0" in svg and "rank 1" in svg


def test_ep_mixtral_is_ep_moe_at_mixtral_width():
    import torch
    from passlab.graphs import distributed, load
    assert distributed.PRESETS["ep_mixtral"]["bench"]["ffn"] == 14336       # Mixtral-8x7B's expert width
    s = load("ep_mixtral", "tiny")
    x = s.make_inputs(3)
    with torch.no_grad():
        assert s.name == "ep_mixtral" and torch.allclose(s.module(*x), s.module.reference(*x), atol=1e-5)


def with_rounds(r, reorder=(9.0, 9.5, 10.0, 9.2, 9.8), chunk=(5.0, 5.2, 4.9, 5.1, 5.3)):
    """Paired-round samples (each the slowest rank's), as `distributed_run.bench_rank` keeps them."""
    for x in r["bench"]["ranks"]:
        x["samples_s"] = {"captured": [10.0] * len(reorder), "overlap_reorder": list(reorder),
                          "overlap_chunk": list(chunk)}
    return r


def test_rows_name_machine_dtype_date_and_a_ci_on_the_ratio():
    text = bench_overlap.markdown([with_rounds(result())], "AMD EPYC, 2 cores", "2026-12-06 21:00 UTC",
                                  "bfloat16", "AMD EPYC (AVX512-BF16, VM)")
    row = next(l for l in text.splitlines() if "overlap_chunk k=8" in l and "| 5,000 |" in l)
    assert row.startswith("| AMD EPYC (AVX512-BF16, VM) | bfloat16 | 2026-12-06 | ep_mixtral | 2 |")
    ratio = row.split("|")[8].strip()                           # point (CI low–high) from the paired rounds
    point, ci = ratio.split(" ", 1)
    lo, hi = (float(v.rstrip("x)")) for v in ci.strip("(").split("–"))
    assert point == "1.86x" and lo <= 1.86 <= hi and lo > 1.0     # medians 9.5 / 5.1
    assert "median over 5 paired rounds" in text
    assert "chunking does not help" not in text                # a clear gain: no note


def test_where_chunking_cannot_help_the_text_says_so_with_the_best_estimate():
    r = with_rounds(result(), chunk=(9.1, 9.6, 10.1, 9.0, 9.9))
    for x in r["bench"]["ranks"]:
        x["step_s"]["overlap_chunk"] = 9.6
        x["stats"]["overlap_chunk"] = {"k": {}, "split": 0, "estimate": {"best_gain_vs_no_split": 1.04},
                                       "measured": {"chosen": "no split", "candidates": {
                                           "no split": {"median_s": 9.5}, "k=16": {"median_s": 15.1}}}}
    text = bench_overlap.markdown([r], "m", "2026-12-06 21:00 UTC", "bfloat16", "Intel Xeon (AMX)")
    note = next(l for l in text.splitlines() if "chunking does not help" in l)
    assert "ep_mixtral at W=2 on Intel Xeon (AMX) (bfloat16)" in note
    assert "kept no split (no split 9,500 ms, k=16 15,100 ms)" in note
    assert "best achievable gain from chunking is 1.04x (latency-bound at this scale" in note
    assert "102.0 ms per all_to_all" in note                  # two one-way latencies as probed (51 ms)


def test_readme_keeps_every_machine_kind(tmp_path):
    run = lambda kind, dtype: {"date": "2026-12-06 21:00 UTC", "machine": "m", "kind": kind, "dtype": dtype,
                               "results": [with_rounds(result())]}
    bench_overlap.kept_runs(run("Intel Xeon (AMX)", "bfloat16"), str(tmp_path))
    bench_overlap.kept_runs(run("AMD EPYC (AVX512-BF16, VM)", "float32"), str(tmp_path))
    runs = bench_overlap.kept_runs(run("Intel Xeon (AMX)", "bfloat16"), str(tmp_path))   # replaces its own
    assert [(r["kind"], r["dtype"]) for r in runs] == [("AMD EPYC (AVX512-BF16, VM)", "float32"),
                                                       ("Intel Xeon (AMX)", "bfloat16")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results-amd-epyc-avx512-bf16-vm-float32.json",
                                                          "results-intel-xeon-amx-bfloat16.json"]
    assert "trace" not in runs[0]["results"][0]["bench"]["ranks"][0]


def test_machine_kind_names_the_matrix_units():
    kind = bench_overlap.machine_kind()
    assert any(u in kind for u in ("AMX", "AVX512-BF16", "no bf16 units"))


def test_a_pass_rolled_back_on_the_link_says_so():
    r = result()
    for x in r["bench"]["ranks"]:
        x["stats"]["overlap_chunk"]["rolled_back"] = "slower on the emulated link: +12.0% (...)"
    rows = bench_overlap.rows_of(r)
    assert rows[2]["rolled_back"].startswith("slower on the emulated link")
    assert "| ep_mixtral | 2 | overlap_chunk (rolled back: slower) |" in bench_overlap.markdown([r], "m", "d")
