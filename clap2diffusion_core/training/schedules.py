"""Schedules as pure functions of the optimizer step, so a resumed run follows the same curve."""

from __future__ import annotations

import torch

from .temperature import TemperatureSchedule

__all__ = ["TemperatureSchedule", "build_lr_scheduler"]


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedules (``constant``, ``constant_with_warmup``, ``linear``, ``cosine``, ...),
    counted in optimizer steps (not micro-batches, not processes)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

