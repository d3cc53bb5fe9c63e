"""Code generation: two thin printers over one kernel description, and `build`.

`EXPR` is the one op -> expression table both printers read (C++ format,
Triton format). `build(kernels, device)` prepares every kernel of a graph:
for "cpu" all C++ kernels go into ONE source file and ONE compiler call
(`-O3 -march=native -fopenmp`); for "cuda" each graph's Triton kernels go into
one module.

The C++ cache (`$PASSLAB_CACHE`, default `~/.cache/passlab`) is trusted with
code only as far as it can be:

- the directory must be owned by this user and writable by nobody else,
  otherwise it is refused (said once on stderr) and this process builds in a
  private temporary directory;
- an entry's key names the source, the compiler (resolved path and its
  `--version`), every flag and, for `-march=native`, the ISA the compiler
  resolves it to (`-Q --help=target`, or /proc/cpuinfo), so a cache shared
  across processors or compilers never hands out a foreign binary;
- the sidecar (`KEY.hmac`) is an HMAC of the entry key and the library bytes
  under a per-user secret (`$PASSLAB_KEY_FILE`, default
  `~/.config/passlab/cache.key`, 0600 in a 0700 directory), so whoever can
  write a library and a matching plain hash still cannot make it load;
- the bytes verified are the bytes loaded: they are copied into this
  process's private 0700 directory, re-hashed there and that copy is opened;
- the compiler runs in a private temporary directory under a timeout
  (`$PASSLAB_CXX_TIMEOUT`, default 300 s); temporary files go on every path.

Triton modules are executed from the text generated in this process (the
copy written to the cache is for reading only, never read back).

Every runner checks its inputs against what its kernel was generated for
(`KernelInputError`): count, tensor-ness, device, sizes, dtypes and strides
(a differently strided input is copied into the generated layout, except
where the kernel reads it expanded); no runner exists for an empty kernel.
So a wrong call is an error, never an out-of-bounds read or a truncated result.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import hmac
import linecache
import math
import os
import platform
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import types

import torch

# primitive -> (C++ format, Triton format)
EXPR = {
    "add": ("({0} + {1})", "({0} + {1})"),
    "sub": ("({0} - {1})", "({0} - {1})"),
    "mul": ("({0} * {1})", "({0} * {1})"),
    "div": ("((float){0} / (float){1})", "({0}.to(tl.float32) / {1})"),
    "maximum": ("pl_max({0}, {1})", "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    "minimum": ("pl_min({0}, {1})", "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    "neg": ("(-{0})", "(-{0})"),
    "exp": ("pl_exp({0})", "tl.exp({0})"),
    "log": ("pl_log({0})", "tl.log({0})"),
    "sqrt": ("sqrtf({0})", "tl.sqrt({0})"),
    "rsqrt": ("(1.0f / sqrtf({0}))", "tl.rsqrt({0})"),
    "recip": ("(1.0f / {0})", "(1.0 / {0})"),
    "abs": ("pl_abs({0})", "tl.abs({0})"),
    "tanh": ("pl_tanh({0})", "tl.where(tl.abs({0}) < 0.625, ((((-5.70498872745e-3 * {0} * {0} + 2.06390887954e-2) "
                             "* {0} * {0} - 5.37397155531e-2) * {0} * {0} + 1.33314422036e-1) * {0} * {0} "
                             "- 3.33332819422e-1) * {0} * {0} * {0} + {0}, 2.0 * tl.sigmoid(2.0 * {0}) - 1.0)"),
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
    "and": ("({0} & {1})", "({0} & {1})"),      # bitwise on bools: gcc vectorizes these, not && / ||
    "or": ("({0} | {1})", "({0} | {1})"),
    "where": ("({0} ? {1} : {2})", "tl.where({0}, {1}, {2})"),
    # integer results in eager's storage width (runtime/kernel/primitives.py `narrow`)
    "f2i32": ("pl_f2i32({0})", "({0}).to(tl.int32).to(tl.int64)"),
    "wrap_i32": ("(int64_t)(int32_t)({0})", "({0}).to(tl.int32).to(tl.int64)"),
    "wrap_i16": ("(int64_t)(int16_t)({0})", "({0}).to(tl.int16).to(tl.int64)"),
    "wrap_i8": ("(int64_t)(int8_t)({0})", "({0}).to(tl.int8).to(tl.int64)"),
    "wrap_u8": ("(int64_t)(uint8_t)({0})", "({0}).to(tl.uint8).to(tl.int64)"),
    # a float result rounded to eager's storage dtype, op by op (primitives.py `round_each_op`)
    "round_bf16": ("pl_bf16(pl_to_bf16({0}))", "({0}).to(tl.bfloat16).to(tl.float32)"),
    "round_f16": ("(float)(_Float16)({0})", "({0}).to(tl.float16).to(tl.float32)"),
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


class CompileError(RuntimeError):
    """The C++ compiler failed, timed out or is missing."""


class KernelInputError(ValueError):
    """A generated kernel was called with inputs it was not generated for."""


def warn_once(msg: str, _said: set = set()) -> None:
    if msg not in _said:
        _said.add(msg)
        print(f"passlab: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- where code may come from

_PRIVATE: list[str] = []


def private_dir() -> str:
    """This process's own directory (0700, removed at exit): loaded library
    copies, and the cache when the configured one is refused."""
    if not _PRIVATE:
        d = tempfile.mkdtemp(prefix="passlab-")
        atexit.register(shutil.rmtree, d, True)
        _PRIVATE.append(d)
    return _PRIVATE[0]


def untrusted(path: str, private: bool = False) -> str | None:
    """Why code from `path` cannot be trusted (None when it can): it must be
    owned by this user and writable by nobody else (`private`: nor readable)."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    bad = st.st_mode & (0o077 if private else 0o022)
    if bad:
        who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if bad & bits)
        return f"its mode {stat.filemode(st.st_mode)} lets {who} {'write' if bad & 0o022 else 'read'} it"
    return None


def cache_dir() -> str:
    """The kernel cache directory: $PASSLAB_CACHE or ~/.cache/passlab when
    it is trusted (see `untrusted`), else a private temporary one."""
    want = os.environ.get("PASSLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "passlab")
    try:
        os.makedirs(want, mode=0o700, exist_ok=True)
        why = untrusted(want)
    except OSError as e:
        why = f"it cannot be used ({e.strerror})"
    if why is None:
        return want
    d = os.path.join(private_dir(), "cache")
    os.makedirs(d, mode=0o700, exist_ok=True)
    warn_once(f"not using the cache directory {want}: {why}. Building in the private temporary directory "
              f"{d} instead (fix: `chmod go-w {want}` or `chown` it, or set PASSLAB_CACHE to a directory you own)")
    return d


_KEYS: dict[str, bytes] = {}


def secret_key() -> bytes:
    """The per-user key of the cache sidecars' HMACs, made on first use."""
    path = os.environ.get("PASSLAB_KEY_FILE") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"), "passlab", "cache.key")
    if path in _KEYS:
        return _KEYS[path]
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        why = untrusted(os.path.dirname(path))
        if why is None and not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")   # mode 0600
            try:
                os.write(fd, secrets.token_bytes(32))
                os.close(fd)
                try:
                    os.link(tmp, path)        # never replaces the key another process made meanwhile
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
        why = why or untrusted(path, private=True)
        if why is None:
            with open(path, "rb") as f:
                key = f.read()
            why = None if len(key) >= 32 else "it is shorter than 32 bytes"
    except OSError as e:
        why = f"it cannot be used ({e.strerror})"
    if why is not None:
        warn_once(f"not using the cache key {path}: {why}. Cache entries are trusted only within this process "
                  f"(fix: remove it, or set PASSLAB_KEY_FILE to a file of yours)")
        key = secrets.token_bytes(32)
    _KEYS[path] = key
    return key


def entry_mac(so: str, data: bytes) -> str:
    """The sidecar of cache entry `so`: an HMAC of its name (the key) and bytes."""
    name = os.path.basename(so).encode()
    return hmac.new(secret_key(), name + b"\0" + data, hashlib.sha256).hexdigest()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


UMASK = os.umask(0o22)
os.umask(UMASK)


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `path` as a whole or not at all: a temporary file in the same
    directory, renamed into place (removed if anything fails)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------- the compiler

def compiler() -> str:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"


def compile_timeout() -> float:
    raw = os.environ.get("PASSLAB_CXX_TIMEOUT", "300")
    try:
        return float(raw)
    except ValueError:
        raise CompileError(f"PASSLAB_CXX_TIMEOUT={raw!r} is not a number of seconds") from None


def run_compiler(argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CompileError(f"the C++ compiler ({argv[0]}) did not finish {what} within {timeout:g}s "
                           f"(set PASSLAB_CXX_TIMEOUT=SECONDS to allow longer)") from None
    except OSError as e:
        raise CompileError(f"cannot run the C++ compiler {argv[0]!r}: {e.strerror}; "
                           f"install g++ or set CXX to a C++ compiler") from None


_TOOLCHAINS: dict[tuple, str] = {}


def toolchain(cxx: str, flags: tuple) -> str:
    """What a cache key names besides the source: the compiler's resolved path
    and `--version`, every flag, and the ISA `-march=native` resolves to here.
    Probed once per process."""
    key = (cxx, flags)
    if key not in _TOOLCHAINS:
        path = os.path.realpath(shutil.which(cxx) or cxx)
        version = run_compiler([path, "--version"], 60, "--version").stdout.strip()
        isa = ""
        if any(f.endswith("=native") for f in flags):
            probe = run_compiler([path, *[f for f in flags if f.endswith("=native")], "-Q", "--help=target"],
                                 60, "the -march=native probe")
            isa = probe.stdout if probe.returncode == 0 and probe.stdout.strip() else cpu_identity()
        _TOOLCHAINS[key] = "\n".join([path, version, " ".join(flags), platform.machine(), isa])
    return _TOOLCHAINS[key]


def cpu_identity() -> str:
    """The processor's model and ISA flags (when the compiler cannot say what native means)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l.strip() for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def compile_library(text: str, cxx: str, flags) -> bytes:
    """Compile `text` in a private temporary directory; the library's bytes."""
    with tempfile.TemporaryDirectory(prefix="passlab-build-") as tmp:
        src, out = os.path.join(tmp, "kernels.cpp"), os.path.join(tmp, "kernels.so")
        with open(src, "w") as f:
            f.write(text)
        proc = run_compiler([cxx, *flags, src, "-o", out], compile_timeout(), "the kernels")
        if proc.returncode != 0:
            raise CompileError(f"C++ kernel compilation failed ({cxx}):\n{proc.stderr[-4000:]}")
        with open(out, "rb") as f:
            data = f.read()
    STATS["compiles"] += 1
    return data


# ---------------------------------------------------------------- build

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
    cxx, flags = compiler(), tuple(cpp.FLAGS)
    h = digest(text + "\0" + toolchain(cxx, flags))
    lib = load_cached_library(h, text, list(bodies), cxx, flags)
    for k in kernels:
        fn = getattr(lib, cpp.symbol(k))
        fn.argtypes, fn.restype = [ctypes.c_void_p], None
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


def entry_paths(d: str, h: str) -> tuple[str, str]:
    base = os.path.join(d, h[:32])
    return base + ".so", base + ".hmac"


def verified_entry(so: str, sig: str) -> bytes | None:
    """The library's bytes when its sidecar holds their HMAC under our key."""
    try:
        with open(sig) as f:
            want = f.read().strip()
        with open(so, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if hmac.compare_digest(entry_mac(so, data), want) else None


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


def same_layout(t, strides) -> bool:
    """Strides agree wherever they matter (dims of size 1 are never stepped along)."""
    return all(a == b for a, b, n in zip(t.stride(), strides, t.shape) if n > 1)


def input_error(fk, i: int | None, inputs, what: str = "differs") -> KernelInputError:
    bufs = fk.kernel.inputs
    fmt = lambda shape, dt: f"{list(shape)}:{str(dt).replace('torch.', '')}"   # noqa: E731
    want = ", ".join(fmt(b.shape, b.dtype) for b in bufs)
    got = ", ".join(fmt(t.shape, t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)
    where = f"input {i} ({bufs[i].name})" if i is not None else f"{len(inputs)} inputs instead of {len(bufs)}"
    return KernelInputError(f"kernel {fk.name} was generated for inputs ({want}) and called with ({got}): "
                            f"{where} {what}. Generated kernels have fixed sizes, dtypes and layouts; capture and "
                            f"optimize again for these inputs (passlab.optimize re-specializes on new shapes)")


def check_generated(fk, device: str) -> None:
    """What no runner is made for: a kernel over no elements (lowering refuses
    them; a description built by hand must too), or one writing an output
    through overlapping strides."""
    from ..kernel.ir import overlaps
    k = fk.kernel
    for b in k.inputs + k.outputs:
        if math.prod(b.shape) == 0:
            raise KernelInputError(f"kernel {fk.name}: {b.name} {list(b.shape)} has no elements; empty tensors "
                                   f"run in ATen (runtime/kernel/materialize.py `refuse`)")
    for b in k.outputs:
        if overlaps(b.shape, b.strides):
            raise KernelInputError(f"kernel {fk.name}: output {b.name} has overlapping strides {b.strides}")


def make_runner(fk, fn, device: str, keepalive):
    """The per-call path: check inputs (count, tensor, device, shape, dtype,
    layout) before any memory is touched, fix up input strides, allocate
    outputs, launch. An input whose strides differ from the generated ones is
    copied into them, unless the kernel was generated for an overlapping
    (expanded, stride 0) layout: a dense input's values cannot be read that
    way, so that call is refused. A storage offset is part of the data
    pointer the kernel gets, so any offset is read in place."""
    from ..kernel.ir import overlaps
    check_generated(fk, device)
    k = fk.kernel
    expect = [b.strides for b in k.inputs]
    expanded = [overlaps(b.shape, b.strides) for b in k.inputs]
    sig = [(torch.Size(b.shape), b.dtype) for b in k.inputs]
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
    want_dev = {"cpu": ("cpu",), "cuda": ("cuda",)}.get(device, ("cpu", "cuda"))   # "triton": either
    Tensor = torch.Tensor

    def run(*inputs):
        if len(inputs) != n_in:
            raise input_error(fk, None, inputs)
        ins = list(inputs)
        for i in range(n_in):
            t = ins[i]
            if not isinstance(t, Tensor):
                raise input_error(fk, i, inputs, f"is a {type(t).__name__}, not a tensor")
            shape, dtype = sig[i]
            if t.shape != shape or t.dtype != dtype:
                raise input_error(fk, i, inputs)
            if t.device.type not in want_dev:
                raise input_error(fk, i, inputs, f"is on {t.device}, the kernel runs on {device}")
            if t.stride() != expect[i] and not same_layout(t, expect[i]):
                if expanded[i]:
                    raise input_error(fk, i, inputs, f"has strides {t.stride()}, the kernel reads it expanded "
                                                     f"with strides {expect[i]}")
                ins[i] = empty(t.shape, expect[i], dtype=t.dtype, device=t.device).copy_(t)
        dev = ins[0].device if ins else home
        res = [empty(s, st, dtype=dt, device=dev) for s, st, dt in outs]
        launch(ins, res)
        return tuple(res) if multi else res[0]

    run.keepalive = keepalive
    return run


from . import cpp, triton  # noqa: E402  (the printers read EXPR/CAST above)
