"""Random-weight CLAP2Diffusion files for tests and the demo (no trained weights exist here)."""

from __future__ import annotations

import os

import torch

from .checkpoint import save_checkpoint
from .decomposer import DecomposerConfig
from .model import BASE_FAMILIES, CLAP2DiffusionModel, ModelConfig
from .projector import ProjectorConfig


def random_model(
    context_dim: int = 768, stage: int = 1, seed: int = 0, adapter=None
) -> CLAP2DiffusionModel:
    """A CLAP2DiffusionModel with seeded random weights; ``adapter`` is an AdapterConfig for stage 2/3."""
    family = {v: k for k, v in BASE_FAMILIES.items()}.get(context_dim, "sd15")
    config = ModelConfig(
        base_family=family,
        stage=stage,
        decomposer=DecomposerConfig(),
        projector=ProjectorConfig(context_dim=context_dim),
        adapter=adapter,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLAP2DiffusionModel(config).eval()


def random_checkpoint(
    path: str | os.PathLike, context_dim: int = 768, stage: int = 1, seed: int = 0
) -> str:
    """Write a random stage-``stage`` file to ``path`` and return the path."""
    save_checkpoint(random_model(context_dim, stage, seed), path)
    return os.fspath(path)
