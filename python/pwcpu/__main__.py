"""Command line: ``python -m pwcpu info`` and ``python -m pwcpu bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pwcpu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the CPU features, ISA, kernels, threads and caches pwcpu uses")
    bench = commands.add_parser("bench", help="time pwcpu against its peers on real network layers")
    from . import benchmark

    benchmark.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import show_runtime

        show_runtime()
        return 0
    return benchmark.run(args)


if __name__ == "__main__":
    sys.exit(main())
