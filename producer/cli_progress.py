"""What ``mcpq call --progress`` shows on stderr while it waits.

On a terminal, a rich progress bar: the call, a bar (pulsing while the server
has not said how much there is), ``progress/total``, the time so far and the
server's latest message. Anywhere else (a pipe, a log file, CI) no bar: one
line per progress update the CLI sees, ``mcpq: progress 3/10 (30%) step 3 of
10``. Updates are read from Redis every :data:`POLL_INTERVAL` seconds, so
quick updates in between are skipped (the latest wins; the last one is always
shown): at most one line per update, never a repeated one.
"""

from __future__ import annotations

from typing import IO, Any, Protocol

from mcpq.worker.contract.progress import ProgressUpdate

#: How often ``mcpq call --progress`` reads the call's latest progress.
POLL_INTERVAL = 0.1


def counts(update: ProgressUpdate) -> str:
    """``3/10``, or ``3`` when the server gives no total."""
    if update.total is None:
        return f"{update.progress:g}"
    return f"{update.progress:g}/{update.total:g}"


def describe(update: ProgressUpdate) -> str:
    """``progress 3/10 (30%) step 3 of 10``: one update as a line of text."""
    share = f" ({update.progress / update.total:.0%})" if update.total else ""
    message = f" {update.message}" if update.message else ""
    return f"progress {counts(update)}{share}{message}"


class ProgressView(Protocol):
    """Where a waiting call's progress goes."""

    def show(self, update: ProgressUpdate) -> None:
        """The call's latest progress (called again with the same one is a no-op)."""
        ...

    def close(self) -> None:
        """The wait is over (result, timeout or Ctrl-C): stop drawing."""
        ...


class LineProgress:
    """No terminal: one ``mcpq: progress ...`` line per new update."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last: ProgressUpdate | None = None

    def show(self, update: ProgressUpdate) -> None:
        if update == self._last:
            return
        self._last = update
        self.stream.write(f"mcpq: {describe(update)}\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class BarProgress:
    """A terminal: a rich progress bar, redrawn in place."""

    def __init__(self, label: str, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[message]}"),
            console=Console(file=stream),
            # stdout is the result's alone, even while the bar is drawn.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task(label, total=None, counts="", message="waiting for a worker")
        self._last: ProgressUpdate | None = None
        self._progress.start()

    def show(self, update: ProgressUpdate) -> None:
        if update == self._last:
            return
        self._last = update
        fields: dict[str, Any] = {"counts": counts(update), "message": update.message or ""}
        if update.total is not None:
            fields["total"] = update.total
        self._progress.update(self._task, completed=update.progress, **fields)

    def close(self) -> None:
        self._progress.stop()


def progress_view(label: str, stream: IO[str]) -> ProgressView:
    """A bar when ``stream`` is a terminal, progress lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return BarProgress(label, stream)
    return LineProgress(stream)
