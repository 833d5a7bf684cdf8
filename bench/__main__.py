"""``make bench``: run the benchmarks and print one table from one run.

``python -m bench`` runs them all, ``python -m bench proofs client`` some; options after the
names go to every module that knows them (``--rounds=3``). Progress goes to stderr, the table
to stdout; ``--output=FILE`` also writes it (with the machine description) to FILE.
"""

from __future__ import annotations

import importlib
import sys
import time

from bench.report import Row, machine, render

# Each name is a module bench/<name>.py with ``main(argv: list[str]) -> list[Row]``.
BENCHMARKS = (
    "proofs",
    "sessions",
    "client",
    "service",
    "faults",
    "outage",
    "stores",
    "memory",
    "startup",
)


def run(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(BENCHMARKS)
    output = next((a.split("=", 1)[1] for a in argv if a.startswith("--output=")), None)
    options = [a for a in argv if a.startswith("-") and not a.startswith("--output=")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    began = time.perf_counter()
    rows: list[Row] = []
    for name in names:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"bench.{name}")
        rows += module.main(options)  # each module ignores the options it does not know
    text = (
        f"{machine()}\n- run: {', '.join(names)} in {time.perf_counter() - began:.0f} s\n\n"
        f"{render(rows)}\n"
    )
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
