"""Gated audio cross-attention for every UNet cross-attention layer (stage 2/3), and level routing.

SonicDiffusion-style decoupled cross-attention: each cross-attention layer of the UNet keeps its
text attention and gains an audio one that *shares its query*,

    out = to_out( attn(q, k_text, v_text) + attn(q, k_audio, v_audio * w) ),
    w[token] = tanh(gate) * strength * route[layer, level(token)] * level_weight[level(token)],

with ``k_audio = to_k(audio_tokens)`` and ``v_audio = to_v(audio_tokens)`` per layer (context_dim ->
inner_dim, no bias). The query is the one the layer already computes (``attn2.to_q``), so a LoRA on
``to_q`` shapes where the image looks for sound as it shapes where it looks for text, and the adapter
adds only keys and values. The gate is a zero-initialised scalar per layer: a fresh adapter leaves
the UNet exactly as it was, and training opens it.

Level routing: the 77 audio tokens each carry one level (``AudioTokens.token_levels``). Each layer
holds three logits over the levels; ``route = 3 * softmax(logits)`` (so an even split weighs every
token 1) scales the tokens' values. Initialised so that ambience leans to the first layers (input
blocks), background to the middle and foreground to the last (output blocks), as in CLAP2Diffusion.

Scaling the values (not the keys) by ``w`` is the same as scaling each token's contribution to the
output after the softmax, so a level weight of 0 removes that level's content while its keys still
shape the attention pattern, exactly as a gate of 0 removes the whole audio term. Because ``w`` is
a per-token constant for a given sound and strength, it is folded into the values once, together
with the gate (see :mod:`clap2diffusion_core.audio_attention`).

Layers are keyed in one canonical order: ComfyUI's execution order of the UNet's cross-attention
layers, ``(block, number, transformer_index)`` as ``set_model_attn2_replace`` takes them, with the
diffusers module name of each. :class:`AdapterConfig` records the layout a file was made for, so a
file applied to a UNet of another layout fails with a :class:`~.checkpoint.CheckpointError` that
names what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import ModuleConfig
from .errors import CheckpointError
from .levels import LEVELS, NUM_LEVELS
from .unet_configs import SD15_UNET_CONFIG, layout_args

#: ComfyUI block names in execution order.
BLOCK_ORDER = ("input", "middle", "output")
#: Sharpness of the initial routing: with 4, the preferred level of the first / last layer takes
#: about 72% of the softmax, the middle layer's about 58%.
ROUTE_INIT_SHARPNESS = 4.0
#: Where along the UNet (0 first layer, 1 last layer) each level is routed at initialisation.
ROUTE_INIT_CENTRES = {"foreground": 1.0, "background": 0.5, "ambience": 0.0}


class AdapterLayer(NamedTuple):
    """One cross-attention layer of the UNet the adapter is made for.

    ``key`` is ComfyUI's ``(block, number, transformer_index)``, e.g. ``("input", 1, 0)``; the
    diffusers name is the ``attn2`` module of ``UNet2DConditionModel``; ``inner_dim = heads * dim_head``.
    """

    key: tuple[str, int, int]
    diffusers_name: str
    inner_dim: int
    heads: int

    @property
    def key_str(self) -> str:
        return format_key(self.key)

    @property
    def dim_head(self) -> int:
        return self.inner_dim // self.heads


def format_key(key: tuple[str, int, int]) -> str:
    """``("input", 1, 0)`` -> ``"input.1.0"`` (how keys are stored in checkpoint metadata)."""
    return ".".join(str(part) for part in key)


def parse_key(text: str) -> tuple[str, int, int]:
    block, number, index = text.split(".")
    if block not in BLOCK_ORDER:
        raise ValueError(f"layer key {text!r}: block must be one of {BLOCK_ORDER}")
    return block, int(number), int(index)


def canonical_order(key: tuple[str, int, int]) -> tuple[int, int, int]:
    """Sort key for ComfyUI's execution order: input blocks, the middle block, output blocks."""
    return BLOCK_ORDER.index(key[0]), key[1], key[2]


def ldm_unet_layout(
    *,
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int | Sequence[int],
    transformer_depth: Sequence[int],
    transformer_depth_output: Sequence[int],
    transformer_depth_middle: int | None,
    num_heads: int = -1,
    num_head_channels: int = -1,
) -> tuple[AdapterLayer, ...]:
    """The cross-attention layers of an LDM/ComfyUI ``UNetModel`` from its config, canonical order.

    Takes the keys of ComfyUI's ``unet_config`` (``transformer_depth`` per input block,
    ``transformer_depth_output`` per output block *popped from the end* as ``UNetModel`` does).
    """
    levels = len(channel_mult)
    res = list(num_res_blocks) if not isinstance(num_res_blocks, int) else [num_res_blocks] * levels
    depth_in = list(transformer_depth)
    depth_out = list(transformer_depth_output)

    def heads_for(ch: int) -> int:
        return num_heads if num_head_channels == -1 else ch // num_head_channels

    layers: list[AdapterLayer] = []
    number = 1
    for level, mult in enumerate(channel_mult):
        ch = model_channels * mult
        for r in range(res[level]):
            for t in range(depth_in.pop(0)):
                name = f"down_blocks.{level}.attentions.{r}.transformer_blocks.{t}.attn2"
                layers.append(AdapterLayer(("input", number, t), name, ch, heads_for(ch)))
            number += 1
        if level != levels - 1:
            number += 1  # the downsampling block
    ch = model_channels * channel_mult[-1]
    for t in range(transformer_depth_middle or 0):
        name = f"mid_block.attentions.0.transformer_blocks.{t}.attn2"
        layers.append(AdapterLayer(("middle", 0, t), name, ch, heads_for(ch)))
    number = 0
    for up, level in enumerate(reversed(range(levels))):
        ch = model_channels * channel_mult[level]
        for r in range(res[level] + 1):
            for t in range(depth_out.pop()):
                name = f"up_blocks.{up}.attentions.{r}.transformer_blocks.{t}.attn2"
                layers.append(AdapterLayer(("output", number, t), name, ch, heads_for(ch)))
            number += 1
    return tuple(layers)


#: SD1.5's 16 cross-attention layers (ComfyUI's SD15 unet_config).
SD15_LAYERS = ldm_unet_layout(**layout_args(SD15_UNET_CONFIG))


@dataclasses.dataclass(frozen=True)
class AdapterConfig(ModuleConfig):
    """The UNet layout an adapter is made for; defaults to SD1.5 (16 layers, context 768).

    Stored flat (parallel tuples) so the JSON in checkpoint metadata stays readable and
    ``ModuleConfig.from_dict`` round-trips it.
    """

    context_dim: int = 768
    #: ComfyUI keys ``"block.number.transformer_index"`` in canonical (execution) order.
    layers: tuple[str, ...] = tuple(layer.key_str for layer in SD15_LAYERS)
    #: The diffusers ``attn2`` module of each layer.
    diffusers_layers: tuple[str, ...] = tuple(layer.diffusers_name for layer in SD15_LAYERS)
    inner_dims: tuple[int, ...] = tuple(layer.inner_dim for layer in SD15_LAYERS)
    heads: tuple[int, ...] = tuple(layer.heads for layer in SD15_LAYERS)

    def __post_init__(self) -> None:
        n = len(self.layers)
        if not n or {len(self.diffusers_layers), len(self.inner_dims), len(self.heads)} != {n}:
            raise ValueError(
                f"AdapterConfig: layers, diffusers_layers, inner_dims and heads must be non-empty and "
                f"equally long, got {len(self.layers)}, {len(self.diffusers_layers)}, "
                f"{len(self.inner_dims)}, {len(self.heads)}"
            )
        keys = [parse_key(k) for k in self.layers]
        if keys != sorted(keys, key=canonical_order) or len(set(keys)) != n:
            raise ValueError(f"AdapterConfig: layers are not unique and in canonical order: {self.layers}")
        for key, inner, heads in zip(self.layers, self.inner_dims, self.heads, strict=True):
            if heads <= 0 or inner % heads:
                raise ValueError(f"AdapterConfig: layer {key}: inner_dim {inner} not divisible by {heads} heads")

    @classmethod
    def for_layers(cls, layers: Sequence[AdapterLayer], context_dim: int = 768) -> AdapterConfig:
        ordered = sorted(layers, key=lambda layer: canonical_order(layer.key))
        return cls(
            context_dim=context_dim,
            layers=tuple(layer.key_str for layer in ordered),
            diffusers_layers=tuple(layer.diffusers_name for layer in ordered),
            inner_dims=tuple(layer.inner_dim for layer in ordered),
            heads=tuple(layer.heads for layer in ordered),
        )

    def layer_specs(self) -> tuple[AdapterLayer, ...]:
        return tuple(
            AdapterLayer(parse_key(k), name, inner, heads)
            for k, name, inner, heads in zip(
                self.layers, self.diffusers_layers, self.inner_dims, self.heads, strict=True
            )
        )

    def check_fits(
        self, found: Sequence[AdapterLayer], context_dim: int, what: str = "this UNet"
    ) -> None:
        """Raise :class:`CheckpointError` unless ``found`` (a UNet's layers) is the layout made for.

        Compares keys, widths and heads (a different head split would change what the weights mean).
        """
        expected = self.layer_specs()
        problems: list[str] = []
        if context_dim != self.context_dim:
            problems.append(f"context_dim: expected {self.context_dim}, found {context_dim}")
        want = {layer.key: layer for layer in expected}
        have = {layer.key: layer for layer in found}
        missing = [format_key(k) for k in want if k not in have]
        extra = [format_key(k) for k in have if k not in want]
        if missing:
            problems.append(f"layers missing from {what}: {', '.join(missing)}")
        if extra:
            problems.append(f"layers of {what} the file has no weights for: {', '.join(extra)}")
        for key in want.keys() & have.keys():
            w, h = want[key], have[key]
            if (w.inner_dim, w.heads) != (h.inner_dim, h.heads):
                problems.append(
                    f"layer {format_key(key)}: expected width {w.inner_dim} with {w.heads} heads, "
                    f"found {h.inner_dim} with {h.heads} heads"
                )
        if problems:
            raise CheckpointError(
                f"the CLAP2Diffusion adapter was made for a UNet with {len(expected)} cross-attention "
                f"layers (context_dim {self.context_dim}), which does not match {what} "
                f"({len(found)} layers, context_dim {context_dim}):\n  "
                + "\n  ".join(problems)
                + "\nUse a CLAP2Diffusion file trained for this base model."
            )


def initial_route_logits(num_layers: int, sharpness: float = ROUTE_INIT_SHARPNESS) -> torch.Tensor:
    """``[L, 3]`` logits: a Gaussian bump per level along the layer order (ambience early,
    background mid, foreground late)."""
    position = torch.linspace(0.0, 1.0, num_layers) if num_layers > 1 else torch.full((1,), 0.5)
    centres = torch.tensor([ROUTE_INIT_CENTRES[name] for name in LEVELS])
    return -sharpness * (position[:, None] - centres[None, :]) ** 2


class AudioAdapterLayer(nn.Module):
    """Audio keys and values for one cross-attention layer, and its gate (a scalar, zero at init)."""

    def __init__(self, context_dim: int, inner_dim: int, heads: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = nn) -> None:
        super().__init__()
        self.heads = heads
        kw = {"dtype": dtype, "device": device}
        self.to_k = operations.Linear(context_dim, inner_dim, bias=False, **kw)
        self.to_v = operations.Linear(context_dim, inner_dim, bias=False, **kw)
        self.gate = nn.Parameter(torch.zeros((), **kw))


class AudioAdapter(nn.Module):
    """Gated audio cross-attention weights for every cross-attention layer of one UNet layout.

    Holds only weights and the per-layer precomputation; the attention itself is
    :mod:`clap2diffusion_core.audio_attention`, shared by the diffusers processor (training) and
    the ComfyUI model patch (inference). SD1.5: 16 layers, 19,169,344 parameters.

    ``operations``, ``dtype``, ``device``: as for :class:`~.projector.AudioProjector`. Gates and
    routing are read in float32 whatever the weights' dtype.
    """

    def __init__(self, config: AdapterConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = nn) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            AudioAdapterLayer(config.context_dim, inner, heads, dtype=dtype, device=device, operations=operations)
            for inner, heads in zip(config.inner_dims, config.heads, strict=True)
        )
        self.route_logits = nn.Parameter(initial_route_logits(len(self.layers)).to(device=device, dtype=dtype))

    def __len__(self) -> int:
        return len(self.layers)

    def route_weights(self) -> torch.Tensor:
        """``[L, 3]`` per-layer weights of the levels; each row sums to 3 (1 per level when even)."""
        return NUM_LEVELS * torch.softmax(self.route_logits.float(), dim=-1)

    def gates(self) -> torch.Tensor:
        """``[L]`` ``tanh(gate)`` per layer."""
        return torch.tanh(torch.stack([layer.gate for layer in self.layers]).float())

    def token_scales(
        self,
        token_levels: torch.Tensor,
        strength: float | torch.Tensor = 1.0,
        level_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[L, N]`` factor on each audio token's value in each layer:
        ``tanh(gate) * strength * route[layer, level] * level_weight[level]``.

        ``token_levels [N]`` long; ``level_weights`` the user's per-level weights (default 1).
        Differentiable in the gates and routing logits (training).
        """
        route = self.route_weights()
        if level_weights is not None:
            route = route * torch.as_tensor(level_weights, dtype=route.dtype, device=route.device)
        per_token = route[:, token_levels.to(route.device)]  # [L, N]
        return per_token * (self.gates() * strength)[:, None]

    def layer_kv(
        self, index: int, tokens: torch.Tensor, token_scale: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio keys and (scaled) values of layer ``index``, split into heads.

        ``tokens [B, N, C]``, ``token_scale [N]`` -> ``(key, value)`` each ``[B, H, N, dim_head]``,
        on the device of the layer's weights, in ``dtype`` (default: the weights' dtype; another one
        needs layers that cast their weights, as ``comfy.ops.manual_cast``'s do).
        """
        layer = self.layers[index]
        weight = layer.to_k.weight
        tokens = tokens.to(device=weight.device, dtype=dtype or weight.dtype)
        b, n, _ = tokens.shape
        key = layer.to_k(tokens)
        value = layer.to_v(tokens) * token_scale.to(device=tokens.device, dtype=tokens.dtype)[:, None]
        return (
            key.view(b, n, layer.heads, -1).transpose(1, 2),
            value.view(b, n, layer.heads, -1).transpose(1, 2),
        )

    @torch.no_grad()
    def active_layers(self, strength: float, level_weights: Sequence[float] | None = None) -> list[int]:
        """Layers whose audio term is not exactly zero for this strength and these level weights.

        Skipping the others (rather than adding zeros) is what makes a closed gate or strength 0
        reproduce the plain model bit for bit.
        """
        if strength == 0:
            return []
        route = self.route_weights()
        if level_weights is not None:
            route = route * torch.as_tensor(level_weights, dtype=route.dtype)
        open_ = (self.gates() != 0) & (route != 0).any(dim=1)
        return [i for i, ok in enumerate(open_.tolist()) if ok]

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, context_dim={self.config.context_dim}"


def adapter_parameter_count(config: AdapterConfig | None = None) -> int:
    """Number of parameters of an adapter for ``config`` (SD1.5 by default), without building it."""
    config = config or AdapterConfig()
    per_layer = sum(2 * config.context_dim * inner + 1 for inner in config.inner_dims)
    return per_layer + NUM_LEVELS * len(config.inner_dims)


__all__ = [
    "SD15_LAYERS",
    "AdapterConfig",
    "AdapterLayer",
    "AudioAdapter",
    "AudioAdapterLayer",
    "adapter_parameter_count",
    "canonical_order",
    "format_key",
    "initial_route_logits",
    "ldm_unet_layout",
    "parse_key",
]
