"""The per-call path of a generated kernel: every runner checks its inputs
against what its kernel was generated for (`KernelInputError`): count,
tensor-ness, device, sizes, dtypes and strides (a differently strided input is
copied into the generated layout, except where the kernel reads it expanded);
no runner exists for an empty kernel. So a wrong call is an error, never an
out-of-bounds read or a truncated result. A C++ kernel returns non-zero when a
gathered row index is out of range (IndexError, as eager's index_select and
embedding raise) or an integer divisor is 0 (ZeroDivisionError, as eager)."""
from __future__ import annotations

import ctypes
import math

import torch


class KernelInputError(ValueError):
    """A generated kernel was called with inputs it was not generated for."""


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


def flagged(fk, code: int) -> Exception:
    """The error a C++ kernel flagged (its non-zero return), as eager raises it."""
    if code == 2:
        return RuntimeError(f"ZeroDivisionError (kernel {fk.name}: an integer division by zero, which eager "
                            f"refuses too)")
    return IndexError(f"index out of range in self (kernel {fk.name} was given a row index outside the table "
                      f"it gathers from, which eager's index_select / embedding refuses too)")


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
            bad = fn(arr_t(*[t.data_ptr() for t in ins], *[t.data_ptr() for t in res]))
            if bad:
                raise flagged(fk, bad)
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
