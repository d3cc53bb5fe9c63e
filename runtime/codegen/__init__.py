"""Code generation: two thin printers over one kernel description, and `build`.

`EXPR` is the one op -> expression table both printers read (C++ format,
Triton format). `build(kernels, device)` prepares every kernel of a graph:
for "cpu" all C++ kernels go into ONE source file and ONE compiler call
(`-O3 -march=native -fopenmp`), cached on disk by the source hash under
`$PASSLAB_CACHE` (default `~/.cache/passlab`); for "cuda" each graph's Triton
kernels go into one module file. Cache entries are written to a temporary
file and renamed into place, and are trusted only when their content hash
(a sidecar file) matches and the library loads with every expected symbol;
anything else is rebuilt.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import torch

# primitive -> (C++ format, Triton format)
EXPR = {
    "add": ("({0} + {1})", "({0} + {1})"),
    "sub": ("({0} - {1})", "({0} - {1})"),
    "mul": ("({0} * {1})", "({0} * {1})"),
    "div": ("((float){0} / (float){1})", "({0}.to(tl.float32) / {1})"),
    "maximum": ("pl_max({0}, {1})", "tl.maximum({0}, {1})"),
    "minimum": ("pl_min({0}, {1})", "tl.minimum({0}, {1})"),
    "neg": ("(-{0})", "(-{0})"),
    "exp": ("pl_exp({0})", "tl.exp({0})"),
    "log": ("pl_log({0})", "tl.log({0})"),
    "sqrt": ("sqrtf({0})", "tl.sqrt({0})"),
    "rsqrt": ("(1.0f / sqrtf({0}))", "tl.rsqrt({0})"),
    "recip": ("(1.0f / {0})", "(1.0 / {0})"),
    "abs": ("pl_abs({0})", "tl.abs({0})"),
    "tanh": ("pl_tanh({0})", "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)"),
    "sigmoid": ("pl_sigmoid({0})", "tl.sigmoid({0})"),
    "erf": ("pl_erf({0})", "tl.erf({0})"),
    "sin": ("sinf({0})", "tl.sin({0})"),
    "cos": ("cosf({0})", "tl.cos({0})"),
    "floor": ("floorf({0})", "tl.floor({0})"),
    "ceil": ("ceilf({0})", "tl.ceil({0})"),
    "trunc": ("truncf({0})", "tl.where({0} < 0, tl.ceil({0}), tl.floor({0}))"),
    "eq": ("({0} == {1})", "({0} == {1})"),
    "ne": ("({0} != {1})", "({0} != {1})"),
    "lt": ("({0} < {1})", "({0} < {1})"),
    "le": ("({0} <= {1})", "({0} <= {1})"),
    "gt": ("({0} > {1})", "({0} > {1})"),
    "ge": ("({0} >= {1})", "({0} >= {1})"),
    "not": ("(!{0})", "({0} == 0)"),
    "and": ("({0} && {1})", "({0} & {1})"),
    "or": ("({0} || {1})", "({0} | {1})"),
    "where": ("({0} ? {1} : {2})", "tl.where({0}, {1}, {2})"),
}
CAST = {  # value type -> (C++ cast, Triton cast)
    "f": ("(float)({0})", "({0}).to(tl.float32)"),
    "i": ("(int64_t)({0})", "({0}).to(tl.int64)"),
    "b": ("(({0}) != 0)", "(({0}) != 0)"),
}


def kernel_symbol(body, fk) -> str:
    """A kernel's exported name: a hash of the body a printer makes for it, so
    the name, the cache key and the source agree for every printer."""
    return "pl_" + hashlib.sha256(body(fk, "KERNEL").encode()).hexdigest()[:16]


def printer(device: str):
    if device == "cpu":
        from . import cpp
        return cpp
    from . import triton as tr
    return tr


def cache_dir() -> str:
    d = os.environ.get("PASSLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "passlab")
    os.makedirs(d, exist_ok=True)
    return d


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


STATS = {"compiles": 0, "cache_hits": 0}


def build(kernels, device: str = "cpu") -> None:
    """Compile every kernel of a graph for `device` and attach a runner to each.

    "cpu" prints C++, "cuda" prints Triton; "triton" prints Triton for
    whatever device the tensors are on (CPU tensors need TRITON_INTERPRET=1)."""
    dev = "cuda" if str(device).startswith("cuda") else device
    todo = [k for k in kernels if dev not in k._compiled]
    if not todo:
        return
    if dev == "cpu":
        build_cpu(todo)
    else:
        build_triton(todo, dev)


def runner(fk, device: str = "cpu"):
    """The compiled callable of one kernel for `device` (built on first use)."""
    build([fk], device)
    return fk._compiled["cuda" if str(device).startswith("cuda") else device]


def build_cpu(kernels) -> None:
    from . import cpp
    bodies = {}
    for k in kernels:
        bodies.setdefault(cpp.symbol(k), k.source("cpu"))
    text = cpp.HEADER + "\n\n".join(bodies[s] for s in sorted(bodies)) + "\n"
    h = digest(text + " ".join(cpp.FLAGS))
    lib = load_cached_library(h, text, list(bodies))
    for k in kernels:
        fn = getattr(lib, cpp.symbol(k))
        fn.argtypes, fn.restype = [ctypes.c_void_p], None
        k._compiled["cpu"] = make_runner(k, fn, "cpu", lib)


def load_cached_library(h: str, text: str, symbols: list[str]):
    base = os.path.join(cache_dir(), h[:32])
    so, sig = base + ".so", base + ".sha256"
    lib = trusted_library(so, sig, symbols)
    if lib is not None:
        STATS["cache_hits"] += 1
        return lib
    compile_library(text, so, sig)
    lib = trusted_library(so, sig, symbols)
    if lib is None:
        raise RuntimeError(f"compiled library {so} does not load or lacks its kernels")
    return lib


def trusted_library(so: str, sig: str, symbols: list[str]):
    try:
        with open(sig) as f:
            want = f.read().strip()
    except OSError:
        return None
    if file_digest(so) != want:
        return None
    try:
        lib = ctypes.CDLL(so)
    except OSError:
        return None
    return lib if all(hasattr(lib, s) for s in symbols) else None


def compile_library(text: str, so: str, sig: str) -> None:
    from . import cpp
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    with tempfile.TemporaryDirectory(dir=os.path.dirname(so)) as tmp:
        src, out = os.path.join(tmp, "kernels.cpp"), os.path.join(tmp, "kernels.so")
        with open(src, "w") as f:
            f.write(text)
        proc = subprocess.run([cxx, *cpp.FLAGS, src, "-o", out], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"C++ kernel compilation failed:\n{proc.stderr[-4000:]}")
        with open(out, "rb") as f:
            data = f.read()
    STATS["compiles"] += 1
    atomic_write(so, data)   # concurrent builders (ranks) write identical bytes; each rename is atomic
    atomic_write(sig, hashlib.sha256(data).hexdigest().encode())


def build_triton(kernels, dev: str = "cuda") -> None:
    from . import triton as tr
    bodies = {}
    for k in kernels:
        bodies.setdefault(tr.symbol(k), k.source("cuda"))
    text = tr.HEADER + "\n\n".join(bodies[s] for s in sorted(bodies)) + "\n"
    h = digest(text)
    path = os.path.join(cache_dir(), f"triton_{h[:32]}.py")
    if file_digest(path) != digest(text):
        atomic_write(path, text.encode())
    name = f"passlab_triton_{h[:16]}"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    for k in kernels:
        k._compiled[dev] = make_runner(k, getattr(mod, tr.symbol(k)), dev, mod)


def same_layout(t, strides) -> bool:
    """Strides agree wherever they matter (dims of size 1 are never stepped along)."""
    return all(a == b for a, b, n in zip(t.stride(), strides, t.shape) if n > 1)


def make_runner(fk, fn, device: str, keepalive):
    """The per-call path: fix up input strides, allocate outputs, launch."""
    k = fk.kernel
    expect = [b.strides for b in k.inputs]
    outs = [(b.shape, b.strides, b.dtype) for b in k.outputs]
    n_in, n_out = len(expect), len(outs)
    multi = fk.multi_output
    empty = torch.empty_strided
    if device == "cpu":
        arr_t = ctypes.c_void_p * (n_in + n_out)

        def launch(ins, res):
            fn(arr_t(*[t.data_ptr() for t in ins], *[t.data_ptr() for t in res]))
    else:
        from . import triton as tr
        rblock, xblock = tr.rblock(k), tr.xblock(k)
        grid = (max(1, -(-k.m_size // xblock)),)

        def launch(ins, res):
            fn[grid](*ins, *res, XBLOCK=xblock, RBLOCK=rblock)

    home = torch.device("cuda" if device == "cuda" else "cpu")

    def run(*inputs):
        ins = list(inputs)
        for i in range(n_in):
            t = ins[i]
            if t.stride() != expect[i] and not same_layout(t, expect[i]):
                ins[i] = empty(t.shape, expect[i], dtype=t.dtype, device=t.device).copy_(t)
        dev = ins[0].device if ins else home
        res = [empty(s, st, dtype=dt, device=dev) for s, st, dt in outs]
        launch(ins, res)
        return tuple(res) if multi else res[0]

    run.keepalive = keepalive
    return run


from . import cpp, triton  # noqa: E402  (the printers read EXPR/CAST above)
