"""The interpreter settings achat-server applies at startup."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from achat.server.runtime import GC_THRESHOLDS, SWITCH_INTERVAL, memory_limit, tune_for_latency

PHYSICAL = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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


def fake(
    tmp_path: Path, cgroup: str | bytes, files: Mapping[str, str | bytes]
) -> tuple[Path, Path]:
    """A /proc/self whose cgroup file says ``cgroup``, and a cgroup tree of ``files``."""
    proc, tree = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_bytes(cgroup if isinstance(cgroup, bytes) else cgroup.encode())
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return proc, tree


def test_memory_limit_is_the_machines_without_a_cgroup_limit(tmp_path: Path) -> None:
    assert memory_limit(tmp_path / "none", tmp_path / "none") == PHYSICAL
    unlimited = {"app/memory.max": "max\n", "memory/app/memory.limit_in_bytes": f"{2**63 - 4096}"}
    assert memory_limit(*fake(tmp_path, "4:memory:/app\n0::/app\n", unlimited)) == PHYSICAL


def test_memory_limit_is_a_lower_cgroup_v2_limit(tmp_path: Path) -> None:
    proc, tree = fake(tmp_path, "0::/app/one\n", {"app/one/memory.max": "536870912\n"})
    assert memory_limit(proc, tree) == 512 * 2**20


def test_memory_limit_is_a_lower_cgroup_v1_limit(tmp_path: Path) -> None:
    cgroup = "9:cpu,cpuacct:/\n4:memory:/box\n0::/\n"
    proc, tree = fake(tmp_path, cgroup, {"memory/box/memory.limit_in_bytes": "1073741824"})
    assert memory_limit(proc, tree) == 2**30


def test_memory_limit_takes_the_lowest_of_the_groups_above(tmp_path: Path) -> None:
    # A slice's limit binds the services under it, which set none of their own.
    files = {"slice/memory.max": "268435456", "slice/service/memory.max": "max"}
    assert memory_limit(*fake(tmp_path, "0::/slice/service\n", files)) == 256 * 2**20


def test_memory_limit_finds_a_container_whose_group_is_the_mounts_root(tmp_path: Path) -> None:
    # cgroup v1 without a namespace of its own: /proc names the host's path, which the
    # container's mount does not have; its root is the container's group.
    cgroup = "4:memory:/docker/0123abcd\n"
    files = {"memory/memory.limit_in_bytes": "805306368"}
    assert memory_limit(*fake(tmp_path, cgroup, files)) == 768 * 2**20


def test_memory_limit_ignores_what_it_cannot_read(tmp_path: Path) -> None:
    # A limit above the machine's memory, lines without a path, a limit that is no
    # number, digits Python would not take, bytes that are no UTF-8: the machine's stands.
    cgroup = "garbage\n4:memory:/big\n0::/odd\n3:memory:\n"
    files: dict[str, str | bytes] = {
        "memory/big/memory.limit_in_bytes": str(PHYSICAL * 4),
        "odd/memory.max": "-1",
        "memory.max": "\u00b2",  # a superscript two: str.isdigit() takes it, int() does not
        "memory/memory.limit_in_bytes": b"\xff\xfe",
    }
    assert memory_limit(*fake(tmp_path, cgroup, files)) == PHYSICAL
    assert memory_limit(*fake(tmp_path / "x", b"\xff:memory:/\n", {})) == PHYSICAL
