"""Small statistics helpers shared by the benchmark and its worker-side tasks."""

from __future__ import annotations

import statistics


def percentile(sorted_samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already sorted samples."""
    if not sorted_samples:
        return float("nan")
    pos = (len(sorted_samples) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """n, median, p90, p99 and mean of samples (in whatever unit they come)."""
    ordered = sorted(samples_ms)
    return {
        "n": float(len(ordered)),
        "median": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "mean": statistics.fmean(ordered) if ordered else float("nan"),
    }
