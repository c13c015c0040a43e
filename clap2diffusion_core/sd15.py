"""SD1.5-family UNets in diffusers for training and parity, loaded from the single file users have.

A ComfyUI user has ``v1-5-pruned-emaonly.safetensors`` (original LDM keys,
``model.diffusion_model.*``), not a diffusers folder, and nothing may be fetched from the hub here.
This module ships the diffusers ``UNet2DConditionModel`` configs (``configs/unet_sd15.json`` for
SD1.5, ``configs/unet_tiny.json`` for the tests' tiny UNet), infers which structure a checkpoint
has from its weight shapes, and maps the LDM keys onto diffusers' names with its own key map (the
same correspondence as ``comfy.utils.unet_to_diffusers``). Every weight must land: a missing,
left-over or wrongly shaped key is a :class:`~.checkpoint.CheckpointError` naming it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import CheckpointError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
UNET_PREFIX = "model.diffusion_model."
#: LDM ResBlock names -> diffusers ResnetBlock2D names.
_RESNET_RENAMES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)


def unet_config(name: str = "sd15") -> dict[str, Any]:
    """A shipped diffusers UNet config: ``"sd15"`` (860M) or ``"tiny"`` (the test checkpoint's 26M)."""
    path = CONFIG_DIR / f"unet_{name}.json"
    if not path.is_file():
        shipped = sorted(p.stem.removeprefix("unet_") for p in CONFIG_DIR.glob("unet_*.json"))
        raise ValueError(f"no UNet config {name!r}; shipped: {shipped}")
    return json.loads(path.read_text())


def build_unet(config: str | Mapping[str, Any] = "sd15", **overrides: Any) -> UNet2DConditionModel:
    """A randomly initialised diffusers UNet from a shipped config name or a config dict."""
    from diffusers import UNet2DConditionModel

    cfg = unet_config(config) if isinstance(config, str) else dict(config)
    cfg.update(overrides)
    return UNet2DConditionModel.from_config(cfg)


# ------------------------------------------------------------------------------------------------
# structure from shapes


def _indices(keys: list[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(ldm: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers config of an SD1.5-family LDM UNet state dict (keys without the prefix).

    Values may be tensors or anything with ``.shape``. Structure (levels, widths, res blocks,
    attention per level, middle block) comes from the shapes; the rest from SD1.5's config.
    Heads are not visible in weights: SD1.5-family UNets use 8 (``attention_head_dim`` 8).
    """
    keys = list(ldm)
    try:
        conv_in = ldm["input_blocks.0.0.weight"].shape
        conv_out = ldm["out.2.weight"].shape
    except KeyError as err:
        raise CheckpointError(f"not an LDM UNet: no {err.args[0]}") from err
    model_channels = conv_in[0]
    levels: list[dict[str, Any]] = [{"res": 0, "attn": [], "mult": None}]
    for n in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in ldm:
            levels.append({"res": 0, "attn": [], "mult": None})
            continue
        level = levels[-1]
        level["res"] += 1
        level["mult"] = ldm[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] // model_channels
        level["attn"].append(len(_indices(keys, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.")))
    res = {level["res"] for level in levels}
    if len(res) != 1:
        raise CheckpointError(f"UNet with {sorted(res)} res blocks per level: not an SD1.5-family UNet")
    layers_per_block = res.pop()
    out_attn = [len(_indices(keys, rf"output_blocks\.{n}\.1\.transformer_blocks\.(\d+)\."))
                for n in _indices(keys, r"output_blocks\.(\d+)\.")]
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    has_mid = "middle_block.0.in_layers.0.weight" in ldm
    context = {ldm[k].shape[1] for k in keys if k.endswith("attn2.to_k.weight")}
    proj_in = [ldm[k].shape for k in keys if k.endswith(".proj_in.weight")]
    depths = {d for level in levels for d in level["attn"] if d} | {d for d in out_attn if d}
    if has_mid and not mid_depth:
        raise CheckpointError("middle block without cross-attention: not an SD1.5-family UNet")
    if len(context) > 1 or len(depths) > 1:
        raise CheckpointError(f"mixed context sizes {context} or transformer depths {depths}")

    cfg = unet_config("sd15")
    per_up = layers_per_block + 1
    up_attn = [out_attn[i * per_up:(i + 1) * per_up] for i in range(len(levels))]
    cfg.update(
        in_channels=conv_in[1],
        out_channels=conv_out[0],
        block_out_channels=[model_channels * level["mult"] for level in levels],
        layers_per_block=layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if any(level["attn"]) else "DownBlock2D" for level in levels],
        up_block_types=["CrossAttnUpBlock2D" if any(a) else "UpBlock2D" for a in up_attn],
        mid_block_type="UNetMidBlock2DCrossAttn" if has_mid else None,
        transformer_layers_per_block=depths.pop() if depths else 1,
        use_linear_projection=bool(proj_in) and len(proj_in[0]) == 2,
    )
    if context:
        cfg["cross_attention_dim"] = context.pop()
    return cfg


# ------------------------------------------------------------------------------------------------
# key map


def ldm_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(ldm_prefix, diffusers_prefix, is_resnet)`` for every block of a UNet with ``config``."""
    per_block = config["layers_per_block"]
    n_levels = len(config["block_out_channels"])
    res = [per_block] * n_levels if isinstance(per_block, int) else list(per_block)
    pairs: list[tuple[str, str, bool]] = [
        ("time_embed.0.", "time_embedding.linear_1.", False),
        ("time_embed.2.", "time_embedding.linear_2.", False),
        ("input_blocks.0.0.", "conv_in.", False),
        ("out.0.", "conv_norm_out.", False),
        ("out.2.", "conv_out.", False),
    ]
    n = 1
    for level, kind in enumerate(config["down_block_types"]):
        for r in range(res[level]):
            pairs.append((f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{r}.", True))
            if kind.startswith("CrossAttn"):
                pairs.append((f"input_blocks.{n}.1.", f"down_blocks.{level}.attentions.{r}.", False))
            n += 1
        if level != n_levels - 1:
            pairs.append((f"input_blocks.{n}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", False))
            n += 1
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        pairs += [
            ("middle_block.0.", "mid_block.resnets.0.", True),
            ("middle_block.1.", "mid_block.attentions.0.", False),
            ("middle_block.2.", "mid_block.resnets.1.", True),
        ]
    n = 0
    for up, kind in enumerate(config["up_block_types"]):
        level = n_levels - 1 - up
        for r in range(res[level] + 1):
            pairs.append((f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{r}.", True))
            sub = 1
            if kind.startswith("CrossAttn"):
                pairs.append((f"output_blocks.{n}.1.", f"up_blocks.{up}.attentions.{r}.", False))
                sub = 2
            if r == res[level] and up != n_levels - 1:
                pairs.append((f"output_blocks.{n}.{sub}.conv.", f"up_blocks.{up}.upsamplers.0.conv.", False))
            n += 1
    return pairs


def ldm_to_diffusers(ldm: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an LDM UNet state dict (no prefix) to diffusers keys; unknown keys are an error."""
    # Longest prefix first: "output_blocks.1.1." must not be taken for "output_blocks.1." .
    pairs = sorted(ldm_prefix_map(config), key=lambda p: len(p[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in ldm.items():
        for ldm_prefix, diffusers_prefix, is_resnet in pairs:
            if key.startswith(ldm_prefix):
                rest = key[len(ldm_prefix):]
                if is_resnet:
                    for old, new in _RESNET_RENAMES:
                        if rest.startswith(old):
                            rest = new + rest[len(old):]
                            break
                out[diffusers_prefix + rest] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"UNet weights with no place in the diffusers UNet: {_some(unmapped)}")
    return out


def _some(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------------
# loading


def read_ldm_unet(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``model.diffusion_model.*`` tensors of a single-file checkpoint, prefix removed.

    Reads only those tensors from a .safetensors file (not the text encoder or VAE); a pickled
    .ckpt is opened with ``torch.load(weights_only=True)``, which cannot run code.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            names = [k for k in f.keys() if k.startswith(UNET_PREFIX)]  # noqa: SIM118
            sd = {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in names}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        sd = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not sd:
        raise CheckpointError(f"{path}: no {UNET_PREFIX}* weights; is this a full SD1.5 checkpoint?")
    return sd


def load_unet(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    config: str | Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> UNet2DConditionModel:
    """A diffusers UNet with the weights of a single-file LDM checkpoint (a path, or its UNet state
    dict without ``model.diffusion_model.``), offline. ``config`` defaults to the inferred one."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    ldm = read_ldm_unet(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    cfg = infer_unet_config(ldm) if config is None else (
        unet_config(config) if isinstance(config, str) else dict(config))
    state = {k: v.to(dtype) for k, v in ldm_to_diffusers(ldm, cfg).items()}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(copy.deepcopy(cfg))
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    wrong = [f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}"
             for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        lines = ["the checkpoint's UNet does not fit the diffusers config"]
        for title, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title}: {_some(items)}")
        raise CheckpointError("\n".join(lines))
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval()
