"""Batch-wide statistics under several processes, so N processes train like one with the global batch.

A loss that is a mean over rows needs nothing: DDP averages the processes' gradients, which is the
gradient of the mean over the global batch. A loss that couples rows does: InfoNCE (every other row
is a negative) and the level prior (a KL of the batch's mean usage). Those gather the rows of every
process with :func:`gather_rows` and compute the loss over the global batch in each process.

The gradient: each process computes the same global loss ``L``, but autograd reaches only its own
rows. :class:`_GatherRows`' backward sums the gathered gradient over the processes (all-reduce) and
keeps the local slice, so process ``p`` holds ``W * dL/dx_p``; DDP's average over the ``W``
processes then leaves exactly ``dL/dx_p`` on each process's rows, the one-process gradient.
(``torch.distributed.nn.all_gather`` does the same but needs all-to-all, which gloo lacks.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.rows = rank, local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """``local [b, ...]`` -> ``[W * b, ...]``: every process's rows in rank order, differentiable
    (see the module docstring); ``local`` itself in one process. Every process must pass the same
    ``b``."""
    if world_size() == 1:
        return local
    if local.requires_grad:
        return _GatherRows.apply(local)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)
