"""How every benchmark's ``main`` runs its report, and the command-line options they share.

``run_and_report`` runs the benchmark under ``bench.harness.stop_on_signals`` (Ctrl-C and
SIGTERM stop what it started), then prints the report and, with ``--json``, writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import stop_on_signals


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json FILE``: ``run_and_report`` also writes the full report there."""
    parser.add_argument("--json", type=Path, help="also write the full report as JSON here")


def key_json(item: str) -> tuple[str, Any]:
    """An argparse ``type`` for ``KEY=JSON`` (a value that is not JSON stays a string)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=JSON, got {item!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def key_value(item: str) -> tuple[str, str]:
    """An argparse ``type`` for ``KEY=VALUE``."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {item!r}")
    return key, value


def run_and_report(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """Run ``run(args)``, print ``render(report)`` and write the report to ``args.json``
    if set. Returns the report, or None when interrupted (every process started was stopped).
    """
    try:
        with stop_on_signals():
            report = run(args)
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped", file=sys.stderr)
        return None
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report
