"""Random-weight CLAP2Diffusion files for tests and the demo (no trained weights exist here)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .adapters import SD15_LAYERS, AdapterConfig, AdapterLayer, ldm_unet_layout
from .checkpoint import save_checkpoint
from .decomposer import DecomposerConfig
from .model import BASE_FAMILIES, CLAP2DiffusionModel, ModelConfig
from .projector import ProjectorConfig
from .unet_configs import TINY_SD15_UNET_CONFIG, layout_args

#: The cross-attention layers of the tests' tiny SD1.5 UNet (input.1, middle, output.0/1).
TINY_SD15_LAYERS = ldm_unet_layout(**layout_args(TINY_SD15_UNET_CONFIG))
UNET_LAYOUTS: dict[str, tuple[AdapterLayer, ...]] = {"sd15": SD15_LAYERS, "tiny": TINY_SD15_LAYERS}


def adapter_config(layout: str | Sequence[AdapterLayer] = "sd15", context_dim: int = 768) -> AdapterConfig:
    """The AdapterConfig for a named layout (``"sd15"``, ``"tiny"``) or a list of layers."""
    layers = UNET_LAYOUTS[layout] if isinstance(layout, str) else layout
    return AdapterConfig.for_layers(layers, context_dim)


def random_model(
    context_dim: int = 768,
    stage: int = 1,
    seed: int = 0,
    adapter: AdapterConfig | None = None,
    layout: str | Sequence[AdapterLayer] = "sd15",
    gates: tuple[float, float] | None = (0.5, 1.0),
) -> CLAP2DiffusionModel:
    """A CLAP2DiffusionModel with seeded random weights.

    Stage 2/3 models get an adapter: ``adapter`` if given, else one for ``layout``. Its gates are
    drawn uniformly from ``gates`` (``tanh`` 0.46 to 0.76), not left at the trained-from-zero
    initial 0, so audio visibly changes images in tests; ``gates=None`` keeps them closed.
    """
    family = {v: k for k, v in BASE_FAMILIES.items()}.get(context_dim, "sd15")
    if adapter is None and stage >= 2:
        adapter = adapter_config(layout, context_dim)
    config = ModelConfig(
        base_family=family,
        stage=stage,
        decomposer=DecomposerConfig(),
        projector=ProjectorConfig(context_dim=context_dim),
        adapter=adapter,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLAP2DiffusionModel(config).eval()
        if model.adapter is not None and gates is not None:
            low, high = gates
            with torch.no_grad():
                for layer in model.adapter.layers:
                    layer.gate.fill_(low + (high - low) * float(torch.rand(())))
    return model


def random_checkpoint(
    path: str | os.PathLike,
    context_dim: int = 768,
    stage: int = 1,
    seed: int = 0,
    layout: str | Sequence[AdapterLayer] = "sd15",
) -> str:
    """Write a random stage-``stage`` file to ``path`` and return the path (stage 2/3: with an
    adapter for ``layout``, gates open)."""
    save_checkpoint(random_model(context_dim, stage, seed, layout=layout), path)
    return os.fspath(path)
