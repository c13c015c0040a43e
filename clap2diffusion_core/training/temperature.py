"""The soft-assignment temperature schedule (torch-free: the node's text fit uses it too)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TemperatureSchedule:
    """Soft-assignment temperature: held at ``start`` for ``warmup_steps``, then cosine down to
    ``end`` at ``anneal_steps``, then ``end``.

    Steps are counted across stages: CLAP2Diffusion anneals over 5,000 steps, stage 1 (3,000) and
    stage 2 (2,000) together, so stage ``n`` evaluates ``schedule(offset + step)`` with ``offset`` the
    steps of the stages before it. Stage 3 starts past the end and stays at 0.5.
    """

    start: float = 2.0
    end: float = 0.5
    warmup_steps: int = 200
    anneal_steps: int = 5000
    offset: int = 0

    def __call__(self, step: int) -> float:
        step += self.offset
        if step < self.warmup_steps:
            return self.start
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.anneal_steps - self.warmup_steps))
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))
