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
