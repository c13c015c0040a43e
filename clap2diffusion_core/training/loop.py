"""The optimizer-step loop every training run goes through: the command line's stages and
distillation (:func:`.trainer.train_stage`, accelerate outside) and the ComfyUI node "Distil Audio
Adapter" (plain torch, ComfyUI's own UNet). Torch only: the node's lean install has no accelerate,
diffusers or yaml.

One step: ``accumulation`` micro-batches, each drawn from the data stream (``batches``) with its
randomness from :func:`.sampling.step_generator` (``(seed, step, micro, 0)``, drawn for the global
batch and sliced by ``part``), forward, backward (the backend divides by the accumulation), then
clip, optimizer step, LR step. Nothing else is stateful, so a run resumed at step ``k`` (model,
optimizer and LR scheduler restored, the stream restarted at ``k``) makes the same updates as one
that never stopped.

The backend is accelerate's ``Accelerator`` on the command line (several processes, mixed
precision) or :class:`PlainBackend` (one process, what the ``Accelerator`` does there).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .sampling import StreamBatchSampler, step_generator

#: ``(step, sums, stats, temperature)`` after every optimizer step: ``sums`` the step's mean loss and
#: terms (tensors) and ``grad_norm`` when clipped; ``stats`` the last micro-batch's statistics.
StepCallback = Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor], float], None]


class Backend(Protocol):
    """What the loop needs of accelerate's ``Accelerator`` (which has all of it)."""

    sync_gradients: bool

    def accumulate(self, module: torch.nn.Module) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor: ...


class PlainBackend:
    """One process, no mixed precision: the ``Accelerator``'s behaviour in that case, in torch."""

    def __init__(self, accumulation: int = 1) -> None:
        self.accumulation = accumulation
        self.micro = 0
        self.sync_gradients = True

    @contextlib.contextmanager
    def accumulate(self, module: torch.nn.Module) -> Iterator[None]:
        self.micro += 1
        self.sync_gradients = self.micro % self.accumulation == 0
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


@dataclass
class Progress:
    """The optimizer step (saved with every checkpoint; accelerate's ``register_for_checkpointing``)."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def batch_stream(dataset: torch.utils.data.Dataset, batch_size: int, seed: int, part: tuple[int, int] = (0, 1),
                 start: int = 0, num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """The endless, seeded stream of collated batches from micro-batch ``start`` on (see
    :class:`.sampling.StreamBatchSampler`)."""
    sampler = StreamBatchSampler(len(dataset), batch_size, seed, part[0], part[1], start=start)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                            pin_memory=pin_memory))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then half a cosine to 0: diffusers' ``cosine`` schedule (the same numbers), in torch."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(
    module: torch.nn.Module,
    unwrapped: torch.nn.Module,
    batches: Iterator[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: Progress,
    stop: int,
    *,
    seed: int,
    accumulation: int,
    max_grad_norm: float,
    temperature: Callable[[int], float],
    backend: Backend,
    device: torch.device,
    part: tuple[int, int] = (0, 1),
    on_step: StepCallback | None = None,
    before_step: Callable[[int], None] | None = None,
) -> None:
    """Optimizer steps from ``state.step`` until ``stop`` (see the module docstring).

    ``module`` is what runs forward (DDP-wrapped on several processes), ``unwrapped`` the module
    itself (its ``draw``); ``before_step(step)`` runs first in every step (the node checks Cancel
    there, so an interruption always leaves a whole step behind it).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    rank, world = part
    while state.step < stop:
        if before_step is not None:
            before_step(state.step)
        t = temperature(state.step)
        sums: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for micro in range(accumulation):
            batch = next(batches)
            # Drawn for the global batch from one generator, then sliced: N processes == 1 process.
            batch.update(unwrapped.draw(batch, step_generator(seed, state.step, micro, 0), (rank, world)))
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with backend.accumulate(module):
                loss, terms, stats = module(batch, t)
                backend.backward(loss)
                if backend.sync_gradients:
                    if max_grad_norm > 0:
                        sums["grad_norm"] = backend.clip_grad_norm_(params, max_grad_norm).detach()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss, **terms}.items():
                sums[key] = sums.get(key, 0.0) + value.detach() / accumulation
        if not backend.sync_gradients:
            raise RuntimeError("gradient accumulation out of step with the optimizer step")
        lr_scheduler.step()
        state.step += 1
        if on_step is not None:
            on_step(state.step, sums, stats, t)


def fixed_batches(data: torch.utils.data.Dataset, rows: range, seed: int, batch_size: int,
                  draw: Callable[..., dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches with their randomness drawn once (``draw(batch, generator, evaluation=True)``
    seeded by ``seed + first row``): the same examples, noise and timesteps at every evaluation."""
    out = []
    for start in range(rows.start, rows.stop, batch_size):
        items = [data[i] for i in range(start, min(rows.stop, start + batch_size))]
        batch = {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}
        batch.update(draw(batch, torch.Generator().manual_seed(seed + start), evaluation=True))
        out.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
    return out


@torch.no_grad()
def evaluate_batches(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]], temperature: float,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                     ) -> dict[str, float]:
    """The row-weighted mean of the loss and each term over ``batches``, in eval mode."""
    was_training = module.training
    module.eval()
    sums, rows = {}, 0
    try:
        for batch in batches:
            with autocast():
                loss, terms, _ = module(batch, temperature)
            n = next(iter(batch.values())).shape[0]
            for k, v in ({"loss": loss} | terms).items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            rows += n
    finally:
        module.train(was_training)
    return {k: v / rows for k, v in sums.items()}


__all__ = ["Backend", "PlainBackend", "Progress", "batch_stream", "cosine_with_warmup", "evaluate_batches", "fixed_batches",
           "train_steps"]
