"""The one table ``make bench`` prints: rows that every benchmark module returns, and the harness.

Every comparison runs its variants in interleaved rounds (`interleave`), so a burst of load from
another process hits all of them alike; a `Row` carries the median of each side and the median of
the per-round ratios, which is the number a target is checked against. `render` turns the rows of
one run into one Markdown table, grouped by section, with a verdict for every target.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SLICE = 0.005
"""Seconds per slice of one variant's calls in `interleave`."""


@dataclass
class Variant:
    """One thing to measure: ``run`` is called in a loop; ``rates`` gets calls/s per round."""

    name: str
    run: Callable[[], object]
    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median calls per second over the rounds."""
        return statistics.median(self.rates)


def interleave(variants: Sequence[Variant], rounds: int, seconds: float, budget: float) -> None:
    """Per round, every variant runs ``seconds`` in total, in alternating slices of ~SLICE s.

    Slices of a few milliseconds, not one block per variant: a burst of load from another
    process on a shared machine then hits every variant of the round about equally, so the
    per-round ratios measure the code rather than the neighbours. The order of the slices is
    shuffled on every pass, because the first calls after a switch run with cold caches
    (a SoftHSM2 signature right after ``cryptography`` ones was measured ~6 % slower): in a
    fixed order the same variant would always pay for it. Stops after ``budget`` seconds even
    if fewer rounds ran.
    """
    clock = time.perf_counter
    began = clock()
    batches = []
    for v in variants:
        v.run()  # warm-up: token fetched, connections open, caches filled
        start = clock()
        for _ in range(10):
            v.run()
        per_call = (clock() - start) / 10
        batches.append(max(1, round(SLICE / per_call)))
    shuffle = random.Random(9449).shuffle  # seeded: the same schedule on every run
    order = list(range(len(variants)))
    for _ in range(rounds):
        spent = [0.0] * len(variants)
        calls = [0] * len(variants)
        while min(spent) < seconds:
            shuffle(order)
            for i in order:
                run, batch = variants[i].run, batches[i]
                start = clock()
                for _ in range(batch):
                    run()
                spent[i] += clock() - start
                calls[i] += batch
        for i, v in enumerate(variants):
            v.rates.append(calls[i] / spent[i])
        if clock() - began > budget:
            break


@dataclass
class Row:
    """One line of the table.

    Attributes:
        section: the group it belongs to, e.g. "Proofs, PEM key".
        name: what was measured.
        value: its median, already formatted with its unit ("37,078 proofs/s", "41 ms").
        versus: what it is compared with and that one's median ("" when nothing).
        ratio: median of the per-round ratios value/versus (None when not a comparison).
        rounds: the per-round ratios, shown so the spread is visible.
        target: the aim in words, e.g. "≥ 0.80"; "" when there is none.
        met: whether the aim is met (None when there is no aim).
        note: anything else worth one line (p50/p99, token requests, ...).
    """

    section: str
    name: str
    value: str
    versus: str = ""
    ratio: float | None = None
    rounds: list[float] = field(default_factory=list)
    target: str = ""
    met: bool | None = None
    note: str = ""


def rate(value: float, unit: str) -> str:
    """``12,345 unit``."""
    return f"{value:,.0f} {unit}"


def compare(
    section: str,
    ours: Variant,
    other: Variant,
    unit: str,
    *,
    target: float | None = None,
    note: str = "",
    name: str | None = None,
) -> Row:
    """The row for ``ours`` against ``other``, both measured in the same `interleave` rounds."""
    ratios = [a / b for a, b in zip(ours.rates, other.rates, strict=True)]
    ratio = statistics.median(ratios)
    return Row(
        section=section,
        name=name or ours.name,
        value=rate(ours.median, unit),
        versus=f"{other.name} ({rate(other.median, unit)})",
        ratio=ratio,
        rounds=ratios,
        target="" if target is None else f"≥ {target:.2f}",
        met=None if target is None else ratio >= target,
        note=note,
    )


def single(section: str, variant: Variant, unit: str, note: str = "") -> Row:
    """A row with no comparison: ``variant``'s median rate."""
    return Row(section=section, name=variant.name, value=rate(variant.median, unit), note=note)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(rows: Sequence[Row]) -> str:
    """One Markdown table of ``rows`` (grouped by section in their order), and a target summary."""
    lines = [
        "| section | measured | median | vs (median) | ratio | per-round ratios | target | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sections: dict[str, list[Row]] = {}
    for row in rows:
        sections.setdefault(row.section, []).append(row)
    for section, members in sections.items():
        for i, row in enumerate(members):
            verdict = "" if row.met is None else (" ✓" if row.met else " ✗")
            lines.append(
                "| "
                + " | ".join(
                    _cell(c)
                    for c in (
                        section if i == 0 else "",
                        row.name,
                        row.value,
                        row.versus,
                        "" if row.ratio is None else f"{row.ratio:.2f}",
                        " ".join(f"{r:.2f}" for r in row.rounds),
                        f"{row.target}{verdict}",
                        row.note,
                    )
                )
                + " |"
            )
    aims = [r for r in rows if r.met is not None]
    missed = [r for r in aims if not r.met]
    lines.append("")
    lines.append(
        f"targets: {len(aims) - len(missed)} of {len(aims)} met"
        + "".join(f"\n  missed: {r.section}: {r.name} ({r.ratio:.2f}, {r.target})" for r in missed)
    )
    return "\n".join(lines)


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "not found"


def machine() -> str:
    """A few lines naming the machine, interpreter and libraries the numbers came from."""
    import cryptography
    from cryptography.hazmat.backends.openssl import backend

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    softhsm = _first_line(["softhsm2-util", "--version"])
    return "\n".join(
        [
            f"- machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            f"- Python: {platform.python_implementation()} {platform.python_version()} "
            f"({sys.executable})",
            f"- cryptography {cryptography.__version__} ({backend.openssl_version_text()}); "
            f"openssl command: {_first_line(['openssl', 'version'])}",
            f"- SoftHSM2: {softhsm}",
        ]
    )
