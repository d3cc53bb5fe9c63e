"""Building and loading: every kernel of a graph compiled for a device and a
runner attached to each. For "cpu" all C++ kernels go into ONE source file and
ONE compiler call; the library comes from the cache only when its sidecar
verifies (`trust.verified_entry`), and the bytes verified are the bytes
loaded: they are copied into this process's private 0700 directory,
re-hashed there and that copy is opened. For "cuda" each graph's Triton
kernels go into one module, executed from the text generated in this process
(the copy written to the cache is for reading only, never read back)."""
from __future__ import annotations

import ctypes
import hashlib
import linecache
import os
import sys
import tempfile
import types

from . import cpp
from .cxx import CompileError, compile_library, compiler, toolchain
from .runners import make_runner
from .trust import atomic_write, cache_dir, digest, entry_mac, entry_paths, file_digest, private_dir, \
    verified_entry, warn_once

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
    bodies = {}
    for k in kernels:
        bodies.setdefault(cpp.symbol(k), k.source("cpu"))
    text = cpp.HEADER + "\n\n".join(bodies[s] for s in sorted(bodies)) + "\n"
    cxx, flags = compiler(), tuple(cpp.FLAGS)
    h = digest(text + "\0" + toolchain(cxx, flags))
    lib = load_cached_library(h, text, list(bodies), cxx, flags)
    for k in kernels:
        fn = getattr(lib, cpp.symbol(k))
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
        k._compiled["cpu"] = make_runner(k, fn, "cpu", lib)


_LOADED: dict[tuple, ctypes.CDLL] = {}   # (cache dir, key) -> library loaded in this process


def load_cached_library(h: str, text: str, symbols: list[str], cxx: str, flags):
    d = cache_dir()
    if (d, h) in _LOADED:
        STATS["cache_hits"] += 1
        return _LOADED[d, h]
    so, sig = entry_paths(d, h)
    data = verified_entry(so, sig)
    lib = None if data is None else load_private(h, data, symbols)
    if lib is not None:
        STATS["cache_hits"] += 1
    else:
        data = compile_library(text, cxx, flags)
        STATS["compiles"] += 1
        try:    # concurrent builders (ranks) write identical bytes; each rename is atomic
            atomic_write(so, data)
            atomic_write(sig, entry_mac(so, data))
        except OSError as e:
            warn_once(f"could not write the cache entry {so}: {e.strerror}; the kernels are used uncached")
        lib = load_private(h, data, symbols)
        if lib is None:
            raise CompileError(f"the compiled library for {so} does not load or lacks its kernels")
    _LOADED[d, h] = lib
    return lib



def load_private(h: str, data: bytes, symbols: list[str]):
    """Load `data` from a fresh file in this process's private directory, after
    checking that file holds exactly those bytes; None if it does not load or
    lacks a symbol."""
    want = hashlib.sha256(data).hexdigest()
    fd, path = tempfile.mkstemp(dir=private_dir(), prefix=f"{h[:16]}-", suffix=".so")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if file_digest(path) != want:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    return lib if all(hasattr(lib, s) for s in symbols) else None


def build_triton(kernels, dev: str = "cuda") -> None:
    from . import triton as tr
    bodies = {}
    for k in kernels:
        bodies.setdefault(tr.symbol(k), k.source("cuda"))
    text = tr.HEADER + "\n\n".join(bodies[s] for s in sorted(bodies)) + "\n"
    h = digest(text)
    name = f"passlab_triton_{h[:16]}"
    mod = sys.modules.get(name) or load_module(name, text, os.path.join(cache_dir(), f"triton_{h[:32]}.py"))
    for k in kernels:
        k._compiled[dev] = make_runner(k, getattr(mod, tr.symbol(k)), dev, mod)


def load_module(name: str, text: str, path: str) -> types.ModuleType:
    """Execute `text` as module `name`. A copy goes to `path` for reading; the
    source Triton (via inspect/linecache) and Python see is `text` itself."""
    if file_digest(path) != digest(text):
        try:
            atomic_write(path, text)
        except OSError as e:
            warn_once(f"could not write {path}: {e.strerror}")
    mod = types.ModuleType(name)
    mod.__file__ = path
    code = compile(text, path, "exec")
    linecache.cache[path] = (len(text), None, text.splitlines(True), path)   # mtime None: never re-read
    sys.modules[name] = mod
    try:
        exec(code, mod.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return mod
