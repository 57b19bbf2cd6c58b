"""The port file: how a server started on ``--port 0`` tells who started it where it
listens, and that it does.

The server writes its port and a newline once it listens (:func:`write_port_file`) and
removes the file on shutdown (:func:`remove_port_file`); whoever started it waits for
the file (:func:`wait_port_file`). A server that is killed, or crashes, leaves its
file behind: a starter removes it before it starts a server, and then waits.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

__all__ = ["remove_port_file", "wait_port_file", "write_port_file"]

#: How often a starter looks for the file, seconds.
POLL_SECONDS = 0.02


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` and a newline to ``path`` whole: a reader that finds the file never
    sees it half written. It is written to a new file of a name nobody can foresee
    beside it, which is then renamed over it."""
    fd, part = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            # mkstemp's 0600 would hide it from a monitor of another user; where modes
            # cannot be set (some mounts), the file is still written.
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), 0o644)
            f.write(f"{port}\n")
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


def remove_port_file(path: Path, port: int) -> None:
    """Remove ``path`` if it still names ``port``: a server started since on another
    port, with the same file, keeps its own."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text(encoding="ascii")) == port:
            path.unlink()


def wait_port_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port ``proc`` writes to ``path`` once it listens, waiting ``timeout`` seconds
    at most. Raises :class:`ChildProcessError` if ``proc`` exits first and
    :class:`TimeoutError` if the time is up (``proc`` is left running)."""
    deadline = time.monotonic() + timeout
    while True:
        # Not there yet, or (written by something else than write_port_file) not whole.
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text(encoding="ascii"))
        if proc.poll() is not None:
            raise ChildProcessError(f"the server exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not listen within {timeout:g} s")
        time.sleep(POLL_SECONDS)
