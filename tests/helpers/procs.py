"""Real ``achat-server`` processes for tests: start, wait until ready, kill -9, restart."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from achat.portfile import wait_port_file

__all__ = ["ServerProcess", "closed_port", "script"]


def script(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    return str(Path(sys.executable).parent / name)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that nothing listens on while the block runs. A socket holds it,
    bound but not listening: a connection to it is refused, and no other socket, a
    listener or a connection's own end, can take it meanwhile."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


class ServerProcess:
    """One ``achat-server`` on 127.0.0.1 that can be killed and started again on its data
    and its port. The first start listens where the kernel picks (``--port 0``) and the
    server names the port in its ``--port-file``; a restart listens on that port again,
    so that clients reconnect to it."""

    def __init__(self, data_dir: Path, *extra: str, nofile: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = 0  # known once started
        self.extra = extra
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "server.log"
        self.port_file = data_dir / "port"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and return once it listens (its port file is written then)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)  # a killed server leaves its own
        cmd = [
            script("achat-server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--port-file",
            str(self.port_file),
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "warning",
            # Tests and benchmarks send bursts; a test of the limits passes its own --rate.
            "--rate",
            "0",
            *self.extra,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=self._limit_files if self.nofile else None,
            )
        try:
            self.port = wait_port_file(self.port_file, self.proc, timeout)
        except (ChildProcessError, TimeoutError) as exc:
            self.kill9()
            raise RuntimeError(f"achat-server: {exc}: {self.log.read_text()[-2000:]}") from None

    def _limit_files(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait: the graceful shutdown path. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
