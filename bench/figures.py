"""How the benchmarks print their figures: percentiles, best of the rounds, ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# -- reporting ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def best_line(name: str, rates: Sequence[float], unit: str = "deliveries/s") -> str:
    rounds = ", ".join(f"{r:,.0f}" for r in rates)
    return f"  {name:44s} {max(rates):8,.0f} {unit}   (rounds: {rounds})"


def round_ratios(ours: Sequence[float], baseline: Sequence[float]) -> str:
    """Each round's ratio and their median: the two sides of one round ran minutes
    apart at most, so this holds up better than best-of when the machine's speed drifts."""
    ratios = [a / b for a, b in zip(ours, baseline, strict=True)]
    listed = ", ".join(f"{r:.2f}" for r in ratios)
    return f"median of the rounds' ratios {statistics.median(ratios):.2f} ({listed})"
