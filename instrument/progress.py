"""Progress lines for long work (loading, compiling): a performer waiting on stage must see what happens."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stream=None, enabled: bool = True, listener=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.listener = listener  # e.g. the stage's loading screen
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {message}"
        if self.enabled:
            print(line, file=self.stream, flush=True)
        if self.listener is not None:
            self.listener(line)


def quiet(_message: str) -> None:
    pass
