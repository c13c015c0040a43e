"""The model injection on ComfyUI's side: gated audio cross-attention as ``attn2`` replace patches.

``apply_audio_to_model`` returns a clone of the ModelPatcher with one :class:`AudioAttn2Patch` per
open adapter layer, registered with ``set_model_attn2_replace`` under ComfyUI's
``(block, number, transformer_index)`` key. ComfyUI calls it with the layer's projected q, k, v
(so LoRA weight patches on to_q/to_k/to_v apply) and applies the layer's to_out to what it returns:

    text  = optimized_attention(q, k, v)                # what the unpatched layer computes, bit for bit
    out   = text + attn(q, k_audio, v_audio * w)       # clap2diffusion_core.audio_attention

Cost per step: the audio keys/values of every layer, for the sound and for silence, are computed
once when the node runs (:class:`~clap2diffusion_core.audio_attention.AudioKV`), held in their own
ModelPatcher (exposed through ``models()``, so ComfyUI loads them with the UNet and offloads them
after) and stored in the UNet's compute dtype. The adapter's projection weights are not needed
while sampling at all. A step adds one attention over 77 tokens and one add per layer; the
per-row stack for a batch layout (``cond_or_uncond``) is assembled on the first step and reused.

Patch objects never change after registration (``clone()`` deep-copies model_options; ours return
themselves). Stacking a second sound wraps the patch already at a key (ours or another pack's):
the new patch calls it for the "text" part, then adds its own audio term.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.utils
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import CallbacksMP

from ..clap2diffusion_core.adapters import AdapterLayer, AudioAdapter, canonical_order
from ..clap2diffusion_core.audio_attention import COND, AudioKV, add_audio
from ..clap2diffusion_core.errors import CheckpointError, ModelMismatchError
from ..clap2diffusion_core.model import CLAP2DiffusionModel
from ..clap2diffusion_core.types import AudioTokens

log = logging.getLogger(__name__)

#: Key of our ON_PRE_RUN callbacks on the ModelPatcher.
CALLBACK_KEY = "clap2diffusion_audio"

Attn2Replace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# layout of a ComfyUI UNet


def comfy_layout(model: ModelPatcher) -> tuple[tuple[AdapterLayer, ...], int | None]:
    """The cross-attention layers of ``model``'s UNet in canonical order, and their context size."""
    unet = model.get_model_object("diffusion_model")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return unet_layout(unet, unet_config)


def unet_layout(unet: torch.nn.Module, unet_config: dict) -> tuple[tuple[AdapterLayer, ...], int | None]:
    """The cross-attention layers of a ComfyUI ``UNetModel`` and their context size (None if mixed).

    Keys are those BasicTransformerBlock looks up (``(block, number, transformer_index)``); the
    diffusers names come from ComfyUI's own ``unet_to_diffusers`` map (empty if it has none).
    """
    if not hasattr(unet, "input_blocks"):
        raise ModelMismatchError(
            f"Apply Audio to Model needs an SD1.5-family UNet; this MODEL is {type(unet).__name__}"
        )
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(unet_config).items()}
    groups: list[tuple[str, int, str, Any]] = [
        ("input", i, f"input_blocks.{i}", m) for i, m in enumerate(unet.input_blocks)
    ]
    if unet.middle_block is not None:
        groups.append(("middle", 0, "middle_block", unet.middle_block))
    groups += [("output", i, f"output_blocks.{i}", m) for i, m in enumerate(unet.output_blocks)]

    layers: list[AdapterLayer] = []
    context_dims: set[int] = set()
    for block, number, prefix, seq in groups:
        for pos, module in enumerate(seq):
            if not isinstance(module, SpatialTransformer):
                continue
            for t, tb in enumerate(module.transformer_blocks):
                attn = getattr(tb, "attn2", None)
                if attn is None or getattr(tb, "switch_temporal_ca_to_sa", False):
                    continue
                ldm = f"{prefix}.{pos}.transformer_blocks.{t}.attn2.to_q.weight"
                name = to_diffusers.get(ldm, "").removesuffix(".to_q.weight")
                layers.append(AdapterLayer((block, number, t), name, attn.heads * attn.dim_head, attn.heads))
                context_dims.add(attn.to_k.in_features)
    layers.sort(key=lambda layer: canonical_order(layer.key))
    return tuple(layers), (context_dims.pop() if len(context_dims) == 1 else None)


def compute_dtype(model: ModelPatcher) -> torch.dtype:
    """The dtype the UNet computes in (what q arrives in): manual_cast_dtype, else its weights'."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model_dtype() or torch.float32


# ------------------------------------------------------------------------------------------------
# the patch


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """Exactly what an unpatched ``CrossAttention`` computes between to_q/to_k/to_v and to_out.

    Looked up at call time: ``optimized_attention`` is chosen when ComfyUI starts (pytorch, xformers,
    sage, sub-quadratic) and must be the same function the plain model uses.
    """
    return comfy_attention.optimized_attention(
        q, k, v, extra_options["n_heads"],
        attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options,
    )  # fmt: skip


class AudioInjection:
    """One Apply Audio to Model: a sound's keys/values (in a ModelPatcher) and when they act.

    Shared by the per-layer patches of one application. Its only state besides the immutable
    settings is derived: the sigma range (re-read from the sampling model at each run's start,
    because a ModelSampling node may follow ours) and a one-entry memo of the in-range decision
    per model call, so the one host read of sigma happens once per call, not once per layer.
    """

    def __init__(
        self,
        kv_patcher: ModelPatcher,
        model: ModelPatcher,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
    ) -> None:
        self.kv_patcher = kv_patcher
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.full_range = self.start_percent <= 0.0 and self.end_percent >= 1.0
        self.sigma_range = (float("inf"), 0.0)
        self._last: tuple[torch.Tensor | None, bool] = (None, True)
        if not self.full_range:
            self.pre_run(model)

    @property
    def kv(self) -> AudioKV:
        return self.kv_patcher.model

    def pre_run(self, patcher: ModelPatcher) -> None:
        """ON_PRE_RUN callback: resolve the percents with the model_sampling that will sample."""
        sampling = patcher.get_model_object("model_sampling")
        self.sigma_range = (
            float(sampling.percent_to_sigma(self.start_percent)),
            float(sampling.percent_to_sigma(self.end_percent)),
        )
        self._last = (None, True)

    def active(self, sigmas: torch.Tensor | None) -> bool:
        """Whether this step's sigma lies in [end_sigma, start_sigma] (as ControlNet decides)."""
        if self.full_range or sigmas is None:
            return True
        last, decision = self._last
        if sigmas is last:
            return decision
        sigma = float(sigmas.reshape(-1)[0])
        decision = self.sigma_range[1] <= sigma <= self.sigma_range[0]
        self._last = (sigmas, decision)
        return decision

    def to(self, device_or_dtype: torch.device | torch.dtype) -> None:
        if isinstance(device_or_dtype, torch.device):
            self.kv.clear_memo()  # batches assembled on the old device


class AudioAttn2Patch:
    """``attn2`` replace for one layer: the text attention (or the replace it wraps) + the audio."""

    def __init__(self, injection: AudioInjection, slot: int, inner: Attn2Replace | None = None) -> None:
        self.injection = injection
        self.slot = slot
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """``q [B, S, H*d]``, ``k``/``v [B, T, H*d]`` (projected) -> ``[B, S, H*d]`` before to_out."""
        out = text_attention(q, k, v, extra_options) if self.inner is None else self.inner(q, k, v, extra_options)
        injection = self.injection
        if not injection.active(extra_options.get("sigmas")):
            return out
        chunks = extra_options.get("cond_or_uncond") or [COND]
        key, value = injection.kv.batch(self.slot, chunks, q.shape[0] // len(chunks), q.device, q.dtype)
        return add_audio(out, q, key, value)

    def models(self) -> list[ModelPatcher]:
        inner = getattr(self.inner, "models", None)
        return [self.injection.kv_patcher] + (list(inner()) if inner is not None else [])

    def to(self, device_or_dtype: torch.device | torch.dtype) -> AudioAttn2Patch:
        self.injection.to(device_or_dtype)
        inner_to = getattr(self.inner, "to", None)
        if inner_to is not None:
            moved = inner_to(device_or_dtype)
            if moved is not self.inner:  # never mutate a registered patch: make a new one
                return AudioAttn2Patch(self.injection, self.slot, moved)
        return self

    def __deepcopy__(self, memo: dict) -> AudioAttn2Patch:
        return self  # immutable; ModelPatcher.clone() deep-copies model_options

    def __repr__(self) -> str:
        layer = self.injection.kv.layers[self.slot]
        return f"AudioAttn2Patch(layer={layer}, inner={type(self.inner).__name__ if self.inner else None})"


# ------------------------------------------------------------------------------------------------
# applying


def check_audio_fits(model: ModelPatcher, clap2diffusion: CLAP2DiffusionModel, audio: AudioTokens) -> AudioAdapter:
    """The adapter of ``clap2diffusion``, checked against ``model``'s UNet and against ``audio``'s source."""
    adapter = clap2diffusion.adapter
    if adapter is None:
        raise CheckpointError(
            f"this CLAP2Diffusion file is stage {clap2diffusion.config.stage}: it has no adapter layers for "
            "Apply Audio to Model. Use Apply Audio to Conditioning with it, or load a stage 2/3 file."
        )
    clap2diffusion.check_tokens(audio, "Apply Audio to Model")
    layers, context_dim = comfy_layout(model)
    adapter.config.check_fits(layers, context_dim or -1, "this MODEL")
    return adapter


def apply_audio_to_model(
    model: ModelPatcher,
    clap2diffusion: CLAP2DiffusionModel,
    audio: AudioTokens,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
) -> ModelPatcher:
    """A clone of ``model`` whose cross-attention layers also attend to ``audio``, through the
    adapter of ``clap2diffusion`` (the file that made ``audio``).

    Unconditional rows attend to the file's silence tokens. The user's level weights
    (``audio.level_scale``) act once, on the adapter's values. Layers whose gate is closed, and the
    whole patch at strength 0, are skipped: the result is then the input model itself.
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(
            f"start_percent ({start_percent}) must not be after end_percent ({end_percent}), both in [0, 1]"
        )
    adapter = check_audio_fits(model, clap2diffusion, audio)
    with torch.no_grad():
        silence = clap2diffusion.silence_tokens()
    kv = AudioKV(
        adapter, audio.tokens, silence, audio.token_levels,
        strength=strength, level_weights=audio.level_scale.tolist(),
        dtype=compute_dtype(model), device=model.offload_device,
    )  # fmt: skip
    if not len(kv):
        return model
    kv_patcher = comfy.model_patcher.ModelPatcher(
        kv, load_device=model.load_device, offload_device=model.offload_device
    )
    patched = model.clone()
    injection = AudioInjection(kv_patcher, patched, start_percent, end_percent)
    if not injection.full_range:
        patched.add_callback_with_key(CallbacksMP.ON_PRE_RUN, CALLBACK_KEY, injection.pre_run)
    replaces = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    specs = adapter.config.layer_specs()
    for slot, index in enumerate(kv.layers):
        key = specs[index].key
        inner = replaces.get(key, replaces.get(key[:2]))  # ComfyUI falls back to (block, number)
        patched.set_model_attn2_replace(AudioAttn2Patch(injection, slot, inner), *key)
    log.debug("clap2diffusion: audio attention on %d of %d layers", len(kv), len(specs))
    return patched
