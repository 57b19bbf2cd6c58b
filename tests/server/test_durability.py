"""Crash safety: a real server killed with SIGKILL mid-traffic loses no acked message."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from achat.client.connection import Backoff, Client
from achat.protocol.messages import Ack, Dm, DmEvent, Message, Say
from achat.server.app import Server
from achat.store.sqlite import SQLiteStore
from tests.conftest import make_config
from tests.helpers.procs import ServerProcess

ROOM = "crash"
CYCLES = 20


async def full_log(port: int) -> list[Message]:
    """Every stored message of ROOM, read by a fresh client page by page."""
    async with Client("127.0.0.1", port, "auditor", send_rate=0) as auditor:
        messages: list[Message] = []
        after = 0
        while True:
            page = await auditor.history(ROOM, after=after, limit=500)
            messages += page.messages
            if not page.more or not page.messages:
                return messages
            after = page.messages[-1].seq


async def test_kill9_cycles_keep_every_acked_message(tmp_path: Path) -> None:
    """20 SIGKILL/restart cycles under load: all acked messages stored once, seq gapless."""
    server = ServerProcess(tmp_path / "data")
    await asyncio.to_thread(server.start)
    rng = random.Random(7)
    try:
        port = server.port
        backoff = Backoff(initial=0.02, cap=0.2, rng=random.Random(1))
        senders = [
            Client("127.0.0.1", port, f"sender{i}", reconnect=True, backoff=backoff, send_rate=0)
            for i in range(3)
        ]
        watcher = Client("127.0.0.1", port, "watcher", reconnect=True, backoff=backoff, send_rate=0)
        for client in [*senders, watcher]:
            await client.connect()
            await client.join(ROOM)
        seen: list[Message] = []
        caught_up = asyncio.Event()
        final_seq = 0

        async def watch() -> None:
            async for event in watcher.events():
                if isinstance(event, Message) and event.room == ROOM:
                    seen.append(event)
                    if final_seq and event.seq >= final_seq:
                        caught_up.set()

        acked: dict[str, int] = {}
        stop = asyncio.Event()

        async def send(client: Client) -> None:
            k = 0
            while not stop.is_set():
                text = f"{client.nick} #{k}"
                k += 1
                ack = await client.say(ROOM, text, timeout=30)
                assert ack.seq is not None
                acked[text] = ack.seq

        watching = asyncio.create_task(watch())
        sending = [asyncio.create_task(send(c)) for c in senders]
        for _ in range(CYCLES):
            # Let traffic flow for a random while, then crash the server in the middle of it.
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            before = len(acked)
            await asyncio.to_thread(server.kill9)
            await asyncio.to_thread(server.start)
            assert len(acked) >= before
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*sending)

        log = await full_log(port)
        assert [m.seq for m in log] == list(range(1, len(log) + 1)), "seq has gaps or repeats"
        texts = [m.text for m in log]
        assert len(texts) == len(set(texts)), "a message was stored twice"
        by_text = {m.text: m.seq for m in log}
        missing = [t for t in acked if t not in by_text]
        assert not missing, f"acked but lost: {missing[:5]}"
        assert all(by_text[t] == seq for t, seq in acked.items()), "ack seq differs from stored"
        assert len(acked) > CYCLES  # the test really ran traffic through the crashes

        # The reconnecting watcher ends with the complete, ordered, duplicate-free log.
        final_seq = log[-1].seq
        if seen and seen[-1].seq >= final_seq:
            caught_up.set()
        async with asyncio.timeout(15):
            await caught_up.wait()
        assert [m.seq for m in seen] == [m.seq for m in log]
        assert [m.text for m in seen] == texts

        for client in [*senders, watcher]:
            await client.close()
        watching.cancel()
    finally:
        await asyncio.to_thread(server.kill9)


async def test_repeated_ref_after_restart_gets_the_original_ack(tmp_path: Path) -> None:
    """A say resent with the same ref after a restart is not stored again: same ack, one row."""
    db = tmp_path / "achat.db"
    first = Server(make_config(), SQLiteStore(db))
    await first.start()
    async with Client("127.0.0.1", first.port, "ana", send_rate=0) as ana:
        await ana.join(ROOM)
        original = await ana.request(Say(room=ROOM, text="only once", ref="fixed-ref"))
    await first.close()

    second = Server(make_config(), SQLiteStore(db))
    await second.start()
    try:
        async with Client("127.0.0.1", second.port, "ana", send_rate=0) as ana:
            await ana.join(ROOM)
            again = await ana.request(Say(room=ROOM, text="only once", ref="fixed-ref"))
            assert again == original
            page = await ana.history(ROOM)
            assert [x.text for x in page.messages] == ["only once"]
            fresh = await ana.say(ROOM, "next")
            assert fresh.seq == 2
    finally:
        await second.close()


async def test_repeated_dm_ref_after_restart_gets_the_original_ack(tmp_path: Path) -> None:
    """A DM resent with the same ref after a restart is not delivered again: same ack."""
    db = tmp_path / "achat.db"
    first = Server(make_config(), SQLiteStore(db))
    await first.start()
    async with (
        Client("127.0.0.1", first.port, "ana", send_rate=0) as ana,
        Client("127.0.0.1", first.port, "bob", send_rate=0) as bob,
    ):
        original = await ana.request(Dm(to="bob", text="psst", ref="dm-ref"))
        assert isinstance(original, Ack)
        assert original.id is not None
        await bob.close()
    await first.close()

    second = Server(make_config(), SQLiteStore(db))
    await second.start()
    try:
        async with (
            Client("127.0.0.1", second.port, "ana", send_rate=0) as ana,
            Client("127.0.0.1", second.port, "bob", send_rate=0) as bob,
        ):
            again = await ana.request(Dm(to="bob", text="psst", ref="dm-ref"))
            assert again == original
            fresh = await ana.dm("bob", "and this")
            assert fresh.id == original.id + 1
            got = await bob.next_event(10)
            while not isinstance(got, DmEvent):
                got = await bob.next_event(10)
            assert got.text == "and this"  # the resend was not delivered again
    finally:
        await second.close()
