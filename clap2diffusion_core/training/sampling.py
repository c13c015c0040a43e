"""Data order and per-step randomness as pure functions of (seed, position): what makes a resumed
run draw the same batches and noise as an uninterrupted one. Torch only, so the ComfyUI node's text
fit can use it without the training stack (accelerate, diffusers)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StreamBatchSampler(torch.utils.data.Sampler[list[int]]):
    """An endless stream of batches: epoch ``e`` is a permutation of the data seeded by
    ``(seed, e)``; global batch ``g`` is positions ``[g * B * P, (g + 1) * B * P)`` of the stream and
    process ``p`` takes its ``p``-th slice of ``B``. Starting at global batch ``start`` is O(1), which is
    how a resumed run picks up exactly where the interrupted one was."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        position = (self.start * self.world + self.rank) * self.batch_size
        epoch, order = -1, None
        while True:
            batch = []
            for p in range(position, position + self.batch_size):
                if p // self.size != epoch:
                    epoch = p // self.size
                    order = self._order(epoch)
                batch.append(int(order[p % self.size]))
            yield batch
            position += self.world * self.batch_size


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-batch's randomness (independent of anything run before)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 257 + rank)
