"""Pass infrastructure: pipeline parser, pass manager rollback, CLI exit codes,
plugins installed as real packages, and the `new-pass` scaffold."""
from __future__ import annotations    # option types must come from string annotations too

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

from passlab.passes import (PassContext, PassManager, PassResult, PipelineError, PipelineFailed,
                            UnknownPassError, get_pass, parse, register_pass, unregister_pass)
from passlab.graphs import check_metadata, clone
from passlab.passes.contract import captured
from passlab.passes.manager import CheckNumerics, Snapshot, Statistics, VerifyGraph
from passlab.tools import cli, scaffold

aten = torch.ops.aten
HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_SRC = os.path.join(HERE, "plugins", "passlab_badpass")


# ---------------------------------------------------------------- pipeline parser

def test_parse_expands_aliases_and_types_options():
    steps = parse("cleanup, fold_constants(max_growth=2)")
    assert [s.name for s in steps] == ["dce", "cse", "remove_noops", "fold_constants", "fold_constants"]
    assert steps[-1].options == {"max_growth": 2.0} and isinstance(steps[-1].options["max_growth"], float)
    assert str(steps[-1]) == "fold_constants(max_growth=2.0)"
    assert parse("") == []


@pytest.mark.parametrize("text, message", [
    ("dce,remove_noop", r"unknown pass 'remove_noop'; did you mean 'remove_noops'\?"),
    ("csee", r"did you mean 'cse'\?"),
])
def test_unknown_pass_names_the_closest(text, message):
    with pytest.raises(UnknownPassError, match=message):
        parse(text)


@pytest.mark.parametrize("text, message", [
    ("fold_constants(max_growth=lots)", r"option max_growth of pass 'fold_constants': 'lots' is not a valid float"),
    ("fold_constants(growth=2)", r"pass 'fold_constants' has no option 'growth'; "
                                 r"allowed options: max_growth: float = 1.0"),
    ("dce(x=1)", r"pass 'dce' has no option 'x'; allowed options: none"),
    ("fold_constants(2)", r"needs key=value; allowed options: max_growth: float"),
    ("cleanup(x=1)", r"alias 'cleanup' takes no options"),
    ("dce,fold_constants(max_growth=2", r"unbalanced '\('"),
    ("dce,9lives", r"cannot parse pipeline item '9lives'"),
])
def test_bad_pipeline_says_what_is_allowed(text, message):
    with pytest.raises(PipelineError, match=message):
        parse(text)


@pytest.mark.parametrize("argv, message", [
    (["run", "mlp", "--pipeline", "dce,remove_noop", "--no-measure"], "did you mean 'remove_noops'"),
    (["run", "mlp", "--pipeline", "fold_constants(growth=2)", "--no-measure"], "allowed options: max_growth: float"),
    (["run", "mlpp", "--pipeline", "dce", "--no-measure"], "did you mean 'mlp'"),
    (["new-pass", "Not-A-Name"], "lower_snake_case"),
    (["new-pass", "dce"], "already exists"),
    (["run", "mlp", "--device", "tpu9", "--no-measure"], "use cpu or cuda"),
])
def test_cli_bad_arguments_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("passlab: error:") and message in err


# ---------------------------------------------------------------- pass manager

def first_call(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def raises(gm, ctx):
    raise RuntimeError("pattern matcher exploded")


def breaks_lint(gm, ctx):
    last = gm.graph.output_node().args[0]
    with gm.graph.inserting_before(first_call(gm, aten.addmm.default)):
        gm.graph.call_function(aten.neg.default, (last,)).meta["val"] = last.meta["val"]
    return gm


def drops_meta(gm, ctx):
    add = first_call(gm, aten.add.Tensor)
    with gm.graph.inserting_after(add):
        neg = gm.graph.call_function(aten.neg.default, (add,))
    with gm.graph.inserting_after(neg):
        twice = gm.graph.call_function(aten.neg.default, (neg,))
    add.replace_all_uses_with(twice, delete_user_cb=lambda u: u is not neg)
    return PassResult(gm, True, {"rewritten": 1})


def changes_numerics(gm, ctx):
    first_call(gm, aten.add.Tensor).target = aten.sub.Tensor
    gm.recompile()
    return gm


def returns_junk(gm, ctx):
    return 42


BROKEN = {"t_raises": raises, "t_breaks_lint": breaks_lint, "t_drops_meta": drops_meta,
          "t_changes_numerics": changes_numerics, "t_returns_junk": returns_junk}
REASONS = {"t_raises": "RuntimeError: pattern matcher exploded",
           "t_breaks_lint": "used before",
           "t_drops_meta": "PassRejected: nodes lost meta['val']: neg",
           "t_changes_numerics": "PassRejected: numerics changed: relative error",
           "t_returns_junk": "TypeError: a pass must return a GraphModule or a PassResult, got int"}


@pytest.fixture
def broken_passes():
    for name, fn in BROKEN.items():      # t_drops_meta claims to keep meta['val'] right itself, and does not
        register_pass(name, keeps_meta=name == "t_drops_meta")(fn)
    yield list(BROKEN)
    for name in BROKEN:
        unregister_pass(name)


@pytest.fixture(scope="module")
def mlp():
    return captured("mlp")


def manager(sample, pipeline, strict=False, snapshots=False):
    return PassManager(pipeline, strict=strict, instruments=[
        VerifyGraph(), CheckNumerics(sample.module, sample.make_inputs, "cpu", 1e-4), Statistics()]
        + ([Snapshot()] if snapshots else []))


def test_the_framework_ends_every_pass(mlp):
    """A pass body ends with its rewrite: lint, recompile and meta['val'] are the framework's (api.finish).
    `drops_meta` makes two nodes without meta['val'] and does not recompile; declared without keeps_meta,
    it is a correct pass."""
    register_pass("t_negate_twice")(drops_meta)
    try:
        s, gm = mlp
        res = get_pass("t_negate_twice")(clone(gm), PassContext(sample=s))
        assert res.changed and "neg" in res.gm.code and check_metadata(res.gm) == []
        step = manager(s, "t_negate_twice").run(clone(gm), PassContext(sample=s)).steps[0]
        assert step.status == "ok" and step.changed and step.numerics_ok, step.error
    finally:
        unregister_pass("t_negate_twice")


@pytest.mark.parametrize("snapshots", [False, True], ids=["copy_before_each_pass", "rollback_to_snapshot"])
def test_broken_passes_are_rolled_back_with_the_reason(mlp, broken_passes, snapshots):
    """Without snapshots each pass works on a copy; with them the passes share one working copy and a
    failed pass is rolled back to the snapshot before it. Either way the caller's graph is untouched."""
    s, gm = mlp
    pipeline = ",".join(n for b in broken_passes for n in (b, "dce")) + ",fold_constants"
    code = gm.code
    res = manager(s, pipeline, snapshots=snapshots).run(gm, PassContext(sample=s))
    assert gm.code == code and res.gm is not gm
    by_name = {r.name: r for r in res.steps if r.name.startswith("t_")}
    for name, rec in by_name.items():
        assert rec.status == "rolled_back" and not rec.changed, name
        assert REASONS[name] in rec.error, (name, rec.error)
    assert by_name["t_changes_numerics"].max_error == res.steps[0].max_error == 0.0   # the rolled-back graph's
    assert by_name["t_drops_meta"].stats["rewritten"] == 1          # what the pass counted is kept
    assert "Traceback" in by_name["t_raises"].stats["traceback"]
    ok = [r for r in res.steps if not r.name.startswith("t_")]
    assert all(r.status == "ok" for r in ok)
    assert res.steps[-1].name == "fold_constants" and res.steps[-1].changed        # the pipeline went on
    assert aten.permute.default not in [n.target for n in res.gm.graph.nodes]
    inputs = s.make_inputs(11)
    assert torch.allclose(res.gm(*inputs), s.module(*inputs), rtol=1e-5, atol=1e-6)
    if snapshots:       # a step that changed nothing shows the graph of the snapshot before it
        for prev, rec in zip([res.baseline] + res.steps, res.steps):
            assert (rec.snapshot is prev.snapshot) != (rec.changed and rec.status == "ok"), rec.name
        assert res.steps[-1].snapshot.code == res.gm.code


def test_strict_stops_and_keeps_everything_before(mlp, broken_passes):
    s, gm = mlp
    with pytest.raises(PipelineFailed, match="pass 't_changes_numerics' failed: PassRejected: numerics") as e:
        manager(s, "fold_constants,dce,t_changes_numerics,cse", strict=True).run(gm, PassContext(sample=s))
    baseline, records = e.value.records
    assert [r.name for r in records] == ["fold_constants", "dce", "t_changes_numerics"]
    assert [r.status for r in records] == ["ok", "ok", "failed"]
    assert records[0].changed and records[0].stats["constants"] == 4
    assert baseline.nodes == 12 and records[1].nodes == 8


def test_rolled_back_pass_is_reported_in_the_table(mlp, broken_passes):
    from passlab.tools import record as records
    from passlab.tools.table import pass_table
    s, gm = mlp
    res = manager(s, "dce,t_raises").run(gm, PassContext(sample=s))
    rec = records.build(model="mlp", preset="tiny", device="cpu", pipeline=["dce", "t_raises"],
                        baseline=res.baseline, steps=res.steps)
    table = pass_table(rec)
    assert "rolled_back" in table and "t_raises: RuntimeError: pattern matcher exploded" in table


def test_pass_options_reach_the_pass(mlp):
    seen = {}

    @register_pass("t_options")
    def with_options(gm, ctx, *, depth: int = 1, mode: str = "fast", on: bool = False,
                     limit: int | None = None, ratio: float = 1, tag=None):
        seen.update(depth=depth, mode=mode, on=on, limit=limit, ratio=ratio, tag=tag)
        return gm
    try:
        types = {k: o.type for k, o in get_pass("t_options").options.items()}
        assert types == {"depth": int, "mode": str, "on": bool, "limit": int, "ratio": float, "tag": str}
        s, gm = mlp
        manager(s, "t_options(depth=3,on=yes,limit=16,ratio=0.5)").run(gm, PassContext(sample=s))
        assert seen == {"depth": 3, "mode": "fast", "on": True, "limit": 16, "ratio": 0.5, "tag": None}
        with pytest.raises(PipelineError, match="'maybe' is not a valid bool"):
            parse("t_options(on=maybe)")
    finally:
        unregister_pass("t_options")


# ---------------------------------------------------------------- plugins, as installed packages

@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The test plugin built and installed into a private folder (not the venv),
    which subprocesses get on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True)
    assert list(site.glob("passlab_badpass-*.dist-info"))
    return site


def passlab(site, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    exe = os.path.join(os.path.dirname(sys.executable), "passlab")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "passlab.tools.cli"]
    return subprocess.Popen(cmd + list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def plugin_runs(plugin_site, tmp_path_factory):
    """`passlab list passes`, and a run with the wrong plugin pass with and
    without --strict, as a user would type them; run side by side to save time."""
    out = tmp_path_factory.mktemp("runs")
    run = ["run", "mlp", "--pipeline", "cleanup,bad_pass,recompose_silu", "--no-measure"]
    procs = {"list": passlab(plugin_site, "list", "passes"),
             False: passlab(plugin_site, *run, "--json", str(out / "lenient.json")),
             True: passlab(plugin_site, *run, "--json", str(out / "strict.json"), "--strict")}
    results = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[key] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    results["json"] = {False: out / "lenient.json", True: out / "strict.json"}
    return results


def test_installed_plugin_passes_are_listed(plugin_runs):
    r = plugin_runs["list"]
    assert r.returncode == 0, r.stderr
    assert "recompose_silu" in r.stdout and "bad_pass" in r.stdout and "dce" in r.stdout
    assert "cheaper_gelu" not in r.stdout        # a Pass keeps its own name, whatever the entry point says
    assert "plugin 'broken_plugin'" in r.stderr and "failed to load" in r.stderr   # warned, not fatal


@pytest.mark.parametrize("strict", [False, True])
def test_wrong_plugin_pass_is_rolled_back_and_strict_stops(plugin_runs, strict):
    r = plugin_runs[strict]
    assert r.returncode == (1 if strict else 0), r.stderr
    assert "bad_pass: PassRejected: numerics changed: relative error" in r.stdout
    rec = json.loads(plugin_runs["json"][strict].read_text())
    steps = {s["pass"]: s for s in rec["steps"]}
    assert [s["pass"] for s in rec["steps"][:4]] == ["dce", "cse", "remove_noops", "fold_constants"]
    assert all(s["status"] == "ok" for s in rec["steps"][:4])
    assert steps["bad_pass"]["status"] == ("failed" if strict else "rolled_back")
    assert "numerics changed" in steps["bad_pass"]["error"]
    if strict:
        assert "recompose_silu" not in steps and "(--strict)" in r.stderr
    else:
        assert steps["recompose_silu"]["status"] == "ok"


# ---------------------------------------------------------------- new-pass scaffold

@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "passes").mkdir()
    (tmp_path / "tests").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, why", [
    ("FusePass", "lower_snake_case"), ("fuse-pass", "lower_snake_case"), ("2fast", "lower_snake_case"),
    ("class", "lower_snake_case"), ("", "lower_snake_case"),
    ("dce", "already exists"), ("cleanup", "already exists"),
    ("parse", "would shadow passlab.passes.parse"), ("patterns", "would shadow"),
])
def test_scaffold_refuses_bad_names(checkout, name, why):
    with pytest.raises(ValueError, match=why):
        scaffold.new_pass(name, str(checkout))
    assert not any(checkout.rglob("*.py"))


def test_scaffold_refuses_to_overwrite_and_non_checkouts(checkout, tmp_path_factory):
    (checkout / "tests" / "test_pass_mine.py").write_text("# mine\n")
    with pytest.raises(ValueError, match="test_pass_mine.py already exists"):
        scaffold.new_pass("mine", str(checkout))
    assert not (checkout / "passes" / "mine.py").exists()
    with pytest.raises(ValueError, match="not a passlab checkout"):
        scaffold.new_pass("mine", str(tmp_path_factory.mktemp("empty")))


def test_scaffold_writes_into_the_checkout_you_stand_in(tmp_path, monkeypatch):
    """Not into the installed passlab: the checkout the current folder is in (or a clear error)."""
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "api.py").write_text("")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path / "docs")
    paths = scaffold.new_pass("mine_here", rewrite=True)
    assert paths == [str(tmp_path / "passes" / "mine_here.py"), str(tmp_path / "tests" / "test_pass_mine_here.py")]
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(ValueError, match="is not inside a passlab checkout.*--dir CHECKOUT"):
        scaffold.new_pass("mine_elsewhere")


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scaffolded_pass_registers_and_its_test_passes(checkout):
    paths = scaffold.new_pass("square_to_mul", str(checkout))
    assert paths == [str(checkout / "passes" / "square_to_mul.py"), str(checkout / "tests" / "test_pass_square_to_mul.py")]
    try:
        load_file("passlab.passes.square_to_mul", paths[0])
        p = get_pass("square_to_mul")
        assert p.options["max_rewrites"].default == -1 and p.options["max_rewrites"].type is int
        test = load_file("test_pass_square_to_mul", paths[1])
        test.test_registered()
        for model in test.test_contract.pytestmark[0].args[1]:
            test.test_contract(model)
        test.test_rewrites_where_its_pattern_occurs()
        test.test_option_limits_rewrites()
    finally:
        unregister_pass("square_to_mul")
        sys.modules.pop("passlab.passes.square_to_mul", None)


def test_scaffolded_plugin_package(tmp_path):
    paths = scaffold.new_pass("my_pass", str(tmp_path), plugin=True)
    pkg = tmp_path / "passlab-my-pass"
    assert sorted(paths) == sorted(str(pkg / f) for f in ("pyproject.toml", "passlab_my_pass.py",
                                                          "tests/test_my_pass.py"))
    meta = tomllib.loads((pkg / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["passlab.passes"] == {"my_pass": "passlab_my_pass:my_pass"}
    assert "import passlab_my_pass" in (pkg / "tests" / "test_my_pass.py").read_text()
    compile((pkg / "passlab_my_pass.py").read_text(), "passlab_my_pass.py", "exec")
