"""What flows between the pipeline's steps (and between the ComfyUI nodes)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .levels import NUM_LEVELS

if TYPE_CHECKING:
    from .model import CLAP2DiffusionModel


@dataclass(frozen=True)
class AudioLevels:
    """A sound decomposed into K tokens softly assigned to foreground / background / ambience.

    Attributes:
        tokens: ``[B, K, D]`` decomposer tokens.
        assignment: ``[B, K, 3]`` soft assignment of each token to the levels; rows sum to 1.
        level_weights: ``[B, 3]`` adaptive per-sample importance of each level; rows sum to 1.
        level_scale: ``[3]`` the user's per-level multipliers (1 = as the model decided).
        temperature: the softmax temperature the assignment was made with.
    """

    tokens: torch.Tensor
    assignment: torch.Tensor
    level_weights: torch.Tensor
    level_scale: torch.Tensor
    temperature: float

    def with_level_scale(
        self, foreground: float, background: float, ambience: float
    ) -> AudioLevels:
        scale = torch.tensor([foreground, background, ambience], dtype=torch.float32)
        return replace(self, level_scale=scale)

    def level_usage(self) -> torch.Tensor:
        """``[B, 3]`` share of the K tokens assigned to each level."""
        return self.assignment.mean(dim=1)


@dataclass(frozen=True)
class AudioTokens:
    """Audio as cross-attention tokens, ready for either injection.

    Attributes:
        tokens: ``[B, N, C]`` projected audio tokens (N = 77), mean token norm = the model's norm_target.
        token_levels: ``[N]`` long, the level (0 fg, 1 bg, 2 ambience) each token carries.
        uncond: ``[1, N, C]`` the tokens of silence (a zero CLAP embedding), for unconditional rows.
        model: the CLAP2Diffusion model that made them; the model injection takes its adapter.
    """

    tokens: torch.Tensor
    token_levels: torch.Tensor
    uncond: torch.Tensor
    model: CLAP2DiffusionModel

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.uncond.shape[1:] != self.tokens.shape[1:]:
            raise ValueError(
                f"audio tokens {tuple(self.tokens.shape)} / uncond {tuple(self.uncond.shape)}"
            )
        if (
            self.token_levels.shape != (self.tokens.shape[1],)
            or int(self.token_levels.max()) >= NUM_LEVELS
        ):
            raise ValueError(
                f"token_levels {tuple(self.token_levels.shape)} does not match the tokens"
            )

    @property
    def context_dim(self) -> int:
        return self.tokens.shape[-1]
