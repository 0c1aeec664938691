"""Command line: ``python -m dbsp COMMAND [options]``.

Each command lives in its own module, imported only when it runs, which provides
``add_cli_arguments(parser)`` and ``run_cli(args) -> int``. This is the only module that reads
environment variables (``DBSP_LOG``: the log level, default WARNING).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dbsp.demo", "a small Wan-style video transformer denoising synthetic latents, dense vs dbsp: table and PNGs"),
    "plan": ("dbsp.plan_cli", "per-rank cost table of a mask before and after db-SP balancing"),
    "simulate": ("dbsp.simulate", "predicted attention time and rho_s of Ulysses, Ring, USP and dbsp on 8 to 1024 GPUs"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dbsp",
        description="dbsp: sparse attention and sparsity-aware sequence parallelism for video DiTs",
        epilog="commands:\n" + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="see below; COMMAND -h for its options")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("DBSP_LOG", "WARNING").upper(), format="%(name)s %(levelname)s: %(message)s"
    )
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["-h"])  # prints help or a clear error, then exits
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"python -m dbsp {name}", description=COMMANDS[name][1])
    module.add_cli_arguments(parser)
    return int(module.run_cli(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
