"""The benchmark runner: its table (failures shown with their reason, a missing
bound as n/a, the zoo's geomean and worst), the README block, and one real
model measured with every contender (structure only, never speed)."""
import math

import pytest

from passlab.tools import bench


def ok_row(model, eager=100.0, passlab=120.0, compile_=110.0, freezing=130.0, bound=25.0):
    def c(tp, **kw):
        return {"throughput": tp, "ci_low": tp * 0.98, "ci_high": tp * 1.02, "speedup_vs_eager": tp / eager,
                "speedup_vs_eager_ci": [tp / eager * 0.97, tp / eager * 1.03], **kw}
    best = max(compile_, freezing)
    return {"model": model, "status": "ok", "dtype": "float32", "unit": "tokens/s", "setup_seconds": 4.0,
            "guard": "final", "percent_of_bound": bound,
            "contenders": {"eager": c(eager), "torch.compile": c(compile_, compile_s=3.0),
                           "torch.compile(freezing)": c(freezing, compile_s=3.5), "captured": c(eager * 0.9),
                           "passlab": c(passlab)},
            "best_compile": "torch.compile(freezing)" if freezing >= compile_ else "torch.compile",
            "passlab_vs_best_compile": [passlab / best, passlab / best * 0.97, passlab / best * 1.03]}


def test_table_shows_failures_with_their_reason_and_missing_bounds_as_na():
    rows = [ok_row("llama", bound=None), {"model": "moe", "status": "failed", "error": "CaptureError: no graph"},
            ok_row("mlp")]
    table = bench.summary_table(rows)
    lines = table.splitlines()
    assert [l.split()[0] for l in lines[2:]] == ["llama", "moe", "mlp"]     # no row dropped
    assert "failed: CaptureError: no graph" in lines[3]
    assert lines[2].rstrip().endswith("n/a") and "0%" not in lines[2]
    assert lines[4].rstrip().endswith("25%")
    assert "1.20x (1.16–1.24)" in lines[2]                                  # passlab/eager with its CI
    assert "0.92x" in lines[2]                                              # passlab/best compile (freezing)
    assert "4.0 / 3.0 / 3.5" in lines[2]                                    # setup: passlab / compile / freezing


def test_a_model_passlab_fails_on_keeps_the_peers_numbers():
    row = ok_row("zoo:x")
    row.update(status="failed", error="passlab.optimize: CaptureError: data-dependent branch")
    for k in ("captured", "passlab"):
        del row["contenders"][k]
    (cells,) = bench.table_rows([row])
    h = bench.HEADERS
    assert cells[h.index("eager")] == "100" and cells[h.index("torch.compile")] == "110 (1.10x)"
    assert cells[h.index("passlab")] == "failed: passlab.optimize: CaptureError: data-dependent branch"
    assert cells[h.index("passlab/eager")] == "–"


def test_zoo_rows_get_a_geomean_and_a_worst_line():
    rows = [ok_row("zoo:a", passlab=200.0), ok_row("zoo:b", passlab=50.0),
            {"model": "zoo:c", "status": "failed", "error": "could not build"}]
    summary = bench.zoo_summary(rows)
    (geo, worst) = summary
    assert geo[0] == "zoo (2/3 ran) geomean" and worst[0] == "zoo (2/3 ran) worst"
    i = bench.HEADERS.index("passlab/eager")
    assert geo[i] == f"{math.sqrt(2.0 * 0.5):.2f}x" and worst[i] == "0.50x (zoo:b)"
    text = bench.markdown(rows, {"cpu": "test cpu"}, "2026-12-03")
    assert "failed: could not build" in text and "zoo (2/3 ran) geomean" in text


def test_readme_block_is_replaced_and_nothing_else(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(f"# title\n\nintro\n\n{bench.START}\nold table\n{bench.END}\n\n## after\n")
    bench.write_readme("new table", str(p))
    text = p.read_text()
    assert text == f"# title\n\nintro\n\n{bench.START}\nnew table\n{bench.END}\n\n## after\n"


def test_model_list_without_zoo_says_so_and_bad_names_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(bench, "zoo_names", lambda: None)
    ap, args = bench.parse_args([])
    models, note = bench.model_list(args, ap)
    assert models == bench.MODELS + bench.SERVING and "zoo" in note and "not installed" in note
    ap, args = bench.parse_args(["--models", "llama,lama_decode"])
    with pytest.raises(SystemExit) as e:
        bench.model_list(args, ap)
    assert e.value.code == 2 and "did you mean 'llama_decode'" in capsys.readouterr().err


def test_a_model_that_fails_is_a_failed_row(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = bench.main(["--models", "zoo:no_such_model", "--quick", "--out", str(tmp_path / "out")])
    assert rc == 1                                   # nothing ran
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| zoo:no_such_model |" in text and "failed: UnknownModelError" in text
    assert "Partial" not in text and "Preset tiny" in text


@pytest.mark.slow
def test_one_model_has_every_contender_with_consistent_ratios():
    row = bench.measure_model("mlp", "tiny", budget_s=0.05)
    assert row["status"] == "ok"
    c = row["contenders"]
    assert set(c) == set(bench.CONTENDERS)
    eager = c["eager"]["throughput"]
    for name in bench.CONTENDERS:
        assert c[name]["speedup_vs_eager"] == pytest.approx(c[name]["throughput"] / eager)
        lo, hi = c[name]["speedup_vs_eager_ci"]
        assert lo <= c[name]["speedup_vs_eager"] <= hi
    assert c["torch.compile"]["compile_s"] > 0 and c["torch.compile(freezing)"]["compile_s"] > 0
    best = row["best_compile"]
    assert row["passlab_vs_best_compile"][0] == pytest.approx(c["passlab"]["throughput"] / c[best]["throughput"])
    assert row["setup_seconds"] > 0 and (row["percent_of_bound"] is None or row["percent_of_bound"] > 0)
    assert "failed" not in bench.summary_table([row])
