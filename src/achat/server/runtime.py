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
"""

from __future__ import annotations

import gc
import sys

__all__ = ["GC_THRESHOLDS", "SWITCH_INTERVAL", "tune_for_latency"]

SWITCH_INTERVAL = 0.0002
GC_THRESHOLDS = (10_000, 10, 10)


def tune_for_latency() -> None:
    """Apply the settings above; call once, after startup state is loaded."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
