"""Seconds spent per named stage of a run."""

from __future__ import annotations

import time


class Timer:
    """Seconds spent per named stage: ``add(name, t0)`` counts the time since ``t0``; ``lap(name)`` the time
    since the previous ``add`` or ``lap``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.last = time.perf_counter()

    def add(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + t - t0
        self.last = t
        return t

    def lap(self, name: str) -> None:
        self.add(name, self.last)
