"""Coverage-guided fuzzing of the protocol core with atheris (libFuzzer for Python).

Feeds arbitrary bytes, split at fuzzer-chosen points, to the frame decoder,
then every body to both frame decoders and the naming rules. Anything but a
clean result or a ProtocolError is a bug, and the fuzzer reports it with the
input that caused it.

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


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
