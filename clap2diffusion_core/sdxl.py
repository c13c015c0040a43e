"""SDXL-family UNets and text encoders in diffusers / transformers, from the single file users have.

The training counterpart of :mod:`.sd15` for SDXL UNets (and their distilled relatives, Segmind
Vega and SSD-1B: fewer levels, other transformer depths and middle blocks): the diffusers config is
read off the checkpoint's weight shapes, the weights are renamed by diffusers' own single-file
converter, and every weight must land. Besides the text states ``[B, 77, 2048]`` the UNet takes
CLIP-G's pooled vector ``[B, 1280]`` and the size/crop ids (``added_cond_kwargs``); the text
encoders are :mod:`.training.sdxl_text`'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .errors import CheckpointError
from .sd15 import UNET_PREFIX, read_ldm_unet

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

CLIP_G_PREFIX = "conditioner.embedders.1.model."
#: SDXL's latent scale (its VAE's ``scaling_factor``; ComfyUI's SDXL latent format).
SDXL_LATENT_SCALE = 0.13025
#: SDXL attention heads are 64 channels wide.
HEAD_CHANNELS = 64


def is_sdxl_unet(ldm: Mapping[str, Any]) -> bool:
    """An SDXL-family LDM UNet (keys without ``model.diffusion_model.``): the size/crop embedding
    (``label_emb``) and 2048-wide cross-attention."""
    context = {ldm[k].shape[1] for k in ldm if k.endswith("attn2.to_k.weight")}
    return "label_emb.0.0.weight" in ldm and context == {2048}


def _indices(keys: list[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_sdxl_config(ldm: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of an SDXL-family LDM UNet, from its shapes."""
    keys = list(ldm)
    if not is_sdxl_unet(ldm):
        raise CheckpointError("not an SDXL-family UNet (no label_emb, or cross-attention not 2048 wide)")
    model_channels = ldm["input_blocks.0.0.weight"].shape[0]
    levels: list[dict[str, Any]] = [{"res": 0, "depth": 0, "mult": 1}]
    for n in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in ldm:
            levels.append({"res": 0, "depth": 0, "mult": levels[-1]["mult"]})
            continue
        level = levels[-1]
        level["res"] += 1
        level["mult"] = ldm[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] // model_channels
        level["depth"] = max(level["depth"], len(_indices(keys, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.")))
    res = {level["res"] for level in levels}
    if len(res) != 1:
        raise CheckpointError(f"SDXL UNet with {sorted(res)} res blocks per level: not understood")
    channels = [model_channels * level["mult"] for level in levels]
    depths = [level["depth"] for level in levels]
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth:
        mid_type = "UNetMidBlock2DCrossAttn"
    elif "middle_block.0.in_layers.0.weight" in ldm:
        mid_type = "UNetMidBlock2D"  # Segmind Vega: one ResBlock, no attention
    else:
        mid_type = None
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128,
        "in_channels": ldm["input_blocks.0.0.weight"].shape[1],
        "out_channels": ldm["out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "mid_block_type": mid_type,
        "block_out_channels": channels,
        "layers_per_block": res.pop(),
        # diffusers reads the last level's depth for the middle block too (SDXL: 10 and 10).
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        "attention_head_dim": [c // HEAD_CHANNELS for c in channels],
        "cross_attention_dim": 2048,
        "use_linear_projection": all(ldm[k].ndim == 2 for k in keys if k.endswith(".proj_in.weight")),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": ldm["label_emb.0.0.weight"].shape[1],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "center_input_sample": False,
        "upcast_attention": False,
    }


def load_sdxl_unet(
    source: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    """A diffusers UNet with the weights of a single-file SDXL-family checkpoint (a path, or its
    UNet state dict without ``model.diffusion_model.``), offline; every weight must land."""
    import copy

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = read_ldm_unet(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    config = infer_sdxl_config(ldm)
    state = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, config)
    state = {k: v.to(dtype) for k, v in state.items()}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(copy.deepcopy(config))
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    wrong = [k for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise CheckpointError(f"the checkpoint's SDXL UNet does not fit the inferred diffusers config: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}")
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval()


def time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """``[B, 6]`` SDXL size/crop ids for an uncropped ``height x width`` image (ComfyUI's default)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1)


def checkpoint_family(checkpoint: str | os.PathLike) -> str:
    """``"sdxl"`` for an SDXL-family single file, else ``"sd15"`` (what :mod:`.sd15` loads)."""
    from safetensors import safe_open

    path = os.fspath(checkpoint)
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
        return "sdxl" if UNET_PREFIX + "label_emb.0.0.weight" in keys and any(
            k.startswith(CLIP_G_PREFIX) for k in keys) else "sd15"
    return "sdxl" if is_sdxl_unet(read_ldm_unet(path)) else "sd15"
