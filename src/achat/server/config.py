"""The server's options: defaults, ``ACHAT_*`` environment variables and command-line flags."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import DEFAULT_PORT
from ..store.base import REF_TTL_MS
from .registry import DEFAULT_MAX_TEXT
from .session import SessionLimits

__all__ = ["DEFAULT_PORT", "REF_BYTES", "ServerConfig", "default_data_dir"]

#: Resident memory one remembered ref takes: ``benchmarks/pauses.py`` measured 194 B a
#: ref with three million in force (the README's "Sizing a server").
REF_BYTES = 194
#: A ref is kept up to a second past its ten minutes (its deadline is rounded up).
_REF_KEPT_S = REF_TTL_MS / 1000 + 1


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

    def refs_memory_bound(self) -> int | None:
        """The most resident memory, in bytes, that the refs of the last ten minutes can
        take: every client at once saying at the flood limit for as long as a ref is
        kept, after its burst. None without a flood limit (``--rate 0``): no bound."""
        flood = self.limits.flood
        if flood.rate <= 0:
            return None
        per_client = flood.rate * _REF_KEPT_S + flood.burst
        return round(self.max_clients * per_client * REF_BYTES)

    def memory_warning(self, memory: int | None) -> tuple[int, str] | None:
        """What to tell an operator at start (a logging level and a line) when the refs
        of the last ten minutes could take over half of ``memory``, the bytes this
        server may use (None if unknown), or have no bound at all."""
        bound = self.refs_memory_bound()
        if bound is None:
            return logging.INFO, (
                f"no flood limit (--rate 0): the refs of the last ten minutes, about "
                f"{REF_BYTES} B a message, take as much memory as messages come"
            )
        if memory is None or bound <= memory // 2:
            return None
        return logging.WARNING, (
            f"at --max-clients {self.max_clients} and --rate {self.limits.flood.rate:g}, "
            f"the refs of the last ten minutes could take up to {bound / 2**30:.1f} GiB, "
            f"over half of the {memory / 2**30:.1f} GiB this server may use: lower either "
            "(the README's Sizing a server)"
        )

    @property
    def database(self) -> Path:
        """The SQLite file inside the data directory."""
        return self.data_dir / "achat.db"

    @property
    def max_frame(self) -> int:
        return self.limits.max_frame
