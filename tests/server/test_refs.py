"""RecentRefs: the memory of refs behind idempotent resends."""

from __future__ import annotations

import gc
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from achat.protocol.messages import DmEvent, Message
from achat.server.refs import (
    PLAIN_KEY_MAX,
    SHARDS,
    RecentRefs,
    ack_from,
    receipt_number,
    receipt_of,
    receipt_of_ack,
    ref_key,
)
from achat.store.base import ack_of


def test_a_claim_remembers_a_new_ref_and_finds_a_known_one() -> None:
    refs: RecentRefs[str] = RecentRefs()
    key = ref_key("ana", "r1")
    refs.deadline(100)
    assert refs.claim(key, b"m-first") is None
    assert refs.get(key) == b"m-first"
    assert refs.claim(key, b"m-second") == b"m-first"  # a resend: what it was claimed with
    assert refs.get(key) == b"m-first"
    assert len(refs) == 1


def test_a_released_ref_is_new_again_until_its_first_deadline() -> None:
    refs: RecentRefs[str] = RecentRefs()
    key = ref_key("ana", "r")
    first = b"m-first"
    refs.deadline(10)
    refs.claim(key, first)
    refs.release(key, b"m-other")  # not what it was claimed with: no change
    assert refs.get(key) == first
    refs.release(key, first)
    assert refs.get(key) is None
    refs.deadline(20)
    assert refs.claim(key, b"m-second") is None  # new again
    assert refs.claim(key, b"m-third") == b"m-second"
    assert len(refs) == 1  # in the expiry order once, at its first place
    refs.expire(10)
    assert refs.get(key) is None


def test_resends_wait_by_the_receipt_of_what_they_wait_for() -> None:
    refs: RecentRefs[str] = RecentRefs()
    refs.wait(b"m-1", "first resend")
    refs.wait(b"m-1", "second resend")
    refs.wait(b"m-2", "another")
    assert refs.waiting == {b"m-1": ["first resend", "second resend"], b"m-2": ["another"]}


def test_unknown_refs_are_not_known() -> None:
    refs: RecentRefs[str] = RecentRefs()
    assert refs.get(ref_key("ana", "nope")) is None


def test_refs_expire_in_order_at_their_deadline() -> None:
    refs: RecentRefs[str] = RecentRefs()
    refs.keep(ref_key("ana", "a"), 10, b"A")
    refs.deadline(20)
    refs.claim(ref_key("ana", "b"), b"B")
    refs.expire(9)
    assert refs.get(ref_key("ana", "a")) == b"A"
    refs.expire(10)
    assert refs.get(ref_key("ana", "a")) is None
    assert refs.get(ref_key("ana", "b")) == b"B"
    refs.expire(20)
    assert refs.get(ref_key("ana", "b")) is None
    assert len(refs) == 0


def test_many_refs_spread_over_every_shard_and_all_expire() -> None:
    # No dict may grow big, or copying it when it fills up stops the loop (refs.py);
    # one nick's refs alone, in order, are what a client pipelining says sends.
    refs: RecentRefs[str] = RecentRefs()
    count = 64 * SHARDS
    refs.deadline(10)
    for i in range(count):
        assert refs.claim(ref_key("ana", f"c0ffee-{i}"), b"R") is None
    sizes = [len(shard) for shard in refs._shards]
    assert sum(sizes) == count
    assert min(sizes) > 0
    assert max(sizes) < 2 * count / SHARDS
    assert refs.get(ref_key("ana", f"c0ffee-{count - 1}")) == b"R"
    refs.expire(10)
    assert not any(refs._shards)
    assert len(refs) == 0


def test_a_shard_count_is_a_power_of_two() -> None:
    assert len(RecentRefs(shards=1)._shards) == 1
    for bad in (0, 3, 48):
        with pytest.raises(ValueError, match="power of two"):
            RecentRefs(shards=bad)


def test_a_key_kept_twice_is_kept_once_with_the_later_ack_until_the_first_deadline() -> None:
    # Only a clock stepped back around a restart gives load_refs one key twice.
    refs: RecentRefs[str] = RecentRefs()
    key = ref_key("ana", "r")
    refs.keep(key, 10, b"EARLIER")
    refs.keep(key, 20, b"LATER")
    assert refs.get(key) == b"LATER"
    assert sum(len(shard) for shard in refs._shards) == 1
    refs.expire(10)
    assert refs.get(key) is None
    assert not any(refs._shards)


def test_a_ref_is_new_again_once_it_expired() -> None:
    refs: RecentRefs[str] = RecentRefs()
    key = ref_key("ana", "r")
    refs.deadline(10)
    assert refs.claim(key, b"FIRST") is None
    refs.expire(10)
    refs.deadline(30)
    assert refs.claim(key, b"SECOND") is None
    assert refs.get(key) == b"SECOND"
    refs.expire(29)
    assert refs.get(key) == b"SECOND"  # the first use's expiry took nothing of the second


def test_keys_of_different_nicks_never_collide() -> None:
    refs: RecentRefs[str] = RecentRefs()
    refs.keep(ref_key("ana", "1"), 10, b"ANA")
    refs.keep(ref_key("bob", "1"), 10, b"BOB")
    assert refs.get(ref_key("ana", "1")) == b"ANA"
    assert refs.get(ref_key("bob", "1")) == b"BOB"


def test_remembered_refs_give_the_garbage_collector_nothing_to_scan() -> None:
    refs: RecentRefs[str] = RecentRefs()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(10_000):
        refs.keep(ref_key("ana", str(i)), 100, b"ack")
    refs.deadline(200)
    for i in range(10_000):
        refs.claim(ref_key("bob", str(i)), b"m%d" % i)
    assert len(gc.get_objects()) - before < 100


def test_refs_of_one_second_share_a_deadline_at_its_end() -> None:
    """With a granularity of a second, deadlines round up to the next whole second."""
    refs: RecentRefs[str] = RecentRefs(granularity=1000)
    for name, deadline in (("a", 10_001), ("b", 10_999), ("c", 11_000), ("d", 11_001)):
        if name in "bd":  # claimed ones and kept ones share the marks of their seconds
            refs.deadline(deadline)
            refs.claim(ref_key("ana", name), name.encode())
        else:
            refs.keep(ref_key("ana", name), deadline, name.encode())
    refs.expire(10_999)
    assert len(refs) == 4  # a and b are kept to the end of their second
    refs.expire(11_000)
    assert [refs.get(ref_key("ana", n)) for n in "abcd"] == [None, None, None, b"d"]
    assert len(refs) == 1
    refs.expire(12_000)
    assert len(refs) == 0


def test_a_deadline_earlier_than_the_last_waits_behind_it() -> None:
    """Refs expire in the order they were made, even if the clock stepped back meanwhile."""
    refs: RecentRefs[str] = RecentRefs(granularity=1000)
    refs.keep(ref_key("ana", "late"), 20_000, b"L")
    refs.keep(ref_key("ana", "early"), 5_000, b"E")
    refs.expire(10_000)
    assert refs.get(ref_key("ana", "early")) == b"E"
    refs.expire(20_000)
    assert len(refs) == 0


def test_a_granularity_is_at_least_a_millisecond() -> None:
    with pytest.raises(ValueError, match="granularity"):
        RecentRefs(granularity=0)


@given(
    ref=st.text(max_size=64),
    ts=st.integers(min_value=0, max_value=2**63 - 1),
    number=st.integers(min_value=0, max_value=2**63 - 1),
    room=st.from_regex(r"[a-z0-9_-]{1,32}", fullmatch=True),
)
def test_a_receipt_gives_back_the_very_ack_it_was_made_for(
    ref: str, ts: int, number: int, room: str
) -> None:
    """A resend gets the same bytes as the first ack, for a message and for a DM."""
    message = Message(room=room, seq=number, ts=ts, sender="ana", text="hi")
    dm = DmEvent(sender="ana", to="bob", id=number, ts=ts, text="hi")
    for record in (message, dm):
        kept = receipt_of(record)
        assert ack_from(ref, kept) == ack_of(ref, record)
        assert len(kept) < len(ack_of(ref, record))
    # And it names its record, for the registry to tell whether that was stored yet.
    assert receipt_number(receipt_of(message)) == (room, number)
    assert receipt_number(receipt_of(dm)) == (None, number)


def test_a_short_ascii_key_is_kept_as_it_is() -> None:
    """The usual key: the nick's key, a NUL, the ref."""
    assert ref_key("ana", "a1b2c3d4-17") == "ana\0a1b2c3d4-17"
    plain = ref_key("n" * 24, "x" * (PLAIN_KEY_MAX - 25))
    assert isinstance(plain, str)
    assert len(plain) == PLAIN_KEY_MAX


@pytest.mark.parametrize(
    ("nick", "ref"),
    [("n" * 24, "x" * (PLAIN_KEY_MAX - 24)), ("josé", "1"), ("ana", "\U0001f600"), ("a", "\ud800")],
)
def test_a_long_or_non_ascii_key_is_kept_as_its_digest(nick: str, ref: str) -> None:
    """One character over the longest plain key, or any beyond ASCII: 16 bytes, the same
    each time (a lone surrogate, which the protocol's decoder never lets through, does
    not make it raise either)."""
    key = ref_key(nick, ref)
    assert isinstance(key, bytes)
    assert len(key) == 16
    assert ref_key(nick, ref) == key


# A nick holds no control character (the protocol's rule), so no NUL: the NUL that
# follows it in a key splits the two unambiguously.
nicks = st.text(st.characters(exclude_categories=["Cc"]), min_size=1, max_size=24)
refs_text = st.text(min_size=1, max_size=64)


def test_where_the_nick_ends_is_part_of_the_key() -> None:
    """The same characters split differently between nick and ref are two keys."""
    assert ref_key("ab", "c") != ref_key("a", "bc")
    assert ref_key("ab", "c" * 64) != ref_key("a", "b" + "c" * 64)
    assert ref_key("jo", "sé") != ref_key("jos", "é")


@given(nicks, refs_text, nicks, refs_text)
def test_keys_are_equal_only_for_the_same_nick_and_ref(
    nick: str, ref: str, other_nick: str, other_ref: str
) -> None:
    """Plain or digest, two uses share a key exactly when nick and ref are the same."""
    same = (nick, ref) == (other_nick, other_ref)
    assert (ref_key(nick, ref) == ref_key(other_nick, other_ref)) == same


@given(nicks, refs_text)
def test_no_key_takes_more_memory_than_the_longest_plain_one(nick: str, ref: str) -> None:
    """Whatever names a client picks, its key takes no more memory than the longest kept
    plain: what bounds the memory of a ref (``REF_BYTES`` and ``--max-refs``)."""
    longest = sys.getsizeof("x" * PLAIN_KEY_MAX)
    assert sys.getsizeof(ref_key(nick, ref)) <= longest


@pytest.mark.parametrize(
    "record",
    [
        Message(room="general", seq=12345, ts=1_765_000_000_000, sender="ana", text="hi"),
        DmEvent(sender="ana", to="bob", id=77, ts=1_765_000_000_000, text="psst"),
    ],
)
def test_a_stored_ack_becomes_the_receipt_of_its_record(record: Message | DmEvent) -> None:
    """The ack a store hands back is kept as the receipt its record would have had, and
    gives the same ack again; the ref it echoed, however long, is not in it."""
    ref = "\x01" * 64
    ack = ack_of(ref, record)
    receipt = receipt_of_ack(ack)
    assert receipt == receipt_of(record)
    assert ack_from(ref, receipt) == ack
    assert len(receipt) < len(ack) // 10


@pytest.mark.parametrize(
    "frame",
    [b"\x00\x00\x00\x02{}", b'\x00\x00\x00\x0f{"type":"pong"}', b"\x00\x00\x00\x01{"],
)
def test_what_is_no_ack_of_a_stored_record_is_refused(frame: bytes) -> None:
    with pytest.raises(ValueError, match="not"):
        receipt_of_ack(frame)
