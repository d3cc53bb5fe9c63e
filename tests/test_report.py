"""The HTML report: built from a real pipeline run (with a fused kernel), self-
contained, and checked in headless Chromium (no console errors, every drawing
rendered, a non-blank screenshot)."""
import html
import os
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from passlab.passes import register_pass, unregister_pass
from passlab.tools import draw, record as records, report
from passlab.runtime.executor import fused_kernels
from passlab.tools.runner import Run, run

CHROMIUM = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
browser = pytest.mark.browser


@pytest.fixture(scope="module")
def run_with_fusion():
    """The tiny transformer through cse, the fusion engine and a no-op, with the
    measured numbers a measured run would add (the report draws them; their
    values are made up here and asserted only as drawn)."""
    @register_pass("test_report_noop")
    def noop(gm, ctx):
        return gm

    try:
        r = run("transformer", pipeline="cse,fuse,test_report_noop", measure=False)
    finally:
        unregister_pass("test_report_noop")
    result, sample = r.result, r.sample
    assert [s.status for s in result.steps] == ["ok", "ok", "ok"]
    tp = [1000.0, 1000.0, 1250.0, 1240.0]
    measured = {"baseline": {"throughput": tp[0], "ci_low": 980.0, "ci_high": 1020.0, "unit": "samples/s",
                             "median_s": 8e-3, "bound_s": 2e-3, "percent_of_bound": 25.0}}
    for i in range(3):
        measured[i] = {"throughput": tp[i + 1], "ci_low": tp[i + 1] * 0.97, "ci_high": tp[i + 1] * 1.03,
                       "unit": "samples/s", "median_s": 8e-3 / (tp[i + 1] / 1000), "bound_s": 1.8e-3,
                       "percent_of_bound": 1.8e-3 / (8e-3 / (tp[i + 1] / 1000)) * 100}
    timeline = [{"name": "forward", "ph": "X", "ts": 0, "dur": 800, "pid": rank, "tid": 0, "cat": "compute"}
                for rank in range(2)] + \
               [{"name": "all_reduce", "ph": "X", "ts": 800 + 50 * rank, "dur": 300, "pid": rank, "tid": 1,
                 "cat": "comm"} for rank in range(2)]
    extra = {"shapley": {"cse": 0.0, "fuse": 0.25, "test_report_noop": -0.01}, "interaction": -0.02,
             "ablation": {"cse": 1.0, "fuse": 1.22, "test_report_noop": 0.99},
             "peers": {"eager": {"throughput": 1100.0, "settings": "torch.no_grad()"},
                       "torch.compile": {"throughput": 1400.0, "settings": "default"}},
             "timeline": timeline}
    rec = records.build(model="transformer", preset="tiny", device="cpu", pipeline=["cse", "fuse", "test_report_noop"],
                        baseline=result.baseline, steps=result.steps, measured=measured, extra=extra)
    return Run(rec, result, sample, result.gm)


@pytest.fixture(scope="module")
def written(run_with_fusion, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = report.write(run_with_fusion.record, run_with_fusion, str(out))
    return path, open(path, encoding="utf-8").read()


def top_level_svgs(text: str) -> list[str]:
    return re.findall(r'<svg[^>]*\bid="([^"]+)"', text)


@needs_dot
def test_report_has_every_part(written, run_with_fusion):
    path, text = written
    assert path.endswith("index.html") and os.path.exists(os.path.join(os.path.dirname(path), "run.json"))
    ids = top_level_svgs(text)
    for chart in ("waterfall", "shapley", "ablation", "peers", "roofline", "timeline"):
        assert chart in ids, chart
    assert "interaction" in text and ">1.250×<" in text    # the fused step's bar is labelled with its speedup
    # before/after drawings of the two passes that changed the graph, the captured one, nothing for the no-op
    changed = [s["changed"] for s in run_with_fusion.record["steps"]]
    assert changed == [True, True, False]
    assert {"g0", "g1b", "g1a", "g2b", "g2a"} <= set(ids) and "g3b" not in ids
    assert "The pass left the graph as it was." in text
    assert "digraph" not in text                               # DOT is rendered, not pasted
    kernels = fused_kernels(run_with_fusion.gm)
    assert kernels
    for k in kernels:
        assert f"⚡ {k.name}" in text                          # the fused group's cluster in the after drawing
        assert f'id="kernel-{k.name}"' in text and html.escape(k.source("cpu")) in text   # its C++ source
    assert html.escape(kernels[0].source("cuda")) in text and "@triton.jit" in text         # and its Triton source
    assert "rank 0" in text and "rank 1" in text


def test_waterfall_and_table_start_at_eager(run_with_fusion, tmp_path):
    rec = dict(run_with_fusion.record, eager={"throughput": 800.0, "ci_low": 790.0, "ci_high": 810.0,
                                              "settings": "the module itself"},
               final_speedup_vs_eager=1.55, final_speedup_vs_eager_ci=[1.5, 1.6], setup_seconds=2.5)
    rec["baseline"] = dict(rec["baseline"], speedup_vs_eager=1.25, speedup_vs_eager_ci=[1.2, 1.3])
    text = report.summary(rec)
    labels = re.findall(r'<text[^>]*rotate[^>]*>([^<]+)</text>', text)
    assert labels[:3] == ["eager", "capture", "cse"] and labels[-1] == "final"
    assert ">1.250×<" in text          # capture's own bar: the captured graph over eager
    assert "1.550× (1.500–1.600)" in text and "2.5 s" in text
    table = report.pass_table(rec)
    assert table.index("eager (reference)") < table.index(">capture<") and "1.250× (1.200–1.300)" in table
    without = report.summary(run_with_fusion.record)      # no eager measured: the waterfall starts at the baseline
    assert re.findall(r'<text[^>]*rotate[^>]*>([^<]+)</text>', without)[0] == "baseline"


def test_report_is_self_contained(written):
    _, text = written
    assert not re.search(r'<(script|img|link|iframe)[^>]+(src|href)=', text), "no external resources"
    assert not re.search(r'url\((?!#)', text)
    assert "http://" not in re.sub(r'xmlns(:\w+)?="http://[^"]+"', "", text).replace("http://www.w3.org", "")


@needs_dot
def test_report_without_run_or_measurement(run_with_fusion, tmp_path):
    rec = dict(run_with_fusion.record)
    rec["baseline"] = dict(rec["baseline"], throughput=None)
    rec["steps"] = [dict(s, throughput=None, speedup_vs_prev=None) for s in rec["steps"]]
    rec.update(shapley=None, interaction=None, ablation=None, peers=None, timeline=None, final_speedup=None)
    text = open(report.write(rec, None, str(tmp_path))).read()
    assert "No graph snapshots" in text and "passlab show transformer --after" in text and "not measured" in text
    assert "kernel launches (static estimate)" in text, "the waterfall falls back to labelled estimates"
    assert "--shapley" in text


def test_report_without_graphviz_keeps_the_dot_text(run_with_fusion, tmp_path, monkeypatch):
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    text = open(report.write(run_with_fusion.record, run_with_fusion, str(tmp_path))).read()
    assert "Graphviz" in text and "apt-get install graphviz" in text
    assert "digraph passlab" in text and "waterfall" in text


@needs_dot
def test_large_graphs_collapse_to_the_same_depth(run_with_fusion, monkeypatch):
    before = run_with_fusion.result.baseline.snapshot
    after = run_with_fusion.gm
    monkeypatch.setattr(report, "GRAPH_MAX_NODES", 40)
    html, note = report.graph_pair(before, after, "x", "before", "after")
    assert "collapsed to module depth" in note
    depths = re.findall(r"collapsed to module depth (\d+)", html)
    assert len(set(depths)) == 1 and len(depths) >= 2


@needs_dot
def test_rolled_back_and_strict_failures_are_reported(tmp_path, capsys):
    from passlab.tools import cli

    @register_pass("test_report_broken")
    def broken(gm, ctx):
        raise ValueError("this pass is broken on purpose")

    try:
        r = run("mlp", pipeline="test_report_broken,dce", measure=False)
        text = open(report.write(r.record, r, str(tmp_path / "a"))).read()
        assert "rolled back: ValueError: this pass is broken on purpose" in text
        assert "<summary>traceback</summary>" in text and 'class="rolled_back"' in text
        # --strict stops the run: the report still draws the passes before the failure
        rc = cli.main(["run", "mlp", "--no-measure", "--strict", "--pipeline", "fold_constants,test_report_broken",
                       "--report", str(tmp_path / "b")])
    finally:
        unregister_pass("test_report_broken")
    assert rc == 1
    text = open(tmp_path / "b" / "index.html").read()
    assert 'id="g1a"' in text and 'class="failed"' in text and "this pass is broken on purpose" in text
    assert "index.html" in capsys.readouterr().err


def test_cli_report_prints_index_path(tmp_path, capsys):
    from passlab.tools import cli
    rc = cli.main(["run", "mlp", "--no-measure", "--pipeline", "dce", "--report", str(tmp_path / "rep")])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"wrote {tmp_path / 'rep' / 'index.html'}" in err


# ---------------------------------------------------------------- headless Chromium

def chromium(*args, tmp) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def page_problems(path: str, tmp) -> tuple[dict, list[str]]:
    """The <body> attributes the page's self-check set, and console errors."""
    p = chromium("--dump-dom", "--enable-logging=stderr", "--v=0", "file://" + path, tmp=tmp)
    body = re.search(r"<body([^>]*)>", p.stdout)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1))) if body else {}
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return attrs, console


def png_size_and_colours(path: str) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values in the decoded
    scanlines: a blank (one-colour) page has a handful whatever the filters."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    return w, h, len(set(zlib.decompress(idat)))


@browser
@needs_dot
@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_report_renders_in_chromium(written, tmp_path):
    path, text = written
    attrs, console = page_problems(path, tmp_path / "profile")
    assert attrs.get("data-ok") == "1", attrs.get("data-errors")
    assert int(attrs["data-drawings"]) >= len(top_level_svgs(text))
    assert console == []
    shot = str(tmp_path / "shot.png")
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", "file://" + path, tmp=tmp_path / "profile")
    w, h, colours = png_size_and_colours(shot)
    assert (w, h) == (1280, 2000) and colours > 64


@browser
@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_browser_check_catches_a_broken_page(tmp_path):
    js = open(os.path.join(report.ASSETS, "report.js")).read()
    bad = tmp_path / "bad.html"
    bad.write_text(f'<html><body><img src="missing.png" alt="gone"><svg width="0" height="0"></svg>'
                   f'<script>{js}</script><script>throw new Error("boom")</script></body></html>')
    attrs, console = page_problems(str(bad), tmp_path / "profile")
    assert attrs.get("data-ok") == "0" and "img gone" in attrs.get("data-errors", "")
    assert any("boom" in line for line in console)
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body style='background:#fff'></body></html>")
    shot = str(tmp_path / "blank.png")
    chromium(f"--screenshot={shot}", "--window-size=320,200", "file://" + str(blank), tmp=tmp_path / "profile")
    assert png_size_and_colours(shot)[2] <= 64
