"""The registry alone, with no event loop: fake peers, an injected clock, the memory store."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from achat.errors import ProtocolError
from achat.protocol import messages as m
from achat.protocol.frames import HEADER_SIZE, FrameDecoder
from achat.protocol.names import nick_key
from achat.server.limits import FloodPolicy
from achat.server.refs import ref_key
from achat.server.registry import BACKLOG_PAGE, Member, Registry
from achat.store.base import RefRecord
from achat.store.memory import MemoryStore

F = TypeVar("F")

#: How long a ref is remembered, by the contract (not the module's constant: this pins it).
TEN_MINUTES = 10 * 60 * 1000


class FakePeer:
    """Records every frame the registry queues for it, decoded as a client would."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(max_frame=10**7)
        self.frames: list[Any] = []
        self.raw: list[bytes] = []
        self.closed = False

    def send(self, frame: bytes) -> None:
        self.raw.append(frame)
        self.frames += [m.decode_server(b) for b in self.decoder.receive_data(frame)]

    def send_pages(self, pages: Iterator[bytes]) -> None:
        for page in pages:  # a peer that reads at once
            self.send(page)

    def close(self, frame: bytes | None = None) -> None:
        self.closed = True

    def take(self) -> list[Any]:
        """Every frame received since the last take, oldest first."""
        out, self.frames = self.frames, []
        self.raw.clear()
        return out

    def of(self, kind: type[F]) -> list[F]:
        """The frames of one type received since the last take."""
        return [f for f in self.frames if isinstance(f, kind)]


class Clock:
    """A millisecond counter: every reading moves it on by 1; tests jump it with advance()."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        self.now += 1
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class DeferredStore(MemoryStore):
    """A memory store whose writes complete only when the test calls complete() (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Callable[[], None]] = []

    def append_many(
        self,
        messages: Sequence[m.Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        super().append_many(messages, refs, lambda: self.waiting.append(on_stored))

    def append_dm(
        self, dm: m.DmEvent, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        super().append_dm(dm, lambda: self.waiting.append(on_stored), ref)

    def complete(self) -> None:
        waiting, self.waiting = self.waiting, []
        for callback in waiting:
            callback()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def reg(store: MemoryStore, clock: Clock) -> Registry:
    return Registry(store, clock=clock, name="test", motd="be nice", max_clients=5)


def hello(nick: str, **kw: Any) -> m.Hello:
    return m.Hello(nick=nick, version=kw.pop("version", 1), **kw)


def add(reg: Registry, nick: str, *rooms: str) -> tuple[Member, FakePeer]:
    """Register ``nick``, join ``rooms``, and forget the frames that caused."""
    peer = FakePeer()
    member = reg.register(peer, hello(nick))
    for room in rooms:
        reg.handle(member, m.Join(room=room))
    peer.take()
    return member, peer


def quiet(*peers: FakePeer) -> None:
    """Forget what every peer has received so far."""
    for peer in peers:
        peer.take()


def refusal(call: Callable[..., object], *args: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        call(*args)
    return exc.value


def say(reg: Registry, member: Member, room: str, count: int, prefix: str = "t") -> None:
    for i in range(count):
        reg.handle(member, m.Say(room=room, text=f"{prefix}{i}"))


def seqs(frames: list[Any]) -> list[int]:
    return [f.seq for f in frames if isinstance(f, m.Message)]


def kinds(frames: list[Any]) -> list[type]:
    return [type(f) for f in frames]


# -- hello ------------------------------------------------------------------


def test_register_sends_welcome(reg: Registry) -> None:
    """hello gets exactly one welcome with the nick as typed, the server name, limits and motd."""
    peer = FakePeer()
    member = reg.register(peer, hello("Ana"))
    [welcome] = peer.take()
    assert welcome == m.Welcome(
        nick="Ana",
        server="test",
        version=1,
        max_frame=65536,
        max_text=4000,
        motd="be nice",
        history_id=reg.store.history_id,
    )
    assert reg.member("ANA") is member
    assert member.rooms == []


def test_welcome_announces_the_flood_limit(store: MemoryStore, clock: Clock) -> None:
    """With the sessions' flood limit given, welcome says it, so clients can pace under it."""
    reg = Registry(store, clock=clock, flood=FloodPolicy(rate=2.5, burst=4))
    peer = FakePeer()
    reg.register(peer, hello("ana"))
    [welcome] = peer.take()
    assert (welcome.send_rate, welcome.send_burst) == (2.5, 4)


def test_register_keeps_the_nfkc_form(reg: Registry) -> None:
    """A nick typed in fullwidth letters is welcomed in its NFKC form."""
    peer = FakePeer()
    reg.register(peer, hello("Ａna"))
    [welcome] = peer.take()
    assert welcome.nick == "Ana"


@pytest.mark.parametrize(
    ("first", "other"),
    [
        ("Ana", "ana"),
        ("Ana", "ANA"),
        ("ana", "Ａna"),
        ("aoe", "аое"),  # all Cyrillic: а о е
        ("аое", "AOE"),  # Cyrillic first, Latin later
        ("cop", "сор"),  # Cyrillic с о р
        ("lol", "l0l"),
    ],
)
def test_nick_taken_ignores_case_and_look_alikes(reg: Registry, first: str, other: str) -> None:
    """A nick equal ignoring case, or confusable with one in use, is refused fatally."""
    holder, _ = add(reg, first)
    peer = FakePeer()
    exc = refusal(reg.register, peer, hello(other))
    assert (exc.code, exc.fatal) == ("nick_taken", True)
    assert peer.frames == []
    assert reg.members == [holder]


@pytest.mark.parametrize("nick", ["Аna", "pаypal"])
def test_mixed_script_nick_is_invalid(reg: Registry, nick: str) -> None:
    """A nick mixing Cyrillic and Latin letters is refused as a fatal invalid_nick."""
    exc = refusal(reg.register, FakePeer(), hello(nick))
    assert (exc.code, exc.fatal) == ("invalid_nick", True)


@pytest.mark.parametrize(
    "nick", ["", "1ana", "_ana", "a b", "a" * 25, "a\u200bb", "a\u202eb", "a!"]
)
def test_invalid_nick_is_refused(reg: Registry, nick: str) -> None:
    """Empty, too long, not starting with a letter, spaces, format or symbol characters."""
    exc = refusal(reg.register, FakePeer(), hello(nick))
    assert (exc.code, exc.fatal) == ("invalid_nick", True)
    assert reg.members == []


def test_unsupported_version(reg: Registry) -> None:
    """A hello with a protocol version other than 1 is a fatal unsupported_version."""
    for version in (0, 2):
        exc = refusal(reg.register, FakePeer(), hello("ana", version=version))
        assert (exc.code, exc.fatal) == ("unsupported_version", True)
    assert reg.members == []


def test_bad_password(clock: Clock) -> None:
    """With a password set, a missing or wrong one is a fatal bad_password; the right one works."""
    reg = Registry(MemoryStore(), clock=clock, password="s3cret")
    for given in (None, "", "S3CRET", "no"):
        exc = refusal(reg.register, FakePeer(), hello("ana", password=given))
        assert (exc.code, exc.fatal) == ("bad_password", True)
    peer = FakePeer()
    reg.register(peer, hello("ana", password="s3cret"))
    assert kinds(peer.take()) == [m.Welcome]


def test_server_full_until_someone_leaves(clock: Clock) -> None:
    """Past max_clients a hello is a fatal server_full; a departure frees the slot."""
    reg = Registry(MemoryStore(), clock=clock, max_clients=2)
    first, _ = add(reg, "ana")
    add(reg, "bob")
    exc = refusal(reg.register, FakePeer(), hello("carol"))
    assert (exc.code, exc.fatal) == ("server_full", True)
    reg.unregister(first)
    add(reg, "carol")
    assert sorted(x.nick for x in reg.members) == ["bob", "carol"]


def test_already_registered(reg: Registry) -> None:
    """A second hello on a registered connection is refused, non-fatally, and changes nothing."""
    ana_m, ana = add(reg, "ana")
    exc = refusal(reg.handle, ana_m, hello("bob"))
    assert (exc.code, exc.fatal) == ("already_registered", False)
    assert ana_m.nick == "ana"
    assert ana.take() == []


# -- join, part, quit ---------------------------------------------------------


def test_join_tells_the_room_then_names_the_joiner(reg: Registry) -> None:
    """join sends joined to everyone (joiner too), then names (with ref and seq) to the joiner."""
    ana_m, ana = add(reg, "ana", "general")
    say(reg, ana_m, "general", 2)
    _, outsider = add(reg, "zed", "other")
    bob_m, bob = add(reg, "Bob")
    quiet(ana, outsider)
    reg.handle(bob_m, m.Join(room="general", ref="j1"))
    joined, names = bob.take()
    assert isinstance(joined, m.Joined)
    assert (joined.room, joined.nick) == ("general", "Bob")
    assert names == m.Names(room="general", nicks=["ana", "Bob"], topic="", seq=2, ref="j1")
    [seen] = ana.take()
    assert seen == joined
    assert outsider.take() == []
    assert bob_m.rooms == ["general"]


def test_first_join_creates_the_room(reg: Registry) -> None:
    """Joining a room nobody is in creates it, with seq 0 and the joiner alone in names."""
    ana_m, ana = add(reg, "ana")
    reg.handle(ana_m, m.Join(room="fresh"))
    joined, names = ana.take()
    assert isinstance(joined, m.Joined)
    assert (names.nicks, names.seq, names.topic) == (["ana"], 0, "")
    assert "fresh" in reg.rooms


def test_joining_twice_only_sends_names(reg: Registry) -> None:
    """A join for a room one is already in sends names again and tells nobody."""
    ana_m, ana = add(reg, "ana", "a")
    _, bob = add(reg, "bob", "a")
    quiet(ana)
    reg.handle(ana_m, m.Join(room="a", ref="again"))
    [names] = ana.take()
    assert isinstance(names, m.Names)
    assert names.ref == "again"
    assert bob.take() == []


@pytest.mark.parametrize("room", ["#general", "General", "", "a b", "x" * 33, "é"])
def test_join_invalid_room(reg: Registry, room: str) -> None:
    """A bad room name is a non-fatal invalid_room and creates nothing."""
    ana_m, ana = add(reg, "ana")
    exc = refusal(reg.handle, ana_m, m.Join(room=room))
    assert (exc.code, exc.fatal) == ("invalid_room", False)
    assert ana.take() == []
    assert reg.rooms == {}


def test_part_tells_the_room_including_the_leaver(reg: Registry) -> None:
    """part sends parted with the reason to every member, the leaver included, once."""
    ana_m, ana = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    _, outsider = add(reg, "zed", "b")
    quiet(ana)
    reg.handle(ana_m, m.Part(room="a", reason="lunch"))
    [mine] = ana.take()
    assert isinstance(mine, m.Parted)
    assert (mine.room, mine.nick, mine.reason) == ("a", "ana", "lunch")
    assert bob.take() == [mine]
    assert outsider.take() == []
    assert ana_m.rooms == []
    reg.handle(bob_m, m.Who(room="a"))
    assert bob.take()[0].nicks == ["bob"]


def test_part_refusals_and_no_reason(reg: Registry) -> None:
    """Parting a room one is not in is not_in_room; without a reason, parted has none."""
    ana_m, ana = add(reg, "ana", "a")
    exc = refusal(reg.handle, ana_m, m.Part(room="b"))
    assert (exc.code, exc.fatal) == ("not_in_room", False)
    reg.handle(ana_m, m.Part(room="a"))
    [parted] = ana.take()
    assert parted.reason is None
    assert refusal(reg.handle, ana_m, m.Part(room="a")).code == "not_in_room"
    assert refusal(reg.handle, ana_m, m.Say(room="a", text="x")).code == "not_in_room"


def test_unregister_parts_every_room_with_reason_quit(reg: Registry) -> None:
    """A connection that ends leaves each of its rooms with parted reason quit, once per room."""
    ana_m, ana = add(reg, "ana", "a", "b")
    bob_m, bob = add(reg, "bob", "a", "b")
    _, carol = add(reg, "carol", "b")
    quiet(ana, bob)
    reg.unregister(ana_m)
    got = [(f.room, f.nick, f.reason) for f in bob.take()]
    assert got == [("a", "ana", "quit"), ("b", "ana", "quit")]
    assert [(f.room, f.reason) for f in carol.take()] == [("b", "quit")]
    assert ana.take() == []  # the leaver's connection is gone
    assert reg.member("ana") is None
    assert bob_m.rooms == ["a", "b"]
    assert list(reg.rooms["a"].members) == ["bob"]
    reg.unregister(ana_m)  # idempotent
    assert bob.take() == []
    add(reg, "ana")  # the nick is free again


def test_unregister_passes_its_reason_on(reg: Registry) -> None:
    """unregister with another reason (a bye's) says that reason in parted."""
    ana_m, _ = add(reg, "ana", "a")
    _, bob = add(reg, "bob", "a")
    reg.unregister(ana_m, "good night")
    assert [f.reason for f in bob.take()] == ["good night"]


def test_stale_member_cannot_unregister_a_successor(reg: Registry) -> None:
    """Unregistering an old member object does not remove a newer one with the same nick."""
    old, _ = add(reg, "ana", "a")
    reg.unregister(old)
    new, _ = add(reg, "ana", "a")
    reg.unregister(old)
    assert reg.member("ana") is new
    assert list(reg.rooms["a"].members.values()) == [new]


# -- say ------------------------------------------------------------------------


def test_seq_starts_at_1_and_grows_by_one_per_room(reg: Registry) -> None:
    """Each room numbers its messages 1, 2, 3 … on its own, whatever happens in other rooms."""
    ana_m, ana = add(reg, "ana", "a", "b")
    for room in ["a", "b", "a", "a", "b", "a"]:
        reg.handle(ana_m, m.Say(room=room, text="x"))
    got = [(f.room, f.seq) for f in ana.of(m.Message)]
    assert got == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("a", 4)]


def test_say_reaches_every_member_and_acks_only_the_sender(reg: Registry) -> None:
    """say: message to every member, sender included; ack (ref, room, seq, ts) to the sender."""
    ana_m, ana = add(reg, "ana", "general")
    _, bob = add(reg, "bob", "general")
    _, carol = add(reg, "carol", "general")
    _, outsider = add(reg, "zed", "other")
    quiet(ana, bob)
    reg.handle(ana_m, m.Say(room="general", text="hello all", ref="r1"))
    [message] = bob.take()
    assert isinstance(message, m.Message)
    assert (message.room, message.seq, message.sender, message.text) == (
        "general",
        1,
        "ana",
        "hello all",
    )
    assert carol.take() == [message]
    assert outsider.take() == []
    mine = ana.take()
    assert mine.count(message) == 1
    [ack] = [f for f in mine if isinstance(f, m.Ack)]
    assert ack == m.Ack(ref="r1", room="general", seq=1, ts=message.ts)
    assert len(mine) == 2


def test_acks_follow_seq(reg: Registry) -> None:
    """Successive says are acked with seq 1, 2, 3 and their own refs."""
    ana_m, ana = add(reg, "ana", "a")
    for i in range(3):
        reg.handle(ana_m, m.Say(room="a", text=f"t{i}", ref=f"r{i}"))
    assert [(a.ref, a.room, a.seq) for a in ana.of(m.Ack)] == [
        ("r0", "a", 1),
        ("r1", "a", 2),
        ("r2", "a", 3),
    ]


def test_say_strips_trailing_whitespace_and_keeps_newlines(reg: Registry) -> None:
    """Trailing whitespace is stripped; inner newlines and tabs stay (one multi-line message)."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Say(room="a", text="line one\n\tline two  \n\n "))
    [message] = ana.of(m.Message)
    assert message.text == "line one\n\tline two"


@pytest.mark.parametrize(
    ("room", "text", "code"),
    [
        ("b", "hello", "not_in_room"),
        ("a", "\x1b[2J", "invalid_text"),
        ("a", "   \n ", "invalid_text"),
        ("a", "x" * 4001, "text_too_long"),
        ("A", "hello", "invalid_room"),
    ],
)
def test_say_refusals_store_nothing(reg: Registry, room: str, text: str, code: str) -> None:
    """A refused say is a non-fatal error, reaches nobody and uses up no seq."""
    ana_m, ana = add(reg, "ana", "a")
    _, bob = add(reg, "bob", "a")
    quiet(ana)
    exc = refusal(reg.handle, ana_m, m.Say(room=room, text=text, ref="r"))
    assert (exc.code, exc.fatal) == (code, False)
    assert ana.take() == []
    assert bob.take() == []
    reg.handle(ana_m, m.Say(room="a", text="fine"))
    assert seqs(bob.take()) == [1]


def test_text_at_the_limit_is_accepted(reg: Registry) -> None:
    """A text of exactly max_text characters is accepted."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Say(room="a", text="é" * 4000))
    assert len(ana.of(m.Message)) == 1


def test_ack_waits_for_the_store(clock: Clock) -> None:
    """Nobody sees a message, and the sender gets no ack, until the store has kept it."""
    store = DeferredStore()
    reg = Registry(store, clock=clock)
    ana_m, ana = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="one", ref="r1"))
    reg.handle(ana_m, m.Say(room="a", text="two", ref="r2"))
    assert ana.take() == []
    assert bob.take() == []
    # Names and history show only what members have been shown.
    reg.handle(bob_m, m.Who(room="a"))
    reg.handle(bob_m, m.HistoryRequest(room="a"))
    reg.handle(bob_m, m.HistoryRequest(room="a", after=0))
    names, latest, after = bob.take()
    assert names.seq == 0
    assert latest.messages == []
    assert after.messages == []
    store.complete()
    assert seqs(bob.take()) == [1, 2]
    assert [a.seq for a in ana.of(m.Ack)] == [1, 2]


def test_join_since_skips_messages_not_yet_stored(clock: Clock) -> None:
    """A backlog holds only stored messages; one still being stored arrives live, once."""
    store = DeferredStore()
    reg = Registry(store, clock=clock)
    ana_m, _ = add(reg, "ana", "a")
    say(reg, ana_m, "a", 2)
    store.complete()
    reg.handle(ana_m, m.Say(room="a", text="in flight"))
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="a", since=0))
    assert seqs(bob.frames) == [1, 2]
    store.complete()
    assert seqs(bob.take()) == [1, 2, 3]


# -- dm ---------------------------------------------------------------------


def test_dm_goes_to_the_recipient_only_with_an_ack(reg: Registry) -> None:
    """dm reaches only the recipient (named in any case); the sender gets an ack with its id."""
    ana_m, ana = add(reg, "ana", "a")
    _, bob = add(reg, "Bob", "a")
    _, carol = add(reg, "carol", "a")
    quiet(ana, bob)
    reg.handle(ana_m, m.Dm(to="BOB", text="psst", ref="d1"))
    [dm] = bob.take()
    assert isinstance(dm, m.DmEvent)
    assert (dm.sender, dm.to, dm.text) == ("ana", "Bob", "psst")
    [ack] = ana.take()
    assert ack == m.Ack(ref="d1", id=dm.id, ts=dm.ts)
    assert carol.take() == []
    reg.handle(ana_m, m.Dm(to="bob", text="again"))
    [second] = bob.take()
    assert second.id == dm.id + 1


def test_dm_to_oneself_is_allowed(reg: Registry) -> None:
    """A dm to one's own nick is delivered to oneself and acked."""
    ana_m, ana = add(reg, "ana")
    reg.handle(ana_m, m.Dm(to="ana", text="note to self", ref="n"))
    assert kinds(ana.take()) == [m.DmEvent, m.Ack]


def test_dm_refusals(reg: Registry) -> None:
    """A dm to a nick nobody uses (or who left) is no_such_nick; bad text is refused too."""
    ana_m, ana = add(reg, "ana")
    bob_m, _ = add(reg, "bob")
    exc = refusal(reg.handle, ana_m, m.Dm(to="carol", text="x"))
    assert (exc.code, exc.fatal) == ("no_such_nick", False)
    assert refusal(reg.handle, ana_m, m.Dm(to="bob", text="\x07")).code == "invalid_text"
    reg.unregister(bob_m)
    assert refusal(reg.handle, ana_m, m.Dm(to="bob", text="x")).code == "no_such_nick"
    assert ana.take() == []


# -- nick ---------------------------------------------------------------------


def test_rename_tells_each_sharer_exactly_once(reg: Registry) -> None:
    """nick sends renamed to the user and to everyone sharing a room, once each."""
    ana_m, ana = add(reg, "ana", "a", "b")
    _, bob = add(reg, "bob", "a", "b")  # shares two rooms: still told once
    _, carol = add(reg, "carol", "b")
    _, dave = add(reg, "dave", "c")
    quiet(ana, bob)
    reg.handle(ana_m, m.Nick(nick="Anna"))
    [renamed] = ana.take()
    assert isinstance(renamed, m.Renamed)
    assert (renamed.old, renamed.new) == ("ana", "Anna")
    assert bob.take() == [renamed]
    assert carol.take() == [renamed]
    assert dave.take() == []


def test_renamed_member_keeps_rooms_under_the_new_nick(reg: Registry) -> None:
    """After a rename the member speaks, is listed and is reached under the new nick only."""
    ana_m, ana = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    reg.handle(ana_m, m.Nick(nick="Anna"))
    quiet(ana, bob)
    assert reg.member("anna") is ana_m
    assert reg.member("ana") is None
    reg.handle(ana_m, m.Say(room="a", text="x"))
    assert bob.take()[0].sender == "Anna"
    reg.handle(bob_m, m.Who(room="a"))
    assert bob.take()[0].nicks == ["Anna", "bob"]
    reg.handle(bob_m, m.Dm(to="anna", text="hi"))
    assert [f.to for f in ana.of(m.DmEvent)] == ["Anna"]
    assert refusal(reg.handle, bob_m, m.Dm(to="ana", text="x")).code == "no_such_nick"
    reg.handle(ana_m, m.Part(room="a"))
    assert list(reg.rooms["a"].members) == ["bob"]
    add(reg, "ana")  # the old nick is free


def test_rename_collisions(reg: Registry) -> None:
    """Renaming to a nick in use in any case, or a look-alike, is a non-fatal nick_taken."""
    ana_m, ana = add(reg, "ana")
    add(reg, "bob")
    add(reg, "cop")
    for taken in ("BOB", "сор"):
        exc = refusal(reg.handle, ana_m, m.Nick(nick=taken))
        assert (exc.code, exc.fatal) == ("nick_taken", False)
    bad = refusal(reg.handle, ana_m, m.Nick(nick="9lives"))
    assert (bad.code, bad.fatal) == ("invalid_nick", False)
    assert ana_m.nick == "ana"
    assert ana.take() == []


def test_rename_to_another_case_of_ones_own_nick(reg: Registry) -> None:
    """Changing only the case of one's nick works and is announced; the same nick is a no-op."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Nick(nick="ana"))
    assert ana.take() == []
    reg.handle(ana_m, m.Nick(nick="ANA"))
    assert [(f.old, f.new) for f in ana.take()] == [("ana", "ANA")]
    assert reg.member("ana") is ana_m


def test_rename_to_a_look_alike_of_ones_own_nick(reg: Registry) -> None:
    """A nick confusable only with one's own current nick is not taken by someone else."""
    lol_m, lol = add(reg, "lol")
    reg.handle(lol_m, m.Nick(nick="l0l"))
    assert [(f.old, f.new) for f in lol.take()] == [("lol", "l0l")]
    # The look-alike slot is still held, now by l0l.
    assert refusal(reg.register, FakePeer(), hello("lol")).code == "nick_taken"


# -- who, rooms, topic ---------------------------------------------------------


def test_who_lists_members_sorted_ignoring_case(reg: Registry) -> None:
    """who answers names: nicks sorted case-insensitively, topic, latest seq, the ref."""
    ana_m, ana = add(reg, "ana", "a")
    add(reg, "Carol", "a")
    add(reg, "bob", "a")
    say(reg, ana_m, "a", 3)
    quiet(ana)
    reg.handle(ana_m, m.Who(room="a", ref="w"))
    assert ana.take() == [
        m.Names(room="a", nicks=["ana", "bob", "Carol"], topic="", seq=3, ref="w")
    ]


def test_who_needs_no_membership(reg: Registry) -> None:
    """who works for rooms one is not in, and for a room nobody made: empty, seq 0."""
    ana_m, ana = add(reg, "ana")
    add(reg, "bob", "a")
    reg.handle(ana_m, m.Who(room="a"))
    reg.handle(ana_m, m.Who(room="nowhere"))
    a, nowhere = ana.take()
    assert a.nicks == ["bob"]
    assert (nowhere.nicks, nowhere.seq) == ([], 0)
    assert "nowhere" not in reg.rooms
    assert refusal(reg.handle, ana_m, m.Who(room="#a")).code == "invalid_room"


def test_rooms_lists_every_room_busiest_first(reg: Registry) -> None:
    """rooms lists each room with its member count and topic, busiest first, then by name."""
    ana_m, ana = add(reg, "ana", "quiet", "busy")
    bob_m, _ = add(reg, "bob", "busy", "also")
    reg.handle(bob_m, m.Topic(room="busy", topic="all day"))
    quiet(ana)
    reg.handle(ana_m, m.RoomsRequest(ref="r"))
    [rooms] = ana.take()
    assert rooms == m.Rooms(
        rooms=[
            m.RoomInfo(room="busy", members=2, topic="all day"),
            m.RoomInfo(room="also", members=1, topic=""),
            m.RoomInfo(room="quiet", members=1, topic=""),
        ],
        ref="r",
    )


def test_topic_is_broadcast_and_remembered(reg: Registry, store: MemoryStore) -> None:
    """topic goes to every member (setter too) with by; names, rooms and the store keep it."""
    ana_m, ana = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    _, outsider = add(reg, "zed", "b")
    quiet(ana)
    reg.handle(ana_m, m.Topic(room="a", topic="  plans for friday  "))
    [event] = ana.take()
    assert isinstance(event, m.TopicEvent)
    assert (event.room, event.topic, event.by) == ("a", "plans for friday", "ana")
    assert bob.take() == [event]
    assert outsider.take() == []
    reg.handle(bob_m, m.Join(room="a"))
    assert bob.take()[0].topic == "plans for friday"
    assert [r.topic for r in store.load_rooms() if r.name == "a"] == ["plans for friday"]
    reg.handle(ana_m, m.Topic(room="a", topic=""))  # clearing is allowed
    assert ana.take()[0].topic == ""


def test_topic_refusals(reg: Registry) -> None:
    """A topic needs membership, at most 300 characters and no control characters."""
    ana_m, ana = add(reg, "ana", "a")
    assert refusal(reg.handle, ana_m, m.Topic(room="b", topic="x")).code == "not_in_room"
    assert refusal(reg.handle, ana_m, m.Topic(room="a", topic="x" * 301)).code == "text_too_long"
    assert refusal(reg.handle, ana_m, m.Topic(room="a", topic="a\nb")).code == "invalid_text"
    reg.handle(ana_m, m.Topic(room="a", topic="x" * 300))
    assert len(ana.take()) == 1


# -- history --------------------------------------------------------------------


def test_history_latest_before_after_and_more(reg: Registry) -> None:
    """history pages oldest first: the latest by default, before/after exclusive, more set."""
    ana_m, ana = add(reg, "ana", "a")
    say(reg, ana_m, "a", 10)
    quiet(ana)
    requests = [
        (m.HistoryRequest(room="a", limit=3, ref="h"), [8, 9, 10], True),
        (m.HistoryRequest(room="a"), list(range(1, 11)), False),
        (m.HistoryRequest(room="a", limit=10), list(range(1, 11)), False),
        (m.HistoryRequest(room="a", before=8, limit=3), [5, 6, 7], True),
        (m.HistoryRequest(room="a", before=3, limit=5), [1, 2], False),
        (m.HistoryRequest(room="a", before=1), [], False),
        (m.HistoryRequest(room="a", before=99, limit=2), [9, 10], True),
        (m.HistoryRequest(room="a", after=2, limit=3), [3, 4, 5], True),
        (m.HistoryRequest(room="a", after=8, limit=5), [9, 10], False),
        (m.HistoryRequest(room="a", after=0), list(range(1, 11)), False),
        (m.HistoryRequest(room="a", after=10), [], False),
    ]
    for request, expected, more in requests:
        reg.handle(ana_m, request)
        [page] = ana.take()
        assert isinstance(page, m.History)
        assert ([x.seq for x in page.messages], page.more) == (expected, more), request
        assert page.room == "a"
        assert page.ref == request.ref
    reg.handle(ana_m, m.HistoryRequest(room="a", limit=1))
    [page] = ana.take()
    assert page.messages[0].text == "t9"
    assert page.messages[0].sender == "ana"


def test_history_of_an_empty_or_unknown_room(reg: Registry) -> None:
    """history of a room with no messages, or none at all, is an empty page without more."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.HistoryRequest(room="a"))
    reg.handle(ana_m, m.HistoryRequest(room="nowhere", after=0))
    assert ana.take() == [
        m.History(room="a", messages=[], more=False),
        m.History(room="nowhere", messages=[], more=False),
    ]


def test_history_refusals(reg: Registry) -> None:
    """before and after together, or a bad room name, are refused non-fatally."""
    ana_m, ana = add(reg, "ana", "a")
    exc = refusal(reg.handle, ana_m, m.HistoryRequest(room="a", before=5, after=1))
    assert (exc.code, exc.fatal) == ("missing_field", False)
    assert refusal(reg.handle, ana_m, m.HistoryRequest(room="A")).code == "invalid_room"
    assert ana.take() == []


def test_history_gap_is_reported_for_after(clock: Clock) -> None:
    """history after a seq whose successors expired sends history_gap, then what is left."""
    reg = Registry(MemoryStore(max_per_room=3), clock=clock)
    ana_m, ana = add(reg, "ana", "a")
    say(reg, ana_m, "a", 8)
    quiet(ana)
    reg.handle(ana_m, m.HistoryRequest(room="a", after=1, ref="h"))
    gap, page = ana.take()
    assert (gap.code, gap.fatal, gap.ref) == ("history_gap", False, "h")
    assert [x.seq for x in page.messages] == [6, 7, 8]
    reg.handle(ana_m, m.HistoryRequest(room="a", after=5))
    assert kinds(ana.take()) == [m.History]


# -- join with since -----------------------------------------------------------------


def test_join_since_sends_the_backlog_then_live_once(reg: Registry) -> None:
    """join since=N: joined, names, every message after N in order, then live ones, no repeats."""
    ana_m, _ = add(reg, "ana", "a")
    say(reg, ana_m, "a", 6)
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="a", since=3, ref="j"))
    frames = bob.take()
    assert kinds(frames) == [m.Joined, m.Names, m.Message, m.Message, m.Message]
    assert frames[1].seq == 6
    assert seqs(frames) == [4, 5, 6]
    say(reg, ana_m, "a", 2, prefix="live")
    assert seqs(bob.take()) == [7, 8]


def test_join_since_zero_and_since_latest(reg: Registry) -> None:
    """since=0 replays the whole room; since=latest (or beyond) replays nothing."""
    ana_m, _ = add(reg, "ana", "a")
    say(reg, ana_m, "a", 4)
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="a", since=0))
    assert seqs(bob.take()) == [1, 2, 3, 4]
    carol_m, carol = add(reg, "carol")
    reg.handle(carol_m, m.Join(room="a", since=4))
    reg.handle(carol_m, m.Join(room="b", since=7))
    assert kinds(carol.take()) == [m.Joined, m.Names, m.Joined, m.Names]


def test_rejoin_with_since_replays_without_a_joined(reg: Registry) -> None:
    """A member already in the room who joins with since gets names and the backlog only."""
    ana_m, _ = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    say(reg, ana_m, "a", 3)
    quiet(bob)
    reg.handle(bob_m, m.Join(room="a", since=1))
    frames = bob.take()
    assert kinds(frames) == [m.Names, m.Message, m.Message]
    assert seqs(frames) == [2, 3]


def test_join_since_pages_through_a_long_backlog(reg: Registry) -> None:
    """A backlog longer than one store page arrives whole, in order, with no duplicates."""
    ana_m, _ = add(reg, "ana", "a")
    total = BACKLOG_PAGE * 2 + 7
    say(reg, ana_m, "a", total)
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="a", since=5))
    assert seqs(bob.take()) == list(range(6, total + 1))


def test_history_gap_before_the_backlog(clock: Clock) -> None:
    """When messages after since expired, history_gap (not fatal) comes first, then the rest."""
    reg = Registry(MemoryStore(max_per_room=3), clock=clock)
    ana_m, _ = add(reg, "ana", "a")
    say(reg, ana_m, "a", 8)
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="a", since=2, ref="j"))
    frames = bob.take()
    assert kinds(frames)[:3] == [m.Joined, m.Names, m.Error]
    assert (frames[2].code, frames[2].fatal, frames[2].ref) == ("history_gap", False, "j")
    assert seqs(frames) == [6, 7, 8]
    carol_m, carol = add(reg, "carol")
    reg.handle(carol_m, m.Join(room="a", since=5))
    assert kinds(carol.take()) == [m.Joined, m.Names, m.Message, m.Message, m.Message]


# -- idempotency ------------------------------------------------------------------


def test_repeated_say_ref_is_stored_once_with_the_original_ack(
    reg: Registry, store: MemoryStore
) -> None:
    """A say repeating a ref is not stored or delivered again; the sender gets the same ack."""
    ana_m, ana = add(reg, "ana", "a")
    _, bob = add(reg, "bob", "a")
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="once", ref="same"))
    first = list(ana.raw)
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="once", ref="same"))
    [again] = ana.raw
    assert again in first  # byte for byte the original ack
    assert ana.of(m.Message) == []
    assert seqs(bob.take()) == [1]
    page = store.history("a", before=None, after=None, limit=10)
    assert [x.text for x in page.messages] == ["once"]
    reg.handle(ana_m, m.Say(room="a", text="next", ref="other"))
    assert seqs(bob.take()) == [2]


@pytest.mark.parametrize(
    ("nick", "ref"),
    [
        ("ana", "r" * 64),  # over the longest key kept plain
        ("José", "a1b2c3d4-1"),  # a nick beyond ASCII
        ("ana", "\U0001f600" * 64),  # the longest ref, beyond the BMP
    ],
)
def test_a_ref_kept_as_a_digest_is_recognised_when_repeated(
    reg: Registry, nick: str, ref: str
) -> None:
    """Refs remembered by their digest (long, or not ASCII) are resends all the same, and
    another nick's use of one is not."""
    ana_m, ana = add(reg, nick, "a")
    bob_m, bob = add(reg, "bob", "a")
    reg.handle(ana_m, m.Say(room="a", text="once", ref=ref))
    reg.handle(ana_m, m.Say(room="a", text="once", ref=ref))
    reg.handle(bob_m, m.Say(room="a", text="mine", ref=ref))
    assert seqs(bob.take()) == [1, 2]
    assert [(a.ref, a.seq) for a in ana.of(m.Ack)] == [(ref, 1), (ref, 1)]


@pytest.mark.parametrize(
    ("nick", "ref"),
    [("ana", "same"), ("José", "\U0001f600" * 64), ("ana", "\x01" * 64)],
)
def test_a_ref_said_before_a_restart_is_recognised_after_it_and_kept_small(
    store: MemoryStore, clock: Clock, nick: str, ref: str
) -> None:
    """A registry started on the store of one before it answers a resend with the first
    ack, and keeps the loaded ref as a receipt, not as the whole ack, which holds the
    ref again (64 control characters take 384 bytes escaped in it)."""
    first = Registry(store, clock=clock)
    ana_m, ana = add(first, nick, "a")
    first.handle(ana_m, m.Say(room="a", text="once", ref=ref))
    [original] = ana.of(m.Ack)
    second = Registry(store, clock=clock)
    kept = second._refs.get(ref_key(nick_key(nick), ref))  # what it loaded
    assert kept is not None
    assert kept[:1] == b"m"
    assert len(kept) == 17 + len("a")  # the receipt's head and the room
    ana_m, ana = add(second, nick, "a")
    second.handle(ana_m, m.Say(room="a", text="once", ref=ref))
    assert ana.of(m.Ack) == [original]
    assert ana.of(m.Message) == []
    page = store.history("a", before=None, after=None, limit=10)
    assert [x.text for x in page.messages] == ["once"]


def test_say_without_ref_is_never_deduplicated(reg: Registry) -> None:
    """Two identical says without a ref are two messages."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Say(room="a", text="same"))
    reg.handle(ana_m, m.Say(room="a", text="same"))
    assert seqs(ana.take()) == [1, 2]


def test_different_nicks_may_use_the_same_ref(reg: Registry) -> None:
    """A ref is remembered per nick: another nick using it gets its own message and ack."""
    ana_m, ana = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    reg.handle(ana_m, m.Say(room="a", text="mine", ref="r"))
    reg.handle(bob_m, m.Say(room="a", text="mine too", ref="r"))
    assert seqs(bob.frames) == [1, 2]
    assert [(a.ref, a.seq) for a in ana.of(m.Ack)] == [("r", 1)]
    assert [(a.ref, a.seq) for a in bob.of(m.Ack)] == [("r", 2)]


def test_ref_is_forgotten_after_ten_minutes(reg: Registry, clock: Clock) -> None:
    """A ref repeated within 10 minutes is deduplicated; after 10 minutes it is a new message."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    clock.advance(TEN_MINUTES - 1000)
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    assert seqs(ana.frames) == [1]
    assert len(ana.of(m.Ack)) == 2
    clock.advance(2000)
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    assert seqs(ana.frames) == [1, 2]
    assert [a.seq for a in ana.of(m.Ack)] == [1, 1, 2]


def test_a_ref_used_again_while_a_slow_store_held_its_first_use_keeps_its_own_ack(
    clock: Clock,
) -> None:
    """After the first use expired unstored, a resend of the second use gets the second's ack."""
    store = DeferredStore()
    reg = Registry(store, clock=clock)
    ana_m, ana = add(reg, "ana", "a")
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="first", ref="r"))
    clock.advance(TEN_MINUTES + 2000)  # the store was stuck (a full disk) all this time
    reg.handle(ana_m, m.Say(room="a", text="second", ref="r"))  # a new message: r expired
    store.complete()
    assert [a.seq for a in ana.of(m.Ack)] == [1, 2]
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="second", ref="r"))  # resent after a reconnect
    assert [a.seq for a in ana.of(m.Ack)] == [2]
    assert seqs(ana.frames) == []  # and not stored again


def test_a_ref_repeated_on_the_same_connection_before_its_ack_is_answered_each_time(
    clock: Clock,
) -> None:
    """Two say frames with one ref, the second before the first is stored: two acks,
    one message (a say does not wait for the fan-out, so this is not rare)."""
    reg, store, later = deferred_registry(clock)
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    store.complete()
    later.pop()()
    assert [(type(f), getattr(f, "seq", None)) for f in ana.take()] == [
        (m.Message, 1),
        (m.Ack, 1),
        (m.Ack, 1),
    ]


def test_ref_survives_a_reconnect(reg: Registry) -> None:
    """After reconnecting as the same nick (any case), a resent ref gets the original ack."""
    ana_m, ana = add(reg, "ana", "a")
    _, bob = add(reg, "bob", "a")
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    [ack] = ana.of(m.Ack)
    reg.unregister(ana_m)
    again_m, again = add(reg, "ANA", "a")
    quiet(bob)
    reg.handle(again_m, m.Say(room="a", text="x", ref="r"))
    assert again.take() == [ack]
    assert bob.take() == []


def test_resent_say_after_parting_gets_the_original_ack(reg: Registry) -> None:
    """A say resent after its room was left is answered with its ack, not not_in_room."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    [ack] = ana.of(m.Ack)
    reg.handle(ana_m, m.Part(room="a"))
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    assert ana.take() == [ack]


def test_repeated_dm_ref_is_delivered_once(reg: Registry) -> None:
    """A dm repeating a ref is delivered once and acked twice with the same id."""
    ana_m, ana = add(reg, "ana")
    _, bob = add(reg, "bob")
    reg.handle(ana_m, m.Dm(to="bob", text="x", ref="d"))
    reg.handle(ana_m, m.Dm(to="bob", text="x", ref="d"))
    assert kinds(bob.take()) == [m.DmEvent]
    first, second = ana.take()
    assert isinstance(first, m.Ack)
    assert first == second


def test_resent_dm_after_the_recipient_left_gets_the_original_ack(reg: Registry) -> None:
    """A dm resent after its recipient went offline is answered with its ack, not no_such_nick."""
    ana_m, ana = add(reg, "ana")
    bob_m, _ = add(reg, "bob")
    reg.handle(ana_m, m.Dm(to="bob", text="x", ref="d"))
    [ack] = ana.take()
    reg.unregister(bob_m)
    reg.handle(ana_m, m.Dm(to="bob", text="x", ref="d"))
    assert ana.take() == [ack]


def _resent_from_a_new_connection(
    clock: Clock,
) -> tuple[Registry, DeferredStore, FakePeer, Member, FakePeer]:
    """ana says ref r in #a (with bob), drops before it is stored, comes back and resends
    it: the registry, its store, the new connection's peer, and bob's member and peer."""
    store = DeferredStore()
    reg = Registry(store, clock=clock)
    old_m, _ = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    reg.handle(old_m, m.Say(room="a", text="x", ref="r"))
    reg.unregister(old_m)
    new_m, new = add(reg, "ana", "a")
    quiet(bob)
    reg.handle(new_m, m.Say(room="a", text="x", ref="r"))
    return reg, store, new, bob_m, bob


def test_resend_while_still_being_stored_gets_the_ack_once_stored(clock: Clock) -> None:
    """A ref resent from a new connection before the first copy is stored is acked there."""
    _, store, new, _, bob = _resent_from_a_new_connection(clock)
    assert new.take() == []
    store.complete()
    [ack] = new.of(m.Ack)
    assert (ack.ref, ack.seq) == ("r", 1)
    assert seqs(bob.take()) == [1]


def test_a_resend_waiting_for_an_ack_gets_it_even_if_the_ref_expired_meanwhile(
    clock: Clock,
) -> None:
    """A resend queued for an ack that a stuck store held past the ref's ten minutes is
    still answered when the store comes back: it came while the ref was known."""
    reg, store, new, bob_m, bob = _resent_from_a_new_connection(clock)  # the resend waits
    clock.advance(TEN_MINUTES + 2000)
    reg.handle(bob_m, m.Say(room="a", text="y", ref="b"))  # expires r on its way
    store.complete()
    assert [(a.ref, a.seq) for a in new.of(m.Ack)] == [("r", 1)]
    assert seqs(bob.frames) == [1, 2]


def test_a_resend_after_the_commit_but_before_the_fan_out_waits_for_the_fan_out(
    clock: Clock,
) -> None:
    """Stored is not yet acked: a resend between the store's callback and the fan-out
    gets the ack with the fan-out, after the message, and not before it."""
    reg, store, later = deferred_registry(clock)
    ana_m, ana = add(reg, "ana", "a")
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    store.complete()
    reg.handle(ana_m, m.Say(room="a", text="x", ref="r"))
    assert ana.take() == []
    later.pop()()
    assert [(type(f), getattr(f, "seq", None)) for f in ana.take()] == [
        (m.Message, 1),
        (m.Ack, 1),
        (m.Ack, 1),
    ]


def test_a_dm_resent_from_a_new_connection_before_it_is_stored_is_acked_once_stored(
    clock: Clock,
) -> None:
    store = DeferredStore()
    reg = Registry(store, clock=clock)
    old_m, _ = add(reg, "ana")
    _, bob = add(reg, "bob")
    reg.handle(old_m, m.Dm(to="bob", text="x", ref="d"))
    reg.unregister(old_m)
    new_m, new = add(reg, "ana")
    quiet(bob)
    reg.handle(new_m, m.Dm(to="bob", text="x", ref="d"))
    assert new.take() == []
    store.complete()
    [ack] = new.of(m.Ack)
    assert (ack.ref, ack.id) == ("d", 1)
    assert kinds(bob.take()) == [m.DmEvent]  # delivered once
    quiet(new)
    reg.handle(new_m, m.Dm(to="bob", text="x", ref="d"))  # and now answered at once
    assert new.take() == [ack]


class FailingOnce(MemoryStore):
    """A store whose next append raises (as a bug in it would), then works."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def _fail_once(self) -> None:
        if self.fail:
            self.fail = False
            raise OSError("the store broke")

    def append_many(
        self,
        messages: Sequence[m.Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        self._fail_once()
        super().append_many(messages, refs, on_stored)

    def append_dm(
        self, dm: m.DmEvent, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        self._fail_once()
        super().append_dm(dm, on_stored, ref)


def test_a_say_the_store_refused_takes_back_its_seq_and_its_ref(clock: Clock) -> None:
    """A say whose append raised was never stored: the next message gets its seq (no
    gap), and its resend is stored then, not taken for acked."""
    store = FailingOnce()
    reg = Registry(store, clock=clock)
    ana_m, ana = add(reg, "ana", "a")
    bob_m, _ = add(reg, "bob", "a")
    store.fail = True
    with pytest.raises(OSError, match="the store broke"):
        reg.handle(ana_m, m.Say(room="a", text="lost", ref="x"))
    reg.handle(bob_m, m.Say(room="a", text="later"))
    quiet(ana)
    reg.handle(ana_m, m.Say(room="a", text="lost", ref="x"))  # the client's resend
    assert [(a.ref, a.seq) for a in ana.of(m.Ack)] == [("x", 2)]
    page = store.history("a", before=None, after=0, limit=10)
    assert [(s.seq, s.text) for s in page.messages] == [(1, "later"), (2, "lost")]


def test_a_dm_the_store_refused_takes_back_its_id_and_its_ref(clock: Clock) -> None:
    store = FailingOnce()
    reg = Registry(store, clock=clock)
    ana_m, ana = add(reg, "ana")
    _, bob = add(reg, "bob")
    store.fail = True
    with pytest.raises(OSError, match="the store broke"):
        reg.handle(ana_m, m.Dm(to="bob", text="lost", ref="x"))
    reg.handle(ana_m, m.Dm(to="bob", text="lost", ref="x"))  # the client's resend
    [ack] = ana.of(m.Ack)
    assert (ack.ref, ack.id) == ("x", 1)
    assert [(d.id, d.text) for d in bob.of(m.DmEvent)] == [(1, "lost")]


def _answers_to(frames: list[m.Say], *, as_a_run: bool) -> list[tuple[str, str | None]]:
    """What ana gets for ``frames`` (said in #a, where she is alone): each answer's type
    and ref, in order, with the errors said as they came."""
    store = DeferredStore()
    reg = Registry(store, clock=Clock())
    ana, peer = add(reg, "ana", "a")
    if as_a_run:
        reg.say_many(
            ana,
            frames,
            lambda exc: peer.send(
                m.encode(m.Error(code=exc.code, message=exc.message, fatal=False, ref=exc.ref))
            ),
        )
    else:
        for frame in frames:
            try:
                reg.handle(ana, frame)
            except ProtocolError as exc:
                peer.send(
                    m.encode(m.Error(code=exc.code, message=exc.message, fatal=False, ref=exc.ref))
                )
    store.complete()
    return [
        (type(frame).__name__, getattr(frame, "ref", None))
        for frame in peer.take()
        if not isinstance(frame, m.Message)
    ]


def test_a_run_of_says_is_answered_as_one_say_at_a_time() -> None:
    """say_many (a read's says) answers as handle does, frame by frame: the errors as
    the frames come, then each ack followed by those of the resends waiting for it."""
    frames = [
        m.Say(room="a", text="one", ref="r1"),
        m.Say(room="b", text="not in #b", ref="e1"),
        m.Say(room="a", text="one", ref="r1"),  # a resend, before r1 is stored
        m.Say(room="a", text="\x01", ref="e2"),
        m.Say(room="a", text="two", ref="r2"),
        m.Say(room="a", text="no ref"),
    ]
    one_at_a_time = _answers_to(frames, as_a_run=False)
    assert one_at_a_time == [
        ("Error", "e1"),
        ("Error", "e2"),
        ("Ack", "r1"),
        ("Ack", "r1"),
        ("Ack", "r2"),
        ("Ack", ""),
    ]
    assert _answers_to(frames, as_a_run=True) == one_at_a_time


# -- fitting max_frame ---------------------------------------------------------------


def test_names_split_to_fit_max_frame(clock: Clock) -> None:
    """A names list too long for one frame comes in parts that fit; all but the last say more."""
    reg = Registry(MemoryStore(), clock=clock, max_frame=300, max_clients=100)
    nicks = [f"user{i:02d}" for i in range(60)]
    members = [add(reg, nick, "big") for nick in nicks]
    member, peer = members[0]
    quiet(peer)
    reg.handle(member, m.Who(room="big", ref="w"))
    assert all(len(raw) <= 300 + HEADER_SIZE for raw in peer.raw)
    parts = peer.take()
    assert len(parts) > 1
    assert all(isinstance(p, m.Names) for p in parts)
    assert [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
    assert all((p.ref, p.room) == ("w", "big") for p in parts)
    assert [n for p in parts for n in p.nicks] == nicks


def test_names_split_on_join_too(clock: Clock) -> None:
    """The names that follow a join are split the same way, after the joined."""
    reg = Registry(MemoryStore(), clock=clock, max_frame=300, max_clients=100)
    for i in range(40):
        add(reg, f"user{i:02d}", "big")
    newcomer_m, newcomer = add(reg, "newcomer")
    reg.handle(newcomer_m, m.Join(room="big"))
    frames = newcomer.take()
    assert isinstance(frames[0], m.Joined)
    names = frames[1:]
    assert len(names) > 1
    assert all(isinstance(p, m.Names) for p in names)
    assert [p.more for p in names][-1] is False
    assert sum(len(p.nicks) for p in names) == 41


def test_short_lists_are_one_frame_without_more(reg: Registry) -> None:
    """A names list that fits is one frame with more false."""
    ana_m, ana = add(reg, "ana", "a")
    reg.handle(ana_m, m.Who(room="a"))
    [names] = ana.take()
    assert names.more is False


def test_rooms_split_to_fit_max_frame(clock: Clock) -> None:
    """A rooms list too long for one frame comes in parts that fit; all but the last say more."""
    reg = Registry(MemoryStore(), clock=clock, max_frame=300)
    rooms = [f"room{i:02d}" for i in range(40)]
    ana_m, ana = add(reg, "ana", *rooms)
    reg.handle(ana_m, m.RoomsRequest(ref="r"))
    assert all(len(raw) <= 300 + HEADER_SIZE for raw in ana.raw)
    parts = ana.take()
    assert len(parts) > 1
    assert [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
    assert [r.room for p in parts for r in p.rooms] == rooms


def test_history_trimmed_to_fit_max_frame(clock: Clock) -> None:
    """A latest/before page too big for one frame keeps the newest messages and sets more."""
    reg = Registry(MemoryStore(), clock=clock, max_frame=2000, max_text=500)
    ana_m, ana = add(reg, "ana", "a")
    for i in range(20):
        reg.handle(ana_m, m.Say(room="a", text=f"{i:03d}" + "x" * 200))
    quiet(ana)
    reg.handle(ana_m, m.HistoryRequest(room="a", limit=20))
    [raw] = ana.raw
    [page] = ana.take()
    assert len(raw) <= 2000 + HEADER_SIZE
    assert page.more
    assert 0 < len(page.messages) < 20
    got = [x.seq for x in page.messages]
    assert got == list(range(21 - len(got), 21))


def test_history_after_trimmed_keeps_the_oldest(clock: Clock) -> None:
    """An after page too big for one frame keeps the messages right after, and sets more."""
    reg = Registry(MemoryStore(), clock=clock, max_frame=2000, max_text=500)
    ana_m, ana = add(reg, "ana", "a")
    for i in range(20):
        reg.handle(ana_m, m.Say(room="a", text=f"{i:03d}" + "x" * 200))
    quiet(ana)
    reg.handle(ana_m, m.HistoryRequest(room="a", after=4, limit=16))
    [raw] = ana.raw
    [page] = ana.take()
    assert len(raw) <= 2000 + HEADER_SIZE
    assert page.more
    got = [x.seq for x in page.messages]
    assert 0 < len(got) < 16
    assert got == list(range(5, 5 + len(got)))


# -- the rest -------------------------------------------------------------------------


def test_ping_pong(reg: Registry) -> None:
    """ping is answered with pong echoing the ref; a client's pong and bye send nothing."""
    ana_m, ana = add(reg, "ana")
    reg.handle(ana_m, m.Ping(ref="p1"))
    reg.handle(ana_m, m.Ping())
    reg.handle(ana_m, m.PongReply(ref="keepalive"))
    reg.handle(ana_m, m.Bye())
    assert ana.take() == [m.Pong(ref="p1"), m.Pong()]


def test_rooms_and_seq_come_back_from_the_store(clock: Clock) -> None:
    """A registry over a store with history continues each room's seq and keeps its topic."""
    store = MemoryStore()
    first = Registry(store, clock=clock)
    ana_m, _ = add(first, "ana", "a")
    say(first, ana_m, "a", 3)
    first.handle(ana_m, m.Topic(room="a", topic="kept"))
    second = Registry(store, clock=clock)
    bob_m, bob = add(second, "bob", "a")
    second.handle(bob_m, m.Who(room="a"))
    names = bob.take()[0]
    assert (names.seq, names.topic) == (3, "kept")
    second.handle(bob_m, m.Say(room="a", text="x"))
    assert seqs(bob.take()) == [4]


# -- fan-out of a commit -----------------------------------------------------------------


def deferred_registry(clock: Clock) -> tuple[Registry, DeferredStore, list[Callable[[], None]]]:
    """A registry whose fan-out waits for the test (as it waits for the end of a loop tick)."""
    store = DeferredStore()
    later: list[Callable[[], None]] = []
    return Registry(store, clock=clock, defer=lambda f, _: later.append(f)), store, later


def test_a_run_across_rooms_reaches_each_room_in_its_order(clock: Clock) -> None:
    """A run's messages to two rooms, interleaved: each room's members get that room's,
    in seq order, in one blob, before the sender's acks (in the order said)."""
    reg, store, later = deferred_registry(clock)
    ana, ana_peer = add(reg, "ana", "a", "b")
    _, in_a = add(reg, "bob", "a")
    _, in_b = add(reg, "cy", "b")
    quiet(ana_peer)
    says = [m.Say(room=r, text=f"{r}{i}", ref=f"{i}") for i, r in enumerate("abab")]
    reg.say_many(ana, says, _raise_it)
    store.complete()
    later.pop()()
    assert [(f.room, f.seq, f.text) for f in in_a.take()] == [("a", 1, "a0"), ("a", 2, "a2")]
    assert len(in_b.raw) == 1
    assert [(f.room, f.seq, f.text) for f in in_b.take()] == [("b", 1, "b1"), ("b", 2, "b3")]
    frames = ana_peer.take()
    assert [(type(f), f.room, f.seq) for f in frames[:4]] == [
        (m.Message, "a", 1),
        (m.Message, "a", 2),
        (m.Message, "b", 1),
        (m.Message, "b", 2),
    ]
    assert [(a.ref, a.room, a.seq) for a in frames[4:]] == [
        ("0", "a", 1),
        ("1", "b", 1),
        ("2", "a", 2),
        ("3", "b", 2),
    ]


def _raise_it(exc: ProtocolError) -> None:
    raise exc


def test_a_commit_reaches_each_member_as_one_blob_in_seq_order(clock: Clock) -> None:
    reg, store, later = deferred_registry(clock)
    ana, ana_peer = add(reg, "ana", "a")
    bob, bob_peer = add(reg, "bob", "a")
    ana_peer.take()
    reg.handle(ana, m.Say(room="a", text="one", ref="1"))
    reg.handle(bob, m.Say(room="a", text="two", ref="2"))
    store.complete()
    assert bob_peer.take() == []
    assert len(later) == 1
    later.pop()()
    assert len(bob_peer.raw) == 2  # one blob of messages, then bob's ack
    frames = bob_peer.take()
    assert [type(f) for f in frames] == [m.Message, m.Message, m.Ack]
    assert [f.seq for f in frames[:2]] == [1, 2]
    assert [type(f) for f in ana_peer.take()] == [m.Message, m.Message, m.Ack]


def test_a_frame_that_shows_the_room_sees_stored_messages_delivered_first(clock: Clock) -> None:
    reg, store, later = deferred_registry(clock)
    ana, ana_peer = add(reg, "ana", "a")
    reg.handle(ana, m.Say(room="a", text="before you came", ref="1"))
    store.complete()
    cy_peer = FakePeer()
    cy = reg.register(cy_peer, hello("cy"))
    reg.handle(cy, m.Join(room="a", since=0))
    # The message went out before cy joined: cy gets it once, from the backlog.
    [names] = cy_peer.of(m.Names)
    assert names.seq == 1
    assert [f.text for f in cy_peer.of(m.Message)] == ["before you came"]
    assert [type(f) for f in ana_peer.take()] == [m.Message, m.Ack, m.Joined]
    later.pop()()  # the scheduled fan-out finds nothing left to do
    assert ana_peer.take() == []
    assert len(cy_peer.of(m.Message)) == 1


def test_a_say_does_not_wait_for_the_fan_out_and_is_delivered_after_it(clock: Clock) -> None:
    reg, store, later = deferred_registry(clock)
    ana, ana_peer = add(reg, "ana", "a")
    bob, bob_peer = add(reg, "bob", "a")
    reg.handle(ana, m.Say(room="a", text="one", ref="1"))
    store.complete()
    # bob's say shows nothing of the room: the commit before it waits for its fan-out...
    reg.handle(bob, m.Say(room="a", text="two", ref="2"))
    reg.handle(bob, m.Ping(ref="p"))
    assert bob_peer.take() == [m.Pong(ref="p")]
    store.complete()
    later.pop()()
    # ...and the two messages come out together, in seq order, then the acks.
    assert [type(f) for f in bob_peer.take()] == [m.Message, m.Message, m.Ack]
    frames = ana_peer.take()
    assert [(f.seq, f.text) for f in frames if isinstance(f, m.Message)] == [(1, "one"), (2, "two")]


class SlowPeer(FakePeer):
    """A peer whose every send takes ``cost`` seconds of the test's timer."""

    def __init__(self, timer: list[float], cost: float) -> None:
        super().__init__()
        self.timer, self.cost = timer, cost

    def send(self, frame: bytes) -> None:
        self.timer[0] += self.cost
        super().send(frame)


@pytest.mark.parametrize(
    ("members", "cost", "waits"), [(4, 0.0001, 0.0045), (1, 0.00005, 0.0), (2, 0.02, 0.010)]
)
def test_a_commit_waits_nine_times_as_long_as_the_last_fan_out_took(
    clock: Clock, members: int, cost: float, waits: float
) -> None:
    """Fan-outs take at most a tenth of the loop's time; a wait under 1 ms is none.

    A fan-out sends the message to each member and the ack to the sayer: 0.5 ms for
    four members at 0.1 ms a send, so 4.5 ms; 0.1 ms for one at 0.05 ms, so none;
    60 ms for two at 20 ms (a stall), so the most there is, 10 ms.
    """
    timer = [100.0]
    store = DeferredStore()
    asked: list[tuple[Callable[[], None], float]] = []
    reg = Registry(
        store, clock=clock, defer=lambda f, delay: asked.append((f, delay)), timer=lambda: timer[0]
    )
    people = [reg.register(SlowPeer(timer, cost), hello(f"p{i}")) for i in range(members)]
    for member in people:
        reg.handle(member, m.Join(room="a"))
    reg.handle(people[0], m.Say(room="a", text="one"))
    store.complete()
    [(fan_out, delay)] = asked
    assert delay == 0.0  # nothing fanned out yet: at once
    fan_out()
    reg.handle(people[0], m.Say(room="a", text="two"))
    store.complete()
    assert asked[1][1] == pytest.approx(waits)
    timer[0] += 1.0  # much later, no wait
    asked[1][0]()
    reg.handle(people[0], m.Say(room="a", text="three"))
    timer[0] += 1.0
    store.complete()
    assert asked[2][1] == 0.0


def test_a_member_leaving_gets_what_was_stored_before(clock: Clock) -> None:
    reg, store, _later = deferred_registry(clock)
    ana, ana_peer = add(reg, "ana", "a")
    bob, bob_peer = add(reg, "bob", "a")
    ana_peer.take()
    reg.handle(ana, m.Say(room="a", text="bye bob", ref="1"))
    store.complete()
    reg.unregister(bob)
    assert [f.text for f in bob_peer.of(m.Message)] == ["bye bob"]
    assert [type(f) for f in ana_peer.take()] == [m.Message, m.Ack, m.Parted]


def test_a_store_that_loses_an_ack_is_refused_at_startup(clock: Clock) -> None:
    """A ref loaded without its ack would leave resends waiting forever: the server says so."""

    class Forgetful(MemoryStore):
        def load_refs(self, now: int) -> list[RefRecord]:
            return [RefRecord("ana", "r1", now + 1000)]

    with pytest.raises(ValueError, match="without its ack"):
        Registry(Forgetful(), clock=clock)


def test_past_max_refs_says_with_new_refs_are_refused_until_old_ones_expire(
    clock: Clock,
) -> None:
    """The table of refs holds at most max_refs: past it a say (or dm) with a new ref is
    refused with a non-fatal rate_limited that says when to send it again, and is not
    stored; resends are still answered with their ack, and says without a ref go on."""
    store = MemoryStore()
    reg = Registry(store, clock=clock, max_refs=3)
    ana, peer = add(reg, "ana", "a")
    add(reg, "bob", "a")
    refused: list[ProtocolError] = []
    reg.say_many(
        ana, [m.Say(room="a", text=f"t{i}", ref=f"r{i}") for i in range(5)], refused.append
    )
    assert [a.ref for a in peer.of(m.Ack)] == ["r0", "r1", "r2"]
    assert [(e.code, e.fatal, e.ref) for e in refused] == [
        ("rate_limited", False, "r3"),
        ("rate_limited", False, "r4"),
    ]
    # The oldest refs are forgotten ten minutes (rounded up to a second) after they came.
    assert all(e.retry_after is not None and 600 <= e.retry_after <= 601 for e in refused)
    assert [msg.text for msg in peer.of(m.Message)] == ["t0", "t1", "t2"]
    first_ack = peer.of(m.Ack)[0]
    quiet(peer)
    # One at a time too; a resend is answered as ever; a say without a ref is stored.
    assert refusal(reg.handle, ana, m.Say(room="a", text="t3", ref="r3")).code == "rate_limited"
    reg.handle(ana, m.Say(room="a", text="t0", ref="r0"))
    reg.handle(ana, m.Say(room="a", text="no ref"))
    assert [a for a in peer.of(m.Ack) if a.ref] == [first_ack]  # the first ack, again
    assert [msg.text for msg in peer.of(m.Message)] == ["no ref"]
    dm = refusal(reg.handle, ana, m.Dm(to="bob", text="psst", ref="d1"))
    assert (dm.code, dm.fatal) == ("rate_limited", False)
    assert dm.retry_after is not None
    assert 599 <= dm.retry_after <= 601
    # Once the oldest have expired, new refs are taken again.
    quiet(peer)
    clock.advance(TEN_MINUTES + 1_000)
    reg.say_many(ana, [m.Say(room="a", text="t3", ref="r3")], refused.append)
    assert [a.ref for a in peer.of(m.Ack)] == ["r3"]
    assert len(refused) == 2
    assert [
        msg.text for msg in store.history("a", before=None, after=None, limit=100).messages
    ] == ["t0", "t1", "t2", "no ref", "t3"]


def test_max_refs_is_reached_exactly_and_a_refused_say_leaves_no_gap_in_the_seqs(
    clock: Clock,
) -> None:
    """A run that just fills the table is taken whole; in the next one, a say with a new
    ref is refused and takes no number, so the says around it are numbered one after
    the other; a DM resend while full is answered with its ack."""
    store = MemoryStore()
    reg = Registry(store, clock=clock, max_refs=4)
    ana, peer = add(reg, "ana", "a")
    add(reg, "bob")
    reg.handle(ana, m.Dm(to="bob", text="psst", ref="d1"))
    refused: list[ProtocolError] = []
    reg.say_many(
        ana, [m.Say(room="a", text=f"t{i}", ref=f"r{i}") for i in range(3)], refused.append
    )
    assert refused == []  # 1 + 3 refs: exactly full
    dm_ack = peer.of(m.Ack)[0]
    quiet(peer)
    run = [
        m.Say(room="a", text="plain"),
        m.Say(room="a", text="new", ref="r9"),
        m.Say(room="a", text="again", ref="r1"),  # a resend
        m.Say(room="a", text="plain too"),
    ]
    reg.say_many(ana, run, refused.append)
    assert [(e.code, e.ref) for e in refused] == [("rate_limited", "r9")]
    assert [(msg.seq, msg.text) for msg in peer.of(m.Message)] == [(4, "plain"), (5, "plain too")]
    reg.handle(ana, m.Dm(to="bob", text="psst", ref="d1"))
    assert [a for a in peer.of(m.Ack) if a.ref == "d1"] == [dm_ack]


def test_refusals_for_the_refs_limit_are_logged_once_a_minute_at_most(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="achat.server")
    reg = Registry(MemoryStore(), clock=clock, max_refs=1)
    ana, _ = add(reg, "ana", "a")
    says = [m.Say(room="a", text=f"t{i}", ref=f"r{i}") for i in range(4)]
    reg.say_many(ana, says, lambda exc: None)  # one taken, three refused

    def lines() -> list[str]:
        return [r.message for r in caplog.records if "its --max-refs" in r.message]

    assert reg.refs_refused == 3
    assert len(lines()) == 1
    assert lines()[0].startswith("the server remembers 1 refs, its --max-refs: refusing")
    assert lines()[0].endswith("(1 time(s) since the last report)")
    clock.advance(59_000)
    reg.say_many(ana, [m.Say(room="a", text="t5", ref="r5")], lambda exc: None)
    assert len(lines()) == 1
    clock.advance(1_000)
    reg.say_many(ana, [m.Say(room="a", text="t6", ref="r6")], lambda exc: None)
    assert reg.refs_refused == 5
    assert len(lines()) == 2
    assert lines()[1].endswith("(4 time(s) since the last report)")
