"""How idle time between calls slows a direct, pooled stdio MCP call.

    python -m bench.idle_gap [--calls 200] [--rounds 3] [--gaps 0,2,5,10]

One ``mcp.Client`` on the stdio demo server, kept open; for each gap (ms), N
``call_tool("echo")`` calls with the loop idle for that long before each one.
Prints the median latency per round and the CPU per call of client and
server. A queued call's SDK leg sees such a gap (the rest of the round trip),
which is why ``bench.latency`` also reports a ``direct_idle`` path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import psutil

from bench.cpu import cpu_seconds
from bench.environment import stdio_params
from bench.harness import is_demo_server

#: Per gap, per round: (median latency ms, client CPU ms per call, server CPU ms per call).
Results = dict[float, list[tuple[float, float, float]]]


async def measure(calls: int, rounds: int, gaps_ms: list[float]) -> Results:
    from mcp import Client

    out: Results = {gap: [] for gap in gaps_ms}
    async with Client(stdio_params()) as client:
        server = next(p for p in psutil.Process().children() if is_demo_server(p))
        for _ in range(50):
            await client.call_tool("echo", {"text": "x"})
        for _ in range(rounds):
            for gap in gaps_ms:
                samples: list[float] = []
                s0 = cpu_seconds(server)
                c0 = time.process_time()
                for _ in range(calls):
                    if gap:
                        await asyncio.sleep(gap / 1000)
                    t0 = time.perf_counter()
                    await client.call_tool("echo", {"text": "x"})
                    samples.append(time.perf_counter() - t0)
                c1 = time.process_time()
                server_cpu = cpu_seconds(server) - s0
                out[gap].append(
                    (statistics.median(samples) * 1000, (c1 - c0) * 1000 / calls, server_cpu * 1000 / calls)
                )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_gap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gaps", default="0,2,5,10", help="idle ms before each call, comma-separated")
    args = parser.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",") if g.strip()]
    try:
        results = asyncio.run(measure(args.calls, args.rounds, gaps))
    except KeyboardInterrupt:
        return 130
    print(f"load {psutil.getloadavg()[0]:.2f}; {args.calls} calls per cell; ms")
    print(f"{'idle gap':>9}  {'median per round':<28} {'client CPU/call':<22} server CPU/call")
    for gap, rows in results.items():
        medians = ", ".join(f"{r[0]:.2f}" for r in rows)
        client = ", ".join(f"{r[1]:.2f}" for r in rows)
        server = ", ".join(f"{r[2]:.2f}" for r in rows)
        print(f"{gap:>7g} ms  {medians:<28} {client:<22} {server}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
