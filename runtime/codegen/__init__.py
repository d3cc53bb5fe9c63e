"""Code generation: two thin printers over one kernel description, and `build`.

The modules, one job each:

- `exprs`: `EXPR`, the one op -> expression table both printers read (C++
  format, Triton format), and `CAST`;
- `plan`: the schedule of a kernel, made once; the printers only spell it
  (`cpp`: C++ with OpenMP, `triton`: Triton), both named by `symbols`;
- `trust`: where compiled code may come from (the cache directory, the HMAC
  sidecars under a per-user key, whole-file writes);
- `cxx`: the C++ compiler call and what a cache key names of the toolchain;
- `loading`: `build(kernels, device)` and `runner(fk, device)`: for "cpu" all
  C++ kernels go into ONE source file and ONE compiler call
  (`-O3 -march=native -fopenmp`); for "cuda" each graph's Triton kernels go
  into one module;
- `runners`: the per-call path, every input checked against what its kernel
  was generated for (`KernelInputError`).

The C++ cache (`$PASSLAB_CACHE`, default `~/.cache/passlab`) is trusted with
code only as far as it can be (`trust`): a directory only you can write, keys
naming the source, the toolchain and the ISA (`cxx.toolchain`), HMAC sidecars
under a per-user secret, and the bytes verified are the bytes loaded
(`loading.load_private`). Triton modules are executed from the text generated
in this process. Every runner checks its inputs against what its kernel was
generated for (`runners`), so a wrong call is an error, never an
out-of-bounds read or a truncated result.
"""
from __future__ import annotations

from .cxx import CompileError, compiler, toolchain
from .exprs import CAST, EXPR
from .loading import STATS, build, runner
from .runners import KernelInputError
from .trust import atomic_write, cache_dir, private_dir, verified_entry

__all__ = ["CAST", "EXPR", "STATS", "CompileError", "KernelInputError", "atomic_write", "build", "cache_dir",
           "compiler", "printer", "private_dir", "runner", "toolchain", "verified_entry"]


def printer(device: str):
    """The printer module of `device`: `cpp` for "cpu", else `triton`."""
    if device == "cpu":
        from . import cpp
        return cpp
    from . import triton as tr
    return tr
