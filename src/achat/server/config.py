"""The server's options: defaults, ``ACHAT_*`` environment variables and command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import DEFAULT_PORT
from .registry import DEFAULT_MAX_TEXT
from .session import SessionLimits

__all__ = ["DEFAULT_PORT", "ServerConfig", "default_data_dir"]


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/achat``, or ``~/.local/share/achat`` when that is unset."""
    env = os.environ if env is None else env
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    base = env.get("XDG_DATA_HOME") or str(home / ".local" / "share")
    return Path(base) / "achat"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything that shapes one server run."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    name: str = "achat"
    motd: str | None = None
    max_clients: int = 10_000
    password: str | None = None
    log_level: str = "info"
    max_text: int = DEFAULT_MAX_TEXT
    limits: SessionLimits = field(default_factory=SessionLimits)
    max_per_ip: int = 64
    max_new_per_ip: int = 120
    #: Loopback clients (local tools, bridges, load tests) skip the per-address limits.
    exempt_loopback: bool = True
    store: str = "sqlite"
    durability: str = "normal"
    history_days: float | None = None
    history_max: int | None = None

    @property
    def database(self) -> Path:
        """The SQLite file inside the data directory."""
        return self.data_dir / "achat.db"

    @property
    def max_frame(self) -> int:
        return self.limits.max_frame
