"""The prompt_toolkit chat window, typed into through a pipe, against a real server.

``server`` (tests/conftest.py) is a real :class:`Server` on 127.0.0.1 and a free
port; the window reads a pipe and writes to a dummy output, and the tests assert
on ``ui.transcript`` and ``ui.state``, polling with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import fragment_list_to_text
from prompt_toolkit.input import PipeInput, create_pipe_input
from prompt_toolkit.output import DummyOutput

from achat.client import commands as cmd
from achat.client import connection
from achat.client.connection import (
    SEND_BURST,
    Backoff,
    Client,
    ConnectionLost,
    Disconnected,
    Event,
    Reconnected,
)
from achat.client.ui import (
    EVENT_SLICE_SECONDS,
    OPENING_WAIT_SECONDS,
    ChatCompleter,
    ChatState,
    ChatUI,
    _as_text,
)
from achat.protocol.messages import (
    ClientFrame,
    DmEvent,
    Error,
    History,
    HistoryRequest,
    Join,
    Joined,
    Message,
    Names,
    Parted,
    Renamed,
    TopicEvent,
    Welcome,
    encode,
)
from achat.server.app import Server
from achat.server.config import ServerConfig
from achat.store.memory import MemoryStore
from tests.helpers.fakeserver import WELCOME, answering, fake_server, joined
from tests.helpers.faultproxy import FaultProxy

ESC_ENTER = "\x1b\r"
CTRL_D = "\x04"
CTRL_C = "\x03"
TAB = "\t"
UP = "\x1b[A"

E = TypeVar("E")


async def until(what: str, condition: Callable[[], bool], timeout: float = 2) -> None:
    """Return once ``condition()`` is true; fail saying ``what`` was awaited after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def next_of(client: Client, kind: type[E], timeout: float = 2) -> E:
    """The next event of ``kind`` that ``client`` receives, skipping every other event."""
    async with asyncio.timeout(timeout):
        while True:
            event: Event = await client.next_event()
            if isinstance(event, kind):
                return event


@dataclass
class Window:
    """A running :class:`ChatUI` and the pipe its keyboard is."""

    ui: ChatUI
    keyboard: PipeInput
    task: asyncio.Task[None]
    seen: int = 0

    def type(self, keys: str) -> None:
        self.keyboard.send_text(keys)

    def mark(self) -> None:
        """Only lines shown from now on count for :meth:`new_lines`."""
        self.seen = len(self.ui.transcript)

    def new_lines(self) -> list[str]:
        return self.ui.transcript[self.seen :]

    def has(self, text: str) -> bool:
        """True once a line shown since :meth:`mark` contains ``text``."""
        return any(text in line for line in self.new_lines())

    async def wait_for(self, text: str, timeout: float = 2) -> str:
        """The first line shown since :meth:`mark` that contains ``text``."""
        try:
            await until(repr(text), lambda: self.has(text), timeout)
        except AssertionError:
            shown = "\n".join(self.new_lines())
            raise AssertionError(f"{text!r} never shown; shown since mark:\n{shown}") from None
        return next(line for line in self.new_lines() if text in line)

    def toolbar(self) -> str:
        return fragment_list_to_text(self.ui._toolbar())


@pytest.fixture
async def bob(server: Server) -> AsyncIterator[Client]:
    """Another person in #general, using the plain client API."""
    async with Client("127.0.0.1", server.port, "bob") as client:
        await client.join("general")
        yield client


@contextlib.asynccontextmanager
async def chat_window(
    server: Server,
    nick: str = "ana",
    room: str | None = "general",
    *,
    reconnect: bool = False,
    send_rate: float | None = None,
) -> AsyncIterator[Window]:
    """``nick``'s chat window, running, and (with ``room``) joined to it; paced as the
    server's welcome says, as `achat join` is, unless ``send_rate`` is given."""
    backoff = Backoff(initial=0.01, cap=0.05)
    client = Client(
        "127.0.0.1", server.port, nick, reconnect=reconnect, backoff=backoff, send_rate=send_rate
    )
    await client.connect()
    with create_pipe_input() as keyboard:
        ui = ChatUI(client, room=room, input=keyboard, output=DummyOutput())
        task = asyncio.create_task(ui.run())
        window = Window(ui, keyboard, task)
        try:
            if room is not None:
                await until(f"{nick} to be in #{room}", lambda: ui.state.room == room)
            else:
                await until("the prompt", lambda: ui.session.app.is_running)
            yield window
        finally:
            if not task.done():
                ui.quit()
            async with asyncio.timeout(5):
                await task


@pytest.fixture
async def ana(server: Server, bob: Client) -> AsyncIterator[Window]:
    """Ana's chat window in #general, where bob already is."""
    async with chat_window(server) as window:
        window.mark()
        yield window


# -- joining and talking ---------------------------------------------------------


async def test_initial_join_shows_names_and_sets_current_room(server: Server, bob: Client) -> None:
    """The first join shows who is in the room and makes it the current room."""
    async with chat_window(server) as window:
        ui = window.ui
        await window.wait_for("-- #general: ")
        assert "-- connected to achat as ana" in ui.transcript
        assert "-- #general: ana, bob (2 people)" in ui.transcript
        assert ui.state.nick == "ana"
        assert ui.state.room == "general"
        assert ui.state.rooms == {"general": ["ana", "bob"]}
        assert ui.state.connection == "connected"
        assert "[#general]" in window.toolbar()
        assert "2 here" in window.toolbar()


async def test_the_first_prompt_waits_for_the_rooms_answer(
    server: Server, bob: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Who is in the first room and its recent lines are shown before the first prompt."""
    await bob.say("general", "said before ana came")
    opening, _ = await first_prompt(server.port, monkeypatch, OPENING_WAIT_SECONDS)
    assert "-- #general: ana, bob (2 people)" in opening
    assert any("said before ana came" in line for line in opening), opening


async def test_the_first_prompt_waits_no_longer_than_its_bound() -> None:
    """A server that never answers the join still gets a prompt, after ``opening_wait``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # hello
        writer.write(WELCOME)
        seen = b""
        while b'"bye"' not in seen:  # the join, never answered, then the window's goodbye
            chunk = await reader.read(65536)
            if not chunk:
                break
            seen += chunk
        writer.close()

    async with fake_server(handler) as port:
        client = Client("127.0.0.1", port, "ana")
        await client.connect()
        with create_pipe_input() as keyboard:
            ui = ChatUI(
                client, room="general", input=keyboard, output=DummyOutput(), opening_wait=0.05
            )
            task = asyncio.create_task(ui.run())
            try:
                await until("the prompt", lambda: ui.session.app.is_running)
                assert ui.state.room is None
                assert "(no room)" in fragment_list_to_text(ui._toolbar())
                assert not ui._opening  # a late answer is an ordinary event
            finally:
                ui.quit()
                async with asyncio.timeout(5):
                    await task


async def first_prompt(
    port: int, monkeypatch: pytest.MonkeyPatch, opening_wait: float
) -> tuple[list[str], ChatUI]:
    """Run ana's window on ``port`` until its first prompt; the transcript at that moment."""
    client = Client("127.0.0.1", port, "ana")
    await client.connect()
    with create_pipe_input() as keyboard:
        ui = ChatUI(
            client, room="general", input=keyboard, output=DummyOutput(), opening_wait=opening_wait
        )
        shown: list[list[str]] = []
        prompt_async = ui.session.prompt_async

        async def prompt(*args: Any, **kwargs: Any) -> str:
            shown.append(list(ui.transcript))
            return await prompt_async(*args, **kwargs)

        monkeypatch.setattr(ui.session, "prompt_async", prompt)
        task = asyncio.create_task(ui.run())
        try:
            await until("the prompt", lambda: bool(shown))
        finally:
            ui.quit()
            async with asyncio.timeout(5):
                await task
    return shown[0], ui


async def test_the_opening_waits_for_every_page_of_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names split in pages: the first prompt comes after the last page, not the first."""

    async def pages(writer: asyncio.StreamWriter, join: ClientFrame) -> None:
        if not isinstance(join, Join):
            return
        writer.write(encode(Joined(room=join.room, nick="ana", ts=1)))
        page = Names(room=join.room, nicks=["a1", "a2"], topic="", seq=0, ref=join.ref, more=True)
        writer.write(encode(page))
        await writer.drain()
        await asyncio.sleep(0.05)  # the last page comes later, in its own read
        writer.write(
            encode(Names(room=join.room, nicks=["ana", "zed"], topic="", seq=0, ref=join.ref))
        )

    async with fake_server(answering(pages)) as port:
        shown, ui = await first_prompt(port, monkeypatch, opening_wait=30)
    assert "-- #general: a1, a2, ana, zed (4 people)" in shown
    assert ui.state.room == "general"


async def test_the_opening_waits_for_the_history_after_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recent lines partly expired: the notice of the gap, then the lines, then the prompt."""

    async def answer(writer: asyncio.StreamWriter, frame: ClientFrame) -> None:
        if isinstance(frame, Join):
            joined(writer, frame, 7)
        elif isinstance(frame, HistoryRequest):
            gap = Error(
                code="history_gap", message="older lines expired", fatal=False, ref=frame.ref
            )
            writer.write(encode(gap))
            await writer.drain()
            await asyncio.sleep(0.05)  # what is left comes later, in its own read
            kept = Message(room=frame.room, seq=7, ts=1, sender="bob", text="still here")
            writer.write(
                encode(History(room=frame.room, messages=[kept], more=False, ref=frame.ref))
            )

    async with fake_server(answering(answer)) as port:
        shown, _ = await first_prompt(port, monkeypatch, opening_wait=30)
    assert any("still here" in line for line in shown), shown


async def test_a_servers_own_refusal_of_the_context_is_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The window keeps quiet only about the client's own error for a context lost with
    the server's messages: an ``unavailable`` the server sends for it is shown."""

    async def answer(writer: asyncio.StreamWriter, frame: ClientFrame) -> None:
        if isinstance(frame, Join):
            joined(writer, frame, 7)
        elif isinstance(frame, HistoryRequest):
            text = "the archive is down"
            writer.write(
                encode(Error(code="unavailable", message=text, fatal=False, ref=frame.ref))
            )

    async with fake_server(answering(answer)) as port:
        shown, _ = await first_prompt(port, monkeypatch, opening_wait=30)
    assert any("the archive is down" in line for line in shown), shown


async def test_the_opening_ends_when_the_connection_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection closed before the join is answered ends the wait at once."""

    async def close(writer: asyncio.StreamWriter, frame: ClientFrame) -> None:
        writer.close()

    async with fake_server(answering(close)) as port:
        shown, ui = await first_prompt(port, monkeypatch, opening_wait=30)
    assert any("disconnected" in line for line in shown), shown
    assert ui.state.room is None


async def test_without_a_room_the_window_starts_in_no_room(server: Server) -> None:
    """With no first room nothing is joined and a typed line says to join first."""
    async with chat_window(server, room=None) as window:
        assert window.ui.state.room is None
        assert "(no room)" in window.toolbar()
        window.type("hello\r")
        await window.wait_for("! join a room first: /join #general")


async def test_typed_text_is_sent_and_its_echo_shown(ana: Window, bob: Client) -> None:
    """A typed line goes to the current room and appears once the server echoes it."""
    ana.type("hello everyone\r")
    received = await next_of(bob, Message)
    assert (received.room, received.sender, received.text) == ("general", "ana", "hello everyone")
    line = await ana.wait_for("<ana> hello everyone")
    assert line.endswith("<ana> hello everyone")
    assert sum("hello everyone" in shown for shown in ana.new_lines()) == 1


async def test_lines_typed_faster_than_the_flood_limit_are_queued_not_lost(
    server: Server, bob: Client
) -> None:
    """Lines typed faster than the client's own flood limit wait in order, the toolbar
    counts them, and every one reaches the room."""
    count = SEND_BURST + 4
    async with chat_window(server, send_rate=20) as window:
        window.mark()
        window.type("".join(f"line {i}\r" for i in range(count)))
        await until("lines to queue", lambda: window.ui.client.queued > 0)
        assert "queued (flood limit)" in window.toolbar()
        await window.wait_for(f"<ana> line {count - 1}")
        shown = [line.split("<ana> ")[1] for line in window.new_lines() if "<ana> " in line]
        assert "queued" not in window.toolbar()
    assert shown == [f"line {i}" for i in range(count)]
    received = [(await next_of(bob, Message)).text for _ in range(count)]
    assert received == shown


async def test_message_from_another_client_appears(ana: Window, bob: Client) -> None:
    """A message someone else says in the current room is shown with their nick."""
    await bob.say("general", "hi ana")
    line = await ana.wait_for("<bob> hi ana")
    assert "#general" not in line  # the current room is not repeated on each line


async def test_message_in_another_room_is_labelled_with_it(ana: Window, bob: Client) -> None:
    """A message in a joined room that is not the current one shows that room's name."""
    ana.type("/join #dev\r")
    await until("#dev to be current", lambda: ana.ui.state.room == "dev")
    await bob.say("general", "over here")
    line = await ana.wait_for("over here")
    assert "#general <bob> over here" in line


async def test_slash_slash_sends_a_line_starting_with_slash(ana: Window, bob: Client) -> None:
    """``//etc`` sends the text ``/etc`` instead of running a command."""
    ana.type("//etc/hosts is fine\r")
    received = await next_of(bob, Message)
    assert received.text == "/etc/hosts is fine"


async def test_me_sends_an_action(ana: Window, bob: Client) -> None:
    """``/me waves`` is sent as ``/me waves`` and shown as ``* ana waves``."""
    ana.type("/me waves\r")
    assert (await next_of(bob, Message)).text == "/me waves"
    await ana.wait_for("* ana waves")


async def test_escape_enter_makes_one_multiline_message(ana: Window, bob: Client) -> None:
    """Esc Enter inserts a newline, so two lines go out as one message."""
    ana.type("first line" + ESC_ENTER + "second line\r")
    received = await next_of(bob, Message)
    assert received.text == "first line\nsecond line"
    line = await ana.wait_for("<ana> first line")
    assert line.endswith("<ana> first line\n      second line")
    assert not any(shown.startswith("second line") for shown in ana.new_lines())


async def test_up_arrow_recalls_the_previous_line(ana: Window, bob: Client) -> None:
    """Up recalls the line sent before, and Enter sends it again."""
    ana.type("once more\r")
    assert (await next_of(bob, Message)).text == "once more"
    ana.type(UP + "\r")
    assert (await next_of(bob, Message)).text == "once more"


# -- commands ---------------------------------------------------------------------


async def test_join_switches_room_and_toolbar(ana: Window, bob: Client) -> None:
    """/join makes the new room current, the toolbar brackets it, and text goes there."""
    ana.type("/join #Dev\r")
    await until("#dev to be current", lambda: ana.ui.state.room == "dev")
    await ana.wait_for("-- #dev: ana (1 person)")
    assert set(ana.ui.state.rooms) == {"general", "dev"}
    toolbar = ana.toolbar()
    assert "[#dev] #general" in toolbar
    assert "[#general]" not in toolbar
    assert "1 here" in toolbar

    await bob.join("dev")
    ana.type("in dev\r")
    received = await next_of(bob, Message)
    assert (received.room, received.text) == ("dev", "in dev")


async def test_join_of_a_joined_room_only_switches(ana: Window, bob: Client) -> None:
    """/join of a room already joined switches to it without asking the server again."""
    ana.type("/join #dev\r")
    await until("#dev to be current", lambda: ana.ui.state.room == "dev")
    ana.mark()
    ana.type("/join #general\r")
    await ana.wait_for("-- now talking in #general")
    assert ana.ui.state.room == "general"
    assert "#dev [#general]" in ana.toolbar()
    assert not ana.has("-- #general:")  # no second names list: nothing was sent


async def test_msg_shows_the_dm_after_the_ack(ana: Window, bob: Client) -> None:
    """/msg delivers a direct message and shows ``you → *bob*`` once the server acks it."""
    ana.type("/msg bob psst\r")
    received = await next_of(bob, DmEvent)
    assert (received.sender, received.to, received.text) == ("ana", "bob", "psst")
    line = await ana.wait_for("you → *bob*: psst")
    assert line.endswith("you → *bob*: psst")


async def test_msg_to_nobody_shows_the_error_not_the_dm(ana: Window) -> None:
    """/msg to a nick that is not online shows the refusal and never ``you → *ghost*``."""
    ana.type("/msg ghost boo\r")
    await ana.wait_for("nobody by that name is online")
    assert not ana.has("you → *ghost*")


async def test_dm_from_someone_shows_as_to_you(ana: Window, bob: Client) -> None:
    """A direct message received shows as ``*bob* → you: …``."""
    await bob.dm("ana", "hey you")
    await ana.wait_for("*bob* → you: hey you")


async def test_nick_updates_state_and_toolbar(ana: Window, bob: Client) -> None:
    """/nick renames: the state, the member list and the toolbar follow the server's reply."""
    ana.type("/nick anna\r")
    renamed = await next_of(bob, Renamed)
    assert (renamed.old, renamed.new) == ("ana", "anna")
    await until("state.nick to be anna", lambda: ana.ui.state.nick == "anna")
    await ana.wait_for("-- ana is now known as anna")
    assert ana.ui.state.rooms["general"] == ["anna", "bob"]
    assert ana.toolbar().startswith(" anna │")


async def test_nick_taken_keeps_the_old_nick(ana: Window) -> None:
    """/nick to a nick in use shows the refusal and the nick stays as it was."""
    ana.type("/nick bob\r")
    await ana.wait_for("that nick is taken")
    assert ana.ui.state.nick == "ana"


async def test_part_leaves_the_current_room(ana: Window, bob: Client) -> None:
    """/part leaves the current room and the next joined room becomes current."""
    ana.type("/join #dev\r")
    await until("#dev to be current", lambda: ana.ui.state.room == "dev")
    await bob.join("dev")
    ana.type("/part see you\r")
    parted = await next_of(bob, Parted)
    assert (parted.room, parted.nick, parted.reason) == ("dev", "ana", "see you")
    await ana.wait_for("-- you left #dev; now in #general")
    assert ana.ui.state.room == "general"
    assert set(ana.ui.state.rooms) == {"general"}
    assert "[#general]" in ana.toolbar()
    assert "#dev" not in ana.toolbar()


async def test_part_of_another_room_keeps_the_current_one(ana: Window) -> None:
    """/part #room for a room that is not current leaves it and stays where the user is."""
    ana.type("/join #dev\r")
    await until("#dev to be current", lambda: ana.ui.state.room == "dev")
    ana.type("/join #general\r/part #dev\r")
    await ana.wait_for("-- you left #dev")
    assert not any("now in" in line for line in ana.ui.transcript)
    assert ana.ui.state.room == "general"
    assert set(ana.ui.state.rooms) == {"general"}


async def test_part_of_the_last_room_leaves_no_room(ana: Window) -> None:
    """/part of the only room leaves the window in no room, and says so."""
    ana.type("/part\r")
    await ana.wait_for("-- you left #general")
    assert ana.ui.state.room is None
    assert ana.ui.state.rooms == {}
    assert "(no room)" in ana.toolbar()


async def test_who_lists_the_people_in_the_room(ana: Window, server: Server) -> None:
    """/who lists the people in the current room, including someone who came in later."""
    async with Client("127.0.0.1", server.port, "cy") as cy:
        await cy.join("general")
        await ana.wait_for("cy joined #general")
        ana.mark()
        ana.type("/who\r")
        await ana.wait_for("-- #general: ana, bob, cy (3 people)")


async def test_who_of_a_room_not_joined(ana: Window, bob: Client) -> None:
    """/who #room lists a room the user is not in, without joining it."""
    await bob.join("ops")
    ana.type("/who #ops\r")
    await ana.wait_for("-- #ops: bob (1 person)")
    assert "ops" not in ana.ui.state.rooms


async def test_rooms_lists_rooms_with_counts_and_topics(ana: Window, bob: Client) -> None:
    """/rooms lists every room with how many are in it and its topic."""
    await bob.join("ops")
    bob.set_topic("ops", "deploys")
    await next_of(bob, TopicEvent)
    ana.type("/rooms\r")
    await ana.wait_for("-- 2 rooms:")
    await ana.wait_for("--   #general (2)")
    await ana.wait_for("--   #ops (1) — deploys")


async def test_topic_set_and_show(ana: Window, bob: Client) -> None:
    """/topic TEXT sets the topic for everyone and /topic alone shows it."""
    ana.type("/topic\r")
    await ana.wait_for("-- #general has no topic")
    ana.type("/topic ship it friday\r")
    await ana.wait_for("ana set the topic of #general: ship it friday")
    assert ana.ui.state.topics["general"] == "ship it friday"
    ana.mark()
    ana.type("/topic\r")
    await ana.wait_for("-- topic of #general: ship it friday")


async def test_topic_set_by_someone_else_is_shown(ana: Window, bob: Client) -> None:
    """A topic change by another member is shown and remembered for /topic."""
    bob.set_topic("general", "lunch at noon")
    await ana.wait_for("bob set the topic of #general: lunch at noon")
    ana.type("/topic\r")
    await ana.wait_for("-- topic of #general: lunch at noon")


async def test_history_shows_the_last_messages(ana: Window, bob: Client) -> None:
    """/history N shows the last N messages of the current room, oldest first."""
    for text in ("one", "two", "three"):
        await bob.say("general", text)
    await ana.wait_for("<bob> three")
    ana.mark()
    ana.type("/history 2\r")
    await ana.wait_for("-- history of #general:")
    await ana.wait_for("<bob> three")
    lines = ana.new_lines()
    start = lines.index("-- history of #general:")
    shown = [line.split(" ", 1)[1] for line in lines[start + 1 : start + 3]]
    assert shown == ["<bob> two", "<bob> three"]
    assert not any("<bob> one" in line for line in lines)


async def test_joining_shows_recent_messages_for_context(server: Server, bob: Client) -> None:
    """Joining a room with messages in it shows its recent history once."""
    await bob.say("general", "before you came")
    async with chat_window(server) as window:
        await window.wait_for("<bob> before you came")
        assert sum("before you came" in line for line in window.ui.transcript) == 1


async def test_help_lists_every_command(ana: Window) -> None:
    """/help lists every command the README documents, with its usage."""
    ana.type("/help\r")
    await ana.wait_for("Tab completes")
    text = "\n".join(ana.new_lines())
    for usage in (
        "/join #room",
        "/part [#room] [reason]",
        "/msg NICK TEXT",
        "/me ACTION",
        "/nick NEWNICK",
        "/who [#room]",
        "/rooms",
        "/topic [#room] [TEXT]",
        "/history [N]",
        "/help",
        "/quit [reason]",
    ):
        assert usage in text, usage


async def test_unknown_command_shows_an_error_and_sends_nothing(ana: Window, bob: Client) -> None:
    """An unknown /command shows an error line and nothing reaches the server."""
    ana.type("/frobnicate now\r")
    line = await ana.wait_for("unknown command")
    assert line.startswith("! unknown command /frobnicate")
    ana.type("after\r")
    assert (await next_of(bob, Message)).text == "after"  # nothing was said before it
    assert not ana.has("<ana> /frobnicate")


async def test_bad_usage_shows_how_to_write_it(ana: Window) -> None:
    """A command missing its arguments shows its usage."""
    ana.type("/msg bob\r")
    await ana.wait_for("! usage: /msg NICK TEXT")


# -- quitting and the connection ---------------------------------------------------


async def test_ctrl_d_quits_cleanly(server: Server, bob: Client) -> None:
    """Ctrl-D ends the window without error and the others see ana leave (quit)."""
    async with chat_window(server) as window:
        window.type(CTRL_D)
        async with asyncio.timeout(2):
            await window.task
        assert not window.ui.client.connected
    parted = await next_of(bob, Parted)
    assert (parted.nick, parted.room, parted.reason) == ("ana", "general", "quit")


async def test_quit_with_a_reason(server: Server, bob: Client) -> None:
    """/quit REASON ends the window and the others see that reason."""
    async with chat_window(server) as window:
        window.type("/quit gone fishing\r")
        async with asyncio.timeout(2):
            await window.task
    parted = await next_of(bob, Parted)
    assert (parted.nick, parted.reason) == ("ana", "gone fishing")


async def test_server_closing_shows_disconnected(ana: Window, server: Server) -> None:
    """When the server goes away the state and a line say disconnected; typing sends nothing."""
    await server.close()
    await until("disconnected", lambda: ana.ui.state.connection == "disconnected")
    await ana.wait_for("! disconnected: ")
    assert "disconnected" in ana.toolbar()
    assert not ana.task.done()  # the window stays open so the user can read it
    ana.type("anyone there?\r")
    await ana.wait_for("! not connected: nothing was sent")


async def test_reconnecting_keeps_typed_lines_and_sends_them(server: Server) -> None:
    """With reconnect on, a lost server shows reconnecting; a line typed meanwhile is sent later."""
    port = server.port
    async with chat_window(server, reconnect=True) as window:
        await server.close()
        await until("reconnecting", lambda: window.ui.state.connection.startswith("reconnecting"))
        await window.wait_for("! connection lost: ")
        assert "reconnecting" in window.toolbar()
        window.type("while you were out\r")
        await window.wait_for("-- (pending, sent when reconnected) while you were out")
        assert "1 unsent" in window.toolbar()

        # The same port, released a moment ago: the client only knows that address.
        again = Server(ServerConfig(host="127.0.0.1", port=port), MemoryStore())
        await again.start()
        try:
            await window.wait_for("-- reconnected; resending 1 unsent message(s)")
            await window.wait_for("<ana> while you were out")
            assert window.ui.state.connection == "connected"
            assert window.ui.state.room == "general"
        finally:
            window.ui.quit()
            await window.task
            await again.close()


async def test_a_server_restarted_without_its_history_is_followed(server: Server) -> None:
    """The server restarts with an empty memory store, numbering #general from 1 again
    (its welcome says so with a new history id): the window says so, and shows what is
    said there, not dropping it as seen."""
    port = server.port
    async with (
        chat_window(server, reconnect=True) as window,
        Client("127.0.0.1", port, "bob", send_rate=0) as bob,
    ):
        await bob.join("general")
        for text in ("one", "two"):
            await bob.say("general", text)
        await window.wait_for("<bob> two")
        await server.close()
        await window.wait_for("! connection lost: ")
        again = Server(ServerConfig(host="127.0.0.1", port=port), MemoryStore())
        await again.start()
        try:
            await window.wait_for(
                "! the server has lost its messages and numbers them again from 1: "
                "what it has of #general is shown from its first message"
            )
            async with Client("127.0.0.1", port, "cy", send_rate=0) as cy:
                await cy.join("general")
                await cy.say("general", "said after the restart")
            await window.wait_for("<cy> said after the restart")
        finally:
            window.ui.quit()
            await window.task
            await again.close()


@pytest.mark.parametrize("cut", ["in the names", "in the context"])
async def test_a_room_joined_as_the_server_lost_its_messages_is_shown_once(cut: str) -> None:
    """The window's join of #x is cut off in its names (the room's place unknown), or in
    the answer to its context (asked by seq of the old numbering), and the client comes
    back to a server with a new history. The new server's messages are shown once each,
    as context or as the room's backlog, and no error for the context lost on the way."""
    old = Server(ServerConfig(host="127.0.0.1", port=0), MemoryStore())
    new = Server(ServerConfig(host="127.0.0.1", port=0), MemoryStore())
    await old.start()
    await new.start()
    proxy = await FaultProxy("127.0.0.1", old.port).start()
    for server, nick, said in ((old, "bob", "old"), (new, "cy", "new")):
        async with Client("127.0.0.1", server.port, nick) as client:
            await client.join("x")
            for i in range(1, 4):
                await client.say("x", f"{said} {i}")
    client = Client("127.0.0.1", proxy.port, "ana", reconnect=True, backoff=Backoff(0.01, 0.05))
    await client.connect()
    joined_size = len(encode(Joined(room="x", nick="ana", ts=int(time.time() * 1000))))
    names_size = len(encode(Names(room="x", nicks=["ana"], topic="", seq=3, ref="0123abcd-1")))
    proxy.target = ("127.0.0.1", new.port)
    proxy.reset_after(joined_size + (2 if cut == "in the names" else names_size + 60))
    try:
        with create_pipe_input() as keyboard:
            ui = ChatUI(client, room="x", input=keyboard, output=DummyOutput())
            window = Window(ui, keyboard, asyncio.create_task(ui.run()))
            await window.wait_for("<cy> new 3")
            await until("everything answered", lambda: not client._outbox and client.connected)
            ui.quit()
            await window.task
    finally:
        await client.close()
        await proxy.close()
        await old.close()
        await new.close()
    assert proxy.resets == 1
    shown = [line.split("> ", 1)[1] for line in ui.transcript if "<cy> " in line]
    assert shown == ["new 1", "new 2", "new 3"]
    assert not [line for line in ui.transcript if "unavailable" in line or "old " in line]


async def test_a_room_left_while_offline_is_left_on_reconnecting(server: Server) -> None:
    """/part typed while reconnecting says it will leave; reconnected, the room is not joined."""
    port = server.port
    async with chat_window(server, reconnect=True) as window:
        await server.close()
        await window.wait_for("! connection lost: ")
        window.type("/part\r")
        await window.wait_for("-- (leaving #general when reconnected)")
        again = Server(ServerConfig(host="127.0.0.1", port=port), MemoryStore())
        await again.start()
        try:
            await window.wait_for("you left #general")
            await window.wait_for("-- reconnected")
            assert window.ui.state.room is None
            assert window.ui.state.rooms == {}
            assert "general" not in window.ui.client.rooms
        finally:
            window.ui.quit()
            await window.task
            await again.close()


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("caf\udce9", "caf\ufffd"),  # a Latin-1 byte
        ("\udcc3\udca9", "\u00e9"),  # bytes that together are UTF-8
        ("x\ud83d\ude00y", "x\U0001f600y"),  # a split surrogate pair
        ("ok \udce9 and \ud800", "ok \ufffd and \ufffd"),  # a surrogate for no byte
        ("na\u00efve \U0001f600 \ud55c\uad6d", "na\u00efve \U0001f600 \ud55c\uad6d"),
    ],
)
def test_typed_text_is_made_sendable(typed: str, sent: str) -> None:
    """What the terminal gave that is not UTF-8 becomes U+FFFD; valid text is untouched."""
    assert _as_text(typed) == sent


async def test_a_byte_that_is_not_utf8_is_sent_as_a_replacement(ana: Window, bob: Client) -> None:
    """A lone surrogate from the terminal (a Latin-1 byte) goes out as U+FFFD, not a crash."""
    ana.ui.submit("caf\udce9 au lait")
    received = await next_of(bob, Message)
    assert received.text == "caf\ufffd au lait"
    ana.type("still typing\r")
    assert (await next_of(bob, Message)).text == "still typing"


# -- tab completion ----------------------------------------------------------------


def complete(state: ChatState, before_cursor: str) -> list[str]:
    """What Tab offers with ``before_cursor`` typed, as the texts that would be inserted."""
    document = Document(before_cursor, len(before_cursor))
    completions = ChatCompleter(state).get_completions(document, CompleteEvent())
    return [c.text for c in completions]


@pytest.fixture
def state() -> ChatState:
    return ChatState(
        nick="ana",
        room="general",
        rooms={"general": ["ana", "Bob", "bea"], "dev": ["bob", "dave"]},
    )


def test_tab_completes_commands(state: ChatState) -> None:
    """A leading /prefix completes to the commands that start with it, with a space."""
    assert complete(state, "/jo") == ["/join "]
    assert sorted(complete(state, "/H")) == ["/help ", "/history "]
    assert complete(state, "/") == [name + " " for name in cmd.COMMANDS]
    assert complete(state, "/zz") == []


def test_tab_completes_rooms(state: ChatState) -> None:
    """A #prefix completes to joined rooms, also as a command's argument."""
    assert complete(state, "#") == ["#dev", "#general"]
    assert complete(state, "/join #g") == ["#general"]
    assert complete(state, "see #D") == ["#dev"]
    assert complete(state, "#ops") == []


def test_tab_completes_nicks(state: ChatState) -> None:
    """A word completes to nicks in joined rooms, case-insensitively, once per person."""
    assert complete(state, "b") == ["bea: ", "Bob: "]
    assert complete(state, "thanks BO") == ["Bob"]
    assert complete(state, "/msg da") == ["dave"]
    assert complete(state, "") == []
    assert complete(state, "hello ") == []


async def test_tab_in_the_window_completes_a_command(ana: Window) -> None:
    """Tab at the prompt inserts the only completion, so ``/hel<Tab><Enter>`` runs /help."""
    ana.type("/hel" + TAB)
    await until("the completion", lambda: ana.ui.session.default_buffer.text == "/help ")
    ana.type("\r")
    await ana.wait_for("-- commands:")


async def test_topic_of_a_room_not_joined_is_asked_for(ana: Window, bob: Client) -> None:
    """/topic #room for a room not joined shows its real topic, not "no topic"."""
    await bob.join("ops")
    bob.set_topic("ops", "deploys")
    await next_of(bob, TopicEvent)
    ana.type("/topic #ops\r")
    await ana.wait_for("-- topic of #ops: deploys")
    assert not ana.has("#ops has no topic")


async def test_ctrl_c_quits_cleanly(server: Server, bob: Client) -> None:
    """Ctrl-C ends the window like Ctrl-D: no error, and the others see ana leave."""
    async with chat_window(server) as window:
        window.type(CTRL_C)
        async with asyncio.timeout(2):
            await window.task
    parted = await next_of(bob, Parted)
    assert (parted.nick, parted.reason) == ("ana", "quit")


# -- bursts ----------------------------------------------------------------------


class _BurstClient:
    """Just enough of a :class:`Client` for the read coroutine: a burst, then the end."""

    nick = "ana"
    pending = 0
    queued = 0

    def __init__(self, count: int) -> None:
        self.count = count

    async def events(self) -> AsyncIterator[Event]:
        for seq in range(1, self.count + 1):
            yield Message(room="general", seq=seq, ts=0, sender="bob", text=f"message {seq}")
        yield Disconnected("the server closed the connection")


async def test_a_burst_is_shown_a_slice_at_a_time_with_the_loop_free_between() -> None:
    """Events already received are handled in slices, so key presses are taken between them.

    The clock moves 1 ms at every reading, so a slice is 8 events; a task that
    takes a turn whenever the loop is free sees the burst part-shown many times.
    """
    readings = itertools.count()
    with create_pipe_input() as keyboard:
        ui = ChatUI(
            cast(Client, _BurstClient(200)),
            input=keyboard,
            output=DummyOutput(),
            clock=lambda: next(readings) / 1000,
        )
        reading = asyncio.create_task(ui.read_events())
        seen: set[int] = set()
        while not reading.done():
            seen.add(len(ui.transcript))
            await asyncio.sleep(0)
        await reading
    assert sum(1 for line in ui.transcript if "message " in line) == 200
    per_slice = round(EVENT_SLICE_SECONDS * 1000)  # events: one clock reading each
    part_shown = {n for n in seen if 0 < n < 200}
    assert len(part_shown) >= 200 // per_slice - 1


async def test_the_toolbar_counts_down_to_the_next_reconnection() -> None:
    """While the connection is down, the toolbar says how long until the next try."""
    now = [100.0]
    welcome = Welcome(nick="ana", server="achat", version=1, max_frame=65536, max_text=4000)
    with create_pipe_input() as keyboard:
        ui = ChatUI(
            cast(Client, _BurstClient(0)),
            input=keyboard,
            output=DummyOutput(),
            clock=lambda: now[0],
        )
        ui.state.connection = "connected"

        def toolbar() -> str:
            return fragment_list_to_text(ui._toolbar())

        ui.handle(ConnectionLost("the server closed the connection", 5.0))
        assert "reconnecting… (next try in 5 s)" in toolbar()
        now[0] = 102.2
        assert "(next try in 3 s)" in toolbar()
        now[0] = 105.0
        assert "reconnecting… now" in toolbar()
        ui.handle(ConnectionLost("connection refused", 2.0))  # that try failed: a new wait
        assert "(next try in 2 s)" in toolbar()
        ui.handle(Reconnected(welcome, 0))
        assert "connected" in toolbar()
        assert "next try" not in toolbar()
        assert ui._countdown is None  # nothing left redrawing the toolbar


async def test_quitting_with_a_line_unacked_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """/quit while a line waits for its ack: the window says it is sending it, and, when
    the server never acks it, that it was not acknowledged, before it is gone."""
    monkeypatch.setattr(connection, "CLOSE_PACING_WAIT", 0.1)

    async def on_frame(writer: asyncio.StreamWriter, frame: ClientFrame) -> None:
        if isinstance(frame, Join):
            joined(writer, frame, 0)
        # a say is never acked (a lost ack, a stalled store)

    async with fake_server(answering(on_frame)) as port:
        client = Client("127.0.0.1", port, "ana")
        await client.connect()
        with create_pipe_input() as keyboard:
            ui = ChatUI(client, room="general", input=keyboard, output=DummyOutput())
            task = asyncio.create_task(ui.run())
            await until("ana in #general", lambda: ui.state.room == "general")
            keyboard.send_text("important line\r")
            await until("the line sent", lambda: client.pending == 1)
            keyboard.send_text("/quit\r")
            async with asyncio.timeout(5):
                await task
    assert "-- sending 1 message(s) before quitting…" in ui.transcript
    assert "! 1 message(s) not acknowledged by the server before closing" in ui.transcript


async def test_a_join_answered_while_quitting_does_not_break_the_quit() -> None:
    """/join then /quit: the join's names come while the client closes; the window does
    not ask the closed client for the room's context, and quits cleanly."""

    async def on_frame(writer: asyncio.StreamWriter, frame: ClientFrame) -> None:
        if isinstance(frame, Join):
            if frame.room == "slow":
                await asyncio.sleep(0.1)  # answered while the client is closing
            joined(writer, frame, 5)

    async with fake_server(answering(on_frame)) as port:
        client = Client("127.0.0.1", port, "ana")
        await client.connect()
        with create_pipe_input() as keyboard:
            ui = ChatUI(client, room=None, input=keyboard, output=DummyOutput())
            task = asyncio.create_task(ui.run())
            await until("the prompt", lambda: ui.session.app.is_running)
            keyboard.send_text("/join slow\r/quit\r")
            async with asyncio.timeout(5):
                await task
    assert "-- #slow: ana (1 person)" in ui.transcript
