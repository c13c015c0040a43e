"""Schedules as pure functions of the optimizer step, so a resumed run follows the same curve."""

from __future__ import annotations

import torch

from .temperature import TemperatureSchedule

__all__ = ["TemperatureSchedule", "build_lr_scheduler"]


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedules (``constant``, ``constant_with_warmup``, ``linear``, ``cosine``, ...),
    counted in optimizer steps (not micro-batches, not processes). ``cosine`` is
    :func:`.loop.cosine_with_warmup` (the same numbers), which the ComfyUI node uses without diffusers."""
    from diffusers.optimization import get_scheduler

    from .loop import cosine_with_warmup

    if name == "cosine":
        return cosine_with_warmup(optimizer, warmup_steps, total_steps)

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

