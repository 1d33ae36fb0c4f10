"""Process-level test helpers: a free TCP port for a gloo process group, and a method wrapper that sends this
process a SIGTERM after a chosen step (as ``kill <pid>`` would), to test checkpoint-and-resume."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SigtermAt:
    """A rank method, plus a SIGTERM to this process after step ``step`` (like `kill <pid>`)."""

    def __init__(self, inner: Any, step: int) -> None:
        self.inner, self.step, self.name = inner, step, inner.name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def on_step_end(self, model: Any, step: int, optimizer: Any) -> Any:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner.on_step_end(model, step, optimizer)
