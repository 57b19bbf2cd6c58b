"""The ``time`` module as a module under test sees it, with some of its clocks replaced."""

from __future__ import annotations

import time
import types
from collections.abc import Callable


def time_with(**clocks: Callable[[], float]) -> types.SimpleNamespace:
    """The ``time`` module with the functions named in ``clocks`` replaced: for
    ``monkeypatch.setattr(module, "time", time_with(monotonic=...))``, which leaves every
    other module's ``time`` as it is."""
    functions = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    return types.SimpleNamespace(**(functions | clocks))
