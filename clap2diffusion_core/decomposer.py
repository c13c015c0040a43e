"""Hierarchical decomposition: one CLAP embedding -> K tokens softly assigned to three levels."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .config import ModuleConfig
from .levels import LEVEL_PRIOR, NUM_LEVELS
from .projector import cast_like
from .types import AudioLevels


@dataclasses.dataclass(frozen=True)
class DecomposerConfig(ModuleConfig):
    clap_dim: int = 512
    num_tokens: int = 10
    token_dim: int = 32
    hidden_dim: int = 256
    level_prior: tuple[float, ...] = LEVEL_PRIOR
    #: Temperature used at inference; training anneals from 2.0 down to this value.
    temperature: float = 0.5


class HierarchicalDecomposer(nn.Module):
    """CLAP ``[B, clap_dim]`` -> :class:`AudioLevels` with ``K = num_tokens`` tokens.

    Each token is assigned to foreground / background / ambience by a softmax over its level logits
    divided by a temperature (high: spread, low: sharp). The log of the 5:3:2 prior is added to the
    logits, so an untrained decomposer already splits the tokens by the prior. A per-sample gate
    weighs the levels, so a thunderclap can lean on the foreground and a rainy street on the
    background. About 0.3M parameters with the defaults.

    ``operations``, ``dtype``, ``device``: as for :class:`~.projector.AudioProjector`.
    """

    def __init__(self, config: DecomposerConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = nn) -> None:
        super().__init__()
        self.config = config
        k, d = config.num_tokens, config.token_dim
        ops, kw = operations, {"dtype": dtype, "device": device}
        self.token_proj = ops.Linear(config.clap_dim, k * d, **kw)
        self.token_pos = nn.Parameter(torch.randn(k, d, **kw) * 0.02)
        self.assign_head = nn.Sequential(ops.LayerNorm(d, **kw), ops.Linear(d, NUM_LEVELS, **kw))
        self.level_gate = nn.Sequential(
            ops.Linear(config.clap_dim, config.hidden_dim, **kw),
            nn.GELU(),
            ops.Linear(config.hidden_dim, NUM_LEVELS, **kw),
        )
        log_prior = torch.tensor(
            [math.log(p / sum(config.level_prior)) for p in config.level_prior]
        )
        self.register_buffer("log_prior", log_prior, persistent=False)

    def forward(
        self, clap_embeds: torch.Tensor, temperature: float | None = None
    ) -> AudioLevels:
        """``clap_embeds [B, clap_dim]`` -> AudioLevels(tokens ``[B, K, D]``, assignment ``[B, K, 3]``)."""
        if clap_embeds.ndim != 2 or clap_embeds.shape[1] != self.config.clap_dim:
            raise ValueError(
                f"expected CLAP embeddings [B, {self.config.clap_dim}], got {tuple(clap_embeds.shape)}"
            )
        temperature = (
            self.config.temperature if temperature is None else float(temperature)
        )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        b = clap_embeds.shape[0]
        tokens = self.token_proj(clap_embeds).view(
            b, self.config.num_tokens, self.config.token_dim
        )
        tokens = tokens + cast_like(self.token_pos, tokens)
        log_prior = cast_like(self.log_prior, tokens)
        logits = self.assign_head(tokens) + log_prior
        assignment = torch.softmax(logits / temperature, dim=-1)
        level_weights = torch.softmax(
            self.level_gate(clap_embeds) + log_prior, dim=-1
        )
        return AudioLevels(
            tokens=tokens,
            assignment=assignment,
            level_weights=level_weights,
            level_scale=torch.ones(NUM_LEVELS),
            temperature=temperature,
        )
