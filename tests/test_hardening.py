"""What the kernel cache trusts, how generated kernels refuse wrong inputs,
that a fallback is reported as one, and that tests leave nothing behind.

The intact cache entries are built by another process where a test damages
them: damaging a library this process has mapped would crash it."""
import glob
import os
import stat
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

from passlab.runtime import codegen
from passlab.runtime.codegen import cpp, loading

from test_codegen import kernel_of, rel_err, rnd

FN = lambda a: torch.softmax(a * 1.5, -1)  # noqa: E731
FIRST_BUILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_codegen import kernel_of, rnd
from passlab.runtime import codegen
codegen.build([kernel_of(lambda a: torch.softmax(a * 1.5, -1), rnd(5, 11))], "cpu")
"""
EVIL = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void evil(void) {
  FILE *f = fopen(getenv("PASSLAB_EVIL_MARK"), "w"); if (f) { fputs("ran", f); fclose(f); }
}
extern "C" void %s(void **a) { (void)a; }
"""


def first_build(cache) -> str:
    """Build the softmax kernel into `cache` in another process; its .so path."""
    subprocess.run([sys.executable, "-c", FIRST_BUILD.format(tests=os.path.dirname(__file__))],
                   env=dict(os.environ, PASSLAB_CACHE=str(cache)), check=True)
    return glob.glob(str(cache / "*.so"))[0]


# --------------------------------------------------------------------- the cache directory

def test_world_writable_cache_dir_is_refused(tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("PASSLAB_CACHE", str(shared))
    x = rnd(3, 21)
    out = codegen.runner(kernel_of(FN, x), "cpu")(x)
    assert rel_err(out, FN(x)) <= 1e-5
    assert os.listdir(shared) == []                      # nothing written (or read) there
    err = capsys.readouterr().err
    assert str(shared) in err and "others write" in err and "private temporary directory" in err
    assert codegen.cache_dir().startswith(codegen.private_dir())


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_cache_dir_owned_by_someone_else_is_refused(tmp_path, monkeypatch, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 4242, 4242)
    monkeypatch.setenv("PASSLAB_CACHE", str(theirs))
    assert codegen.cache_dir() != str(theirs)
    assert "owned by uid 4242" in capsys.readouterr().err


def test_own_private_cache_dir_is_used(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    monkeypatch.setenv("PASSLAB_CACHE", str(mine))
    assert codegen.cache_dir() == str(mine) and stat.S_IMODE(os.stat(mine).st_mode) == 0o700


# --------------------------------------------------------------------- entries: signed, verified, private copies

def test_tampered_library_with_a_matching_plain_hash_is_not_loaded(tmp_path, monkeypatch):
    import hashlib
    so = first_build(tmp_path / "cache")
    fk = kernel_of(FN, rnd(5, 11))
    evil_src, evil_so = tmp_path / "evil.cpp", tmp_path / "evil.so"
    evil_src.write_text(EVIL % cpp.symbol(fk))
    subprocess.run([codegen.compiler(), "-shared", "-fPIC", str(evil_src), "-o", str(evil_so)], check=True)
    data = evil_so.read_bytes()
    open(so, "wb").write(data)
    for sidecar in (".sha256", ".hmac"):                 # whatever sidecar a reader might check
        open(so[:-3] + sidecar, "w").write(hashlib.sha256(data).hexdigest())
    mark = tmp_path / "mark"
    monkeypatch.setenv("PASSLAB_EVIL_MARK", str(mark))
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))
    before = codegen.STATS["compiles"]
    x = rnd(5, 11, seed=3)
    out = codegen.runner(fk, "cpu")(x)
    assert not mark.exists(), "the tampered library's constructor ran"
    assert codegen.STATS["compiles"] == before + 1 and rel_err(out, FN(x)) <= 1e-5


def test_libraries_load_from_a_private_verified_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))
    fk = kernel_of(lambda a: torch.tanh(a) * 3, rnd(4, 13))
    lib = codegen.runner(fk, "cpu").keepalive
    where = os.path.dirname(lib._name)
    assert where.startswith(codegen.private_dir()) and not lib._name.startswith(str(tmp_path))
    st = os.stat(where)
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700


def test_an_entry_signed_under_another_key_is_rebuilt(tmp_path, monkeypatch):
    so = first_build(tmp_path / "cache")
    assert codegen.verified_entry(so, so[:-3] + ".hmac") is not None
    monkeypatch.setenv("PASSLAB_KEY_FILE", str(tmp_path / "other-user" / "cache.key"))
    assert codegen.verified_entry(so, so[:-3] + ".hmac") is None
    key = tmp_path / "other-user" / "cache.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and stat.S_IMODE(os.stat(key.parent).st_mode) == 0o700


def test_cache_key_names_the_compiler_and_the_isa(tmp_path, monkeypatch):
    real = codegen.compiler()
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "other compiler 99.1"; exit 0; fi\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    flags = tuple(cpp.FLAGS)
    ours, other = codegen.toolchain(real, flags), codegen.toolchain(str(wrapper), flags)
    assert ours != other and "other compiler 99.1" in other
    assert "-march=" in ours and "native" not in ours.splitlines()[-1]     # what native resolves to
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))
    x = rnd(6, 7)
    codegen.runner(kernel_of(lambda a: a.exp() + 2, x), "cpu")
    before = codegen.STATS["compiles"]
    monkeypatch.setenv("CXX", str(wrapper))
    codegen.runner(kernel_of(lambda a: a.exp() + 2, x), "cpu")          # same source, other compiler
    assert codegen.STATS["compiles"] == before + 1
    assert len(glob.glob(str(tmp_path / "cache" / "*.so"))) == 2


def build_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "passlab-build-*")))


def test_compiler_timeout_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    slow = tmp_path / "slow-cxx"
    slow.write_text('#!/bin/sh\nfor a; do case "$a" in --version|--help=target) echo slow 1.0; exit 0;; esac; done\n'
                    'exec sleep 30\n')
    slow.chmod(0o755)
    monkeypatch.setenv("CXX", str(slow))
    monkeypatch.setenv("PASSLAB_CXX_TIMEOUT", "0.5")
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))
    before = build_dirs()
    with pytest.raises(codegen.CompileError, match="did not finish .* within 0.5s .*PASSLAB_CXX_TIMEOUT"):
        codegen.runner(kernel_of(lambda a: a * 7 - 1, rnd(3, 3)), "cpu")
    assert build_dirs() <= before and os.listdir(tmp_path / "cache") == []


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(codegen.CompileError, match="cannot run the C\\+\\+ compiler .*set CXX"):
        codegen.runner(kernel_of(lambda a: a * 5, rnd(3, 3)), "cpu")


def test_failed_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def no_rename(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        codegen.atomic_write(str(tmp_path / "entry.so"), b"x" * 1000)
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))
    x = rnd(4, 4)
    out = codegen.runner(kernel_of(lambda a: a * 9 + 1, x), "cpu")(x)   # an unwritable cache: used uncached
    assert torch.allclose(out, x * 9 + 1) and os.listdir(tmp_path / "cache") == []


def test_triton_module_runs_the_generated_text_not_the_file(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))
    mark = tmp_path / "mark"
    write = codegen.atomic_write

    def raced(path, data):    # someone swaps the file right after it is written
        write(path, data)
        with open(path, "w") as f:
            f.write(f"open({str(mark)!r}, 'w').write('ran')\n")
    monkeypatch.setattr(loading, "atomic_write", raced)   # where the module writer reads it
    x = rnd(3, 17)
    fn = lambda a: torch.sigmoid(a) * 0.25 + a  # noqa: E731
    out = codegen.runner(kernel_of(fn, x), "triton")(x)
    assert not mark.exists() and rel_err(out, fn(x)) <= 1e-5


# --------------------------------------------------------------------- generated kernels check their inputs

@pytest.mark.parametrize("device", ["cpu", "triton"])
def test_kernels_refuse_inputs_they_were_not_generated_for(device, monkeypatch):
    if device == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn = lambda a, b: torch.relu(a) * b  # noqa: E731
    a, b = rnd(4, 16), rnd(16, seed=1)
    run = codegen.runner(kernel_of(fn, a, b), device)
    assert rel_err(run(a, b), fn(a, b)) <= 1e-5
    for bad, what in (((rnd(2, 16), b), "[2, 16]:float32"),            # smaller: would read out of bounds
                      ((rnd(8, 16), b), "[8, 16]:float32"),            # larger: would be truncated
                      ((a.double(), b), "[4, 16]:float64"),
                      ((a, rnd(4, 16)), "[4, 16]:float32")):
        with pytest.raises(codegen.KernelInputError, match="generated for inputs") as e:
            run(*bad)
        assert "[4, 16]:float32, [16]:float32" in str(e.value) and what in str(e.value)
    with pytest.raises(codegen.KernelInputError, match="1 inputs instead of 2"):
        run(a)


# --------------------------------------------------------------------- fallbacks are reported

class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 40), nn.Linear(40, 16)

    def forward(self, x):
        return x + self.out(torch.nn.functional.gelu(self.fc(x)))


def test_gemm_template_off_cuda_counts_and_reports_its_aten_launches():
    from passlab.graphs import capture
    from passlab.passes import PassContext, get_pass
    from passlab.runtime.costmodel import node_cost
    m, x = FFN().eval(), torch.randn(2, 5, 16)
    gm = get_pass("fuse_epilogue")(capture(m, (x,)), PassContext(device="cuda")).gm
    nodes = {n.target.name: n for n in gm.graph.nodes if getattr(n.target, "is_gemm_template", False)}
    assert set(nodes) == {"gemm_bias_gelu", "gemm_bias_residual"}
    assert node_cost(nodes["gemm_bias_gelu"]).launches == 2       # addmm + gelu, not one fused launch
    assert node_cost(nodes["gemm_bias_residual"]).launches == 2   # addmm + add
    assert "ATen reference on cpu (addmm, gelu: 2 launches)" in nodes["gemm_bias_gelu"].target.fallback(
        nodes["gemm_bias_gelu"])


def test_run_record_lists_aten_fallbacks():
    from passlab.graphs import load
    from passlab.passes import PassContext, get_pass, register_pass, unregister_pass
    from passlab.tools.runner import run

    @register_pass("_epilogue_for_cuda")
    def _epilogue_for_cuda(gm, ctx):
        return get_pass("fuse_epilogue")(gm, PassContext(device="cuda", options={}))
    try:
        r = run(load("mlp", "tiny"), pipeline="_epilogue_for_cuda", measure=False)
    finally:
        unregister_pass("_epilogue_for_cuda")
    step = r.record["steps"][0]
    assert step["status"] == "ok", step["error"]
    assert r.record["aten_fallbacks"] and all("ATen reference on cpu" in v
                                              for v in r.record["aten_fallbacks"].values())
    assert step["launches"] == r.record["baseline"]["launches"]   # nothing really fused on CPU


# --------------------------------------------------------------------- hermetic tests (conftest)

def test_tests_use_a_private_cache_and_key():
    home = os.path.join(os.path.expanduser("~"), ".cache", "passlab")
    assert os.environ["PASSLAB_CACHE"] != home and os.environ["PASSLAB_CACHE"].startswith(tempfile.gettempdir())
    assert os.environ["PASSLAB_KEY_FILE"].startswith(tempfile.gettempdir())


LINK_BEFORE = os.environ.get("PASSLAB_DIST_LINK")


def test_leaky_test_part_1_sets_env_and_a_fake_world():
    os.environ["PASSLAB_DIST_LINK"] = "rate=1MB;latency=1ms"      # as a spawned rank has it
    from passlab.tools.simulate import fake_world
    fake_world(64)


def test_leaky_test_part_2_sees_none_of_it():
    import torch.distributed as dist
    assert os.environ.get("PASSLAB_DIST_LINK") == LINK_BEFORE
    assert not dist.is_initialized() or dist.get_world_size() == 1
