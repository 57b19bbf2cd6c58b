"""The port file: written whole, removed only by its own server, waited for."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from achat.portfile import remove_port_file, wait_port_file, write_port_file


def test_written_whole_over_an_old_one(tmp_path: Path) -> None:
    """The file holds the port and a newline, replaces one a killed server left, can be
    read by other users, and leaves nothing beside it."""
    path = tmp_path / "port"
    path.write_text("1234\n")
    write_port_file(path, 40123)
    assert path.read_text() == "40123\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["port"]


def test_a_file_that_cannot_be_written_raises_and_leaves_nothing(tmp_path: Path) -> None:
    """Into a directory that is not there: the error is raised, and nothing is left."""
    with pytest.raises(FileNotFoundError):
        write_port_file(tmp_path / "missing" / "port", 40123)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_leaves_no_part_behind(tmp_path: Path) -> None:
    """Over a directory the rename fails: the part written beside it is removed."""
    (tmp_path / "port").mkdir()
    with pytest.raises(IsADirectoryError):
        write_port_file(tmp_path / "port", 40123)
    assert [p.name for p in tmp_path.iterdir()] == ["port"]


def test_removed_only_while_it_names_the_port(tmp_path: Path) -> None:
    """A server removes its own file, not one a server started since has written."""
    path = tmp_path / "port"
    write_port_file(path, 40125)
    remove_port_file(path, 40123)  # an older server of the same file, shutting down
    assert path.read_text() == "40125\n"
    remove_port_file(path, 40125)
    assert not path.exists()
    remove_port_file(path, 40125)  # gone already: nothing to do


def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


def test_wait_returns_the_port_once_written(tmp_path: Path) -> None:
    """A starter gets the port its server writes, once it is written."""
    path = tmp_path / "port"
    code = (
        "import time; from pathlib import Path; from achat.portfile import write_port_file;"
        f"time.sleep(0.2); write_port_file(Path({str(path)!r}), 40127); time.sleep(30)"
    )
    proc = _python(code)
    try:
        assert wait_port_file(path, proc, 30) == 40127
    finally:
        proc.kill()
        proc.wait()


def test_wait_for_a_server_that_exits_raises(tmp_path: Path) -> None:
    """A server that exits before it listens is told at once, with its exit code."""
    proc = _python("raise SystemExit(3)")
    with pytest.raises(ChildProcessError, match=r"exited \(3\) before listening"):
        wait_port_file(tmp_path / "port", proc, 30)


def test_wait_takes_a_file_that_holds_no_port_for_not_there_yet(tmp_path: Path) -> None:
    """A file that is no port (not written by write_port_file) is waited past."""
    path = tmp_path / "port"
    path.write_bytes(b"\xff")
    proc = _python("raise SystemExit(3)")
    with pytest.raises(ChildProcessError):
        wait_port_file(path, proc, 30)


def test_wait_gives_up_after_its_timeout(tmp_path: Path) -> None:
    """A server that never writes the file: TimeoutError, the server left running."""
    proc = _python("import time; time.sleep(30)")
    try:
        with pytest.raises(TimeoutError, match=r"did not listen within 0\.2 s"):
            wait_port_file(tmp_path / "port", proc, 0.2)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
