"""The keyword options every fan-out entry point takes, declared once.

``ToolQueue.map/fan_out/as_completed/submit_many`` and the functions of
:mod:`mcpq.producer.fanout` all take the same options. They are declared here
twice over, for two readers, and nowhere else:

* :class:`FanOutOptions` (a ``TypedDict``) is the signature: entry points take
  ``**options: Unpack[FanOutOptions]`` and pass them on untouched, so type
  checkers and IDEs still see every keyword and its type;
* :class:`FanOutConfig` (a dataclass) holds the defaults and what each option
  means, and is what the engine reads. :meth:`FanOutConfig.from_options` is the
  one place options become a config.

mypy rejects an option in :class:`FanOutOptions` that :class:`FanOutConfig`
lacks (at ``cls(**merged)``); a unit test checks the other direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict, Unpack

from mcpq.producer.calls import CallProgressCallback, ProgressCallback

#: Calls of one batch outstanding (published, not yet answered) at most, when
#: ``window`` is None.
DEFAULT_WINDOW = 2000
#: ``window`` of :func:`~mcpq.producer.fanout.submit_many` when not given: no
#: limit, so every call is published before it returns.
SUBMIT_MANY_WINDOW = 0


class FanOutOptions(TypedDict, total=False):
    """Keyword options of a fan-out; see :class:`FanOutConfig` for what each
    means and its default."""

    on_progress: ProgressCallback | None
    on_call_progress: CallProgressCallback | None
    chunk_size: int | None
    window: int | None
    queue: str | None
    stall_timeout: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class FanOutConfig:
    """How one batch runs: the fan-out options with their defaults.

    ``on_progress`` (default None)
        Called with a :class:`~mcpq.producer.calls.Progress` after every result.
    ``on_call_progress`` (default None)
        Called as ``on_call_progress(index, ProgressUpdate)`` when call
        ``index`` reports progress. Setting it makes every call of the batch
        ask its server for progress (``progress=True``); without it there is
        no progress traffic at all. The sync face reads the latest progress
        of outstanding calls every 0.2 s, the asyncio face is told at once;
        both hand over each change at most once.
    ``chunk_size`` (default None)
        Calls per task. None: :func:`~mcpq.producer.calls.auto_chunk_size`
        picks by batch size; 1: one ``mcpq.call_tool`` task per call; at most
        ``MAX_CHUNK_CALLS`` (1000).
    ``window`` (default None; :func:`~mcpq.producer.fanout.submit_many`: 0)
        Calls outstanding (published, not yet answered) at most. None:
        :data:`DEFAULT_WINDOW` (2000); 0: no limit, every call is published
        at once.
    ``queue`` (default None)
        Celery queue the tasks go to. None: ``MCPQ_QUEUE`` (``settings.queue``).
    ``stall_timeout`` (default None)
        Seconds with nothing published and nothing finished after which every
        outstanding call ends with a ``timeout`` result. None: the longest call
        deadline of the batch plus ``RESULT_GRACE``.
    """

    on_progress: ProgressCallback | None = None
    on_call_progress: CallProgressCallback | None = None
    chunk_size: int | None = None
    window: int | None = None
    queue: str | None = None
    stall_timeout: float | None = None

    @classmethod
    def from_options(cls, options: FanOutOptions, **defaults: Unpack[FanOutOptions]) -> FanOutConfig:
        """The config for ``options`` as a caller gave them.

        ``defaults`` are an entry point's own defaults where they differ from
        the ones above (``submit_many``: ``window=SUBMIT_MANY_WINDOW``); an
        option the caller gave, even as None, wins over them. An unknown option
        raises TypeError."""
        merged: FanOutOptions = {**defaults, **options}
        return cls(**merged)
