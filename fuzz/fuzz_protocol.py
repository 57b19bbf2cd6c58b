"""Coverage-guided fuzzing of the protocol core with atheris (libFuzzer for Python).

Feeds arbitrary bytes, split at fuzzer-chosen points, to the frame decoder,
then every body to both frame decoders and the naming rules. Anything but a
clean result or a ProtocolError is a bug, and the fuzzer reports it with the
input that caused it. The bodies, and the stream cut at its commas, also go
to ``decode_client_many`` at once, which must give what decoding each body
alone gives, or leave them to that (None).

    make fuzz                      # 60 s
    python fuzz/fuzz_protocol.py -max_total_time=600 fuzz/corpus
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from achat.errors import ProtocolError
    from achat.protocol import messages, names
    from achat.protocol.frames import FrameDecoder


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_frame = fdp.ConsumeIntInRange(1, 4096)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    decoder = FrameDecoder(max_frame=max_frame)
    bodies: list[bytes] = []
    pos = 0
    step = 1 + (len(stream) % 7)
    try:
        while pos < len(stream):
            bodies += decoder.receive_data(stream[pos : pos + step])
            pos += step
    except ProtocolError:
        pass
    for run in (bodies, [part for part in stream.split(b",") if part]):
        if run:
            _same_as_one_by_one(run)
    for body in bodies + [stream]:
        for decode in (messages.decode_client, messages.decode_server):
            try:
                decode(body)
            except ProtocolError:
                pass
        text = body.decode("utf-8", "replace")
        for check in (names.validate_nick, names.validate_room, names.validate_topic):
            try:
                check(text)
            except ProtocolError:
                pass
        try:
            names.validate_text(text, 4000)
        except ProtocolError:
            pass
        names.nick_skeleton(text[:64])


def _same_as_one_by_one(bodies: list[bytes]) -> None:
    frames = messages.decode_client_many(bodies)
    if frames is None:
        return
    # Every body must decode alone, to the frame the one pass gave for it.
    alone = [messages.decode_client(body) for body in bodies]
    if frames != alone:
        raise AssertionError(f"one pass {frames!r} != one by one {alone!r} for {bodies!r}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
