"""Exec a stdio MCP server so that it dies with the worker process that started it.

The SDK puts every stdio server in a new session (its own process group) and
kills that group on a clean close, but a worker killed with SIGKILL closes
nothing. Linux's parent-death signal covers that case: this launcher sets it,
checks the parent has not already gone, then replaces itself with the real
command. Usage (built by mcpq.worker.transports, never from task input):

    python -m mcpq.worker.launch <command> [args...]
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the SDK's process-group kill on close still applies


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stderr.write("usage: python -m mcpq.worker.launch <command> [args...]\n")
        raise SystemExit(2)
    expected_parent = int(os.environ.pop("MCPQ_LAUNCH_PARENT", "0") or 0)
    _set_parent_death_signal(signal.SIGTERM)
    # The parent may have died between fork and prctl; then no signal will come.
    if expected_parent and os.getppid() != expected_parent:
        raise SystemExit(1)
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        sys.stderr.write(f"mcpq: cannot start stdio server {args[0]!r}: {exc.strerror}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()
