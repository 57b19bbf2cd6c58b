"""The server's options: defaults, ``ACHAT_*`` environment variables and command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import DEFAULT_PORT
from ..store.base import REF_TTL_MS
from .refs import DEADLINE_STEP_MS, REF_BYTES
from .registry import DEFAULT_MAX_TEXT
from .session import SessionLimits

__all__ = ["DEFAULT_PORT", "ServerConfig", "default_data_dir"]

#: The longest a ref is kept, seconds: its ten minutes, its deadline rounded up.
_REF_KEPT_S = (REF_TTL_MS + DEADLINE_STEP_MS) / 1000


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
    #: Where to write the port once listening (and remove it on shutdown); None: nowhere.
    port_file: Path | None = None
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
    #: The most refs remembered at once (0: no limit; None: what half the memory the
    #: server may use holds, at REF_BYTES each, worked out when it starts).
    max_refs: int | None = None

    def refs_memory_estimate(self) -> int | None:
        """The resident memory, in bytes, that the refs of the last ten minutes take on
        a full server: ``max_clients`` clients, each saying at the flood limit for as
        long as a ref is kept, after its burst, with refs of a typical length
        (:data:`~achat.server.refs.REF_BYTES`). None without a flood limit (``--rate
        0``). Not a bound: a client that reconnects starts with a full burst again, and
        a long ref takes more."""
        flood = self.limits.flood
        if flood.rate <= 0:
            return None
        per_client = flood.rate * _REF_KEPT_S + flood.burst
        return round(self.max_clients * per_client * REF_BYTES)

    @property
    def database(self) -> Path:
        """The SQLite file inside the data directory."""
        return self.data_dir / "achat.db"

    @property
    def max_frame(self) -> int:
        return self.limits.max_frame
