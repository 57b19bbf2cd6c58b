"""Resources: nothing leaks after any kind of disconnect; running out of fds is survived."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

from achat.client.connection import Client
from achat.errors import ConnectionClosed
from achat.protocol.frames import encode_frame
from achat.server.app import Server
from achat.store.memory import MemoryStore
from tests.conftest import make_config
from tests.helpers.procs import ServerProcess
from tests.server.test_app import Raw


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(server: Server) -> None:
    """Wait until the server has forgotten every connection."""
    async with asyncio.timeout(5):
        await server.wait_connections(0)


async def test_no_leak_after_every_kind_of_disconnect() -> None:
    """Clean quits, resets, timeouts, framing errors and slow readers leave no fd or task."""
    # Long enough for every connection but the silent one to say hello on a busy machine.
    server = Server(make_config(hello_timeout=0.3, sendq_limit=16 * 1024), MemoryStore())
    await server.start()
    try:
        async with Client("127.0.0.1", server.port, "host", send_rate=0) as host:
            await host.join("room")
            await settle_one(server, host)
            fds, tasks = open_fds(), len(asyncio.all_tasks())
            for round_ in range(5):
                await one_of_each(server, host, round_)
                await settle_one(server, host)
            assert open_fds() == fds
            assert len(asyncio.all_tasks()) == tasks
            assert [m.nick for m in server.registry.members] == ["host"]
            assert list(server.registry.rooms["room"].members) == ["host"]
    finally:
        await server.close()
    await settle(server)


async def settle_one(server: Server, host: Client) -> None:
    async with asyncio.timeout(5):
        await server.wait_connections(1)
    await host.ping()


async def one_of_each(server: Server, host: Client, round_: int) -> None:
    port = server.port
    # A clean quit.
    async with Client("127.0.0.1", port, f"clean{round_}", send_rate=0) as clean:
        await clean.join("room")
    # An abrupt reset after joining.
    raw = await Raw.open(port)
    await raw.hello(f"reset{round_}")
    raw.send({"type": "join", "room": "room"})
    await raw.next()
    raw.writer.transport.abort()
    # A connection that never says hello.
    silent = await Raw.open(port)
    assert await silent.closed()
    silent.writer.close()
    # A framing error.
    broken = await Raw.open(port)
    await broken.hello(f"broken{round_}")
    broken.writer.write(b"\xff\xff\xff\xff")
    assert await broken.closed()
    broken.writer.close()
    # A reader that never reads while the room is busy.
    sloth = socket.create_connection(("127.0.0.1", port))
    sloth.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sloth.sendall(encode_frame(b'{"type":"hello","nick":"sloth%d","version":1}' % round_))
    sloth.sendall(encode_frame(b'{"type":"join","room":"room"}'))
    await host.who("room")
    while server.registry.member(f"sloth{round_}") is not None:
        await host.say("room", "y" * 3900)
    sloth.close()
    for r in (raw, silent, broken):
        with contextlib.suppress(ConnectionError, OSError):
            await r.writer.wait_closed()


def count_dropped(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server closed or reset (it had no fd to keep them)."""
    dropped = 0
    for s in sockets:
        s.settimeout(0.05)
        try:
            if s.recv(1) == b"":
                dropped += 1
        except TimeoutError:
            pass
        except OSError:
            dropped += 1
    return dropped


async def test_accept_survives_running_out_of_file_descriptors(tmp_path: Path) -> None:
    """With its fd limit exhausted the server keeps running and serves again once fds free up."""
    server = ServerProcess(tmp_path / "data", "--store", "memory", nofile=48)
    await asyncio.to_thread(server.start)
    hogs: list[socket.socket] = []
    try:
        for _ in range(80):
            s = socket.socket()
            s.settimeout(2)
            with contextlib.suppress(OSError):
                s.connect(("127.0.0.1", server.port))
            hogs.append(s)
        assert server.proc is not None
        assert server.proc.poll() is None
        assert await asyncio.to_thread(count_dropped, hogs) > 0, "fds were never exhausted"
        for s in hogs:
            s.close()
        hogs.clear()
        async with asyncio.timeout(20):
            while True:
                try:
                    async with Client(
                        "127.0.0.1", server.port, "after", connect_timeout=2, send_rate=0
                    ) as c:
                        await c.join("back")
                        ack = await c.say("back", "the server recovered")
                        assert ack.seq == 1
                        break
                except (ConnectionClosed, TimeoutError):
                    await asyncio.sleep(0.2)
        assert server.proc.poll() is None
    finally:
        for s in hogs:
            s.close()
        await asyncio.to_thread(server.kill9)
