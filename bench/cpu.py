"""CPU seconds (user + system) of the processes a benchmark involves, around each measured block.

One meter for every benchmark: ``add`` names a process (several under one name add up),
``add_source`` adds a function that is asked at every snapshot (for processes that come
and go, or a tree walked anew each time), ``measure`` adds what a block used to a dict,
and ``per_call_ms`` turns totals into milliseconds per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import psutil


def cpu_seconds(proc: psutil.Process, reaped: bool = False) -> float:
    """User + system CPU seconds of ``proc`` so far; ``reaped``: plus those of the children
    it has already waited for (short-lived servers it started, say). Raises psutil.Error
    when the process is gone."""
    t = proc.cpu_times()
    return float(t.user + t.system + (t.children_user + t.children_system if reaped else 0.0))


@dataclass
class CpuMeter:
    """CPU seconds by name (a process, or a kind of process), sampled around each block.

    ``categories``: names every snapshot has, at 0 when nothing counted under them.
    """

    categories: Iterable[str] = ()
    procs: list[tuple[str, psutil.Process, bool]] = field(default_factory=list)
    sources: list[Callable[[], dict[str, float]]] = field(default_factory=list)

    def add(self, name: str, pid: int, reaped: bool = False) -> None:
        """Count process ``pid`` under ``name`` (``reaped``: see ``cpu_seconds``). A process
        already gone is left out; one that goes while measured makes its name NaN."""
        with contextlib.suppress(psutil.Error):
            self.procs.append((name, psutil.Process(pid), reaped))

    def add_source(self, source: Callable[[], dict[str, float]]) -> None:
        """Add ``source()``'s CPU seconds by name to every snapshot."""
        self.sources.append(source)

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far, by name."""
        out = dict.fromkeys(self.categories, 0.0)
        for name, proc, reaped in self.procs:
            try:
                out[name] = out.get(name, 0.0) + cpu_seconds(proc, reaped)
            except psutil.Error:
                out[name] = float("nan")
        for source in self.sources:
            for name, seconds in source().items():
                out[name] = out.get(name, 0.0) + seconds
        return out

    @contextlib.contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        """Add the CPU seconds used during the block to ``into``, by name. A total that drops
        during the block (a source's worker stopped mid-way) counts 0, not less."""
        before = self.snapshot()
        try:
            yield
        finally:
            after = self.snapshot()
            for name, value in after.items():
                into[name] = into.get(name, 0.0) + max(value - before.get(name, 0.0), 0.0)


def per_call_ms(used: dict[str, dict[str, float]], calls: dict[str, int]) -> dict[str, dict[str, float]]:
    """CPU milliseconds per call: ``used`` maps each path to its CPU seconds by name
    (``measure``'s dicts), ``calls`` each path to the calls made while measuring it."""
    return {
        path: {name: 1000 * sec / max(calls[path], 1) for name, sec in by_name.items()}
        for path, by_name in used.items()
    }
