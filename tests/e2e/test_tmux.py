"""The real ``achat`` client in a real terminal (tmux), against a real ``achat-server``.

Each test starts ``achat-server`` on a free loopback port and its own tmux
server (``tmux -L <unique socket>``, so nobody's own tmux is touched), runs
``achat join`` for ana and bob in two 100x30 windows, types with
``send-keys`` and reads the screen with ``capture-pane``. Every wait polls
the screen until a deadline; nothing waits a fixed time.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from achat.client.connection import Client
from achat.protocol.messages import Message
from tests.helpers.procs import ServerProcess, closed_port, script

pytestmark = pytest.mark.e2e

needs_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed: terminal tests run the real client inside tmux",
)

WIDTH, HEIGHT = 100, 30
SCREEN_TIMEOUT = 10.0
POLL = 0.1
PROMPT = "#general>"
TOOLBAR = "│ /help"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process started here: fixed terminal and locale, outside
    any tmux (conftest's no_achat_environment has taken the ACHAT_* variables out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
    env.update(TERM="xterm-256color", LANG="C.UTF-8", LC_ALL="C.UTF-8", **extra)
    return env


class Tmux:
    """A private tmux server holding one detached session, one window per client."""

    SESSION = "achat"

    def __init__(self, workdir: Path) -> None:
        self.socket = f"achat-test-{os.getpid()}-{secrets.token_hex(4)}"
        # The socket lives in a directory of its own (short: sockets paths are limited),
        # removed with the server, so no stale socket is left in the shared tmux directory.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="achat-tmux-"))
        self.workdir = workdir
        self.config = workdir / "tmux.conf"
        # No status line: the client gets the whole 100x30. TERM inside panes comes from
        # default-terminal (tmux overrides a TERM given with -e). Panes stay after their
        # process ends so the last screen can still be read.
        self.config.write_text(
            "set -g status off\n"
            "set -g remain-on-exit on\n"
            "set -g default-terminal xterm-256color\n"
            "set -g default-shell /bin/sh\n"
        )
        self._started = False
        self._status_files: dict[str, Path] = {}

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "-f", str(self.config), *args],
            capture_output=True,
            text=True,
            env=child_env(TMUX_TMPDIR=str(self.socket_dir)),
            timeout=10,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tmux {shlex.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def open(self, name: str, command: list[str]) -> str:
        """Run ``command`` in a new window called ``name``; returns its pane id."""
        if self._started:
            head = ["new-window", "-d", "-t", self.SESSION]
        else:
            head = ["new-session", "-d", "-s", self.SESSION, "-x", str(WIDTH), "-y", str(HEIGHT)]
        self._started = True
        # The shell records the exit status itself: tmux's own pane_dead_status is not
        # always filled in (tmux 3.3a sometimes leaves the exited client unreaped).
        status_file = self.workdir / f"{name}.status"
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(status_file))}"
        pane = self.tmux(*head, "-n", name, "-P", "-F", "#{pane_id}", "-e", "LANG=C.UTF-8", shell)
        pane = pane.strip()
        self._status_files[pane] = status_file
        return pane

    def screen(self, pane: str) -> list[str]:
        """The visible lines of ``pane``, right-trimmed."""
        return [line.rstrip() for line in self.tmux("capture-pane", "-p", "-t", pane).splitlines()]

    def type(self, pane: str, text: str) -> None:
        """Type ``text`` literally (no key names), without Enter."""
        self.tmux("send-keys", "-t", pane, "-l", text)

    def press(self, pane: str, key: str) -> None:
        self.tmux("send-keys", "-t", pane, key)

    def exit_status(self, pane: str) -> int | None:
        """The exit status of the command run in ``pane``; None while it runs."""
        try:
            text = self._status_files[pane].read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    def wait_screen(self, pane: str, what: str, check: Callable[[list[str]], bool]) -> list[str]:
        """Poll ``pane`` until ``check(screen)`` holds; returns that screen or fails showing it."""
        deadline = time.monotonic() + SCREEN_TIMEOUT
        while True:
            lines = self.screen(pane)
            if check(lines):
                return lines
            if time.monotonic() > deadline:
                shown = "\n".join(lines)
                raise AssertionError(f"timed out waiting for {what}; screen of {pane}:\n{shown}")
            time.sleep(POLL)

    def kill(self) -> None:
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"],
            capture_output=True,
            env=child_env(TMUX_TMPDIR=str(self.socket_dir)),
            timeout=10,
            check=False,
        )
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def find(lines: list[str], pattern: str) -> int:
    """Index of the last line matching the regex ``pattern``, or -1."""
    regex = re.compile(pattern)
    hits = [i for i, line in enumerate(lines) if regex.search(line)]
    return hits[-1] if hits else -1


def prompt_line(lines: list[str]) -> int:
    return find(lines, re.escape(PROMPT))


def toolbar_line(lines: list[str]) -> int:
    return find(lines, re.escape(TOOLBAR) + "$")


def ready(here: int) -> Callable[[list[str]], bool]:
    """A screen showing the #general prompt above a toolbar that counts ``here`` people."""

    def check(lines: list[str]) -> bool:
        bar = toolbar_line(lines)
        return 0 <= prompt_line(lines) < bar and f"│ {here} here │ connected" in lines[bar]

    return check


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """``achat-server`` on a 127.0.0.1 port it picked, listening."""
    proc = ServerProcess(tmp_path / "server", "--store", "memory")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


def join_command(server: ServerProcess, nick: str) -> list[str]:
    return [
        script("achat"),
        "join",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--nick",
        nick,
    ]


@dataclass(frozen=True)
class Chat:
    """Ana and bob, each in ``achat join`` in their own tmux window, both in #general."""

    tmux: Tmux
    ana: str  # pane ids
    bob: str


@pytest.fixture
def chat(server_process: ServerProcess, tmp_path: Path) -> Iterator[Chat]:
    tmux = Tmux(tmp_path)
    try:
        ana = tmux.open("ana", join_command(server_process, "ana"))
        tmux.wait_screen(ana, "ana's prompt", ready(1))
        bob = tmux.open("bob", join_command(server_process, "bob"))
        tmux.wait_screen(bob, "bob's prompt", ready(2))
        tmux.wait_screen(ana, "ana to see bob come in", ready(2))
        yield Chat(tmux, ana, bob)
    finally:
        tmux.kill()


@needs_tmux
def test_message_appears_above_the_prompt_and_toolbar(chat: Chat) -> None:
    """A message bob sends shows on ana's screen above her prompt line and the toolbar."""
    t = chat.tmux
    t.type(chat.bob, "hello from bob")
    t.press(chat.bob, "Enter")

    def shown(lines: list[str]) -> bool:
        return find(lines, r"<bob> hello from bob$") >= 0 and ready(2)(lines)

    lines = t.wait_screen(chat.ana, "bob's message on ana's screen", shown)
    message = find(lines, r"<bob> hello from bob$")
    prompt = prompt_line(lines)
    assert re.fullmatch(r"\d\d:\d\d <bob> hello from bob", lines[message])
    assert message < prompt < toolbar_line(lines) == HEIGHT - 1  # the bar is the bottom row
    assert lines[prompt] == PROMPT
    assert sum("hello from bob" in line for line in lines) == 1


@needs_tmux
def test_half_typed_line_survives_an_incoming_message(chat: Chat) -> None:
    """Bob's message prints above ana's half-typed line, which stays intact and is sent whole."""
    t = chat.tmux
    half = "this is only half of what I"
    t.type(chat.ana, half)
    t.wait_screen(chat.ana, "ana's half line", lambda lines: PROMPT + " " + half in lines)

    t.type(chat.bob, "interrupting you")
    t.press(chat.bob, "Enter")

    def interrupted(lines: list[str]) -> bool:
        message = find(lines, r"<bob> interrupting you$")
        prompt = prompt_line(lines)
        return 0 <= message < prompt < toolbar_line(lines) and lines[prompt] == f"{PROMPT} {half}"

    lines = t.wait_screen(chat.ana, "bob's message above ana's half line", interrupted)
    assert sum(half in line for line in lines) == 1

    t.type(chat.ana, " wanted to say")
    t.press(chat.ana, "Enter")
    whole = half + " wanted to say"

    def sent(lines: list[str]) -> bool:
        return find(lines, f"<ana> {re.escape(whole)}$") >= 0

    t.wait_screen(chat.bob, "ana's whole line on bob's screen", sent)
    lines = t.wait_screen(chat.ana, "ana's own line above her prompt", sent)
    assert lines[prompt_line(lines)] == PROMPT


@needs_tmux
def test_quit_ends_the_process_and_others_see_it(chat: Chat) -> None:
    """/quit ends bob's achat with status 0 and ana sees 'bob left #general (quit)'."""
    t = chat.tmux
    t.type(chat.bob, "/quit")
    t.press(chat.bob, "Enter")
    lines = t.wait_screen(
        chat.ana, "bob leaving", lambda ls: find(ls, r"-- bob left #general \(quit\)$") >= 0
    )
    assert find(lines, r"bob left") < prompt_line(lines)
    t.wait_screen(chat.ana, "the toolbar to count ana alone", ready(1))
    deadline = time.monotonic() + SCREEN_TIMEOUT
    while (status := t.exit_status(chat.bob)) is None and time.monotonic() < deadline:
        time.sleep(POLL)
    assert status == 0


# -- achat send (no terminal needed) -----------------------------------------------


async def run_send(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run ``achat send ARGS``; returns its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        script("achat"),
        "send",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        async with asyncio.timeout(SCREEN_TIMEOUT):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def next_message(client: Client) -> Message:
    async with asyncio.timeout(SCREEN_TIMEOUT):
        while True:
            event = await client.next_event()
            if isinstance(event, Message):
                return event


async def test_send_delivers_one_message(server_process: ServerProcess) -> None:
    """``achat send`` posts its argument to the room, reports the seq and exits 0."""
    async with Client("127.0.0.1", server_process.port, "ana", send_rate=0) as ana:
        await ana.join("ops")
        where = ("--host", "127.0.0.1", "--port", str(server_process.port))
        status, out, err = await run_send(*where, "--nick", "bot", "--room", "#Ops", "deployed")
        assert (status, err) == (0, "")
        assert out == "sent to #ops as message 1\n"
        message = await next_message(ana)
        assert (message.room, message.sender, message.text) == ("ops", "bot", "deployed")


async def test_send_reads_stdin_when_no_text(server_process: ServerProcess) -> None:
    """``achat send`` without a text argument sends what it reads from stdin."""
    async with Client("127.0.0.1", server_process.port, "ana", send_rate=0) as ana:
        await ana.join("general")
        where = ("--host", "127.0.0.1", "--port", str(server_process.port))
        status, _, err = await run_send(*where, "--nick", "ci", stdin=b"build 42 is green\n")
        assert (status, err) == (0, "")
        message = await next_message(ana)
        assert (message.sender, message.text) == ("ci", "build 42 is green")
        assert message.room == "general"


async def test_send_to_a_port_nobody_listens_on_fails() -> None:
    """``achat send`` exits 1 with a message on stderr when the server cannot be reached."""
    with closed_port() as port:
        where = ("--host", "127.0.0.1", "--port", str(port))
        status, out, err = await run_send(*where, "--nick", "bot", "anyone?")
    assert status == 1
    assert out == ""
    assert err.startswith("achat: cannot reach 127.0.0.1:")


async def test_send_with_nothing_to_send_is_a_usage_error() -> None:
    """``achat send`` with empty stdin exits 2 without connecting anywhere."""
    with closed_port() as port:
        where = ("--host", "127.0.0.1", "--port", str(port))
        status, _, err = await run_send(*where, "--nick", "bot", stdin=b"  \n")
    assert status == 2
    assert "nothing to send" in err
