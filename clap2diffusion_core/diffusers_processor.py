"""The gated audio cross-attention on a diffusers ``UNet2DConditionModel`` (the training path).

    hook = attach_audio_adapter(unet, model.adapter)          # checks the layout, sets processors
    with hook.audio(tokens, token_levels):                    # tokens [B, 77, C], one row per latent
        noise_pred = unet(latents, t, text_embeddings).sample
    hook.detach()                                             # the original processors back

Each ``attn2`` gets an :class:`AudioAttnProcessor`: diffusers' ``AttnProcessor2_0`` for the text,
plus :func:`~.audio_attention.add_audio` before ``to_out``, the same math the ComfyUI patch runs.
Outside ``hook.audio(...)`` the UNet is the plain one. Audio keys and values are computed per
forward from the adapter's weights, so gradients reach the projections, gates and routing.

Audio reaches the processors through the hook rather than ``cross_attention_kwargs``: diffusers
warns on every ``attn1`` call about keyword arguments its processor does not declare.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .adapters import AdapterLayer, AudioAdapter, canonical_order
from .audio_attention import add_audio

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention


def diffusers_layout(unet: UNet2DConditionModel) -> tuple[AdapterLayer, ...]:
    """The cross-attention layers of a diffusers UNet as :class:`AdapterLayer`, canonical order.

    Maps diffusers' ``down_blocks.i.attentions.j`` / ``mid_block`` / ``up_blocks.i.attentions.j``
    to ComfyUI's ``(block, number, transformer_index)`` the way ``comfy.utils.unet_to_diffusers`` does.
    """
    per_block = unet.config.layers_per_block
    levels = len(unet.down_blocks)
    res = [per_block] * levels if isinstance(per_block, int) else list(per_block)
    layers: list[AdapterLayer] = []

    def add(block: str, number: int, prefix: str, attentions: Any) -> None:
        for t, tb in enumerate(attentions.transformer_blocks):
            attn = tb.attn2
            if attn is None or not attn.is_cross_attention:
                continue
            name = f"{prefix}.transformer_blocks.{t}.attn2"
            layers.append(AdapterLayer((block, number, t), name, attn.to_q.out_features, attn.heads))

    number = 1
    for i, down in enumerate(unet.down_blocks):
        for j in range(res[i]):
            if getattr(down, "attentions", None):
                add("input", number, f"down_blocks.{i}.attentions.{j}", down.attentions[j])
            number += 1
        number += down.downsamplers is not None
    if unet.mid_block is not None and getattr(unet.mid_block, "attentions", None):
        for j, attentions in enumerate(unet.mid_block.attentions):
            if j:  # ComfyUI's middle block holds one transformer stack
                raise ValueError("mid block with more than one attention stack is not an SD UNet")
            add("middle", 0, "mid_block.attentions.0", attentions)
    number = 0
    for i, up in enumerate(unet.up_blocks):
        for j in range(len(up.resnets)):
            if getattr(up, "attentions", None):
                add("output", number, f"up_blocks.{i}.attentions.{j}", up.attentions[j])
            number += 1
    return tuple(sorted(layers, key=lambda layer: canonical_order(layer.key)))


@dataclass(frozen=True)
class _Audio:
    tokens: torch.Tensor  # [B, N, C] one row per latent row
    scales: torch.Tensor  # [L, N]


class AudioAttnProcessor:
    """``attn2`` processor: diffusers' text attention + the adapter's gated audio attention.

    Mirrors ``AttnProcessor2_0`` for the text part (masks, ``norm_cross``, residual and rescale
    included), so with no audio bound it computes exactly what the default processor does.
    """

    def __init__(self, hook: AudioAdapterHook, index: int) -> None:
        self.hook = hook
        self.index = index

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        heads = attn.heads
        d = k.shape[-1] // heads
        text = F.scaled_dot_product_attention(
            q.view(batch, -1, heads, d).transpose(1, 2),
            k.view(batch, -1, heads, d).transpose(1, 2),
            v.view(batch, -1, heads, d).transpose(1, 2),
            attn_mask=attention_mask,
        )
        out = text.transpose(1, 2).reshape(batch, -1, heads * d).to(q.dtype)

        audio = self.hook.current
        if audio is not None:
            key, value = self.hook.adapter.layer_kv(self.index, audio.tokens, audio.scales[self.index])
            if key.shape[0] != batch:
                if key.shape[0] != 1:
                    raise ValueError(f"audio tokens for {key.shape[0]} rows, but the UNet batch has {batch}")
                key, value = key.expand(batch, *key.shape[1:]), value.expand(batch, *value.shape[1:])
            out = add_audio(out, q, key.to(q.dtype), value.to(q.dtype))

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AudioAdapterHook:
    """An :class:`AudioAdapter` attached to a diffusers UNet; see the module docstring."""

    def __init__(self, unet: UNet2DConditionModel, adapter: AudioAdapter) -> None:
        adapter.config.check_fits(
            diffusers_layout(unet), unet.config.cross_attention_dim, "the diffusers UNet"
        )
        self.unet = unet
        self.adapter = adapter
        self.current: _Audio | None = None
        self._original: dict[str, Any] = {}
        for index, layer in enumerate(adapter.config.layer_specs()):
            module = unet.get_submodule(layer.diffusers_name)
            self._original[layer.diffusers_name] = module.processor
            module.set_processor(AudioAttnProcessor(self, index))

    @contextlib.contextmanager
    def audio(
        self,
        tokens: torch.Tensor,
        token_levels: torch.Tensor,
        *,
        strength: float | torch.Tensor = 1.0,
        level_weights: Sequence[float] | torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Bind audio for the forwards inside: ``tokens [B, N, C]`` per latent row, or ``[1, N, C]``
        for all (rows whose text is dropped for CFG take the silence tokens, ``CLAP2DiffusionModel.silence_tokens()``),
        ``token_levels [N]``; ``strength`` and ``level_weights [3]`` as in the ComfyUI node."""
        if self.current is not None:
            raise RuntimeError("audio is already bound to this UNet (nested hook.audio)")
        scales = self.adapter.token_scales(token_levels, strength, level_weights)
        self.current = _Audio(tokens, scales)
        try:
            yield
        finally:
            self.current = None

    def detach(self) -> None:
        """Restore the processors the UNet had before."""
        for name, processor in self._original.items():
            self.unet.get_submodule(name).set_processor(processor)
        self._original.clear()


def attach_audio_adapter(unet: UNet2DConditionModel, adapter: AudioAdapter) -> AudioAdapterHook:
    """Give every cross-attention layer of ``unet`` the adapter's audio attention.

    Raises :class:`~.checkpoint.CheckpointError` if the adapter was made for another layout.
    """
    return AudioAdapterHook(unet, adapter)


@torch.no_grad()
def init_adapter_from_unet(adapter: AudioAdapter, unet: UNet2DConditionModel) -> None:
    """Start the audio keys/values as copies of each layer's text ``to_k``/``to_v`` (as IP-Adapter
    does): audio tokens live in the text-embedding space, so this is a better start than random."""
    for layer, spec in zip(adapter.layers, adapter.config.layer_specs(), strict=True):
        attn = unet.get_submodule(spec.diffusers_name)
        layer.to_k.weight.copy_(attn.to_k.weight)
        layer.to_v.weight.copy_(attn.to_v.weight)
