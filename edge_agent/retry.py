"""Exponential backoff with jitter, for everything that reconnects (MQTT links, camera streams)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (0-based): min_s doubling up to max_s, times a random
    factor in [0.5, 1] so that many boxes reconnecting after one outage do not all knock at once."""
    return min(max_s, min_s * 2 ** min(attempt, 30)) * rng.uniform(0.5, 1.0)
