"""RecentRefs: the memory of refs behind idempotent resends."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from achat.protocol.messages import DmEvent, Message
from achat.server.refs import RecentRefs, ack_from, receipt_of, ref_key
from achat.store.base import ack_of


def test_a_pending_ref_collects_waiters_until_it_is_acked() -> None:
    refs: RecentRefs[str] = RecentRefs()
    key, other = ref_key("ana", "r1"), ref_key("ana", "r2")
    batch = refs.pending(100)
    refs.add(key, batch)
    refs.add(other, batch)
    assert refs.ack(key) is None
    assert refs.resent(key, "first resend") is True
    assert refs.resent(key, "second resend") is True
    assert refs.acked(batch, [(key, b"ACK"), (other, b"OTHER")]) == {
        key: ["first resend", "second resend"]
    }
    assert refs.ack(key) == b"ACK"
    assert refs.ack(other) == b"OTHER"
    assert refs.resent(key, "a resend after the ack") == b"ACK"


def test_unknown_refs_are_not_waited_for() -> None:
    refs: RecentRefs[str] = RecentRefs()
    assert refs.resent(ref_key("ana", "nope"), "x") is False
    batch = refs.pending(10)
    refs.add(ref_key("ana", "yes"), batch)
    assert refs.acked(batch, [(ref_key("ana", "yes"), b"A")]) == {}  # nobody was waiting


def test_refs_expire_in_order_at_their_deadline() -> None:
    refs: RecentRefs[str] = RecentRefs()
    refs.keep(ref_key("ana", "a"), 10, b"A")
    refs.add(ref_key("ana", "b"), refs.pending(20))
    refs.expire(9)
    assert refs.ack(ref_key("ana", "a")) == b"A"
    refs.expire(10)
    assert refs.ack(ref_key("ana", "a")) is None
    assert refs.resent(ref_key("ana", "b"), "w") is True
    refs.expire(20)
    assert refs.resent(ref_key("ana", "b"), "w") is False
    assert len(refs) == 0


def test_an_ack_arriving_after_expiry_is_not_kept() -> None:
    refs: RecentRefs[str] = RecentRefs()
    key = ref_key("ana", "slow")
    batch = refs.pending(5)
    refs.add(key, batch)
    assert refs.resent(key, "resender") is True
    refs.expire(6)
    # The resend came while the ref was known: it still gets the ack.
    assert refs.acked(batch, [(key, b"ACK")]) == {key: ["resender"]}
    assert refs.ack(key) is None
    assert len(refs) == 0


def test_keys_of_different_nicks_never_collide() -> None:
    refs: RecentRefs[str] = RecentRefs()
    refs.keep(ref_key("ana", "1"), 10, b"ANA")
    refs.keep(ref_key("bob", "1"), 10, b"BOB")
    assert refs.ack(ref_key("ana", "1")) == b"ANA"
    assert refs.ack(ref_key("bob", "1")) == b"BOB"


def test_remembered_refs_give_the_garbage_collector_nothing_to_scan() -> None:
    refs: RecentRefs[str] = RecentRefs()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(10_000):
        refs.keep(ref_key("ana", str(i)), 100, b"ack")
    batch = refs.pending(200)
    for i in range(10_000):
        refs.add(ref_key("bob", str(i)), batch)  # pending: one batch for all of them
    assert len(gc.get_objects()) - before < 100
    refs.acked(batch, [(ref_key("bob", str(i)), b"ack") for i in range(10_000)])
    assert len(gc.get_objects()) - before < 100


def test_refs_of_one_second_share_a_deadline_at_its_end() -> None:
    """With a granularity of a second, deadlines round up to the next whole second."""
    refs: RecentRefs[str] = RecentRefs(granularity=1000)
    for name, deadline in (("a", 10_001), ("b", 10_999), ("c", 11_000), ("d", 11_001)):
        if name in "bd":  # pending ones and acked ones share the marks of their seconds
            refs.add(ref_key("ana", name), refs.pending(deadline))
        else:
            refs.keep(ref_key("ana", name), deadline, name.encode())
    refs.expire(10_999)
    assert len(refs) == 4  # a and b are kept to the end of their second
    refs.expire(11_000)
    assert [refs.resent(ref_key("ana", n), "w") for n in "abcd"] == [False, False, False, True]
    assert len(refs) == 1
    refs.expire(12_000)
    assert len(refs) == 0


def test_a_deadline_earlier_than_the_last_waits_behind_it() -> None:
    """Refs expire in the order they were made, even if the clock stepped back meanwhile."""
    refs: RecentRefs[str] = RecentRefs(granularity=1000)
    refs.keep(ref_key("ana", "late"), 20_000, b"L")
    refs.keep(ref_key("ana", "early"), 5_000, b"E")
    refs.expire(10_000)
    assert refs.ack(ref_key("ana", "early")) == b"E"
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


def test_a_whole_ack_kept_is_given_back_as_it_is() -> None:
    """Refs loaded from a store come with their encoded ack, which is sent unchanged."""
    ack = ack_of("r1", Message(room="general", seq=7, ts=1, sender="ana", text="hi"))
    assert ack[:1] == b"\0"  # a frame's length prefix: never taken for a receipt
    assert ack_from("r1", ack) == ack


def test_the_ack_of_an_expired_use_of_a_key_is_not_taken_for_a_later_one() -> None:
    """A ref used again after the first use expired unstored keeps the second use's ack."""
    refs: RecentRefs[str] = RecentRefs()
    key = ref_key("ana", "r")
    first = refs.pending(10)
    refs.add(key, first)  # the first use, on its way to a slow store
    refs.expire(10)
    second = refs.pending(30)
    refs.add(key, second)  # the same ref, a new message
    assert refs.resent(key, "resender") is True
    assert refs.acked(first, [(key, b"FIRST")]) == {}
    assert refs.ack(key) is None
    assert refs.acked(second, [(key, b"SECOND")]) == {key: ["resender"]}
    assert refs.ack(key) == b"SECOND"
