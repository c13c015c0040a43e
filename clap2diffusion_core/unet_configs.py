"""The LDM UNet configurations the pack builds or lays adapters out for: their one home.

Keyword arguments of ComfyUI's ``UNetModel`` (``comfy.ldm.modules.diffusionmodules.openaimodel``),
which are also the keys of ComfyUI's ``unet_config``; plain data, so the core stays free of
ComfyUI. The adapters' layer lists (``adapters.SD15_LAYERS``, ``testing.TINY_SD15_LAYERS``), the
test-model builder (tools/test_models.py) and the timing tools all read them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

#: SD1.5 (ComfyUI's ``supported_models.SD15``): 4 levels, 16 cross-attention layers, 860M parameters.
SD15_UNET_CONFIG: Mapping[str, Any] = MappingProxyType({
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": (2, 2, 2, 2),
    "channel_mult": (1, 2, 4, 4),
    "transformer_depth": (1, 1, 1, 1, 1, 1, 0, 0),
    "transformer_depth_output": (1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
})

#: The tests' tiny SD1.5 UNet: SD1.5's width, heads and context size on a single level with one res
#: block and a middle block (4 cross-attention layers: input.1, middle, output.0/1; 25.8M
#: parameters). ComfyUI's detector keys on context_dim / model_channels / linear-in-transformer, so
#: CheckpointLoaderSimple still takes it for SD15.
TINY_SD15_UNET_CONFIG: Mapping[str, Any] = MappingProxyType({
    **SD15_UNET_CONFIG,
    "num_res_blocks": (1,),
    "channel_mult": (1,),
    "transformer_depth": (1,),
    "transformer_depth_output": (1, 1),
})

#: Segmind Vega (ComfyUI's ``supported_models.Segmind_Vega``): the smallest SDXL-family UNet that
#: ComfyUI 0.3.75 detects (its detector keys on model_channels 320, linear-in-transformer, context
#: 2048, adm 2816 and the input depths [0, 0, 1, 1, 2, 2]); 3 levels, no middle block, 10
#: cross-attention layers on 640/1280 channels, 745M parameters. The tests' SDXL checkpoint uses it.
SEGMIND_VEGA_UNET_CONFIG: Mapping[str, Any] = MappingProxyType({
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": (2, 2, 2),
    "channel_mult": (1, 2, 4),
    "transformer_depth": (0, 0, 1, 1, 2, 2),
    "transformer_depth_output": (0, 0, 0, 1, 1, 1, 2, 2, 2),
    "transformer_depth_middle": -1,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "num_heads": -1,
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "legacy": False,
})

#: SDXL base (ComfyUI's ``supported_models.SDXL``): Vega's layout with 2 / 10 transformer blocks per
#: level and a 10-deep middle block (70 cross-attention layers, 2.6B parameters). The FLOP count only.
SDXL_UNET_CONFIG: Mapping[str, Any] = MappingProxyType({
    **SEGMIND_VEGA_UNET_CONFIG,
    "transformer_depth": (0, 0, 2, 2, 10, 10),
    "transformer_depth_output": (0, 0, 0, 2, 2, 2, 10, 10, 10),
    "transformer_depth_middle": 10,
})

#: What ``adapters.ldm_unet_layout`` reads of a config.
LAYOUT_KEYS = ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "transformer_depth_output",
               "transformer_depth_middle", "num_heads", "num_head_channels")


def layout_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``adapters.ldm_unet_layout`` takes, from a UNet config."""
    return {key: config[key] for key in LAYOUT_KEYS}


def unet_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """A mutable copy for ``UNetModel(**unet_kwargs(config), operations=...)`` (lists, as ComfyUI passes them)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
