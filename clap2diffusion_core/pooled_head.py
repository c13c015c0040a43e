"""Pooled head: decomposed audio -> the pooled text vector of base models that take one (SDXL).

SDXL conditions on tokens ``[B, 77, 2048]`` (CLIP-L + CLIP-G hidden states) *and* a pooled vector
``[B, 1280]`` (CLIP-G's projected end token), which enters the UNet through the timestep embedding
and steers the whole image. A file made for such a family carries this head beside the projector;
SD1.5 files have none (their config has no ``pooled`` entry, their weights no ``pooled_head.*``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModuleConfig
from .types import AudioLevels


@dataclasses.dataclass(frozen=True)
class PooledHeadConfig(ModuleConfig):
    #: Width of the base model's pooled vector (SDXL: 1280, CLIP-G's projection).
    pooled_dim: int = 1280
    token_dim: int = 32
    num_tokens: int = 10
    hidden_dim: int = 512
    #: L2 norm of the output: the mean norm of the text encoder's pooled vectors the head was fitted
    #: on. Only the direction is learned (as for the tokens' ``norm_target``), so mixing the audio
    #: vector into a text one does not change its scale.
    norm_target: float = 1.0


class PooledHead(nn.Module):
    """:class:`AudioLevels` -> pooled vector ``[B, pooled_dim]`` of L2 norm ``norm_target``.

    Reads all ``K`` decomposer tokens (flattened, ``[B, K * D]``) and the adaptive level weights
    ``[B, 3]`` through a two-layer MLP, the way the text encoder's pooled vector summarises the whole
    caption. About 0.8M parameters with the defaults.

    ``operations``, ``dtype``, ``device``: as for :class:`~.projector.AudioProjector`.
    """

    def __init__(self, config: PooledHeadConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = nn) -> None:
        super().__init__()
        self.config = config
        width = config.num_tokens * config.token_dim + 3
        kw = {"dtype": dtype, "device": device}
        self.norm = operations.LayerNorm(width, **kw)
        self.mlp = nn.Sequential(
            operations.Linear(width, config.hidden_dim, **kw),
            nn.GELU(),
            operations.Linear(config.hidden_dim, config.pooled_dim, **kw),
        )

    def forward(self, levels: AudioLevels) -> torch.Tensor:
        """AudioLevels with tokens ``[B, K, D]`` -> ``[B, pooled_dim]``."""
        expected = (self.config.num_tokens, self.config.token_dim)
        if tuple(levels.tokens.shape[1:]) != expected:
            raise ValueError(f"expected tokens [B, {expected[0]}, {expected[1]}], got {tuple(levels.tokens.shape)}")
        x = torch.cat([levels.tokens.flatten(1), levels.level_weights], dim=-1)
        out = self.mlp(self.norm(x))
        return F.normalize(out, dim=-1) * self.config.norm_target
