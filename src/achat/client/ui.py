"""The terminal client: a prompt_toolkit prompt with incoming lines printed above it.

Two coroutines run side by side under one TaskGroup: :meth:`ChatUI.read_events`
takes events from the :class:`~achat.client.connection.Client` and prints
them above the prompt, and :meth:`ChatUI.read_input` waits for lines at the
prompt and turns them into frames. Printing never disturbs a half-typed line:
lines are collected and printed together once per loop tick through
prompt_toolkit's ``print_formatted_text``, which redraws the prompt below
them. The terminal (input and output) is injected so tests can drive the UI
with a pipe and a dummy output.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable

import msgspec
from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import Output
from prompt_toolkit.styles import Style

from ..errors import ConnectionClosed
from ..protocol.messages import (
    Ack,
    Dm,
    Error,
    History,
    HistoryRequest,
    Join,
    Joined,
    Names,
    Nick,
    Part,
    Parted,
    Renamed,
    RoomsRequest,
    Say,
    Topic,
    TopicEvent,
    Who,
)
from ..protocol.names import nick_key
from . import commands as cmd
from .connection import (
    HISTORY_LOST,
    Client,
    ConnectionLost,
    Disconnected,
    LocalNotice,
    Reconnected,
)
from .render import Line, Renderer, plain, visible

__all__ = ["ChatCompleter", "ChatState", "ChatUI", "run_ui"]

STYLE = Style.from_dict(
    {
        "time": "ansibrightblack",
        "notice": "ansibrightblack",
        "day": "ansibrightblack bold",
        "error": "ansired bold",
        "room": "ansicyan",
        "dm": "ansimagenta",
        "action": "italic",
        "mention": "bold reverse",
        "bottom-toolbar": "noreverse bg:ansiblue ansiwhite",
        "toolbar.bad": "bg:ansired ansiwhite bold",
    }
)

CONTEXT_LINES = 20
#: Lines of plain-text transcript kept (for tests and tools); older ones are dropped.
TRANSCRIPT_LINES = 10_000
#: Longest the window handles incoming events before it lets the keyboard in: a burst
#: of thousands of messages is shown a slice at a time, and typing goes on between.
EVENT_SLICE_SECONDS = 0.008
#: How often the toolbar's countdown to the next reconnection attempt is redrawn.
COUNTDOWN_SECONDS = 0.5
#: Longest the first prompt waits for the first room's answer (who is there, recent
#: lines): on a server that answers within it, those lines print before any prompt
#: exists, and the prompt is drawn once, naming the room.
OPENING_WAIT_SECONDS = 0.2


class ChatState(msgspec.Struct):
    """What the UI knows: current room, rooms joined and their members, connection state."""

    nick: str
    room: str | None = None
    rooms: dict[str, list[str]] = msgspec.field(default_factory=dict)
    topics: dict[str, str] = msgspec.field(default_factory=dict)
    connection: str = "connecting"
    partial_names: dict[str, list[str]] = msgspec.field(default_factory=dict)
    #: While reconnecting: when (on the UI's clock) the next attempt is due.
    retry_at: float | None = None

    def all_nicks(self) -> list[str]:
        seen: dict[str, str] = {}
        for nicks in self.rooms.values():
            for n in nicks:
                seen.setdefault(nick_key(n), n)
        return sorted(seen.values(), key=str.casefold)


def _as_text(line: str) -> str:
    """``line`` with what cannot be sent as UTF-8 replaced by U+FFFD.

    A byte from the terminal that is not UTF-8 (a pasted Latin-1 é, a Meta key
    sending 8-bit) reaches the prompt as a lone surrogate (U+DC80 to U+DCFF),
    which no frame can carry; bytes that together are UTF-8 are decoded, and a
    split surrogate pair is joined.
    """
    if line.isascii():
        return line
    try:
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:
        pass
    joined = line.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    raw = bytearray()
    for ch in joined:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            raw.append(code - 0xDC00)  # the byte the terminal sent
        elif 0xD800 <= code <= 0xDFFF:
            raw += "\ufffd".encode()
        else:
            raw += ch.encode()
    return raw.decode("utf-8", "replace")


class ChatCompleter(Completer):
    """Tab completes commands, ``#rooms`` and nicks of people in the joined rooms."""

    def __init__(self, state: ChatState) -> None:
        self.state = state

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        before = document.text_before_cursor
        word = before.split(" ")[-1] if before else ""
        if before.startswith("/") and " " not in before:
            for name in cmd.COMMANDS:
                if name.startswith(word.lower()):
                    yield Completion(name + " ", -len(word), display_meta=cmd.COMMANDS[name][1])
            return
        if word.startswith("#"):
            for room in sorted(self.state.rooms):
                if room.startswith(word[1:].lower()):
                    yield Completion("#" + room, -len(word))
            return
        if not word:
            return
        at_start = before == word
        for nick in self.state.all_nicks():
            if nick_key(nick).startswith(nick_key(word)):
                yield Completion(nick + (": " if at_start else ""), -len(word))


class ChatUI:
    """One person's chat window, built on a connected :class:`Client`."""

    def __init__(
        self,
        client: Client,
        *,
        room: str | None = None,
        input: Input | None = None,
        output: Output | None = None,
        renderer: Renderer | None = None,
        clock: Callable[[], float] = time.monotonic,
        opening_wait: float = OPENING_WAIT_SECONDS,
    ) -> None:
        self.client = client
        self.opening_wait = opening_wait
        self._clock = clock
        self._countdown: asyncio.TimerHandle | None = None
        self.state = ChatState(nick=client.nick)
        self.first_room = room
        self.renderer = renderer or Renderer(me=lambda: self.state.nick)
        #: Every line shown, as plain text (tests read it; it is cheap).
        self.transcript: list[str] = []
        self._pending: list[Line] = []
        self._flush_scheduled = False
        self._want_context: set[str] = set()
        self._sent_dms: dict[str, tuple[str, str]] = {}
        self._asked: set[str] = set()  # refs of /who requests, whose names are shown
        self._asked_topic: set[str] = set()  # refs of /topic requests for rooms not joined
        self._context: set[str] = set()  # refs of the history asked for a room just joined
        self._quit = asyncio.Event()
        # Refs of the first room's join and context request, until answered; then opened.
        self._opening: set[str] = set()
        self._opened = asyncio.Event()
        self._output = output
        self.session: PromptSession[str] = PromptSession(
            input=input,
            output=output,
            history=InMemoryHistory(),
            completer=ChatCompleter(self.state),
            complete_while_typing=False,
            bottom_toolbar=self._toolbar,
            key_bindings=self._bindings(),
            style=STYLE,
            multiline=False,
            erase_when_done=True,
        )

    # -- running --------------------------------------------------------------

    async def run(self) -> None:
        """Run until the user quits or the connection ends for good."""
        self.state.connection = "connected"
        if self.client.welcome is not None:
            self.show(self.renderer.event(self.client.welcome, current_room=None))
        if self.first_room:
            self.execute(cmd.JoinCmd(self.first_room))
        if not self._opening:
            self._opened.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self.read_events())
                prompt = tasks.create_task(self.read_input())
                await self._quit.wait()
                reader.cancel()
                prompt.cancel()
        finally:
            self._stop_countdown()
            unacked = self.client.pending
            if unacked and self.client.connected:
                self.show([self.renderer.notice(f"sending {unacked} message(s) before quitting…")])
            self._flush()
            await self.client.close(self._quit_reason)
            # What came while closing, such as a message the server never acked.
            for event in self.client.received():
                if not isinstance(event, Disconnected):
                    with contextlib.suppress(ConnectionClosed):
                        self.handle(event)
            self._flush()

    _quit_reason: str | None = None

    def quit(self, reason: str | None = None) -> None:
        self._quit_reason = reason
        self._quit.set()

    async def read_input(self) -> None:
        """The input coroutine: one line at a time, until quit.

        The first prompt waits until the first room has answered, for at most
        ``opening_wait``. Lines printed while a prompt is up make prompt_toolkit
        erase it, print, ask the terminal where its cursor is and draw it again;
        the opening's lines are printed before there is a prompt to erase.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.opening_wait):
                await self._opened.wait()
        self._opening.clear()  # late answers are handled as any other
        self._opened.set()
        self._flush()
        while True:
            try:
                line = await self.session.prompt_async(self._prompt)
            except (EOFError, KeyboardInterrupt):
                self.quit()
                return
            self.submit(line)

    async def read_events(self) -> None:
        """The read coroutine: every event from the server, printed above the prompt.

        Events already received are handed over without a pause, so a burst
        is handled in slices of at most ``EVENT_SLICE_SECONDS``, each followed
        by a turn of the loop in which key presses are taken and drawn.
        """
        clock = self._clock
        until = clock() + EVENT_SLICE_SECONDS
        async for event in self.client.events():
            self.handle(event)
            if clock() >= until:
                await asyncio.sleep(0)
                until = clock() + EVENT_SLICE_SECONDS
        self.state.connection = "disconnected"
        self._redraw()

    def _redraw(self) -> None:
        if self.session.app.is_running:
            self.session.app.invalidate()

    # -- input ----------------------------------------------------------------

    def submit(self, line: str) -> None:
        """Carry out one line typed at the prompt."""
        try:
            command = cmd.parse(_as_text(line))
        except cmd.CommandError as exc:
            self.show([self.renderer.problem(str(exc))])
            return
        if command is not None:
            self.execute(command)

    def execute(self, command: cmd.Command) -> None:
        """Send what ``command`` asks for; local-only commands act at once."""
        try:
            self._execute(command)
        except ConnectionClosed:
            self.show([self.renderer.problem("not connected: nothing was sent")])

    def _execute(self, command: cmd.Command) -> None:
        client = self.client
        state = self.state
        if isinstance(command, cmd.QuitCmd):
            self.quit(command.reason)
        elif isinstance(command, cmd.HelpCmd):
            self.show(self._help())
        elif isinstance(command, cmd.JoinCmd):
            if command.room in state.rooms:
                state.room = command.room
                self.show([self.renderer.notice(f"now talking in #{command.room}")])
            else:
                self._want_context.add(command.room)
                ref = client.new_ref()
                client.send(Join(room=command.room, ref=ref))
                if not self._opened.is_set():
                    self._opening.add(ref)
                if not client.connected:
                    self.show([self.renderer.notice(f"(joining #{command.room} when reconnected)")])
        elif isinstance(command, cmd.SayCmd | cmd.MeCmd):
            if state.room is None:
                self.show([self.renderer.problem("join a room first: /join #general")])
                return
            text = command.text if isinstance(command, cmd.SayCmd) else "/me " + command.action
            client.send(Say(room=state.room, text=text, ref=client.new_ref()))
            if not client.connected:
                self.show(
                    [self.renderer.notice(f"(pending, sent when reconnected) {visible(text)}")]
                )
        elif isinstance(command, cmd.PartCmd):
            room = command.room or state.room
            if room is None:
                self.show([self.renderer.problem("you are in no room")])
                return
            client.send(Part(room=room, reason=command.reason, ref=client.new_ref()))
            if not client.connected:
                self.show([self.renderer.notice(f"(leaving #{room} when reconnected)")])
        elif isinstance(command, cmd.DmCmd):
            ref = client.new_ref()
            self._sent_dms[ref] = (command.nick, command.text)
            client.send(Dm(to=command.nick, text=command.text, ref=ref))
        elif isinstance(command, cmd.NickCmd):
            client.send(Nick(nick=command.nick, ref=client.new_ref()))
        elif isinstance(command, cmd.WhoCmd):
            room = command.room or state.room
            if room is None:
                self.show([self.renderer.problem("usage: /who #room")])
                return
            ref = client.new_ref()
            self._asked.add(ref)
            client.send(Who(room=room, ref=ref))
        elif isinstance(command, cmd.RoomsCmd):
            client.send(RoomsRequest(ref=client.new_ref()))
        elif isinstance(command, cmd.TopicCmd):
            room = command.room or state.room
            if room is None:
                self.show([self.renderer.problem("join a room first")])
            elif command.topic is None and room not in state.rooms:
                # Only the topics of joined rooms are known here: ask for any other.
                ref = client.new_ref()
                self._asked_topic.add(ref)
                client.send(Who(room=room, ref=ref))
            elif command.topic is None:
                self.show([self._topic_line(room, state.topics.get(room, ""))])
            else:
                client.send(Topic(room=room, topic=command.topic, ref=client.new_ref()))
        elif isinstance(command, cmd.HistoryCmd):
            if state.room is None:
                self.show([self.renderer.problem("join a room first")])
                return
            client.send(HistoryRequest(room=state.room, limit=command.limit, ref=client.new_ref()))

    # -- events ---------------------------------------------------------------

    def handle(self, event: object) -> None:
        """Update the state for one event and print what it says."""
        self._handle(event)
        if self._opening:
            self._settle_opening(event)

    def _settle_opening(self, event: object) -> None:
        """Count ``event`` off the first room's answer; the prompt waits for all of it."""
        if isinstance(event, Disconnected | ConnectionLost):
            self._opening.clear()
        elif isinstance(event, Names) and event.more:
            pass  # more pages follow
        elif isinstance(event, Error) and event.code == "history_gap":
            pass  # what history is left follows
        else:
            self._opening.discard(getattr(event, "ref", None) or "")
        if not self._opening:
            self._opened.set()

    def _handle(self, event: object) -> None:
        state = self.state
        me = nick_key(state.nick)
        if isinstance(event, Disconnected):
            self._stop_countdown()
            state.connection = "disconnected"
            self.show([self.renderer.problem(f"disconnected: {visible(event.reason)}")])
            return
        if isinstance(event, LocalNotice):
            self.show([self.renderer.problem(event.text)])
            return
        if isinstance(event, ConnectionLost):
            if state.connection == "connected":
                self.show([self.renderer.problem(f"connection lost: {visible(event.reason)}")])
            state.connection = "reconnecting…"
            state.retry_at = self._clock() + event.retry_in
            if self._countdown is None:
                self._count_down()
            self._redraw()
            return
        if isinstance(event, Reconnected):
            self._stop_countdown()
            state.connection = "connected"
            state.nick = self.client.nick
            resent = f"; resending {event.resent} unsent message(s)" if event.resent else ""
            self.show([self.renderer.notice(f"reconnected{resent}")])
            return
        if isinstance(event, Names):
            collected = state.partial_names.pop(event.room, []) + list(event.nicks)
            if event.more:
                state.partial_names[event.room] = collected
                return
            if event.room in state.rooms or event.room in self._want_context:
                state.rooms[event.room] = collected
                state.topics[event.room] = event.topic
            if event.room in self._want_context:
                self._want_context.discard(event.room)
                state.room = event.room
                self.show(self.renderer.names(event.room, collected, event.topic))
                if event.seq > 0 and not self._quit.is_set():  # no questions while quitting
                    ref = self.client.new_ref()
                    self._context.add(ref)
                    self.client.send(
                        HistoryRequest(
                            room=event.room,
                            before=event.seq + 1,
                            limit=CONTEXT_LINES,
                            ref=ref,
                        )
                    )
                    if event.ref in self._opening:
                        self._opening.add(ref)
                return
            if event.ref is not None and event.ref in self._asked:
                self._asked.discard(event.ref)
                self.show(self.renderer.names(event.room, collected, event.topic))
            if event.ref is not None and event.ref in self._asked_topic:
                self._asked_topic.discard(event.ref)
                self.show([self._topic_line(event.room, event.topic)])
            # Otherwise a refresh (after a reconnect): the state is updated, nothing to print.
            return
        if isinstance(event, Joined):
            if nick_key(event.nick) == me:
                state.rooms.setdefault(event.room, [])
                return  # names follows and says it better
            members = state.rooms.get(event.room)
            if members is not None and event.nick not in members:
                members.append(event.nick)
        elif isinstance(event, Parted):
            if nick_key(event.nick) == me:
                state.rooms.pop(event.room, None)
                where = ""
                if state.room == event.room:
                    state.room = next(iter(state.rooms), None)
                    where = f"; now in #{state.room}" if state.room else ""
                self.show([self.renderer.notice(f"you left #{visible(event.room)}{where}")])
                return
            members = state.rooms.get(event.room)
            if members is not None:
                state.rooms[event.room] = [
                    n for n in members if nick_key(n) != nick_key(event.nick)
                ]
        elif isinstance(event, Renamed):
            if nick_key(event.old) == me:
                state.nick = event.new
            for room, members in state.rooms.items():
                state.rooms[room] = [event.new if n == event.old else n for n in members]
        elif isinstance(event, TopicEvent):
            state.topics[event.room] = event.topic
        elif isinstance(event, Ack):
            sent = self._sent_dms.pop(event.ref, None)
            if sent is not None:
                self.show(
                    self.renderer.dated(event.ts, self.renderer.dm_sent(sent[0], sent[1], event.ts))
                )
            return
        elif isinstance(event, Error):
            self._sent_dms.pop(event.ref or "", None)
            self._asked_topic.discard(event.ref or "")
            if event.ref in self._context:
                self._context.discard(event.ref)
                if event.code == "unavailable" and event.message == HISTORY_LOST:
                    return  # the client's own: lost with the server's messages, as said
        elif isinstance(event, History) and event.ref in self._context:
            self._context.discard(event.ref)
        elif isinstance(event, History) and not event.messages and event.ref is None:
            return
        self.show(self.renderer.event(event, current_room=state.room))

    # -- output ---------------------------------------------------------------

    def show(self, lines: list[Line]) -> None:
        """Print ``lines`` above the prompt (batched: one redraw per loop tick)."""
        if not lines:
            return
        self.transcript.extend(plain(line) for line in lines)
        if len(self.transcript) > 2 * TRANSCRIPT_LINES:
            del self.transcript[:TRANSCRIPT_LINES]
        self._pending.extend(lines)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:
                self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        fragments: list[tuple[str, str]] = []
        for line in self._pending:
            fragments.extend(line)
            fragments.append(("", "\n"))
        self._pending.clear()
        print_formatted_text(FormattedText(fragments), end="", style=STYLE, output=self._output)

    def _count_down(self) -> None:
        """Redraw the toolbar every half second while a reconnection is awaited."""
        self._redraw()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop running: nothing to count down
            return
        self._countdown = loop.call_later(COUNTDOWN_SECONDS, self._count_down)

    def _stop_countdown(self) -> None:
        self.state.retry_at = None
        if self._countdown is not None:
            self._countdown.cancel()
            self._countdown = None

    def _connection_text(self) -> str:
        state = self.state
        if state.retry_at is None:
            return state.connection
        left = math.ceil(state.retry_at - self._clock())
        return (
            f"{state.connection} (next try in {left} s)" if left > 0 else f"{state.connection} now"
        )

    def _prompt(self) -> FormattedText:
        room = f"#{self.state.room}" if self.state.room else "(no room)"
        return FormattedText([("class:room", room), ("", "> ")])

    def _toolbar(self) -> FormattedText:
        state = self.state
        conn = self._connection_text()
        rooms = " ".join(
            ("[#" + r + "]") if r == state.room else ("#" + r) for r in sorted(state.rooms)
        )
        people = len(state.rooms.get(state.room or "", []))
        style = "" if state.connection == "connected" else "class:toolbar.bad"
        pending = self.client.pending
        if pending and state.connection != "connected":
            conn += f" │ {pending} unsent"
        elif self.client.queued:
            conn += f" │ {self.client.queued} queued (flood limit)"
        return FormattedText(
            [
                ("", f" {visible(state.nick)} │ "),
                ("", f"{rooms or '(no room)'} │ {people} here │ "),
                (style, conn),
                ("", " │ /help"),
            ]
        )

    def _topic_line(self, room: str, topic: str) -> Line:
        room = visible(room)
        text = f"topic of #{room}: {visible(topic)}" if topic else f"#{room} has no topic"
        return self.renderer.notice(text)

    def _help(self) -> list[Line]:
        lines = [self.renderer.notice("commands:")]
        for usage, what in cmd.COMMANDS.values():
            lines.append(self.renderer.notice(f"  {usage:<24} {what}"))
        lines.append(
            self.renderer.notice("  Tab completes, Up/Down recall, Esc Enter (Alt-Enter) newline")
        )
        return lines

    @staticmethod
    def _bindings() -> KeyBindings:
        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event: KeyPressEvent) -> None:
            event.current_buffer.insert_text("\n")

        return bindings


async def run_ui(
    *,
    host: str,
    port: int,
    nick: str,
    room: str | None,
    password: str | None = None,
    input: Input | None = None,
    output: Output | None = None,
) -> int:
    """Connect as ``nick`` and run the chat window until the user quits. Returns an exit code."""
    client = Client(
        host, port, nick, password=password, client_name="achat-terminal", reconnect=True
    )
    await client.connect()
    ui = ChatUI(client, room=cmd.normalise_room(room) if room else None, input=input, output=output)
    with contextlib.suppress(asyncio.CancelledError):
        await ui.run()
    return 0
