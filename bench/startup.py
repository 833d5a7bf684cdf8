"""Start-up time: ``import dpop_signer`` and ``dpop --help`` against ``python -c pass``.

Three commands, each a fresh process of the same interpreter (this one, ``sys.executable``):

* ``python -c pass``: the bare interpreter, what every Python command pays anyway;
* ``python -c "import dpop_signer"``: the library import (its names are imported lazily);
* ``dpop --help``: the console script next to the interpreter (``.venv/bin/dpop``, which runs
  the same interpreter), or ``python -m dpop_signer --help`` when there is no such script.

Every round runs the three once, in a shuffled order (seeded), so a burst of load from another
process or a cold disk cache is not always paid by the same command; the first round is a
warm-up and not counted. A row shows the median wall time and the median of the per-round
ratios command / bare interpreter: here a *time* ratio, so higher is slower, and there is no
target. The note says how many milliseconds the command adds to the bare interpreter and which
modules dominate them: from ``python -X importtime -c CODE`` (CODE is ``import dpop_signer``, or
``import dpop_signer.cli`` for ``dpop --help``, which is what the console script imports), the
self time of every module it imports that ``python -c pass`` does not, summed per top-level
package (median of 3 runs).

    python -m bench startup --rounds=15
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.report import Row

SECTION = "Start-up"
IMPORTTIME_RUNS = 3


def commands() -> dict[str, list[str]]:
    """The three commands by name; ``dpop --help`` says which form it is."""
    python = sys.executable
    script = Path(python).parent / "dpop"
    if script.is_file() and os.access(script, os.X_OK):
        help_name, help_command = "dpop --help", [str(script), "--help"]
    else:
        help_name = "python -m dpop_signer --help"
        help_command = [python, "-m", "dpop_signer", "--help"]
    return {
        "python -c pass": [python, "-c", "pass"],
        "import dpop_signer": [python, "-c", "import dpop_signer"],
        help_name: help_command,
    }


def cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def run_ms(command: list[str]) -> tuple[float, float]:
    """Wall and CPU milliseconds of one run of ``command``.

    CPU time is the child's user + system time (the change in ``RUSAGE_CHILDREN``: this runs
    one child at a time); unlike wall time it hardly moves when a neighbour takes the CPU.
    """
    cpu = cpu_s()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Not subprocess.run(timeout=...): with a timeout it polls the child with sleeps that
    # double up to 50 ms, which rounds these ~20-300 ms runs to the next poll (measured: wall
    # times of exactly 32 or 64 ms). A blocking wait returns when the child exits; the timer
    # is the bound.
    killer = threading.Timer(30, process.kill)
    killer.start()
    try:
        status = process.wait()
    finally:
        killer.cancel()
    wall = time.perf_counter() - start
    if status != 0:
        raise subprocess.CalledProcessError(status, command)
    return wall * 1000, (cpu_s() - cpu) * 1000


def import_self_us(code: str) -> dict[str, int]:
    """Self import time in µs of every module ``python -X importtime -c code`` imports."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    times: dict[str, int] = {}
    for line in done.stderr.splitlines():
        # "import time:       571 |        571 |   dpop_signer.errors"
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line.removeprefix("import time:").split("|")
        times[name.strip()] = int(own)
    return times


def heaviest(code: str, count: int = 3) -> list[tuple[str, float]]:
    """The top-level packages whose modules cost ``code`` the most import time (ms, self).

    Only modules that ``python -c pass`` does not import count: those are what ``code`` adds.
    """
    runs = []
    for _ in range(IMPORTTIME_RUNS):
        bare = import_self_us("pass")
        added: dict[str, int] = defaultdict(int)
        for name, own in import_self_us(code).items():
            if name not in bare:
                added[name.split(".")[0]] += own
        runs.append(added)
    packages = set().union(*runs)
    medians = {p: statistics.median(r.get(p, 0) for r in runs) / 1000 for p in packages}
    return sorted(medians.items(), key=lambda item: -item[1])[:count]


def main(argv: list[str]) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench startup")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the three (3-50)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds at most (5-120)")
    args, _ = parser.parse_known_args(argv)
    rounds = max(3, min(args.rounds, 50))
    budget = max(5.0, min(args.budget, 120.0))

    named = commands()
    names = list(named)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    shuffle = random.Random(9449).shuffle  # seeded: the same schedule on every run
    began = time.monotonic()
    for name in names:  # warm-up: page cache and .pyc files, not counted
        run_ms(named[name])
    for done in range(rounds):
        shuffle(names)
        for name in names:
            wall, used = run_ms(named[name])
            times[name].append(wall)
            cpu[name].append(used)
        # The importtime runs below take about as long as 6 rounds: keep room for them.
        if done >= 2 and time.monotonic() - began > budget * 0.7:
            break
    print(f"startup: {len(times['python -c pass'])} rounds", file=sys.stderr)

    bare_name, import_name, help_name = named  # dict order: as written in `commands`
    bare = times[bare_name]
    codes = {import_name: "import dpop_signer", help_name: "import dpop_signer.cli"}
    rows = []
    for name in (import_name, help_name):
        ratios = [a / b for a, b in zip(times[name], bare, strict=True)]
        added = statistics.median(times[name]) - statistics.median(bare)
        top = ", ".join(f"{p} {ms:.1f} ms" for p, ms in heaviest(codes[name]))
        rows.append(
            Row(
                section=SECTION,
                name=name,
                value=f"{statistics.median(times[name]):.0f} ms",
                versus=f"{bare_name} ({statistics.median(bare):.0f} ms)",
                ratio=statistics.median(ratios),
                rounds=ratios,
                note=f"+{added:.0f} ms over the bare interpreter (time ratio: higher is "
                f"slower); CPU time {statistics.median(cpu[name]):.0f} ms against "
                f"{statistics.median(cpu[bare_name]):.0f} ms; heaviest imports of "
                f"`{codes[name]}` (self time per package, -X importtime): {top}",
            )
        )
    return rows


if __name__ == "__main__":
    from bench.report import render

    print(render(main(sys.argv[1:])))
