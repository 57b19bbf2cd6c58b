"""Command-line entry points: ``achat-server`` and ``achat join|send``.

Each parses its options, builds a config, runs the event loop and maps
exceptions to exit codes: 0 done, 1 refused by the server or unreachable,
2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .errors import AchatError, ConnectionClosed, ServerError
from .protocol import DEFAULT_PORT

if TYPE_CHECKING:
    from .server.config import ServerConfig

__all__ = ["main", "parse_server_args", "server_main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _env(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    return env.get(f"ACHAT_{name}", default)


def _runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop's ``run`` when it is installed, else the standard loop's."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run
    return uvloop.run


def _run(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    return _runner()(coro_factory())


@contextlib.contextmanager
def _typeahead_kept(stream: TextIO | None) -> Iterator[None]:
    """Until the prompt reads the keyboard, keys typed wait unechoed; then the terminal is reset.

    In the terminal's line mode, keys pressed while ``achat join`` starts were
    echoed where they fell and then shown again at the prompt, and a Ctrl-D
    among them was taken by the terminal as the end of that line and lost.
    Echo and line editing are off from the start instead (Ctrl-C still
    interrupts), so the prompt gets the keys as typed; the terminal's settings
    as found are put back on the way out, whatever the way. A SIGTERM or SIGHUP
    (unless ignored) puts them back too, then ends the process by that signal
    as it would have. Not a terminal: as is.
    """
    try:
        import termios
    except ImportError:  # not a POSIX system
        yield
        return
    try:
        fd = stream.fileno() if stream is not None else -1
        found = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):  # not a terminal, or no stdin at all
        yield
        return

    def put_back() -> None:
        with contextlib.suppress(termios.error, OSError):  # the terminal is gone
            termios.tcsetattr(fd, termios.TCSANOW, found)

    def put_back_and_die(signum: int, frame: object) -> None:
        # Not an exception: one raised here can land in a finaliser that swallows it.
        # prompt_toolkit will not undo its own modes: line wrap back on, bracketed
        # paste off, cursor shown, colours reset, on a new line.
        with contextlib.suppress(OSError):
            os.write(fd, b"\x1b[?7h\x1b[?2004l\x1b[?25h\x1b[0m\r\n")
        put_back()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    handlers: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                handlers[sig] = signal.signal(sig, put_back_and_die)
        mode = list(found)
        mode[3] &= ~(termios.ECHO | termios.ICANON)
        mode[6] = list(found[6])
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        put_back()


@contextlib.contextmanager
def _loading_for_good() -> Iterator[None]:
    """Import with the cyclic collector off, then take what exists out of its sight.

    What ``achat join`` imports (prompt_toolkit, asyncio, msgspec) is tens of
    thousands of objects that live as long as the process. With the collector on,
    it ran about 70 times over them while they loaded, 10-15 ms of the ~200 ms
    before the prompt shows, and every full collection afterwards, in a burst of
    messages, would look at them again. ``gc.freeze`` moves every object alive to
    the permanent generation, including the few hundred cycles the imports left
    as garbage (about 140 KB, kept: a collection to free them first costs as much
    as the window saves), and in a longer-lived caller, such as a test calling
    :func:`main`, that caller's whole heap. What the program makes later is
    collected as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


# -- server -----------------------------------------------------------------


def parse_server_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build a :class:`ServerConfig` from flags, falling back to ``ACHAT_*`` variables."""
    # The server's modules are imported here, not at the top: `achat join` shares this
    # module and reaches its prompt ~30 ms sooner without them.
    from pathlib import Path  # with urllib and ipaddress, 10 ms `achat join` does without

    from .server.config import ServerConfig, default_data_dir
    from .server.limits import FloodPolicy
    from .server.registry import BACKLOG_PIECE
    from .server.session import SessionLimits

    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="achat-server",
        description="Run an achat chat server. Every option can also be set with an "
        "ACHAT_* environment variable (flags win).",
    )
    parser.add_argument(
        "--host",
        default=_env(env, "HOST", "0.0.0.0"),
        help="address to listen on (ACHAT_HOST, default 0.0.0.0: every interface)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(_env(env, "PORT", str(DEFAULT_PORT)) or DEFAULT_PORT),
        help=f"TCP port (ACHAT_PORT, default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--port-file",
        type=Path,
        default=_env(env, "PORT_FILE", None) or None,  # argparse makes a string a Path
        help="once listening, write the port listened on to this file, and remove it "
        "on shutdown: how a script learns the port --port 0 picked, and that the server "
        "is ready (ACHAT_PORT_FILE, default none)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env(env, "DATA_DIR", None) or default_data_dir(env)),
        help="where the server keeps its data (ACHAT_DATA_DIR, default "
        "$XDG_DATA_HOME/achat or ~/.local/share/achat)",
    )
    parser.add_argument(
        "--name", default=_env(env, "NAME", "achat"), help="server name shown to clients"
    )
    parser.add_argument("--motd", default=_env(env, "MOTD", None), help="message of the day")
    parser.add_argument(
        "--max-clients",
        type=int,
        default=int(_env(env, "MAX_CLIENTS", "10000") or 10000),
        help="most users at once; more get server_full (ACHAT_MAX_CLIENTS, default 10000)",
    )
    parser.add_argument(
        "--password",
        default=_env(env, "PASSWORD", None),
        help="require this password in hello (ACHAT_PASSWORD; default none)",
    )
    parser.add_argument(
        "--log-level",
        default=_env(env, "LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (ACHAT_LOG_LEVEL, default info)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=float(_env(env, "IDLE_TIMEOUT", "120") or 120),
        help="seconds of silence before a client is dropped (ACHAT_IDLE_TIMEOUT, default 120)",
    )
    parser.add_argument(
        "--hello-timeout",
        type=float,
        default=float(_env(env, "HELLO_TIMEOUT", "10") or 10),
        help="seconds a new connection has to say hello (ACHAT_HELLO_TIMEOUT, default 10)",
    )
    parser.add_argument(
        "--frame-timeout",
        type=float,
        default=float(_env(env, "FRAME_TIMEOUT", "10") or 10),
        help="seconds a started frame has to arrive in full (ACHAT_FRAME_TIMEOUT, default 10)",
    )
    parser.add_argument(
        "--max-frame",
        type=int,
        default=int(_env(env, "MAX_FRAME", "65536") or 65536),
        help="largest frame in bytes (ACHAT_MAX_FRAME, default 65536)",
    )
    parser.add_argument(
        "--max-text",
        type=int,
        default=int(_env(env, "MAX_TEXT", "4000") or 4000),
        help="longest message in characters (ACHAT_MAX_TEXT, default 4000)",
    )
    parser.add_argument(
        "--sendq-limit",
        type=int,
        default=int(_env(env, "SENDQ_LIMIT", str(1 << 20)) or 1 << 20),
        help="bytes of unsent output a connection may have before it is cut off "
        "(ACHAT_SENDQ_LIMIT, default 1048576)",
    )
    parser.add_argument(
        "--write-lag",
        type=float,
        default=float(_env(env, "WRITE_LAG", "0.5") or 0.5),
        help="seconds the server's writing may fall behind (a room too big for its core) "
        "before it refuses messages with rate_limited until it catches up "
        "(ACHAT_WRITE_LAG, default 0.5)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=float(_env(env, "RATE", "5") or 5),
        help="frames a second one connection may send on average; 0 turns the limit off "
        "(ACHAT_RATE, default 5)",
    )
    parser.add_argument(
        "--burst",
        type=float,
        default=float(_env(env, "BURST", "10") or 10),
        help="frames one connection may send at once (ACHAT_BURST, default 10)",
    )
    parser.add_argument(
        "--max-per-ip",
        type=int,
        default=int(_env(env, "MAX_PER_IP", "64") or 64),
        help="connections at once from one address, loopback exempt (ACHAT_MAX_PER_IP, default 64)",
    )
    parser.add_argument(
        "--max-new-per-ip",
        type=int,
        default=int(_env(env, "MAX_NEW_PER_IP", "120") or 120),
        help="new connections a minute from one address, loopback exempt "
        "(ACHAT_MAX_NEW_PER_IP, default 120)",
    )
    parser.add_argument(
        "--store",
        default=_env(env, "STORE", "sqlite"),
        choices=["sqlite", "memory"],
        help="sqlite keeps history in DATA_DIR/achat.db; memory forgets it on exit "
        "(ACHAT_STORE, default sqlite)",
    )
    parser.add_argument(
        "--durability",
        default=_env(env, "DURABILITY", "normal"),
        choices=["normal", "full"],
        help="normal: acked messages survive a crash of the server; full: also a power "
        "loss, at the cost of an fsync per batch (ACHAT_DURABILITY, default normal)",
    )
    parser.add_argument(
        "--history-days",
        type=float,
        default=_float_or_none(_env(env, "HISTORY_DAYS", None)),
        help="delete messages older than this many days (ACHAT_HISTORY_DAYS, default keep)",
    )
    parser.add_argument(
        "--history-max",
        type=int,
        default=_int_or_none(_env(env, "HISTORY_MAX", None)),
        help="keep at most this many messages per room (ACHAT_HISTORY_MAX, default all)",
    )
    parser.add_argument(
        "--max-refs",
        type=int,
        default=_int_or_none(_env(env, "MAX_REFS", None)),
        help="most messages remembered at once for the ten minutes a resend is "
        "recognised; past it a say or dm with a new ref is refused with rate_limited "
        "until old ones expire "
        "(ACHAT_MAX_REFS; default: as many as half the memory the server may use holds, "
        "at about 237 bytes each; 0: no limit)",
    )
    parser.add_argument("--version", action="version", version=f"achat {__version__}")
    args = parser.parse_args(argv)
    if args.max_refs is not None and args.max_refs < 0:
        parser.error("--max-refs must be 0 (no limit) or more")
    if args.history_days is not None and args.history_days <= 0:
        parser.error("--history-days must be positive")
    if args.history_max is not None and args.history_max < 1:
        parser.error("--history-max must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0 to 65535")
    if args.port_file is not None and not args.port_file.name:
        parser.error("--port-file must name a file")
    if args.max_clients < 1:
        parser.error("--max-clients must be at least 1")
    if args.motd is not None and len(args.motd) > 1000:
        parser.error("--motd has at most 1000 characters")
    if args.idle_timeout <= 0:
        parser.error("--idle-timeout must be positive")
    if args.hello_timeout <= 0 or args.frame_timeout <= 0:
        parser.error("--hello-timeout and --frame-timeout must be positive")
    if not 1 <= args.max_text <= 100_000:
        parser.error("--max-text must be 1 to 100000")
    # A message of max_text characters, 4 bytes each in UTF-8, must fit in one frame.
    if args.max_frame < args.max_text * 4 + 1024 or args.max_frame > 16 * 1024 * 1024:
        parser.error("--max-frame must hold a full message (max_text * 4 + 1024) and be <= 16 MiB")
    # A backlog (join since) is handed over a piece at a time while what the peer has
    # not read is under a quarter of the limit: the limit must hold that and a piece.
    if args.sendq_limit < 2 * (args.max_frame + BACKLOG_PIECE):
        parser.error(
            f"--sendq-limit must be at least twice --max-frame plus {2 * BACKLOG_PIECE} "
            "(a backlog's pieces must fit in it)"
        )
    if not 0 < args.write_lag <= 60:  # NaN fails too
        parser.error("--write-lag must be over 0 and at most 60 seconds")
    if not (0 <= args.rate < math.inf and 1 <= args.burst < math.inf):  # NaN fails too
        parser.error("--rate must be a number of 0 or more and --burst at least 1")
    if args.max_per_ip < 1 or args.max_new_per_ip < 1:
        parser.error("--max-per-ip and --max-new-per-ip must be at least 1")
    return ServerConfig(
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        data_dir=args.data_dir,
        name=args.name,
        motd=args.motd,
        max_clients=args.max_clients,
        password=args.password,
        log_level=args.log_level,
        max_text=args.max_text,
        limits=SessionLimits(
            max_frame=args.max_frame,
            sendq_limit=args.sendq_limit,
            hello_timeout=args.hello_timeout,
            frame_timeout=args.frame_timeout,
            idle_timeout=args.idle_timeout,
            flood=FloodPolicy(rate=args.rate, burst=args.burst),
            write_lag=args.write_lag,
        ),
        max_per_ip=args.max_per_ip,
        max_new_per_ip=args.max_new_per_ip,
        store=args.store,
        durability=args.durability,
        history_days=args.history_days,
        history_max=args.history_max,
        max_refs=args.max_refs,
    )


def _float_or_none(value: str | None) -> float | None:
    return float(value) if value else None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None


async def _serve(config: ServerConfig) -> int:
    import asyncio

    from .portfile import remove_port_file, write_port_file
    from .server.app import Server
    from .server.runtime import tune_for_latency
    from .store.base import Store
    from .store.memory import MemoryStore
    from .store.sqlite import SQLiteStore

    store: Store
    if config.store == "memory":
        store = MemoryStore(max_per_room=config.history_max)
    else:
        store = SQLiteStore(
            config.database,
            durability=config.durability,
            history_days=config.history_days,
            history_max=config.history_max,
        )
    server = Server(config, store)
    tune_for_latency()
    try:
        await server.start()
    except BaseException:
        store.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def log_stats() -> None:
        stats = " ".join(f"{k}={v}" for k, v in server.stats().items())
        logging.getLogger("achat.server").warning("stats %s", stats)

    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGUSR1, log_stats)
    host, port = config.host, server.port
    if config.port_file is not None:
        try:
            write_port_file(config.port_file, port)
        except OSError as exc:
            await server.close()
            why = exc.strerror or exc
            print(
                f"achat-server: cannot write --port-file {config.port_file}: {why}", file=sys.stderr
            )
            return EXIT_FAILED
    where = "localhost" if host in ("0.0.0.0", "::", "") else host
    logging.getLogger("achat.server").info(
        "ready: join with  achat join --host %s --port %d --nick YOURNAME", where, port
    )
    try:
        await stop.wait()
    finally:
        # First: a server that is closing is not ready for anyone who reads the file.
        if config.port_file is not None:
            remove_port_file(config.port_file, port)
    logging.getLogger("achat.server").info("shutting down")
    await server.close()
    return EXIT_OK


def server_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``achat-server``."""
    config = parse_server_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(lambda: _serve(config))
    except OSError as exc:
        print(f"achat-server: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# -- client -----------------------------------------------------------------


def _client_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="achat", description="The achat chat client.")
    parser.add_argument("--version", action="version", version=f"achat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--host", default=_env(env, "HOST", "127.0.0.1"), help="server (default 127.0.0.1)"
        )
        p.add_argument(
            "--port",
            type=int,
            default=int(_env(env, "PORT", str(DEFAULT_PORT)) or DEFAULT_PORT),
            help=f"server port (default {DEFAULT_PORT})",
        )
        p.add_argument(
            "--nick", default=_env(env, "NICK", None), required=_env(env, "NICK", None) is None
        )
        p.add_argument("--password", default=_env(env, "PASSWORD", None))

    join = sub.add_parser("join", help="chat in the terminal")
    common(join)
    join.add_argument("--room", default="general", help="room to join first (default general)")
    send = sub.add_parser("send", help="send one message and exit (for scripts)")
    common(send)
    send.add_argument("--room", default="general", help="room to send to (default general)")
    send.add_argument("text", nargs="?", help="the message; read from stdin when omitted")
    return parser


async def _send(args: argparse.Namespace, text: str) -> int:
    from .client.commands import normalise_room
    from .client.connection import Client

    room = normalise_room(args.room)
    async with Client(args.host, args.port, args.nick, password=args.password) as client:
        await client.join(room)
        ack = await client.say(room, text)
        print(f"sent to #{room} as message {ack.seq}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``achat``."""
    env = os.environ
    args = _client_parser(env).parse_args(argv)
    try:
        if args.command == "send":
            text = args.text if args.text is not None else (sys.stdin or io.StringIO()).read()
            if not text.strip():
                print("achat send: nothing to send", file=sys.stderr)
                return EXIT_USAGE
            return _run(lambda: _send(args, text))
        if sys.stdin is None:  # uvloop would give the connection fd 0, then abort closing it
            print("achat join: no standard input to type into", file=sys.stderr)
            return EXIT_USAGE
        with _typeahead_kept(sys.stdin):
            with _loading_for_good():
                from .client.ui import run_ui

                run = _runner()
            return run(
                run_ui(
                    host=args.host,
                    port=args.port,
                    nick=args.nick,
                    room=args.room,
                    password=args.password,
                )
            )
    except ServerError as exc:
        print(f"achat: the server refused: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_FAILED
    except (ConnectionClosed, AchatError) as exc:
        print(f"achat: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"achat: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
