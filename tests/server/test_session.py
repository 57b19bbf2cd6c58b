"""The session's deadlines (pure); the session itself is driven for real in test_app.py."""

from __future__ import annotations

from achat.server.session import SessionLimits, deadline

LIMITS = SessionLimits(hello_timeout=10.0, frame_timeout=5.0, idle_timeout=120.0)


def at(
    *, registered: bool = True, pinged: bool = False, frame_started: float | None = None
) -> tuple[float, str]:
    """The deadline of a connection made at 100.0 whose last frame came at 200.0."""
    return deadline(
        LIMITS,
        connected=100.0,
        registered=registered,
        last_frame=200.0,
        pinged=pinged,
        frame_started=frame_started,
    )


def test_before_hello_only_the_hello_deadline_counts() -> None:
    assert at(registered=False) == (110.0, "no hello")


def test_a_quiet_member_is_pinged_half_way_then_dropped_at_idle() -> None:
    assert at() == (260.0, "ping")
    assert at(pinged=True) == (320.0, "idle")


def test_a_frame_in_progress_brings_the_deadline_forward() -> None:
    assert at(frame_started=250.0) == (255.0, "frame")
    assert at(registered=False, frame_started=101.0) == (106.0, "frame")


def test_a_frame_deadline_later_than_the_others_does_not_count() -> None:
    assert at(registered=False, frame_started=108.0) == (110.0, "no hello")
    assert at(pinged=True, frame_started=318.0) == (320.0, "idle")
