"""The interpreter settings achat-server applies at startup."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from achat.server.runtime import GC_THRESHOLDS, SWITCH_INTERVAL, tune_for_latency


@pytest.fixture
def restore_interpreter() -> Iterator[None]:
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*thresholds)
    gc.unfreeze()


@pytest.mark.usefixtures("restore_interpreter")
def test_tuning_sets_the_switch_interval_and_freezes_what_exists() -> None:
    survivor = [object()]
    tune_for_latency()
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0
    assert survivor  # alive through the freeze
