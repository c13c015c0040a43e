"""CLAP2DiffusionModel: the trained audio modules of one checkpoint file, and their config."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .decomposer import DecomposerConfig, HierarchicalDecomposer
from .projector import AudioProjector, ProjectorConfig
from .types import AudioLevels, AudioTokens

#: Base model families a file can be made for, with the context size of their cross-attention.
BASE_FAMILIES: dict[str, int] = {"sd15": 768, "sd2": 1024, "sdxl": 2048}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the modules of a file. Stage 1 has no adapter."""

    base_family: str = "sd15"
    stage: int = 1
    decomposer: DecomposerConfig = dataclasses.field(default_factory=DecomposerConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    #: ``clap2diffusion_core.adapters.AdapterConfig`` for stage 2/3 files, else None.
    adapter: Any = None

    def __post_init__(self) -> None:
        if self.decomposer.token_dim != self.projector.token_dim:
            raise ValueError("decomposer and projector token_dim differ")
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")

    @property
    def context_dim(self) -> int:
        return self.projector.context_dim

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_family": self.base_family,
            "stage": self.stage,
            "decomposer": self.decomposer.to_dict(),
            "projector": self.projector.to_dict(),
            "adapter": None if self.adapter is None else self.adapter.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        adapter = data.get("adapter")
        if adapter is not None:
            from .adapters import AdapterConfig

            adapter = AdapterConfig.from_dict(adapter)
        return cls(
            base_family=data["base_family"],
            stage=int(data["stage"]),
            decomposer=DecomposerConfig.from_dict(data["decomposer"]),
            projector=ProjectorConfig.from_dict(data["projector"]),
            adapter=adapter,
        )


class CLAP2DiffusionModel(nn.Module):
    """Decomposer + projector (+ the gated audio cross-attention adapter after stage 2).

    ``encode`` turns CLAP embeddings into :class:`AudioLevels`, ``project`` turns those into
    :class:`AudioTokens` carrying the tokens of silence for unconditional rows.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.decomposer = HierarchicalDecomposer(config.decomposer)
        self.projector = AudioProjector(config.projector)
        self.adapter: nn.Module | None = None
        if config.adapter is not None:
            from .adapters import AudioAdapter

            self.adapter = AudioAdapter(config.adapter)

    @property
    def device(self) -> torch.device:
        return self.projector.queries.device

    @torch.no_grad()
    def encode(
        self, clap_embeds: torch.Tensor, temperature: float | None = None
    ) -> AudioLevels:
        """``clap_embeds [B, clap_dim]`` -> AudioLevels (inference: no grad)."""
        return self.decomposer(clap_embeds.to(self.device, torch.float32), temperature)

    @torch.no_grad()
    def silence_tokens(self) -> torch.Tensor:
        """``[1, N, C]`` tokens of a zero CLAP embedding: what unconditional rows attend to."""
        zeros = torch.zeros(1, self.config.decomposer.clap_dim, device=self.device)
        return self.projector(self.decomposer(zeros))

    @torch.no_grad()
    def project(self, levels: AudioLevels) -> AudioTokens:
        """AudioLevels -> AudioTokens ``[B, N, C]`` (with the silence tokens, computed once here)."""
        return AudioTokens(
            tokens=self.projector(levels),
            token_levels=self.projector.token_levels.clone(),
            uncond=self.silence_tokens(),
            model=self,
        )
