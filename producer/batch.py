"""``mcpq batch``: run a JSONL file of calls, one result line per input line, resumable.

Input: one call per line, ``{"tool": ..., "arguments": {...}, "server": ...,
"timeout": ...}`` (only ``tool`` is required; blank lines are skipped). Line
numbers are the file's physical line numbers, starting at 1.

Output (``--out``): one line per input line, ``{"line": n, ...ToolResult}``,
in completion order. Re-running with the same ``--out`` skips the lines
already answered there, after dropping a half-written last line; the one
exception is a line whose answer is ``cancelled``: it runs again if its call
never ran (``details.may_have_run`` false), or with ``--rerun-cancelled``
(:meth:`ResultsState.settled` is that rule). A re-run line's new answer is
appended; the last answer for a line is the one that counts.

Ctrl-C (SIGINT) cancels what is outstanding, waits up to ``--cancel-wait``
seconds for those calls' own results, writes them, answers the lines not
sent yet as ``cancelled`` (they never ran) and exits 130: every input line
has its answer in ``--out``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from mcpq.producer import fanout
from mcpq.producer.calls import Call
from mcpq.producer.cli_batch_cancel import (
    BatchLines,
    CancellingPublisher,
    Fetcher,
    Interrupt,
    sigint_sets,
    unsent_result,
    write_results,
)
from mcpq.producer.cli_types import DEADLINE, WAIT
from mcpq.producer.fanout_options import DEFAULT_WINDOW
from mcpq.worker.contract.errors import ErrorCode, InvalidArgumentsError, MCPConnectionError
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.task_names import MAX_CHUNK_CALLS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130
#: After Ctrl-C, how long ``mcpq batch`` waits by default for the cancelled calls' own results.
CANCEL_WAIT = 5.0


class ResultsFileError(Exception):
    """The --out file holds something that is not a result line (other than a torn last line)."""


# --------------------------------------------------------------------------- input


def iter_input(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` for every non-blank line, numbered from 1."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def parse_line(
    number: int,
    raw: bytes | str,
    *,
    default_server: str | None = None,
    default_timeout: float | None = None,
) -> Call | ToolResult:
    """One input line -> a Call, or a failed ``invalid_arguments`` ToolResult
    whose message names the line."""
    tool = "?"
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = _strict_json(text)
        if isinstance(value, dict) and isinstance(value.get("tool"), str) and value["tool"]:
            tool = value["tool"]
        return Call.from_dict(value, default_server=default_server, default_timeout=default_timeout)
    except UnicodeDecodeError:
        message = "not valid UTF-8"
    except InvalidArgumentsError as exc:
        message = exc.message
    return ToolResult(
        success=False,
        tool_name=tool,
        error=f"line {number}: {message}",
        error_code=ErrorCode.INVALID_ARGUMENTS.value,
        details={"line": number},
    )


def _refuse_constant(name: str) -> Any:
    raise InvalidArgumentsError(f"not valid JSON: {name} is not a number (RFC 8259 has no NaN or Infinity)")


def _strict_json(text: str) -> Any:
    """One line's JSON (RFC 8259), every way it can fail an ``InvalidArgumentsError``:
    bad syntax, NaN/Infinity, an integer too long to convert, nesting past the
    parser's recursion limit."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentsError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise InvalidArgumentsError("not valid JSON here: nested too deeply") from None
    except ValueError as exc:  # Python's limit on integer digits (sys.set_int_max_str_digits)
        raise InvalidArgumentsError(f"not valid JSON here: {exc}") from None


# --------------------------------------------------------------------------- results file


@dataclass
class ResultsState:
    """What an existing --out file already answers."""

    #: input line number -> did that call succeed (the last answer wins)
    answered: dict[int, bool] = field(default_factory=dict)
    #: input line number -> may its call have run, for lines whose last answer is ``cancelled``
    cancelled: dict[int, bool] = field(default_factory=dict)
    #: bytes of the file that are whole result lines; anything after is a torn write
    good_bytes: int = 0
    #: bytes dropped from the end (a half-written line from a crash)
    torn_bytes: int = 0
    #: the last result line is complete but lacks its newline
    needs_newline: bool = False

    def settled(self, line: int, rerun_cancelled: bool = False) -> bool:
        """The resume rule, decided here and nowhere else: is ``line`` done, so
        that running the batch again skips it?

        A line with no answer is not. An answered line is (a success or a
        failure alike), except one whose answer is ``cancelled`` and whose call
        never ran (``details.may_have_run`` false): running it now is its first
        run. A cancelled line that may have run is kept, so a call with side
        effects is not repeated behind anyone's back, unless
        ``rerun_cancelled`` (``--rerun-cancelled``) says to run it again."""
        if line not in self.answered:
            return False
        may_have_run = self.cancelled.get(line)
        if may_have_run is None:
            return True
        return may_have_run and not rerun_cancelled


def _result_answer(raw: bytes) -> tuple[int, bool, bool | None] | None:
    """``(line, success, may_have_run)`` of a result line (``may_have_run`` is
    None unless its error code is ``cancelled``; missing, it counts as True),
    or None when ``raw`` is not a result line."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    line, success = value.get("line"), value.get("success")
    if isinstance(line, bool) or not isinstance(line, int) or line < 1 or not isinstance(success, bool):
        return None
    if success or value.get("error_code") != ErrorCode.CANCELLED.value:
        return line, success, None
    details = value.get("details")
    ran = details.get("may_have_run") if isinstance(details, dict) else None
    return line, success, ran if isinstance(ran, bool) else True


def read_results(path: Path) -> ResultsState:
    """Read an existing results file (missing: nothing answered), streaming. A
    last line that is not a whole result is a torn write, to be dropped; a bad
    line anywhere else raises ResultsFileError."""
    state = ResultsState()
    if not path.exists():
        return state
    pos = 0
    bad: tuple[int, int] | None = None  # (line number, offset) of a bad line seen last
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            end = pos + len(raw)
            if raw.strip():
                if bad is not None:
                    break  # a bad line with more results after it: not a torn write
                parsed = _result_answer(raw)
                if parsed is None:
                    bad = (number, pos)
                else:
                    line, success, may_have_run = parsed
                    state.answered[line] = success
                    if may_have_run is None:
                        state.cancelled.pop(line, None)
                    else:
                        state.cancelled[line] = may_have_run
                    state.needs_newline = not raw.endswith(b"\n")
                    state.good_bytes = end
            elif bad is None:
                state.good_bytes = end
            pos = end
        else:
            if bad is not None:
                state.torn_bytes = pos - bad[1]
                state.good_bytes = bad[1]
            return state
    assert bad is not None
    raise ResultsFileError(
        f"{path} line {bad[0]} is not a result line; fix or remove it (or use another --out)"
    )


def repair_results(path: Path, state: ResultsState) -> None:
    """Drop a torn last line and end the file with a newline, ready to append."""
    if not path.exists():
        return
    if state.torn_bytes:
        with path.open("r+b") as f:
            f.truncate(state.good_bytes)
    if state.needs_newline:
        with path.open("ab") as f:
            f.write(b"\n")
        state.needs_newline = False


def result_line(number: int, result: ToolResult) -> str:
    return json.dumps({"line": number, **result.to_dict()}, default=str, separators=(",", ":")) + "\n"


# --------------------------------------------------------------------------- progress


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """A one-line bar with rate and ETA on a terminal; silent elsewhere."""

    def __init__(self, total: int, stream: IO[str], enabled: bool, width: int = 28) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled and total > 0
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def render(self, done: int, failed: int, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        frac = done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - done) / rate) if rate > 0 and done < self.total else "-:--"
        if done >= self.total:
            eta = _clock(elapsed)
        text = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {frac:4.0%} "
            f"{rate:7.1f} calls/s  {'in' if done >= self.total else 'ETA'} {eta}"
        )
        return text + (f"  {failed} failed" if failed else "")

    def update(self, done: int, failed: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render(done, failed, now) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self, done: int, failed: int) -> None:
        if self.enabled and self._drawn:
            self.update(done, failed, force=True)
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- the run


@dataclass
class BatchOutcome:
    calls: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    previously_failed: int = 0
    unanswered: int = 0
    seconds: float = 0.0
    error_codes: Counter[str] = field(default_factory=Counter)
    problem: str | None = None
    #: bytes of a torn last line dropped from --out before resuming
    torn_bytes: int = 0
    #: skipped lines answered ``cancelled`` whose call may have run (not re-run without --rerun-cancelled)
    cancelled_kept: int = 0
    #: lines answered ``cancelled`` before that run again now
    cancelled_rerun: int = 0
    #: lines answered ``cancelled`` in this run, and how many of those calls may have run
    cancelled: int = 0
    cancelled_may_have_run: int = 0
    #: Ctrl-C stopped the run (what was outstanding is cancelled and answered)
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.problem is not None or self.unanswered:
            return EXIT_UNREACHABLE
        if self.failed or self.previously_failed:
            return EXIT_FAILED
        return EXIT_OK

    def summary(self) -> str:
        return (
            f"{self.calls} calls: {self.succeeded} succeeded, {self.failed} failed "
            f"in {self.seconds:.1f}s ({self.rate:.1f} calls/s)"
        )

    def to_dict(self, out: str) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 2),
            "skipped": self.skipped,
            "previously_failed": self.previously_failed,
            "unanswered": self.unanswered,
            "error_codes": dict(self.error_codes),
            "problem": self.problem,
            "torn_bytes_dropped": self.torn_bytes,
            "cancelled": self.cancelled,
            "cancelled_may_have_run": self.cancelled_may_have_run,
            "cancelled_kept": self.cancelled_kept,
            "cancelled_rerun": self.cancelled_rerun,
            "interrupted": self.interrupted,
            "out": out,
            "exit_code": self.exit_code,
        }


class _Writer:
    def __init__(self, f: IO[str], outcome: BatchOutcome, bar: ProgressBar) -> None:
        self.f = f
        self.outcome = outcome
        self.bar = bar

    def write(self, number: int, result: ToolResult) -> None:
        if result.details.get("stalled"):
            # The producer gave up waiting: leave the line unanswered so a re-run retries it.
            self.outcome.unanswered += 1
            return
        self.f.write(result_line(number, result))
        self.f.flush()
        o = self.outcome
        o.calls += 1
        if result.success:
            o.succeeded += 1
        else:
            o.failed += 1
            o.error_codes[result.error_code or "unknown"] += 1
            if result.error_code == ErrorCode.CANCELLED.value:
                o.cancelled += 1
                o.cancelled_may_have_run += result.details.get("may_have_run", True) is not False
        self.bar.update(o.calls + o.unanswered, o.failed)


def run_batch(
    calls_path: Path,
    out_path: Path,
    *,
    queue: Any,
    server: str | None = None,
    timeout: float | None = None,
    window: int | None = None,
    chunk_size: int | None = None,
    task_queue: str | None = None,
    stall_timeout: float | None = None,
    progress_stream: IO[str] | None = None,
    show_progress: bool = False,
    rerun_cancelled: bool = False,
    interrupt: Interrupt | None = None,
    cancel_wait: float = CANCEL_WAIT,
) -> BatchOutcome:
    """The body of ``mcpq batch``; raises ResultsFileError for a bad --out file.
    ``queue`` is a ToolQueue (or a callable returning one, called only if
    some line needs the broker). ``rerun_cancelled`` also runs the lines
    answered ``cancelled`` that may have run (:meth:`ResultsState.settled`).
    Setting ``interrupt`` (what Ctrl-C does, see :func:`sigint_sets`) stops
    the batch: outstanding calls are cancelled, their results waited for up
    to ``cancel_wait`` seconds, and every line not answered yet is answered
    ``cancelled``."""
    interrupt = interrupt or Interrupt()
    state = read_results(out_path)
    call_lines = [number for number, _ in iter_input(calls_path)]
    strangers = sorted(set(state.answered) - set(call_lines))
    if strangers:
        raise ResultsFileError(
            f"{out_path} answers line {strangers[0]}, which is not a call line of {calls_path}: "
            "is it the results of another file? Use another --out"
        )
    outcome = BatchOutcome()
    settled = [n for n in state.answered if state.settled(n, rerun_cancelled)]
    outcome.skipped = len(settled)
    outcome.previously_failed = sum(1 for n in settled if not state.answered[n])
    outcome.cancelled_kept = sum(1 for n in settled if n in state.cancelled)
    outcome.cancelled_rerun = len(state.answered) - len(settled)
    outcome.torn_bytes = state.torn_bytes
    todo = len(call_lines) - len(settled)
    del call_lines, settled
    repair_results(out_path, state)

    bar = ProgressBar(todo, progress_stream or sys.stderr, show_progress)
    started = time.monotonic()

    def source() -> Iterator[tuple[int, Call | ToolResult]]:
        for number, raw in iter_input(calls_path):
            if not state.settled(number, rerun_cancelled):
                yield number, parse_line(number, raw, default_server=server, default_timeout=timeout)

    lines = BatchLines(source(), interrupt)
    with out_path.open("a", encoding="utf-8") as f:
        writer = _Writer(f, outcome, bar)

        def flush_invalid() -> None:
            while lines.invalid:
                writer.write(*lines.invalid.popleft())

        try:
            first = lines.next_call()
            flush_invalid()
            if first is not None and interrupt.requested:  # Ctrl-C before anything was sent
                number = lines.answered(0)
                writer.write(number, unsent_result(number, first))
            elif first is not None:
                tq = queue() if callable(queue) else queue
                publisher = CancellingPublisher(tq)
                stream = fanout.as_completed(
                    publisher,
                    lines.feed(first),
                    window=window,
                    chunk_size=chunk_size,
                    queue=task_queue,
                    stall_timeout=stall_timeout,
                )
                fetcher = Fetcher(stream)
                fetcher.start()
                write_results(fetcher, lines, publisher, writer.write, interrupt, cancel_wait, flush_invalid)
            if interrupt.requested:
                flush_invalid()
                for number, parsed in lines.rest():
                    answer = parsed if isinstance(parsed, ToolResult) else unsent_result(number, parsed)
                    writer.write(number, answer)
        except MCPConnectionError as exc:
            outcome.problem = exc.message
        finally:
            outcome.interrupted = interrupt.requested
            flush_invalid()  # malformed lines read so far are answered whatever happened
            outcome.seconds = time.monotonic() - started
            bar.close(outcome.calls + outcome.unanswered, outcome.failed)
    return outcome


# --------------------------------------------------------------------------- the command


def _queue() -> Any:
    from mcpq.producer.queue import ToolQueue

    return ToolQueue.from_env()


@click.command()
@click.argument("calls_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL results file; re-running with the same file resumes.",
)
@click.option("--server", "-s", help="Server for lines that name none.")
@click.option(
    "--timeout",
    "-t",
    type=DEADLINE,
    help="Call deadline (s) for lines without one.",
)
@click.option(
    "--window",
    type=click.IntRange(min=0),
    default=DEFAULT_WINDOW,
    show_default=True,
    help="Calls outstanding at most (0: publish everything at once).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1, max=MAX_CHUNK_CALLS),
    help="Calls per Celery task (default: chosen from the batch size; 1: one task per call).",
)
@click.option("--queue", "task_queue", help="Queue to send the calls to (default MCPQ_QUEUE).")
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Give up when no call finished for this long (default: longest call deadline + 10 s).",
)
@click.option(
    "--rerun-cancelled",
    is_flag=True,
    help="On resume, also run lines answered cancelled whose call may have run (by default only "
    "cancelled lines that never ran run again).",
)
@click.option(
    "--cancel-wait",
    type=WAIT,
    default=CANCEL_WAIT,
    show_default=True,
    help="After Ctrl-C, seconds to wait for the cancelled calls' own results.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar, even on a terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def batch(
    calls_file: Path,
    out_file: Path,
    server: str | None,
    timeout: float | None,
    window: int,
    chunk_size: int | None,
    task_queue: str | None,
    stall_timeout: float | None,
    rerun_cancelled: bool,
    cancel_wait: float,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Run every call in CALLS_FILE (JSONL) and write one result line per input line to --out.

    \b
    Each line: {"tool": "add", "arguments": {"a": 1}, "server": "local", "timeout": 30}
    (only "tool" is required). A malformed line gets its own invalid_arguments
    result. Results are written as they finish: {"line": N, "success": ..., ...}.
    Re-running with the same --out skips lines already answered there, except
    lines cancelled before their call ran (and, with --rerun-cancelled, every
    cancelled line).

    Ctrl-C cancels the calls still outstanding, writes their results (the lines
    not sent yet as cancelled) and exits 130.

    Exits 0 when every line succeeded, 1 when any failed, 2 on bad usage,
    3 when the broker, the result backend or a worker could not be reached.
    """
    interrupt = Interrupt()
    try:
        if out_file.exists() and calls_file.resolve() == out_file.resolve():
            raise click.UsageError("--out must not be the calls file itself")
        stderr = sys.stderr
        with sigint_sets(interrupt):
            outcome = run_batch(
                calls_file,
                out_file,
                queue=_queue,
                server=server,
                timeout=timeout,
                window=window,
                chunk_size=chunk_size,
                task_queue=task_queue,
                stall_timeout=stall_timeout,
                progress_stream=stderr,
                show_progress=not no_progress and stderr.isatty(),
                rerun_cancelled=rerun_cancelled,
                interrupt=interrupt,
                cancel_wait=cancel_wait,
            )
    except ResultsFileError as exc:
        click.echo(f"mcpq: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo(f"\nmcpq: interrupted; run the same command again to resume ({out_file})", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(outcome.to_dict(os.fspath(out_file)), indent=2))
    else:
        click.echo(outcome.summary())
        if outcome.error_codes:
            codes = ", ".join(f"{code} {n}" for code, n in outcome.error_codes.most_common())
            click.echo(f"failures by error_code: {codes}")
        if outcome.skipped:
            click.echo(
                f"skipped {outcome.skipped} lines already answered in {out_file}"
                + (f" ({outcome.previously_failed} of them failed)" if outcome.previously_failed else "")
            )
        if outcome.cancelled_rerun:
            click.echo(f"ran again {outcome.cancelled_rerun} lines answered cancelled before")
        if outcome.cancelled_kept:
            click.echo(
                f"cancelled earlier and may have run: {outcome.cancelled_kept}, not re-run; "
                "pass --rerun-cancelled to run them"
            )
    if outcome.torn_bytes:
        click.echo(
            f"mcpq: dropped a half-written last line ({outcome.torn_bytes} bytes) from {out_file}", err=True
        )
    if outcome.interrupted:
        ran = outcome.cancelled_may_have_run
        click.echo(
            f"mcpq: interrupted: {outcome.cancelled} calls cancelled"
            + (f" ({ran} may have run: a resume keeps those unless --rerun-cancelled)" if ran else "")
            + f"; run the same command again to resume ({out_file})",
            err=True,
        )
    if outcome.problem is not None:
        click.echo(f"mcpq: {outcome.problem}; run the same command again to resume", err=True)
    if outcome.unanswered:
        click.echo(
            f"mcpq: {outcome.unanswered} calls got no result (is a worker running?); "
            "they are not in --out: run the same command again to retry them",
            err=True,
        )
    sys.exit(outcome.exit_code)
