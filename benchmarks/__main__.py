"""One runner for every benchmark suite: ``python -m benchmarks <suite> [options]``.

A suite is a module of this package with ``add_arguments(parser)`` and ``run(args)``; list it in ``SUITES``. A suite
whose module fails to import (a missing optional package) is still listed, and says why when it is asked for.
"""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "kernels": "benchmarks.kernels",
    "generate": "benchmarks.generate",
    "models_io": "benchmarks.models_io",
    "decode_step": "benchmarks.decode_step",
}


def _unavailable(name: str, error: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"benchmark suite {name!r} cannot run here: {type(error).__name__}: {error}")
        return 1

    return run


def main(argv: list[str] | None = None) -> int:
    """Parse ``<suite> [options]`` and run that suite; returns its exit status (0 unless it says otherwise)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="perceiver_fast benchmarks")
    commands = parser.add_subparsers(dest="suite", required=True, metavar="suite")
    for name, module_name in SUITES.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # one broken suite must not take the others down
            commands.add_parser(name, help=f"unavailable ({error})").set_defaults(run=_unavailable(name, error))
            continue
        sub = commands.add_parser(name, help=(module.__doc__ or name).splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    status = args.run(args)
    return status if isinstance(status, int) else 0  # some suites return their rows


if __name__ == "__main__":
    raise SystemExit(main())
