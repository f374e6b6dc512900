"""Fan-out without a broker (mcpq.producer.fanout and the calls, collector and
engine modules under it): call parsing, progress accounting, the window, result
conversion, the engine driven by a fake publisher/collector, the options."""

from __future__ import annotations

import ast
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpq.producer import calls as calls_module
from mcpq.producer import collector as collector_module
from mcpq.producer import engine, fanout
from mcpq.producer.calls import Call, Progress, task_result_to_tool_result
from mcpq.producer.collector import PendingCall, ResultCollector
from mcpq.producer.engine import BatchRun
from mcpq.producer.fanout_options import DEFAULT_WINDOW, SUBMIT_MANY_WINDOW, FanOutConfig, FanOutOptions
from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.errors import InvalidArgumentsError
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- Call


def test_call_from_dict_defaults_and_label() -> None:
    call = Call.from_dict({"tool": "add", "arguments": {"a": 1}})
    assert call == Call("add", {"a": 1})
    assert call.label == "add"
    full = Call.from_dict({"tool": "add", "server": "s", "timeout": 5, "arguments": None})
    assert full == Call("add", {}, "s", 5.0)
    assert full.label == "s/add"
    defaulted = Call.from_dict({"tool": "add"}, default_server="d", default_timeout=9)
    assert (defaulted.server, defaulted.timeout) == ("d", 9)
    # explicit values beat the defaults
    assert Call.from_dict({"tool": "t", "server": "x"}, default_server="d").server == "x"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ([1, 2], "must be a JSON object, got array"),
        ("add", "got string"),
        ({}, "missing 'tool'"),
        ({"tool": ""}, "non-empty string"),
        ({"tool": 3}, "non-empty string, got number"),
        ({"tool": "add", "arguments": [1]}, "'arguments' of 'add' must be a JSON object, got array"),
        ({"tool": "add", "arguments": "a=1"}, "got string"),
        ({"tool": "add", "server": 1}, "'server' must be a non-empty string"),
        ({"tool": "add", "timeout": 0}, "positive number"),
        ({"tool": "add", "timeout": True}, "positive number"),
        ({"tool": "add", "timeout": "5"}, "positive number"),
        ({"tool": "add", "argument": {}}, "unknown field(s) 'argument'"),
    ],
)
def test_call_from_dict_rejects(raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgumentsError) as info:
        Call.from_dict(raw)
    assert fragment in info.value.message


# --------------------------------------------------------------------------- Progress


def test_progress_accounting() -> None:
    p = Progress(done=30, failed=4, total=100, submitted=50, elapsed=10.0)
    assert p.succeeded == 26
    assert p.in_flight == 20
    assert p.rate == 3.0
    assert p.eta == pytest.approx(70 / 3)
    assert Progress(0, 0, 10).eta is None and Progress(0, 0, 10).rate == 0.0
    assert Progress(5, 0, None, elapsed=1).eta is None


# --------------------------------------------------------------------------- conversion


def test_task_result_conversion() -> None:
    ok = ToolResult.ok("add", "s", {"content": []}).to_dict()
    assert task_result_to_tool_result("add", "t1", "SUCCESS", ok) == ToolResult.from_dict(ok)
    for state, value in [
        ("FAILURE", RuntimeError("worker bug")),
        ("REVOKED", None),
        ("SUCCESS", {"not": "a result"}),
        ("SUCCESS", {"success": True}),  # no tool_name: not a ToolResult
        ("SUCCESS", 42),
    ]:
        result = task_result_to_tool_result("s/add", "t1", state, value)
        assert result.success is False
        assert result.error_code == "internal_error"
        assert f"task t1 ended in state {state}" in (result.error or "")
        assert result.tool_name == "s/add" and result.request_id == "t1"


# --------------------------------------------------------------------------- the engine, faked


class FakeCollector:
    """Stands in for ResultCollector: publishes 'complete' in the order given by ``finish``."""

    def __init__(self) -> None:
        self.pending: dict[str, PendingCall] = {}
        self.max_pending = 0

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, slot: PendingCall) -> None:
        self.pending[str(slot.result.id)] = slot
        self.max_pending = max(self.max_pending, len(self.pending))

    def take(self, wait: float) -> list[tuple[PendingCall, ToolResult]]:
        # finish the two oldest outstanding calls per round, the second first
        ids = list(self.pending)[:2][::-1]
        out = []
        for task_id in ids:
            slot = self.pending.pop(task_id)
            args = slot.result.kwargs["arguments"]
            if args.get("boom"):
                out.append((slot, ToolResult(success=False, tool_name=slot.label, error_code="tool_error")))
            else:
                out.append((slot, ToolResult.ok(slot.label, "s", {"structuredContent": args})))
        return out

    def sweep(self) -> list[tuple[PendingCall, ToolResult]]:
        return []

    def states(self) -> dict[str, str]:
        return {}

    def pop_all(self) -> list[PendingCall]:
        slots = list(self.pending.values())
        self.pending.clear()
        return slots

    def close(self) -> None:
        self.pending.clear()


class FakeResult:
    def __init__(self, task_id: str, kwargs: dict[str, Any]) -> None:
        self.id = task_id
        self.kwargs = kwargs


class FakeQueue:
    def __init__(self) -> None:
        self.settings = Settings()
        self.app = object()
        self.published: list[list[str]] = []


def make_run(calls: Any, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[BatchRun, FakeQueue]:
    tq = FakeQueue()
    monkeypatch.setattr(engine, "ResultCollector", lambda app: FakeCollector())

    def publish(self: BatchRun, batch: list[tuple[int, Call]]) -> None:
        tq.published.append([c.tool for _, c in batch])
        for index, call in batch:
            task_id = f"t{index}"
            fake = FakeResult(task_id, {"arguments": call.arguments})
            self.collector.add(PendingCall(index, call.label, fake, None))  # type: ignore[arg-type]
        self.submitted += len(batch)

    monkeypatch.setattr(BatchRun, "_publish", publish)
    opts: dict[str, Any] = {
        "chunk_size": None,
        "window": None,
        "queue": None,
        "stall_timeout": None,
        "on_progress": None,
    }
    opts.update(kw)
    return BatchRun(tq, calls, FanOutConfig(**opts)), tq  # type: ignore[arg-type]


def test_engine_window_chunks_progress_and_order(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Progress] = []
    calls: list[Any] = [Call("add", {"i": i}) for i in range(25)]
    calls[7] = {"tool": "add", "arguments": "bad"}
    calls[11] = Call("add", {"i": 11, "boom": True})
    run, tq = make_run(calls, monkeypatch, chunk_size=4, window=10, on_progress=seen.append)
    got = list(run.drain())
    assert sorted(i for i, _ in got) == list(range(25))
    # rounds are whole chunk tasks (4 calls) while the input lasts, and never more than `window` outstanding
    assert all(len(batch) % 4 == 0 and len(batch) <= 8 for batch in tq.published[:-1])
    assert sum(len(chunk) for chunk in tq.published) == 24  # the malformed call is never published
    assert run.collector.max_pending <= 10  # type: ignore[attr-defined]
    results = dict(got)
    assert results[7].error_code == "invalid_arguments" and "call 7" in (results[7].error or "")
    assert results[11].error_code == "tool_error"
    assert results[3].structured == {"i": 3}
    assert [p.done for p in seen] == list(range(1, 26))
    assert (seen[-1].done, seen[-1].failed, seen[-1].total) == (25, 2, 25)


def test_engine_generator_input_total_unknown_until_read(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Progress] = []

    def gen() -> Iterator[Call]:
        for i in range(9):
            yield Call("add", {"i": i})

    run, _ = make_run(gen(), monkeypatch, chunk_size=2, window=4, on_progress=seen.append)
    assert run.total is None
    list(run.drain())
    assert seen[0].total is None  # not read to the end yet
    assert seen[-1].total == 9 and seen[-1].done == 9


def test_engine_window_zero_publishes_everything_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    run, tq = make_run([Call("add", {"i": i}) for i in range(10)], monkeypatch, chunk_size=3, window=0)
    run.refill()
    assert [len(c) for c in tq.published] == [10]
    assert run.exhausted and run.total == 10


def test_engine_rounds_are_whole_chunks_up_to_the_publish_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    run, tq = make_run([Call("add", {"i": i}) for i in range(1000)], monkeypatch, chunk_size=30, window=0)
    run.refill()
    # 200 calls a round, rounded down to whole 30-call chunk tasks
    assert [len(c) for c in tq.published] == [180] * 5 + [100]


def test_auto_chunk_size_grows_with_the_batch() -> None:
    assert calls_module.auto_chunk_size(1) == 1
    assert calls_module.auto_chunk_size(31) == 1  # a small batch: one task per call, spread over all slots
    assert calls_module.auto_chunk_size(100) == 6
    assert calls_module.auto_chunk_size(5000) == calls_module.MAX_AUTO_CHUNK
    assert calls_module.auto_chunk_size(None) == calls_module.MAX_AUTO_CHUNK  # a generator: length unknown


def test_engine_rejects_bad_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        make_run([], monkeypatch, chunk_size=0)
    with pytest.raises(ValueError, match="from 1 to 1000"):
        make_run([], monkeypatch, chunk_size=1001)
    with pytest.raises(ValueError):
        make_run([], monkeypatch, window=-1)


def test_engine_stall_fails_outstanding_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = make_run([Call("add", {"i": i}) for i in range(3)], monkeypatch, stall_timeout=0.05)
    run.collector.take = lambda wait: []  # type: ignore[method-assign]
    got = list(run.drain())
    assert sorted(i for i, _ in got) == [0, 1, 2]
    for _, result in got:
        assert result.error_code == "timeout" and result.details["stalled"] is True
        assert "still queued" in (result.error or "")


def test_empty_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    run, tq = make_run([], monkeypatch)
    assert list(run.drain()) == [] and tq.published == []
    assert run.progress().total == 0


# --------------------------------------------------------------------------- the collector, faked backend


class FakeAsync:
    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.callbacks: list[Any] = []
        self.state = "PENDING"
        self.result: Any = None

    def then(self, callback: Any) -> None:
        self.callbacks.append(callback)


class FakeConsumer:
    def __init__(self) -> None:
        self.queued: list[FakeAsync] = []  # messages "on the connection"
        self.drains = 0

    def drain_events(self, timeout: float) -> None:
        self.drains += 1
        if self.queued:
            r = self.queued.pop(0)
            r.state = "SUCCESS"
            for cb in r.callbacks:
                cb(r)


class FakeBackend:
    def __init__(self, push: bool) -> None:
        self.is_async = push
        self.result_consumer = FakeConsumer()
        self.stored: dict[str, dict[str, Any]] = {}
        self.mgets: list[list[str]] = []
        self.forgotten: list[str] = []

    def get_many(self, ids: list[str], interval: float, max_iterations: int) -> Iterator[tuple[str, Any]]:
        self.mgets.append(list(ids))
        for task_id in ids:
            if task_id in self.stored:
                yield task_id, self.stored[task_id]

    def meta_from_decoded(self, meta: dict[str, Any]) -> dict[str, Any]:
        return meta

    def remove_pending_result(self, result: FakeAsync) -> None:
        self.forgotten.append(result.id)


class FakeApp:
    def __init__(self, push: bool) -> None:
        self.backend = FakeBackend(push)
        self.conf = type("conf", (), {"result_backend": "redis://x/1"})()


def ok_dict(n: int) -> dict[str, Any]:
    return ToolResult.ok("add", "s", {"structuredContent": {"n": n}}).to_dict()


def make_collector(push: bool, n: int) -> tuple[ResultCollector, FakeApp, list[FakeAsync]]:
    app = FakeApp(push)
    collector = ResultCollector(app)
    results = [FakeAsync(f"t{i}") for i in range(n)]
    for i, r in enumerate(results):
        r.result = ok_dict(i)
        collector.add(PendingCall(i, "add", r, None))  # type: ignore[arg-type]
    return collector, app, results


def test_collector_push_path_reads_messages_without_mget() -> None:
    collector, app, results = make_collector(True, 3)
    app.backend.result_consumer.queued = [results[2], results[0], results[1]]
    got = []
    while len(collector):
        got += [(slot.index, r.structured) for slot, r in collector.take(1.0)]
    assert got == [(2, {"n": 2}), (0, {"n": 0}), (1, {"n": 1})]
    assert app.backend.mgets == []


def test_collector_idle_sweep_finds_lost_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector_module, "IDLE_SWEEP_INTERVAL", 0.0)
    collector, app, _results = make_collector(True, 3)
    app.backend.stored["t1"] = {"status": "SUCCESS", "result": ok_dict(1)}  # its message never comes
    got = collector.take(0.5)
    assert [(slot.index, r.structured) for slot, r in got] == [(1, {"n": 1})]
    assert app.backend.mgets == [["t0", "t1", "t2"]]
    assert app.backend.forgotten == ["t1"]  # no longer waiting on its channel


def test_collector_periodic_sweep_only_reads_old_calls() -> None:
    collector, app, _results = make_collector(True, 2)
    now = time.monotonic()
    assert collector._maybe_sweep(now) == [] and app.backend.mgets == []  # swept just now
    collector._last_sweep -= 100  # results keep flowing (never idle), but no sweep for long
    collector._pending["t0"].added_at -= 100  # outstanding for ages; t1 is new
    collector._maybe_sweep(now)
    assert app.backend.mgets == [["t0"]]


def test_collector_sweep_soon_reads_everything_at_once() -> None:
    collector, app, _results = make_collector(True, 2)
    app.backend.stored["t0"] = {"status": "FAILURE", "result": RuntimeError("boom")}
    collector.sweep_soon()
    got = collector.take(0.0)
    assert [(slot.index, r.error_code) for slot, r in got] == [(0, "internal_error")]
    assert "boom" in (got[0][1].error or "")


def test_collector_without_push_polls() -> None:
    collector, app, _results = make_collector(False, 2)
    app.backend.stored = {f"t{i}": {"status": "SUCCESS", "result": ok_dict(i)} for i in range(2)}
    got = []
    while len(collector):
        got += [slot.index for slot, _ in collector.take(1.0)]
    assert sorted(got) == [0, 1]
    assert app.backend.result_consumer.drains == 0


def test_collector_close_stops_waiting() -> None:
    collector, app, _ = make_collector(True, 3)
    collector.close()
    assert len(collector) == 0 and sorted(app.backend.forgotten) == ["t0", "t1", "t2"]


# --------------------------------------------------------------------------- options and module layout


def test_options_and_config_declare_the_same_options() -> None:
    # mypy catches an option FanOutConfig lacks; this catches one FanOutOptions lacks.
    keys = FanOutOptions.__required_keys__ | FanOutOptions.__optional_keys__
    assert keys == {f.name for f in dataclasses.fields(FanOutConfig)}
    assert keys == {"on_progress", "on_call_progress", "chunk_size", "window", "queue", "stall_timeout"}


def test_config_from_options_entry_point_defaults() -> None:
    assert FanOutConfig.from_options({}) == FanOutConfig()
    assert FanOutConfig.from_options({}, window=SUBMIT_MANY_WINDOW).window == 0
    # an option given, even as None, wins over the entry point's default
    assert FanOutConfig.from_options({"window": None}, window=0).window is None
    given = FanOutConfig.from_options({"window": 7, "queue": "q"}, window=0)
    assert given == FanOutConfig(window=7, queue="q")
    with pytest.raises(TypeError):
        FanOutConfig.from_options({"windw": 3})  # type: ignore[typeddict-unknown-key]


def test_submit_many_window_defaults_to_no_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _, tq = make_run([], monkeypatch)  # installs the fake collector and publisher
    handle = fanout.submit_many(tq, [Call("add", {"i": i}) for i in range(450)], chunk_size=5)  # type: ignore[arg-type]
    assert sum(len(c) for c in tq.published) == 450  # all published before it returned
    assert handle.progress.submitted == 450
    windowed = fanout.submit_many(tq, [Call("add", {"i": i}) for i in range(10)], window=None)  # type: ignore[arg-type]
    assert windowed._run.window == DEFAULT_WINDOW
    queue = ToolQueue(Settings())
    published = queue.submit_many([Call("add", {"i": i}) for i in range(300)], chunk_size=3)
    assert published.progress.submitted == 300
    with pytest.raises(TypeError):
        queue.fan_out([], windw=3)  # type: ignore[call-arg]


def _producer_imports() -> dict[str, set[str]]:
    """Producer module -> the producer modules it imports anywhere (at the top,
    inside functions, under TYPE_CHECKING)."""
    folder = Path(__file__).resolve().parents[2] / "producer"
    modules = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name in modules:
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                parts = target.split(".")
                if parts[:2] == ["mcpq", "producer"] and len(parts) > 2 and parts[2] in modules:
                    graph[name].add(parts[2])
    return graph


def test_no_import_cycle_between_producer_modules() -> None:
    graph = _producer_imports()
    assert {"queue", "fanout", "engine", "collector", "calls"} <= set(graph)
    assert "fanout" not in graph["engine"] and "queue" not in graph["fanout"]

    def visit(module: str, path: list[str]) -> None:
        for imported in graph[module]:
            assert imported not in path, " -> ".join([*path, imported])
            visit(imported, [*path, imported])

    for module in graph:
        visit(module, [module])
