"""The registry alone, with no event loop: fake peers, an injected clock, the memory store."""

from __future__ import annotations

from typing import Any

import pytest

from achat.errors import ProtocolError
from achat.protocol import messages as m
from achat.protocol.frames import FrameDecoder
from achat.server.registry import REF_TTL_MS, Member, Registry
from achat.store.memory import MemoryStore


class FakePeer:
    """Records every frame the registry queues for it, decoded."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(max_frame=10**7)
        self.frames: list[Any] = []
        self.closed = False

    def send(self, frame: bytes) -> None:
        self.frames += [m.decode_server(b) for b in self.decoder.receive_data(frame)]

    def close(self, frame: bytes | None = None) -> None:
        self.closed = True

    def take(self) -> list[Any]:
        out, self.frames = self.frames, []
        return out

    def of(self, kind: type) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> Registry:
    return Registry(MemoryStore(), clock=clock, name="test", max_clients=5)


def hello(nick: str, **kw: Any) -> m.Hello:
    return m.Hello(nick=nick, version=kw.pop("version", 1), **kw)


def add(reg: Registry, nick: str, *rooms: str) -> tuple[Member, FakePeer]:
    peer = FakePeer()
    member = reg.register(peer, hello(nick))
    for room in rooms:
        reg.handle(member, m.Join(room=room))
    peer.take()
    return member, peer


def refusal(call: Any, *args: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        call(*args)
    return exc.value


def test_register_sends_welcome(reg: Registry) -> None:
    """hello gets welcome with the nick as typed, the server name and limits."""
    peer = FakePeer()
    reg.register(peer, hello("Ana"))
    [welcome] = peer.take()
    assert isinstance(welcome, m.Welcome)
    assert (welcome.nick, welcome.server, welcome.version) == ("Ana", "test", 1)
    assert welcome.max_frame == 65536
    assert welcome.max_text == 4000


@pytest.mark.parametrize(
    ("first", "other"),
    [("Ana", "ana"), ("Ana", "ANA"), ("aoe", "аое"), ("lol", "l0l"), ("Ａna", "ana")],
)
def test_nick_taken_ignores_case_and_look_alikes(reg: Registry, first: str, other: str) -> None:
    """A nick equal ignoring case, or confusable with one in use, is refused fatally."""
    add(reg, first)
    exc = refusal(reg.register, FakePeer(), hello(other))
    assert (exc.code, exc.fatal) == ("nick_taken", True)


def test_mixed_script_nick_is_invalid(reg: Registry) -> None:
    """A nick mixing Cyrillic and Latin letters is refused as invalid_nick."""
    exc = refusal(reg.register, FakePeer(), hello("Аna"))
    assert (exc.code, exc.fatal) == ("invalid_nick", True)


def test_hello_refusals(clock: Clock) -> None:
    """Wrong version, bad password, invalid nick and a full server are fatal refusals."""
    reg = Registry(MemoryStore(), clock=clock, max_clients=1, password="pw")
    assert refusal(reg.register, FakePeer(), hello("a", version=2)).code == "unsupported_version"
    assert refusal(reg.register, FakePeer(), hello("a")).code == "bad_password"
    assert refusal(reg.register, FakePeer(), hello("a", password="no")).code == "bad_password"
    bad = refusal(reg.register, FakePeer(), hello("1a", password="pw"))
    assert (bad.code, bad.fatal) == ("invalid_nick", True)
    reg.register(FakePeer(), hello("a", password="pw"))
    assert refusal(reg.register, FakePeer(), hello("b", password="pw")).code == "server_full"


def test_join_tells_the_room_then_names_the_joiner(reg: Registry) -> None:
    """join sends joined to everyone (joiner too), then names to the joiner only."""
    _, ana = add(reg, "ana", "general")
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="general", ref="j1"))
    joined, names = bob.take()
    assert isinstance(joined, m.Joined)
    assert joined.nick == "bob"
    assert isinstance(names, m.Names)
    assert (names.nicks, names.ref, names.seq) == (["ana", "bob"], "j1", 0)
    assert [type(f) for f in ana.take()] == [m.Joined]


def test_say_fans_out_in_seq_order_and_acks_the_sender(reg: Registry) -> None:
    """say reaches every member with seq 1, 2, 3; only the sender gets the ack."""
    ana_m, ana = add(reg, "ana", "general")
    _, bob = add(reg, "bob", "general")
    ana.take()
    for i in range(3):
        reg.handle(ana_m, m.Say(room="general", text=f"t{i}", ref=f"r{i}"))
    assert [f.seq for f in bob.of(m.Message)] == [1, 2, 3]
    assert bob.of(m.Ack) == []
    acks = ana.of(m.Ack)
    assert [(a.ref, a.room, a.seq) for a in acks] == [
        ("r0", "general", 1),
        ("r1", "general", 2),
        ("r2", "general", 3),
    ]
    assert [f.sender for f in ana.of(m.Message)] == ["ana"] * 3


def test_seq_is_per_room(reg: Registry) -> None:
    """Each room counts its own seq from 1."""
    ana_m, ana = add(reg, "ana", "a", "b")
    reg.handle(ana_m, m.Say(room="a", text="x"))
    reg.handle(ana_m, m.Say(room="b", text="y"))
    reg.handle(ana_m, m.Say(room="a", text="z"))
    assert [(f.room, f.seq) for f in ana.of(m.Message)] == [("a", 1), ("b", 1), ("a", 2)]


def test_say_needs_membership_and_valid_text(reg: Registry) -> None:
    """Saying in a room you are not in, or bad text, is a non-fatal refusal."""
    ana_m, _ = add(reg, "ana", "a")
    exc = refusal(reg.handle, ana_m, m.Say(room="b", text="x"))
    assert (exc.code, exc.fatal) == ("not_in_room", False)
    assert refusal(reg.handle, ana_m, m.Say(room="a", text="\x1b[2J")).code == "invalid_text"
    assert refusal(reg.handle, ana_m, m.Say(room="a", text="x" * 4001)).code == "text_too_long"
    assert refusal(reg.handle, ana_m, m.Say(room="A", text="x")).code == "invalid_room"


def test_dm_and_no_such_nick(reg: Registry) -> None:
    """dm goes to the recipient only, with an ack carrying its id; unknown nick is refused."""
    ana_m, ana = add(reg, "ana")
    _, bob = add(reg, "Bob")
    reg.handle(ana_m, m.Dm(to="BOB", text="psst", ref="d1"))
    [dm] = bob.take()
    assert (dm.sender, dm.to, dm.text) == ("ana", "Bob", "psst")
    [ack] = ana.take()
    assert (ack.ref, ack.id) == ("d1", dm.id)
    assert refusal(reg.handle, ana_m, m.Dm(to="carol", text="x")).code == "no_such_nick"


def test_rename_tells_each_sharer_once(reg: Registry) -> None:
    """nick sends renamed to the user and to everyone sharing a room, once each."""
    ana_m, ana = add(reg, "ana", "a", "b")
    _, bob = add(reg, "bob", "a", "b")
    _, carol = add(reg, "carol")
    ana.take()
    reg.handle(ana_m, m.Nick(nick="Anna"))
    assert [(f.old, f.new) for f in ana.take()] == [("ana", "Anna")]
    assert len(bob.take()) == 1
    assert carol.take() == []
    assert reg.member("anna") is ana_m
    assert reg.member("ana") is None
    reg.handle(ana_m, m.Say(room="a", text="x"))
    assert bob.of(m.Message)[0].sender == "Anna"


def test_rename_collisions(reg: Registry) -> None:
    """Renaming to a nick in use (any case) is refused; changing one's own case is fine."""
    ana_m, _ = add(reg, "ana")
    add(reg, "bob")
    exc = refusal(reg.handle, ana_m, m.Nick(nick="BOB"))
    assert (exc.code, exc.fatal) == ("nick_taken", False)
    reg.handle(ana_m, m.Nick(nick="ANA"))
    assert ana_m.nick == "ANA"


def test_part_and_quit_notices(reg: Registry) -> None:
    """part sends parted to the room including the leaver; a disconnect says reason quit."""
    ana_m, ana = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    ana.take()
    reg.handle(ana_m, m.Part(room="a", reason="lunch"))
    assert [(f.nick, f.reason) for f in ana.take()] == [("ana", "lunch")]
    assert [(f.nick, f.reason) for f in bob.take()] == [("ana", "lunch")]
    assert refusal(reg.handle, ana_m, m.Part(room="a")).code == "not_in_room"
    reg.handle(ana_m, m.Join(room="a"))
    bob.take()
    reg.unregister(ana_m)
    assert [(f.nick, f.reason) for f in bob.take()] == [("ana", "quit")]
    assert reg.member("ana") is None
    assert bob_m.rooms == {"a"}


def test_who_rooms_topic(reg: Registry) -> None:
    """who lists members, topic is broadcast and remembered, rooms lists rooms with counts."""
    ana_m, ana = add(reg, "ana", "a")
    add(reg, "bob", "a", "b")
    ana.take()
    reg.handle(ana_m, m.Topic(room="a", topic="plans", ref="t"))
    [event] = ana.take()
    assert (event.topic, event.by) == ("plans", "ana")
    reg.handle(ana_m, m.Who(room="a", ref="w"))
    [names] = ana.take()
    assert (names.nicks, names.topic, names.ref) == (["ana", "bob"], "plans", "w")
    reg.handle(ana_m, m.RoomsRequest(ref="r"))
    [rooms] = ana.take()
    assert [(r.room, r.members, r.topic) for r in rooms.rooms] == [("a", 2, "plans"), ("b", 1, "")]
    assert refusal(reg.handle, ana_m, m.Topic(room="b", topic="x")).code == "not_in_room"


def test_history_pages(reg: Registry) -> None:
    """history returns latest, before and after pages oldest first, with more."""
    ana_m, ana = add(reg, "ana", "a")
    for i in range(10):
        reg.handle(ana_m, m.Say(room="a", text=f"t{i}"))
    ana.take()
    reg.handle(ana_m, m.HistoryRequest(room="a", limit=3))
    reg.handle(ana_m, m.HistoryRequest(room="a", before=3, limit=5))
    reg.handle(ana_m, m.HistoryRequest(room="a", after=8, limit=5))
    latest, before, after = ana.take()
    assert ([x.seq for x in latest.messages], latest.more) == ([8, 9, 10], True)
    assert ([x.seq for x in before.messages], before.more) == ([1, 2], False)
    assert ([x.seq for x in after.messages], after.more) == ([9, 10], False)


def test_join_since_sends_the_backlog_once(reg: Registry) -> None:
    """join with since sends every message after since, in order, no duplicates."""
    ana_m, _ana = add(reg, "ana", "a")
    for i in range(6):
        reg.handle(ana_m, m.Say(room="a", text=f"t{i}"))
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="a", since=3))
    frames = bob.take()
    assert [type(f) for f in frames[:2]] == [m.Joined, m.Names]
    assert [f.seq for f in frames[2:]] == [4, 5, 6]


def test_history_gap_before_the_backlog(clock: Clock) -> None:
    """When messages after since have expired, history_gap comes first, then what is left."""
    reg = Registry(MemoryStore(max_per_room=3), clock=clock)
    ana_m, _ = add(reg, "ana", "a")
    for i in range(8):
        reg.handle(ana_m, m.Say(room="a", text=f"t{i}"))
    bob_m, bob = add(reg, "bob")
    reg.handle(bob_m, m.Join(room="a", since=2))
    frames = bob.take()
    assert isinstance(frames[2], m.Error)
    assert frames[2].code == "history_gap"
    assert not frames[2].fatal
    assert [f.seq for f in frames[3:]] == [6, 7, 8]


def test_repeated_ref_is_not_stored_again(reg: Registry, clock: Clock) -> None:
    """A say repeating a ref gets the original ack; no new message, until 10 minutes pass."""
    ana_m, ana = add(reg, "ana", "a")
    bob_m, bob = add(reg, "bob", "a")
    ana.take()
    reg.handle(ana_m, m.Say(room="a", text="once", ref="same"))
    reg.handle(ana_m, m.Say(room="a", text="once", ref="same"))
    acks = ana.of(m.Ack)
    assert len(acks) == 2
    assert acks[0] == acks[1]
    assert len(bob.of(m.Message)) == 1
    reg.handle(bob_m, m.Say(room="a", text="mine", ref="same"))
    assert len(bob.of(m.Message)) == 2  # another nick may use the same ref
    clock.now += REF_TTL_MS + 1
    reg.handle(ana_m, m.Say(room="a", text="again", ref="same"))
    assert len(bob.of(m.Message)) == 3


def test_repeated_dm_ref(reg: Registry) -> None:
    """A dm repeating a ref is delivered once and acked with the same id."""
    ana_m, ana = add(reg, "ana")
    _, bob = add(reg, "bob")
    reg.handle(ana_m, m.Dm(to="bob", text="x", ref="d"))
    reg.handle(ana_m, m.Dm(to="bob", text="x", ref="d"))
    assert len(bob.take()) == 1
    first, second = ana.take()
    assert first == second


def test_names_split_to_fit_max_frame(clock: Clock) -> None:
    """A names list too long for one frame comes in parts; all but the last say more."""
    reg = Registry(MemoryStore(), clock=clock, max_frame=300, max_clients=100)
    members = [add(reg, f"user{i:02d}", "big") for i in range(60)]
    member, peer = members[0]
    peer.take()
    reg.handle(member, m.Who(room="big", ref="w"))
    parts = peer.take()
    assert len(parts) > 1
    assert all(p.more for p in parts[:-1])
    assert not parts[-1].more
    assert all(p.ref == "w" for p in parts)
    assert sorted(n for p in parts for n in p.nicks) == sorted(f"user{i:02d}" for i in range(60))


def test_history_trimmed_to_fit_max_frame(clock: Clock) -> None:
    """A history page too big for one frame keeps the newest messages and sets more."""
    reg = Registry(MemoryStore(), clock=clock, max_frame=2000, max_text=500)
    ana_m, ana = add(reg, "ana", "a")
    for i in range(20):
        reg.handle(ana_m, m.Say(room="a", text=f"{i:03d}" + "x" * 200))
    ana.take()
    reg.handle(ana_m, m.HistoryRequest(room="a", limit=20))
    [page] = ana.take()
    assert page.more
    assert 0 < len(page.messages) < 20
    assert page.messages[-1].seq == 20
    assert len(m.encode(page)) <= 2000 + 4


def test_already_registered(reg: Registry) -> None:
    """A second hello on a registered connection is refused, non-fatally."""
    ana_m, _ = add(reg, "ana")
    exc = refusal(reg.handle, ana_m, hello("ana"))
    assert (exc.code, exc.fatal) == ("already_registered", False)


def test_ping_pong(reg: Registry) -> None:
    """ping is answered with pong echoing the ref."""
    ana_m, ana = add(reg, "ana")
    reg.handle(ana_m, m.Ping(ref="p1"))
    assert ana.take() == [m.Pong(ref="p1")]
