"""Run benchmarks by name: ``python -m bench`` runs them all, ``python -m bench signers`` one."""

from __future__ import annotations

import importlib
import sys

# Each name is a module bench/<name>.py with a ``main(argv: list[str]) -> int``.
BENCHMARKS = ("signers", "client", "service")


def run(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(BENCHMARKS)
    options = [a for a in argv if a.startswith("-")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    status = 0
    for name in names:
        status |= importlib.import_module(f"bench.{name}").main(options)
    return status


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
