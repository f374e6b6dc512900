"""How every benchmark's ``main`` runs its report: Ctrl-C and SIGTERM stop what it
started (``bench.latency._interrupt``), then the report is printed and, with
``--json``, written."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from typing import Any


def run_and_report(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """The report, or None when interrupted (every process started was stopped)."""
    from bench.latency import _interrupt

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped", file=sys.stderr)
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report
