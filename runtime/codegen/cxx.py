"""The C++ compiler call: which compiler, its timeout, what a cache key names
of the toolchain (resolved path, `--version`, flags and the ISA
`-march=native` resolves to here), and one compile in a private temporary
directory."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile


class CompileError(RuntimeError):
    """The C++ compiler failed, timed out or is missing."""


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
    return data
