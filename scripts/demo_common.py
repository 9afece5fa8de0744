"""What every demo (scripts/demo DEVICE) shares: the guest's and the
bridge's knobs, the seed, logging and a clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import random

from bridge.processes import exit_cleanly_on_sigterm


def add_common_args(p: argparse.ArgumentParser, *, memory_help: str = "the bridge's memory model") -> None:
    p.add_argument("--vcpus", type=int, default=2, help="guest vCPUs (default: 2)")
    p.add_argument("--memory", choices=("passthrough", "shadow"), default="passthrough",
                   help=f"{memory_help} (default: passthrough)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the guest's drivers do")


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, pick a seed when none was given, and set the process up: logs
    on stderr, SIGTERM unwinding like Ctrl-C so every child is stopped."""
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    exit_cleanly_on_sigterm()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="demo: %(name)s: %(message)s")
    return args
