"""A busy room of every size: where latency climbs, and where the server gives out.

``achat-bench busy-room`` at the two sizes of the targets (300 and 2,500
members) says whether they are met; this runs it at sizes from a few
hundred members to past what one core can write, each client saying once
a second, and draws what it measured:

- the latency of a message to its members (p50, p99, p99.9) against the
  room's size, with the two targets marked;
- deliveries a second against the room's size: what the clients offered
  (the members squared), what was delivered, and the 1.8-2.2 million a
  second at which issue 4 says the C IRC daemons ngircd and InspIRCd give
  out (by 2,000 members), for comparison. Those are the issue's figures,
  not measured here.

A size whose run delivered less than 99.9 % of what was said (members cut
off with ``sendq_exceeded`` for falling too far behind) is drawn hollow.

    python benchmarks/sweep.py [--sizes 300,1000,...] [--seconds 5]
                               [--update docs/performance.md] [--svg docs/busy-room-sweep.svg]

Each size is one ``achat-bench busy-room -n N -r 1`` run in its own process,
which starts its own server (pinned to CPU 0, SQLite store on, default
limits), as ``make bench`` runs the targets.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from achat.bench.cli import SETTLE_SECONDS, replace_section

#: Room sizes of ``make bench``: both targets, and on past where this host gives out.
SIZES = (300, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000)
#: What issue 4 gives for the C IRC daemons on this kind of machine (deliveries/s).
IRC_DAEMONS = (1.8e6, 2.2e6)
#: The targets: members, p99 in ms, and where their label goes (below or above).
TARGETS = ((300, 5.0, 17), (2500, 250.0, -8))
#: How achat-bench's note of the server's errors begins.
_ERRORS = "errors from the server: "
#: Below this share delivered, a size is drawn hollow (the busy-room target's ratio).
FULL = 0.999


@dataclass(frozen=True)
class Point:
    """One run of ``achat-bench busy-room`` at one size."""

    members: int
    offered: float  # deliveries/s
    delivered: float  # deliveries/s
    ratio: float
    p50: float | None  # ms; None when nothing was delivered
    p99: float | None
    p999: float | None
    server_cpu: float | None  # % of one core
    load_cpu: float | None
    generator_limit: bool  # achat-bench said the load may have been the limit
    cut_off: int = 0  # members whose connection ended before the run did
    errors: str = ""  # the server's errors by code, as achat-bench noted them

    @classmethod
    def from_result(cls, result: dict[str, object]) -> Point:
        """A point from achat-bench's JSON result."""
        latency = result["latency_ms"]
        assert isinstance(latency, dict)
        params = result["params"]
        assert isinstance(params, dict)
        notes = result["notes"]
        assert isinstance(notes, list)

        def ms(key: str) -> float | None:
            value = latency.get(key)
            return float(value) if value else None

        def num(key: str) -> float:
            value = result[key]
            assert isinstance(value, int | float)
            return float(value)

        def opt(key: str) -> float | None:
            value = result[key]
            return None if value is None else num(key)

        return cls(
            members=int(params["clients"]),
            offered=num("offered_per_s"),
            delivered=num("delivered_per_s"),
            ratio=num("delivered_ratio"),
            p50=ms("p50"),
            p99=ms("p99"),
            p999=ms("p99.9"),
            server_cpu=opt("server_cpu_pct"),
            load_cpu=opt("load_cpu_pct"),
            generator_limit=any("generator may be the limit" in str(n) for n in notes),
            cut_off=int(num("closed")),
            errors="; ".join(
                str(n).removeprefix(_ERRORS) for n in notes if str(n).startswith(_ERRORS)
            ),
        )


def run_one(members: int, seconds: float, warmup: float, rate: float = 1.0) -> Point:
    """``achat-bench busy-room -n members`` in its own process, with its own server."""
    bench = str(Path(sys.executable).parent / "achat-bench")
    with tempfile.TemporaryDirectory(prefix="achat-sweep-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [bench, "busy-room", "-n", str(members), "-r", str(rate)]
        cmd += ["--duration", str(seconds), "--warmup", str(warmup), "--json", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"achat-bench failed at {members} members:\n{done.stderr[-2000:]}")
        # Its server's warnings of members cut off say whether they left their data
        # unread (unsent=) or the server queued it faster than it wrote (dropped=).
        for line in done.stderr.splitlines():
            if "cut off with sendq_exceeded" in line:
                print(f"sweep: {members} members: {line.strip()}", file=sys.stderr)
        return Point.from_result(json.loads(out.read_text()))


def measure(
    sizes: tuple[int, ...],
    seconds: float,
    warmup: float,
    settle: float = SETTLE_SECONDS,
    rate: float = 1.0,
) -> list[Point]:
    """One run per size, smallest first, with ``settle`` seconds between them."""
    points = []
    for i, members in enumerate(sorted(sizes)):
        if i:
            time.sleep(settle)  # the last run's thousands of sockets are still closing
        print(f"sweep: {members} members …", file=sys.stderr, flush=True)
        points.append(run_one(members, seconds, warmup, rate))
    return points


# -- the report ------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms" if value >= 10 else f"{value:.2f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} %"


def table(points: list[Point], seconds: float) -> str:
    """The runs as a Markdown table, with what each row's marks mean."""
    lines = [
        f"`achat-bench busy-room -n N -r 1`, {seconds:g} s each (`python benchmarks/sweep.py`):",
        "",
        "| members | offered/s | delivered/s | delivered | p50 | p99 | p99.9 | server CPU "
        "| load CPU | cut off | errors from the server |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        mark = " ¹" if p.generator_limit else ""
        lines.append(
            f"| {p.members:,}{mark} | {p.offered:,.0f} | {p.delivered:,.0f} | "
            f"{p.ratio * 100:.2f} % | {_ms(p.p50)} | {_ms(p.p99)} | {_ms(p.p999)} | "
            f"{_pct(p.server_cpu)} | {_pct(p.load_cpu)} | {p.cut_off:,} | {p.errors or '-'} |"
        )
    if any(p.generator_limit for p in points):
        lines += [
            "",
            "¹ achat-bench noted that the load may have been the limit (its worker's CPU "
            "was nearly full, or it said less than planned).",
        ]
    return "\n".join(lines)


# -- the chart -------------------------------------------------------------------------

WIDTH, PANEL, TOP, GAP = 760, 250, 40, 70
LEFT, RIGHT = 70, 24
#: Latency is drawn on a log scale between these (ms).
LOW_MS, HIGH_MS = 1.0, 10_000.0
#: The latency lines: label, Point attribute, colour, dashes.
SERIES = (
    ("p50", "p50", "#1f77b4", ""),
    ("p99", "p99", "#d62728", ""),
    ("p99.9", "p999", "#7f7f7f", "5,4"),
)


#: What a tick step may be, times a power of ten (an axis's end may also be 4 times one).
TICK_STEPS = (1, 2, 2.5, 5, 10)


def _nice_max(value: float, steps: tuple[float, ...] = (1, 2, 2.5, 4, 5, 10)) -> float:
    """The smallest 1, 2, 2.5, 4 or 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(s * power for s in steps if s * power >= value)


def chart(points: list[Point], title: str = "achat-server, one busy room") -> str:
    """Both panels as one SVG document (no script, no external font)."""
    if not points:
        raise ValueError("nothing to draw")
    x_max = _nice_max(max(p.members for p in points))
    plot_w = WIDTH - LEFT - RIGHT
    height = TOP + 2 * PANEL + GAP + 50

    def x(members: float) -> float:
        return LEFT + plot_w * members / x_max

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15" '
        f'font-weight="bold">{escape(title)}</text>',
    ]

    def frame(top: float, label: str) -> None:
        out.append(
            f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="none" '
            f'stroke="#333"/>'
        )
        out.append(
            f'<text transform="translate(18 {top + PANEL / 2}) rotate(-90)" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
        step = _nice_max(x_max / 10, TICK_STEPS)
        for i in range(round(x_max / step) + 1):
            members = step * i
            out.append(
                f'<line x1="{x(members):.1f}" y1="{top + PANEL}" x2="{x(members):.1f}" '
                f'y2="{top + PANEL + 4}" stroke="#333"/>'
            )
            out.append(
                f'<text x="{x(members):.1f}" y="{top + PANEL + 17}" '
                f'text-anchor="middle">{members:,.0f}</text>'
            )

    # Panel 1: latency, log scale.
    top1 = TOP
    span = math.log10(HIGH_MS / LOW_MS)

    def y1(ms: float) -> float:
        ms = min(max(ms, LOW_MS), HIGH_MS)
        return top1 + PANEL * (1 - math.log10(ms / LOW_MS) / span)

    frame(top1, "latency (ms, log scale)")
    for tick in (1, 10, 100, 1000, 10000):
        out.extend(_grid(y1(tick), plot_w, f"{tick:,}"))
    for members, ms, label_dy in TARGETS:
        out.append(
            f'<path d="M{x(members) - 10:.1f},{y1(ms):.1f} h20" stroke="#2ca02c" stroke-width="3"/>'
        )
        out.extend(_label(x(members), y1(ms) + label_dy, f"target {ms:g} ms", "#2ca02c", "middle"))
    legend_x = LEFT + 10
    for label, attr, colour, dash in SERIES:
        drawn = [(p, getattr(p, attr)) for p in points if getattr(p, attr) is not None]
        out.append(_line([(x(p.members), y1(v)) for p, v in drawn], colour, dash))
        out.extend(_marker(x(p.members), y1(v), colour, p.ratio >= FULL) for p, v in drawn)
        out.extend(_legend(legend_x, top1 + 14, label, colour, dash))
        legend_x += 75

    # Panel 2: deliveries a second, linear.
    top2 = TOP + PANEL + GAP
    y_max = _nice_max(max(max(p.offered, p.delivered) for p in points) * 1.05)

    def y2(rate: float) -> float:
        return top2 + PANEL * (1 - rate / y_max)

    frame(top2, "deliveries a second (millions)")
    step = _nice_max(y_max / 5, TICK_STEPS)
    for i in range(round(y_max / step) + 1):
        out.extend(_grid(y2(step * i), plot_w, f"{step * i / 1e6:g}"))
    low, high = IRC_DAEMONS
    out.append(
        f'<rect x="{LEFT}" y="{y2(high):.1f}" width="{plot_w}" '
        f'height="{y2(low) - y2(high):.1f}" fill="#ff7f0e" fill-opacity="0.25"/>'
    )
    out.extend(
        _label(
            LEFT + plot_w - 6,
            y2(high) - 5,
            f"C IRC daemons give out at {low / 1e6:g}–{high / 1e6:g} M/s (issue 4's figures)",
            "#b35900",
            "end",
        )
    )
    out.append(_line([(x(p.members), y2(p.offered)) for p in points], "#7f7f7f", "5,4"))
    out.append(_line([(x(p.members), y2(p.delivered)) for p in points], "#1f77b4", ""))
    for p in points:
        out.append(_marker(x(p.members), y2(p.delivered), "#1f77b4", p.ratio >= FULL))
        if p.ratio < FULL:
            text = f"{p.ratio * 100:.0f} % delivered"
            out.extend(_label(x(p.members) - 8, y2(p.delivered) + 18, text, "#d62728", "end"))
    out.extend(_legend(LEFT + 10, top2 + 14, "offered", "#7f7f7f", "5,4"))
    out.extend(_legend(LEFT + 100, top2 + 14, "delivered", "#1f77b4", ""))
    out.append(
        f'<text x="{LEFT + 200}" y="{top2 + 18}">hollow: under {FULL * 100:g} % delivered</text>'
    )
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{top2 + PANEL + 40}" text-anchor="middle">'
        "members in the room, each saying one message a second</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _grid(y: float, width: float, label: str) -> list[str]:
    """A faint line across a panel at ``y``, and its value on the left."""
    return [
        f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + width}" y2="{y:.1f}" stroke="#ddd"/>',
        f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>',
    ]


def _line(xy: list[tuple[float, float]], colour: str, dash: str) -> str:
    """A polyline through ``xy`` (nothing when it is empty)."""
    if not xy:
        return ""
    path = " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in enumerate(xy))
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{dashes}/>'


def _legend(left: float, y: float, label: str, colour: str, dash: str) -> list[str]:
    """A short stroke of a line's style, and its label."""
    return [
        _line([(left, y), (left + 22, y)], colour, dash),
        f'<text x="{left + 27}" y="{y + 4}">{escape(label)}</text>',
    ]


def _label(left: float, y: float, text: str, colour: str, anchor: str) -> list[str]:
    """Text over a white edge of itself, so that it stays readable over lines."""
    at = f'x="{left:.1f}" y="{y:.1f}" text-anchor="{anchor}"'
    return [
        f'<text {at} fill="white" stroke="white" stroke-width="4">{escape(text)}</text>',
        f'<text {at} fill="{colour}">{escape(text)}</text>',
    ]


def _marker(cx: float, cy: float, colour: str, full: bool) -> str:
    fill = colour if full else "white"
    return (
        f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{fill}" stroke="{colour}" '
        'stroke-width="2"/>'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=SIZES,
        help="room sizes, comma-separated (default %(default)s)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds a size")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--update", type=Path, help="replace the sweep section of this file")
    parser.add_argument("--svg", type=Path, help="write the chart here")
    args = parser.parse_args()
    points = measure(args.sizes, args.seconds, args.warmup)
    text = table(points, args.seconds)
    print(text)
    if args.svg is not None:
        args.svg.write_text(chart(points))
    if args.update is not None:
        replace_section(args.update, "sweep", text)


if __name__ == "__main__":
    main()
