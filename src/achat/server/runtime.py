"""Process-wide settings of the interpreter for a server that answers in milliseconds.

Both were found by measuring (``achat-bench many-rooms``; docs/performance-history.md,
items 2 and 3):

- **GIL switch interval.** A message is delivered once its store commit is
  done, and the store's writer thread takes the GIL a few times per commit
  (once after each SQLite call). With CPython's default interval of 5 ms,
  every one of those waits for the busy event loop to be *forced* to let go,
  so a commit took 5–15 ms at p99. At 0.2 ms it takes 1–3 ms.
- **Garbage collector.** A young-generation collection runs every 700 net
  allocations of container objects; under load that is many times a second,
  and each one stops the loop. Objects that live from startup on are moved
  out of the collector's sight (``gc.freeze``), the youngest generation is
  allowed to grow to 10,000 objects, and frames, which are most of what a
  busy server allocates, are not tracked at all (``gc=False`` on the
  protocol's structs). Old generations are still collected, so reference
  cycles left by closed connections are still freed.

It also tells how much memory the process may use (:func:`memory_limit`), for the
warning a server logs at start when its limits let the refs of the last ten minutes
outgrow it, and for the default ``--max-refs`` (``app.memory_notice`` and
``app.refs_limit``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

__all__ = ["GC_THRESHOLDS", "SWITCH_INTERVAL", "memory_limit", "tune_for_latency"]

SWITCH_INTERVAL = 0.0002
GC_THRESHOLDS = (10_000, 10, 10)


def tune_for_latency() -> None:
    """Apply the settings above; call once, after startup state is loaded."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: A cgroup v1 "limit" at or above this is none (v1 says 2**63 rounded down to a page).
_NO_LIMIT = 2**62


def memory_limit(
    proc: Path = Path("/proc/self"), cgroups: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """The bytes of memory this process may use: the machine's, or the lowest limit of
    its cgroup and the cgroups above it (as a container or a systemd slice sets them:
    ``memory.max`` of cgroup v2, ``memory.limit_in_bytes`` of v1) if lower; None if
    unknown. Never raises for what it finds in those files."""
    limits = []
    with contextlib.suppress(ValueError, OSError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except (OSError, ValueError):
        lines = []
    for line in lines:  # "ID:CONTROLLERS:PATH"; v2's is "0::PATH"
        _, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if not group.startswith("/"):
            continue
        if not controllers:
            root, name = cgroups, "memory.max"
        elif "memory" in controllers.split(","):
            root, name = cgroups / "memory", "memory.limit_in_bytes"
        else:
            continue
        # The group and each one above it, up to the mount's root: in a container whose
        # cgroup is not a namespace of its own, the root mounted is the container's group.
        parts = [part for part in group.split("/") if part]
        for depth in range(len(parts), -1, -1):
            limits.extend(_limit_in(root.joinpath(*parts[:depth], name)))
    return min((n for n in limits if 0 < n < _NO_LIMIT), default=None)


def _limit_in(path: Path) -> list[int]:
    """The number of bytes ``path`` holds, if it holds one (v2 says "max" for none)."""
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):  # a decoding error is a ValueError
        return []
    return [int(text)] if text.isascii() and text.isdigit() else []
