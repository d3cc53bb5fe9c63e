"""What every command shares without importing the CLI: exit codes and the
bad-arguments error (exit 2). `tools.cli` re-exports them; the commands in
other modules (distributed_run, simulate) import them from here, so no module
imports the CLI back."""
from __future__ import annotations

BAD_ARGS, FAILED, INTERRUPTED = 2, 1, 130


class BadArguments(Exception):
    """A command's arguments are wrong: the CLI prints it and exits 2."""


def bad_args_errors():
    """The library errors that mean bad arguments (unknown model or pass, bad option)."""
    from passlab.graphs import UnknownModelError
    from passlab.passes import PipelineError, UnknownPassError
    return (UnknownModelError, PipelineError, UnknownPassError)
