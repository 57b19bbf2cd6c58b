"""Resends against the contract's guarantees, over random histories (a model-based check).

Each seed plays a random history against a registry: runs of ``say`` frames
as reads bring them (refs reused, some frames refused), DMs, a store that
commits late and a few writes at a time, a paced fan-out run late, clock
jumps past a ref's ten minutes, reconnects, parting and joining, and
restarts (what the store holds survives; callbacks not run are lost, as in a
crash after a commit). Then it checks what ``protocol.md`` promises:

- an ``ack`` names a record that is stored (durability);
- every frame with a ref is answered once, by an ack or an error, on the
  connection it came on;
- an ack of a ref is the ack of a record stored with that ref (a resend gets
  the original's);
- a ref stores at most one record in ten minutes (idempotency).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import pytest

from achat.errors import ProtocolError
from achat.protocol import messages as m
from achat.server.registry import Member, Registry
from achat.store.base import RefRecord, ack_of

from .test_registry import TEN_MINUTES, Clock, DeferredStore, FakePeer, hello

SEEDS = 300
REFS = ("r0", "r1", "r2", "r3")

RecordId = tuple[str, int]  # a room and a seq, or "" and a DM's id


def _record_id(record: m.Message | m.DmEvent) -> RecordId:
    return (record.room, record.seq) if isinstance(record, m.Message) else ("", record.id)


def _acked_id(ack: m.Ack) -> RecordId:
    return (ack.room, ack.seq or 0) if ack.room is not None else ("", ack.id or 0)


class RecordingStore(DeferredStore):
    """A slow store that knows what it holds, what it has said is stored, and the records
    stored with each ref."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[RecordId] = set()
        self.stored: set[RecordId] = set()
        self.uses: dict[str, list[m.Message | m.DmEvent]] = defaultdict(list)

    def append_many(
        self,
        messages: Sequence[m.Message],
        refs: Sequence[RefRecord | None],
        on_stored: Callable[[], None],
    ) -> None:
        kept = [_record_id(message) for message in messages]
        for message, ref in zip(messages, refs, strict=True):
            if ref is not None:
                self.uses[ref.ref].append(message)
        self.held.update(kept)
        super().append_many(messages, refs, lambda: self._stored(kept, on_stored))

    def append_dm(
        self, dm: m.DmEvent, on_stored: Callable[[], None], ref: RefRecord | None = None
    ) -> None:
        if ref is not None:
            self.uses[ref.ref].append(dm)
        self.held.add(_record_id(dm))
        super().append_dm(dm, lambda: self._stored([_record_id(dm)], on_stored), ref)

    def _stored(self, kept: list[RecordId], on_stored: Callable[[], None]) -> None:
        self.stored.update(kept)
        on_stored()

    def complete_some(self, count: int) -> None:
        """Complete the oldest ``count`` writes, in order."""
        done, self.waiting = self.waiting[:count], self.waiting[count:]
        for callback in done:
            callback()

    def crash(self) -> None:
        """The server dies: everything written was committed, no callback runs."""
        self.stored |= self.held
        self.waiting = []


class CheckingPeer(FakePeer):
    """A peer that fails the test on an ack of a record its store has not stored."""

    def __init__(self, store: RecordingStore) -> None:
        super().__init__()
        self.store = store

    def send(self, frame: bytes) -> None:
        before = len(self.frames)
        super().send(frame)
        for f in self.frames[before:]:
            if isinstance(f, m.Ack):
                assert _acked_id(f) in self.store.stored, f"acked before it was stored: {f}"


def _play(seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    store = RecordingStore()
    later: list[Callable[[], None]] = []
    paced = rng.random() < 0.5

    def start() -> Registry:
        defer = (lambda f, _wait: later.append(f)) if paced else None
        return Registry(store, clock=clock, defer=defer)

    def connect(reg: Registry, nick: str, rooms: Sequence[str]) -> tuple[Member, CheckingPeer]:
        peer = CheckingPeer(store)
        member = reg.register(peer, hello(nick))
        for room in rooms:
            reg.handle(member, m.Join(room=room))
        return member, peer

    def refused_on(peer: CheckingPeer) -> Callable[[ProtocolError], None]:
        return lambda exc: peer.send(
            m.encode(m.Error(code=exc.code, message=exc.message, fatal=False, ref=exc.ref))
        )

    reg = start()
    bob, _ = connect(reg, "bob", ["a", "b"])
    ana, ana_peer = connect(reg, "ana", ["a", "b"])
    peers = [ana_peer]  # ana's connections since the last restart
    asked: dict[CheckingPeer, Counter[str]] = defaultdict(Counter)
    for _ in range(rng.randint(5, 150)):
        step = rng.random()
        if step < 0.35:  # a read of says
            frames = [
                m.Say(
                    room=rng.choice("aabc"),
                    text=rng.choice(["hi", "hi", ""]),
                    ref=rng.choice([*REFS, None]),
                )
                for _ in range(rng.randint(1, 4))
            ]
            asked[ana_peer].update(f.ref for f in frames if f.ref)
            reg.say_many(ana, frames, refused_on(ana_peer))
        elif step < 0.45:
            dm = m.Dm(
                to=rng.choice(["bob", "bob", "zed"]),
                text=rng.choice(["hi", "hi", ""]),
                ref=rng.choice([*REFS, None]),
            )
            if dm.ref:
                asked[ana_peer][dm.ref] += 1
            try:
                reg.handle(ana, dm)
            except ProtocolError as exc:
                exc.ref = dm.ref
                refused_on(ana_peer)(exc)
        elif step < 0.6:
            store.complete_some(rng.randint(0, 3))
        elif step < 0.7:
            while later:
                later.pop(0)()
        elif step < 0.78:
            clock.advance(rng.choice([1000, 60_000, TEN_MINUTES - 5000, TEN_MINUTES + 2000]))
            reg.handle(bob, m.Say(room="a", text="time passes"))
        elif step < 0.86:
            reg.unregister(ana)
            ana, ana_peer = connect(reg, "ana", rng.choice([["a", "b"], ["a"]]))
            peers.append(ana_peer)
        elif step < 0.88:
            store.crash()
            later.clear()
            reg = start()
            bob, _ = connect(reg, "bob", ["a", "b"])
            ana, ana_peer = connect(reg, "ana", ["a", "b"])
            peers = [ana_peer]  # what was in flight died with the server
        elif step < 0.92:
            reg.handle(ana, m.Part(room="b") if "b" in ana.rooms else m.Join(room="b"))
        else:
            reg.handle(bob, m.Say(room=rng.choice("ab"), text="x"))
    store.complete()
    while later:
        later.pop(0)()
    reg.fan_out()

    for peer in peers:
        answered = Counter(f.ref for f in peer.frames if isinstance(f, m.Ack | m.Error) and f.ref)
        assert answered == asked[peer], f"seed {seed}: answers {answered}, asked {asked[peer]}"
        for f in peer.frames:
            if isinstance(f, m.Ack) and f.ref:  # a say without a ref is acked with ref ""
                records = store.uses[f.ref]
                assert any(ack_of(f.ref, r) == m.encode(f) for r in records), f"seed {seed}: {f}"
    for ref, records in store.uses.items():
        for first, second in itertools.pairwise(records):
            assert second.ts - first.ts >= TEN_MINUTES, f"seed {seed}: {ref} stored twice"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_resends_keep_the_guarantees_over_random_histories(seed: int) -> None:
    _play(seed)
