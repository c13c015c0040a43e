"""ComfyUI's own UNet as the distillation's :class:`~..clap2diffusion_core.training.distil.DistilUNet`.

The node "Distil Audio Adapter" trains through the MODEL as ComfyUI loaded it (its UNetModel, its
weights as model management placed them, LoRA weight patches included), not through diffusers. The
adapter acts through ``attn2`` replace patches handed to the UNet in its ``transformer_options``, as
Apply Audio to Model's do, but with the audio keys and values computed per call from the adapter's
live weights (:meth:`AudioAdapter.layer_kv`, with gradient) and the same math
(:func:`~..clap2diffusion_core.audio_attention.add_audio`) after the layer's own text attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher

from ..clap2diffusion_core.adapters import AdapterConfig, AdapterLayer, AudioAdapter
from ..clap2diffusion_core.audio_attention import add_audio
from ..clap2diffusion_core.errors import ModelMismatchError
from ..clap2diffusion_core.model import BASE_FAMILIES
from .model_patch import comfy_layout, compute_dtype, cross_attentions, text_attention

#: ComfyUI model classes of the SDXL family the distillation serves (pooled text + size ids).
SDXL_CLASSES = ("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B")


def model_family(model: ModelPatcher) -> tuple[str, str]:
    """``("sd15" | "sdxl", what it is)`` of a MODEL, or an error naming what was found instead."""
    base = model.model
    name = type(getattr(base, "model_config", None)).__name__
    unet = model.get_model_object("diffusion_model")
    layers, context = comfy_layout(model)  # raises for a UNet that is not an SD-style UNetModel
    family = {v: k for k, v in BASE_FAMILIES.items()}.get(context)
    sdxl_type = type(base).__name__ == "SDXL"
    if family == "sd15" and not sdxl_type or family == "sdxl" and sdxl_type:
        return family, f"{name} ({type(unet).__name__}, {len(layers)} cross-attention layers, context {context})"
    raise ModelMismatchError(
        f"Distil Audio Adapter: the MODEL is {name} ({type(base).__name__}, UNet context {context}), which is not "
        "an SD1.5- or SDXL-family model. Load an SD1.5 or SDXL-family checkpoint with Load Checkpoint.")


def ensure_autograd_weights(module: torch.nn.Module) -> int:
    """Give ``module`` ordinary copies of its inference-mode parameters (same values, same device and
    dtype, still frozen); returns how many. ComfyUI loads models under ``torch.inference_mode``, and
    autograd cannot save such tensors for the backward pass that reaches the adapter through the UNet.
    One parameter at a time, so memory rises by one tensor at most."""
    count = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    count += 1
    return count


@dataclass(frozen=True)
class _Bound:
    tokens: torch.Tensor  # [B | 1, N, C]
    scales: torch.Tensor  # [L, N]


class _TrainingAttn2:
    """``attn2`` replace of one layer: the layer's own text attention + the live adapter's audio."""

    def __init__(self, owner: ComfyDistilUNet, index: int, layer: torch.nn.Module) -> None:
        self.owner, self.index, self.layer = owner, index, layer

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = text_attention(q, k, v, extra_options, self.layer)
        bound = self.owner.bound
        key, value = self.owner.adapter.layer_kv(self.index, bound.tokens, bound.scales[self.index])
        if key.shape[0] != q.shape[0]:
            key, value = key.expand(q.shape[0], *key.shape[1:]), value.expand(q.shape[0], *value.shape[1:])
        return add_audio(out, q, key.to(q.dtype), value.to(q.dtype))


class ComfyDistilUNet:
    """The MODEL's UNet, loaded by model management, as the distillation calls it (see the module
    docstring). ``x`` at DDPM timestep ``t`` goes straight into ``diffusion_model`` (what diffusers'
    UNet takes: ComfyUI's input scaling maps its sigma parametrisation onto exactly this), SDXL's
    ``y`` from the model's own ``encode_adm``."""

    def __init__(self, model: ModelPatcher, adapter: AudioAdapter) -> None:
        from comfy.model_base import ModelType

        if model.model.model_type != ModelType.EPS:
            raise ModelMismatchError(
                f"Distil Audio Adapter: this MODEL predicts {model.model.model_type.name}, the distillation's "
                "DDIM walk needs an epsilon-prediction model (SD1.5, SDXL). A v-prediction or EDM fine-tune "
                "(or a ModelSamplingDiscrete node before this one) is not supported yet.")
        self.model = model
        self.adapter = adapter
        self.family, _ = model_family(model)
        with torch.inference_mode(False):  # weights moved now are ordinary tensors
            mm.load_models_gpu([model], force_full_load=True)
        self.unet = model.get_model_object("diffusion_model")
        ensure_autograd_weights(self.unet)  # those loaded earlier, in ComfyUI's inference mode
        self.device = mm.get_torch_device()
        self.dtype = compute_dtype(model)
        sigmas = model.get_model_object("model_sampling").sigmas.float().cpu()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas * sigmas)
        self.in_channels = model.model.latent_format.latent_channels
        self.sdxl = self.family == "sdxl"
        self.prediction_type = "epsilon"
        layers = cross_attentions(self.unet)
        self.patches = {spec.key: _TrainingAttn2(self, i, layers[spec.key][1])
                        for i, spec in enumerate(adapter.config.layer_specs())}
        self.bound: _Bound | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        options: dict = {}
        if self.bound is not None:
            options["patches_replace"] = {"attn2": self.patches}
        y = None
        if self.sdxl:
            side = 8 * x.shape[-1]
            y = self.model.model.encode_adm(pooled_output=pooled, width=side, height=side).to(self.device, self.dtype)
        out = self.unet(x.to(self.device, self.dtype), t.to(self.device).float(), context.to(self.device, self.dtype),
                        y=y, transformer_options=options)
        return out.float()

    @contextlib.contextmanager
    def audio(self, tokens: torch.Tensor, token_levels: torch.Tensor) -> Iterator[None]:
        if self.bound is not None:
            raise RuntimeError("audio is already bound to this UNet")
        self.bound = _Bound(tokens, self.adapter.token_scales(token_levels))
        try:
            yield
        finally:
            self.bound = None


def adapter_config_of(model: ModelPatcher) -> AdapterConfig:
    """The adapter layout of a MODEL's UNet (its own cross-attention layers, canonical order)."""
    layers, context = comfy_layout(model)
    return AdapterConfig.for_layers(layers, context)


def text_kv_of(model: ModelPatcher):  # noqa: ANN201
    """``layer -> (to_k, to_v)`` weights of the UNet's text attention there, float32 on the CPU."""
    layers = cross_attentions(model.get_model_object("diffusion_model"))

    def text_kv(spec: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor]:
        attn = layers[spec.key][1]
        return attn.to_k.weight.detach().float().cpu(), attn.to_v.weight.detach().float().cpu()

    return text_kv


__all__ = ["ComfyDistilUNet", "adapter_config_of", "ensure_autograd_weights", "model_family", "text_kv_of"]
