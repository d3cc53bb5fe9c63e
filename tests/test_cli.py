"""`passlab run` at its edges: bad arguments fail before anything is measured,
Ctrl-C keeps what was measured, outputs are written atomically and one that
fails does not lose the others, a shrunken default pipeline is said, and
`--peers` runs on a tiny sample."""
import csv
import json
import os
import signal

import pytest

from passlab.passes import register_pass, unregister_pass
from passlab.tools import cli


@pytest.fixture
def no_measuring(monkeypatch):
    """Fails the test if the run starts (bad arguments must be found first)."""
    from passlab.tools import runner

    def run(*a, **k):
        raise AssertionError("the run started before its arguments were checked")
    monkeypatch.setattr(runner, "run", run)


def test_unknown_device_exits_2_naming_the_devices(no_measuring, capsys):
    assert cli.main(["run", "mlp", "--device", "tpu9"]) == 2
    err = capsys.readouterr().err
    assert "tpu9" in err and "cpu" in err and "cuda" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--json", "--csv", "--report"])
def test_unwritable_output_exits_2_before_measuring(flag, tmp_path, no_measuring, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = str(blocker / "sub" / "out")
    assert cli.main(["run", "mlp", flag, path]) == 2
    err = capsys.readouterr().err
    assert flag in err and path in err and "not a folder" in err


def test_output_that_is_a_directory_exits_2(tmp_path, no_measuring, capsys):
    assert cli.main(["run", "mlp", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.fixture
def sigint_pass():
    """A pass that sends this process SIGINT, as a Ctrl-C would, in the middle of a pipeline."""
    @register_pass("_sigint")
    def _sigint(gm, ctx):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000_000):     # the handler raises KeyboardInterrupt at the next bytecode
            pass
        raise AssertionError("SIGINT was not delivered")
    # Python's own Ctrl-C handler, whatever this process inherited (a job started in the
    # background by a non-interactive shell ignores SIGINT, and Python then keeps it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
    unregister_pass("_sigint")


def test_sigint_after_the_first_pass_leaves_valid_outputs(sigint_pass, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = cli.main(["run", "mlp", "--pipeline", "dce,_sigint,cse", "--no-measure", "--json", str(out),
                     "--csv", str(tmp_path / "run.csv")])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err
    rec = json.loads(out.read_text())
    assert [s["pass"] for s in rec["steps"]] == ["dce"] and rec["steps"][0]["status"] == "ok"
    assert "after 1 of 3 passes" in rec["interrupted"]
    rows = list(csv.reader(open(tmp_path / "run.csv")))
    assert [r[0] for r in rows[1:]] == ["baseline", "dce"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_interrupt_while_measuring_keeps_every_pass(tmp_path, monkeypatch, capsys):
    from passlab.tools import attribution

    def measure_run(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(attribution, "measure_run", measure_run)
    out = tmp_path / "run.json"
    assert cli.main(["run", "mlp", "--pipeline", "dce,cse", "--json", str(out)]) == 130
    assert "Traceback" not in capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert [s["pass"] for s in rec["steps"]] == ["dce", "cse"] and "measurement" in rec["interrupted"]


def test_interrupt_before_anything_ran_exits_130(monkeypatch, capsys):
    from passlab.tools import runner

    def run(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run", run)
    assert cli.main(["run", "mlp"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_failed_output_still_writes_the_others(tmp_path, monkeypatch, capsys):
    from passlab.tools import record

    def broken(rec, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(record, "write_json", broken)
    paths = [str(tmp_path / "run.json"), str(tmp_path / "run.csv"), str(tmp_path / "report")]
    code = cli.main(["run", "mlp", "--pipeline", "dce", "--no-measure", "--json", paths[0], "--csv", paths[1],
                     "--report", paths[2]])
    err = capsys.readouterr().err
    assert code == 1
    assert f"could not write {paths[0]}" in err and "No space left" in err
    assert os.path.exists(paths[1]) and os.path.exists(os.path.join(paths[2], "index.html"))


def test_outputs_are_replaced_atomically(tmp_path, monkeypatch):
    from passlab.tools import record
    path = tmp_path / "run.json"
    path.write_text('{"old": true}')

    def no_rename(src, dst):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "replace", no_rename)
    rec = {"baseline": {}, "steps": [{"pass": "x"}], "payload": "y" * 100_000}
    for write, name in ((record.write_json, "run.json"), (record.write_csv, "run.csv")):
        with pytest.raises(OSError):
            write(rec, str(tmp_path / name))
    assert json.loads(path.read_text()) == {"old": True}           # the old file is whole, not truncated
    assert sorted(os.listdir(tmp_path)) == ["run.json"]             # no temporary file left behind


def test_missing_default_pass_is_listed_and_said(tmp_path, monkeypatch, capsys):
    from passlab.passes import registry
    registry.load_builtin_and_plugins()
    monkeypatch.delitem(registry._PASSES, "fuse_attention")
    monkeypatch.setitem(registry.LOAD_ERRORS, "passlab.passes.patterns.attention", "ImportError: no module x")
    out = tmp_path / "run.json"
    assert cli.main(["run", "mlp", "--no-measure", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "without fuse_attention" in err and "ImportError: no module x" in err
    rec = json.loads(out.read_text())
    assert "fuse_attention" in rec["missing_default_passes"]
    assert "fuse_attention" not in rec["pipeline"]


def test_peers_on_a_tiny_sample(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert cli.main(["run", "mlp", "--pipeline", "cleanup,fuse", "--peers", "--budget", "0.2",
                     "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert set(rec["peers"]) >= {"eager", "torch.compile"}, rec["peers"]
    for name in ("eager", "torch.compile"):
        peer = rec["peers"][name]
        assert peer.get("throughput") and peer["throughput"] > 0, peer


def test_a_subcommand_that_does_not_import_says_why(monkeypatch, capsys):
    import importlib
    real = importlib.import_module

    def broken(name, *a, **kw):
        if name == "passlab.tools.simulate":
            raise ModuleNotFoundError("No module named 'some_optional_dep'")
        return real(name, *a, **kw)
    monkeypatch.setattr(importlib, "import_module", broken)
    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [])
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    monkeypatch.setattr(cli, "UNAVAILABLE", {})
    assert cli.main(["simulate", "tp_mlp", "--world-size", "4"]) == cli.FAILED
    err = capsys.readouterr().err
    assert "`passlab simulate` is unavailable" in err and "some_optional_dep" in err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "simulate" in capsys.readouterr().out and "unavailable" in cli.build_parser().format_help()
    assert cli.main(["list", "passes"]) == 0                     # the other commands still work
