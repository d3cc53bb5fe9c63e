"""Progress for long runs: a one-line bar on a terminal, sparse lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width, self.tty = width, self.stream.isatty()
        self.last_line, self.last_t = "", 0.0

    def message(self, text: str) -> None:
        self._clear()
        print(f"passlab: {text}", file=self.stream, flush=True)

    def bar(self, done: int, total: int, label: str = "") -> None:
        frac = done / total if total else 1.0
        filled = int(self.width * frac)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {label}"
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last_line)))
            self.stream.flush()
            self.last_line = line
            if done >= total:
                self._clear()
        elif done >= total or time.time() - self.last_t > 10:
            print(f"passlab: {line}", file=self.stream, flush=True)
            self.last_t = time.time()

    def _clear(self):
        if self.tty and self.last_line:
            self.stream.write("\r" + " " * len(self.last_line) + "\r")
            self.stream.flush()
            self.last_line = ""
