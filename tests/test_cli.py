"""The command lines: options, environment variables, validation, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from achat import cli
from tests.helpers.fakeserver import fake_server
from tests.helpers.procs import ServerProcess, closed_port, script


def test_server_defaults() -> None:
    """With no flags and no environment, the documented defaults apply."""
    config = cli.parse_server_args([], env={"HOME": "/home/ana"})
    assert (config.host, config.port, config.store, config.durability) == (
        "0.0.0.0",
        7777,
        "sqlite",
        "normal",
    )
    assert config.data_dir == Path("/home/ana/.local/share/achat")
    assert config.limits.flood.rate == 5
    assert config.limits.sendq_limit == 1 << 20
    assert config.limits.write_lag == 0.5
    assert config.max_per_ip == 64
    assert config.max_refs is None  # worked out from the memory when the server starts


def test_environment_and_flags() -> None:
    """ACHAT_* variables set options; flags win over them."""
    env = {
        "ACHAT_PORT": "9000",
        "ACHAT_NAME": "school",
        "XDG_DATA_HOME": "/data",
        "ACHAT_RATE": "0",
        "ACHAT_WRITE_LAG": "2",
    }
    config = cli.parse_server_args(["--name", "lab", "--history-max", "50"], env=env)
    assert (config.port, config.name, config.history_max) == (9000, "lab", 50)
    assert config.data_dir == Path("/data/achat")
    assert config.limits.flood.rate == 0
    assert config.limits.write_lag == 2
    assert cli.parse_server_args(["--write-lag", "0.25"], env=env).limits.write_lag == 0.25
    assert cli.parse_server_args([], env={**env, "ACHAT_MAX_REFS": "0"}).max_refs == 0
    assert cli.parse_server_args(["--max-refs", "5000"], env=env).max_refs == 5000
    assert cli.parse_server_args([], env=env).port_file is None
    named = cli.parse_server_args([], env={**env, "ACHAT_PORT_FILE": "/run/achat.port"})
    assert named.port_file == Path("/run/achat.port")
    assert cli.parse_server_args(["--port-file", "p"], env=env).port_file == Path("p")


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "70000"],
        ["--max-clients", "0"],
        ["--idle-timeout", "0"],
        ["--history-days", "-1"],
        ["--max-frame", "100"],
        ["--store", "paper"],
        ["--sendq-limit", "10"],
        ["--sendq-limit", "150000"],  # the default frame and a backlog's piece, twice
        ["--rate", "-1"],
        ["--rate", "nan"],  # would make every connection's bucket NaN: nothing passes
        ["--rate", "inf"],
        ["--burst", "0.5"],
        ["--burst", "inf"],  # announced in welcome, where JSON has no infinity
        ["--write-lag", "0"],  # every pass would refuse says
        ["--write-lag", "nan"],
        ["--write-lag", "61"],
        ["--max-refs", "-1"],
        ["--port-file", ""],  # no file's name
        ["--port-file", "/"],
    ],
)
def test_bad_options_exit_with_usage_error(argv: list[str]) -> None:
    """Out-of-range or unknown option values stop with exit code 2 and a message."""
    with pytest.raises(SystemExit) as exc:
        cli.parse_server_args(argv, env={})
    assert exc.value.code == 2


def test_server_names_the_port_it_picked_and_removes_the_file_on_shutdown(
    tmp_path: Path,
) -> None:
    """``--port 0 --port-file F``: F names the port the server listens on once it does,
    and is gone after a graceful shutdown."""
    server = ServerProcess(tmp_path / "data", "--store", "memory")
    server.start()
    try:
        assert server.port > 0
        assert server.port_file.read_text() == f"{server.port}\n"
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    finally:
        assert server.stop() == 0
    assert not server.port_file.exists()


def test_server_that_cannot_write_its_port_file_exits(tmp_path: Path) -> None:
    """An unwritable --port-file is an error at start: exit 1, saying why."""
    missing = tmp_path / "missing" / "port"
    done = subprocess.run(
        [
            script("achat-server"),
            *("--host", "127.0.0.1", "--port", "0", "--store", "memory", "--rate", "0"),
            *("--data-dir", str(tmp_path / "data"), "--log-level", "warning"),
            *("--port-file", str(missing)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 1
    said = done.stderr.splitlines()[-1]  # after any notice of the start's
    assert said == f"achat-server: cannot write --port-file {missing}: No such file or directory"


def test_send_refuses_empty_text(capsys: pytest.CaptureFixture[str]) -> None:
    """achat send with nothing to send exits 2 without connecting."""
    assert cli.main(["send", "--nick", "bot", "--port", "1", "   "]) == 2
    assert "nothing to send" in capsys.readouterr().err


def test_send_to_nowhere_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """achat send exits 1 with a readable message when no server listens."""
    with closed_port() as port:
        assert cli.main(["send", "--nick", "bot", "--port", str(port), "hello"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_join_loads_its_modules_without_the_collector() -> None:
    """``achat join`` imports its UI with the collector off, then freezes what it loaded.

    In a fresh interpreter, as the console script runs it: importing ``achat.cli``
    loads none of the heavy modules (so they fall inside the window), and after
    ``join`` (here refused: nothing listens) the collector is on again and the
    modules' objects are in the permanent generation.
    """
    probe = """
import gc, sys
during = []  # collections that ran while the UI module was still being imported
def count(phase, info):
    ui = sys.modules.get("achat.client.ui")
    if phase == "start" and ui is not None and not hasattr(ui, "run_ui"):
        during.append(info["generation"])
gc.callbacks.append(count)
from achat import cli
heavy = [m for m in ("asyncio", "msgspec", "prompt_toolkit") if m in sys.modules]
code = cli.main(["join", "--port", sys.argv[1], "--nick", "ana"])
print(heavy, code, gc.isenabled(), gc.get_freeze_count(), "prompt_toolkit" in sys.modules,
      len(during), sep=";")
"""
    with closed_port() as port:
        done = subprocess.run(
            [sys.executable, "-c", probe, str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    heavy, code, enabled, frozen, loaded, collections = done.stdout.strip().split(";")
    assert heavy == "[]"
    assert (code, enabled, loaded) == ("1", "True", "True"), done.stderr
    assert collections == "0"  # about 60 with the collector on
    assert int(frozen) > 20_000  # about 45,000 objects with prompt_toolkit 3.0.5x


def test_loading_window_restores_the_collector() -> None:
    """The window turns the collector back on, even when an import fails, unless it was off."""
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    seen: list[bool] = []
    kept: list[list[int]] = []

    def load() -> None:
        with cli._loading_for_good():
            seen.append(gc.isenabled())
            kept.extend([] for _ in range(100))
            raise ImportError("no such module")

    try:
        with pytest.raises(ImportError):
            load()
        assert seen == [False]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(kept)
        gc.disable()
        with cli._loading_for_good():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_typeahead_waits_unechoed_and_the_terminal_is_put_back() -> None:
    """On a terminal: echo and line editing off inside, the settings as found after."""
    import termios

    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "r", closefd=False) as stream:
            found = termios.tcgetattr(slave)
            assert found[3] & termios.ECHO
            assert found[3] & termios.ICANON
            inside: list[int] = []

            def interrupted() -> None:
                with cli._typeahead_kept(stream):
                    inside.append(termios.tcgetattr(slave)[3] & (termios.ECHO | termios.ICANON))
                    raise KeyboardInterrupt

            with pytest.raises(KeyboardInterrupt):
                interrupted()
            assert inside == [0]
            assert termios.tcgetattr(slave) == found
    finally:
        os.close(master)
        os.close(slave)


def test_typeahead_leaves_anything_else_alone() -> None:
    """A pipe is not a terminal: nothing to set, nothing raised."""
    read, write = os.pipe()
    try:
        with os.fdopen(read, "r", closefd=False) as stream, cli._typeahead_kept(stream):
            pass
    finally:
        os.close(read)
        os.close(write)


def test_join_holds_typeahead_while_it_loads() -> None:
    """``achat join`` on a terminal turns echo off before its UI loads, and back on after."""
    master, slave = os.openpty()
    probe = """
import sys, termios
during = []
def hook(event, args):
    if event == "import" and args[0] == "achat.client.ui":
        during.append(termios.tcgetattr(0)[3] & (termios.ECHO | termios.ICANON))
sys.addaudithook(hook)
from achat import cli
code = cli.main(["join", "--port", sys.argv[1], "--nick", "ana"])
print(code, during, termios.tcgetattr(0)[3] & termios.ECHO != 0, sep=";")
"""
    try:
        with closed_port() as port:
            done = subprocess.run(
                [sys.executable, "-c", probe, str(port)],
                stdin=slave,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
    finally:
        os.close(master)
        os.close(slave)
    assert done.stdout.strip() == "1;[0];True", done.stderr


@pytest.mark.parametrize(
    ("command", "says"), [("join", "no standard input"), ("send", "nothing to send")]
)
def test_without_standard_input_is_a_usage_error(
    command: str, says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``achat join <&-`` (stdin closed), or ``achat send <&-`` with no text: a usage error
    that says why, not a crash."""
    monkeypatch.setattr(sys, "stdin", None)
    with closed_port() as port:
        assert cli.main([command, "--port", str(port), "--nick", "ana"]) == 2
    assert says in capsys.readouterr().err


def test_join_put_back_the_terminal_when_terminated() -> None:
    """SIGTERM while ``achat join`` runs on a terminal: echo and line mode back, then the
    process ends by that signal, as it would have."""
    import signal
    import termios
    import time

    async def never_welcome(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await reader.read(65536)

    async def run() -> tuple[int, int, bytes]:
        master, slave = os.openpty()
        try:
            async with fake_server(never_welcome) as port:
                proc = await asyncio.create_subprocess_exec(
                    script("achat"),
                    "join",
                    "--port",
                    str(port),
                    "--nick",
                    "ana",
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                )
                deadline = time.monotonic() + 30
                while termios.tcgetattr(slave)[3] & termios.ECHO:  # until join holds the keys
                    assert time.monotonic() < deadline, "echo never turned off"
                    await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(proc.wait(), 30)
            os.set_blocking(master, False)
            shown = b""
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(master, 65536):
                    shown += chunk
            return code, termios.tcgetattr(slave)[3] & (termios.ECHO | termios.ICANON), shown
        finally:
            os.close(master)
            os.close(slave)

    code, flags, shown = asyncio.run(run())
    assert code == -signal.SIGTERM
    assert flags == termios.ECHO | termios.ICANON
    assert b"\x1b[?7h\x1b[?2004l\x1b[?25h\x1b[0m" in shown  # prompt_toolkit's modes off


def test_typeahead_leaves_an_ignored_hangup_ignored() -> None:
    """Under nohup (SIGHUP ignored) the window keeps it ignored; after it, handlers are back."""
    import signal

    master, slave = os.openpty()
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with os.fdopen(slave, "r", closefd=False) as stream, cli._typeahead_kept(stream):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)
        os.close(master)
        os.close(slave)
