"""Two versions of achat in alternating runs of one scenario, with the host's speed fitted out.

On the reference machine busy-room 300's p99 moves with the host's spells by
more than most changes move it, and in step with how busy the same load keeps
the server's core (item 55 of docs/performance-history.md: about 0.11 ms per
per cent). So a change is measured against the code before it in pairs of runs, the
order turned each pair so that neither version always meets a spell first,
and reported two ways:

- the medians of both, in how many pairs the change was lower, and the median
  of the pairs' differences;
- the change's effect with the server's CPU fitted out: a least-squares fit of
  ``metric ≈ a + b × CPU + c × [new]`` over every run, ``c`` with its standard
  error. A change that does not alter the server's work but happened to meet
  quicker spells shows in the medians, not in ``c``. (A change that does alter
  the work moves the CPU too, and ``c`` then leaves out the part of its effect
  that goes through the CPU, whichever way: the medians are the figure to read.)

    python benchmarks/pairs.py --base main --new worktree [--pairs 8] \\
        [--metric p99] [-- busy-room -n 300 -r 1]

``--base`` and ``--new`` are git revisions, or ``worktree`` for this
checkout's ``src`` as it is (uncommitted changes included). Each is copied
out once, and every run is ``achat-bench`` (with the server it starts) importing
that copy. What follows ``--`` is ``achat-bench``'s scenario and its
arguments (busy-room 300 by default): ``busy-room``, ``many-rooms`` or
``ingest``, with a server that ``achat-bench`` starts, since the fit needs
the server's CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "worktree"
DEFAULT_SCENARIO = ["busy-room", "-n", "300", "-r", "1"]
#: What can be compared, and where each is in achat-bench's JSON result.
METRICS = {
    "p50": ("latency_ms", "p50"),
    "p99": ("latency_ms", "p99"),
    "p99.9": ("latency_ms", "p99.9"),
    "acked_per_s": (None, "acked_per_s"),
    "delivered_per_s": (None, "delivered_per_s"),
}
#: The scenarios that measure a server achat-bench starts, and their metrics.
SCENARIOS = {
    "busy-room": {"p50", "p99", "p99.9", "delivered_per_s"},
    "many-rooms": {"p50", "p99", "p99.9", "delivered_per_s"},
    "ingest": set(METRICS),
}


@dataclass(frozen=True)
class Run:
    version: str  # "base" or "new"
    metric: float
    cpu: float  # the server's CPU over the measured window, % of one core


@dataclass(frozen=True)
class Fit:
    """``metric ≈ intercept + per_cpu × CPU + new × [new]``, and ``new``'s standard error."""

    intercept: float
    per_cpu: float
    new: float
    new_se: float


def copy_out(version: str, dest: Path) -> Path:
    """This checkout's ``src`` at ``version`` (a git revision, or ``worktree``) in
    ``dest``; returns the directory to put on ``PYTHONPATH``."""
    dest.mkdir(parents=True, exist_ok=True)
    if version == WORKTREE:
        shutil.copytree(
            ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", version, "src"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            why = archive.stderr.decode(errors="replace").strip()
            raise SystemExit(f"cannot copy out {version!r}: {why}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    src = dest / "src"
    if not (src / "achat" / "__init__.py").exists():
        raise RuntimeError(f"{version} has no src/achat")
    return src


def check_scenario(scenario: list[str], metric: str) -> str | None:
    """Why ``scenario`` cannot be compared by ``metric`` here, or None if it can."""
    if not scenario or scenario[0] not in SCENARIOS:
        return f"the scenario must be one of {', '.join(SCENARIOS)}"
    if any(arg == "--port" or arg.startswith("--port=") for arg in scenario):
        return "the fit needs the server's CPU: let achat-bench start the server (no --port)"
    if metric not in SCENARIOS[scenario[0]]:
        return f"{scenario[0]} does not measure {metric}"
    return None


def _achat_bench() -> str:
    beside = Path(sys.executable).parent / "achat-bench"
    found = str(beside) if beside.exists() else shutil.which("achat-bench")
    if found is None:
        raise SystemExit("no achat-bench: run this with the project's .venv/bin/python")
    return found


def run_one(version: str, src: Path, scenario: list[str], metric: str) -> Run:
    """One ``achat-bench`` run of ``scenario`` with ``src``'s achat, server and load."""
    bench = _achat_bench()
    where, key = METRICS[metric]
    with tempfile.TemporaryDirectory(prefix="achat-pairs-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(src)}
        done = subprocess.run(
            [bench, *scenario, "--json", str(out)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"achat-bench failed with {version}:\n{done.stderr[-2000:]}")
        result = json.loads(out.read_text())
    value = (result.get(where) or {}).get(key) if where else result.get(key)
    if not value:  # a latency with nothing delivered, a rate with nothing done
        raise RuntimeError(f"the run with {version} measured no {metric}")
    cpu = result.get("server_cpu_pct")
    if cpu is None:
        raise RuntimeError(f"the run with {version} measured no server CPU")
    return Run(version, float(value), float(cpu))


def fit(runs: list[Run]) -> Fit | None:
    """Least squares of the metric on the server's CPU and the version; None when the
    runs cannot tell the three apart (too few, or no spread in one of them)."""
    n = len(runs)
    if n < 4:
        return None
    # The CPU about its mean: the same c and error, and a matrix whose size does not
    # grow with how busy the server was.
    mean_cpu = statistics.fmean(r.cpu for r in runs)
    rows = [(1.0, r.cpu - mean_cpu, 1.0 if r.version == "new" else 0.0) for r in runs]
    xtx = [[sum(row[i] * row[j] for row in rows) for j in range(3)] for i in range(3)]
    xty = [sum(row[i] * r.metric for row, r in zip(rows, runs, strict=True)) for i in range(3)]
    inverse = _inverse_gram(xtx)
    if inverse is None:
        return None
    a, b, c = (sum(inverse[i][j] * xty[j] for j in range(3)) for i in range(3))
    residuals = [
        r.metric - (a + b * row[1] + c * row[2]) for row, r in zip(rows, runs, strict=True)
    ]
    variance = sum(e * e for e in residuals) / (n - 3)
    return Fit(a - b * mean_cpu, b, c, math.sqrt(max(variance * inverse[2][2], 0.0)))


def _inverse_gram(m: list[list[float]]) -> list[list[float]] | None:
    """The inverse of a 3×3 Gram matrix (``XᵀX``: symmetric, never negative), None if it
    is (nearly) singular. Such a matrix's determinant is at most the product of its
    diagonal, and near 0 against it when a column is nearly a mix of the others."""
    (a, b, c), (d, e, f), (g, h, i) = m
    cofactors = [
        [e * i - f * h, -(d * i - f * g), d * h - e * g],
        [-(b * i - c * h), a * i - c * g, -(a * h - b * g)],
        [b * f - c * e, -(a * f - c * d), a * e - b * d],
    ]
    det = a * cofactors[0][0] + b * cofactors[0][1] + c * cofactors[0][2]
    # Singular, or as good as: measured against the diagonal (the columns' sizes), so
    # that what counts is how far the columns are from one another, not how big.
    scale = abs(a * e * i)
    if scale == 0 or abs(det) < 1e-9 * scale:
        return None
    # The inverse is the transposed cofactors over the determinant.
    return [[cofactors[j][k] / det for j in range(3)] for k in range(3)]


def report(pairs: list[tuple[Run, Run]], metric: str, base: str, new: str) -> str:
    """The pairs' table and what they say; each pair is (base's run, new's run)."""
    lines = [
        f"{len(pairs)} alternating pairs, {metric}: base `{base}`, new `{new}`",
        "",
        f"| pair | base {metric} | base CPU | new {metric} | new CPU |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, (b, n) in enumerate(pairs, 1):
        lines.append(f"| {i} | {b.metric:,.2f} | {b.cpu:.1f} % | {n.metric:,.2f} | {n.cpu:.1f} % |")
    base_values = [b.metric for b, _ in pairs]
    new_values = [n.metric for _, n in pairs]
    differences = [n.metric - b.metric for b, n in pairs]
    lines += [
        "",
        f"- median: base {statistics.median(base_values):,.2f}, "
        f"new {statistics.median(new_values):,.2f}",
        f"- new lower in {sum(d < 0 for d in differences)} of {len(pairs)} pairs, "
        f"higher in {sum(d > 0 for d in differences)}; "
        f"median of the differences {statistics.median(differences):+,.2f}",
    ]
    fitted = fit([run for pair in pairs for run in pair])
    if fitted is None:
        lines.append("- with the server's CPU fitted out: too few runs, or no spread, to tell")
    else:
        lines.append(
            f"- with the server's CPU fitted out: new {fitted.new:+,.3f} "
            f"(± {fitted.new_se:,.3f}); {fitted.per_cpu:+,.3f} per per cent of the core"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        usage="%(prog)s [--base REV] [--new REV] [--pairs N] [--metric M] [-- scenario ...]",
    )
    parser.add_argument("--base", default="HEAD", help="git revision, or 'worktree' (HEAD)")
    parser.add_argument("--new", default=WORKTREE, help="git revision, or 'worktree' (the default)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--metric", choices=sorted(METRICS), default="p99")
    argv = sys.argv[1:]
    scenario = DEFAULT_SCENARIO
    if "--" in argv:
        at = argv.index("--")
        argv, scenario = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if why := check_scenario(scenario, args.metric):
        parser.error(why)
    with tempfile.TemporaryDirectory(prefix="achat-pairs-") as tmp:
        sources = {
            "base": copy_out(args.base, Path(tmp) / "base"),
            "new": copy_out(args.new, Path(tmp) / "new"),
        }
        pairs: list[tuple[Run, Run]] = []
        for i in range(args.pairs):
            order = ["base", "new"] if i % 2 == 0 else ["new", "base"]
            runs = {v: run_one(v, sources[v], scenario, args.metric) for v in order}
            pairs.append((runs["base"], runs["new"]))
            print(
                f"pair {i + 1}: "
                + ", ".join(f"{v} {runs[v].metric:,.2f} ({runs[v].cpu:.1f} % CPU)" for v in order),
                file=sys.stderr,
            )
    print(report(pairs, args.metric, args.base, args.new))


if __name__ == "__main__":
    main()
