"""What every command shares without importing the CLI: exit codes and the
bad-arguments error (exit 2). `tools.cli` re-exports them; the commands in
other modules (distributed_run, simulate) import them from here, so no module
imports the CLI back."""
from __future__ import annotations

import os
import tempfile

BAD_ARGS, FAILED, INTERRUPTED = 2, 1, 130


class BadArguments(Exception):
    """A command's arguments are wrong: the CLI prints it and exits 2."""


def bad_args_errors():
    """The library errors that mean bad arguments (unknown model or pass, bad option)."""
    from passlab.graphs import UnknownModelError
    from passlab.passes import PipelineError, UnknownPassError
    return (UnknownModelError, PipelineError, UnknownPassError)


def check_device(device: str, present: bool = True) -> None:
    """--device: cpu, or cuda[:N] (`present`: where a CUDA device exists)."""
    import torch
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise BadArguments(f"unknown --device {device!r}: use cpu or cuda (cuda:N for one GPU)")
    if present and kind == "cuda" and not torch.cuda.is_available():
        raise BadArguments(f"--device {device} asked for, but no CUDA device is available here; use --device cpu")


def unwritable(path: str, folder: bool = False) -> str | None:
    """Why `path` (a file, or with `folder` a directory to write into) cannot
    be written, found by creating its folder and a scratch file there."""
    where = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    if not folder and os.path.isdir(path):
        return "it is a directory"
    up = where
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        return f"{up} is a file, not a folder"
    try:
        os.makedirs(where, exist_ok=True)
        fd, scratch = tempfile.mkstemp(dir=where, prefix=".passlab-check-")
        os.close(fd)
        os.unlink(scratch)
    except OSError as e:
        return e.strerror or str(e)
    return None
