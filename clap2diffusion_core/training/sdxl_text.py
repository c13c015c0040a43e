"""SDXL's text encoders (CLIP-L + OpenCLIP ViT-bigG) loaded offline from a single-file checkpoint with
transformers, for the command-line text fit (no ComfyUI import).

An SDXL file stores CLIP-L under ``conditioner.embedders.0.transformer.text_model.*`` (transformers
layout) and CLIP-G under ``conditioner.embedders.1.model.*`` in OpenCLIP's layout: fused ``in_proj``
attention weights, ``transformer.resblocks.N``, ``ln_final`` and ``text_projection`` applied as
``x @ W``. :func:`openclip_to_transformers` converts the latter to ``CLIPTextModelWithProjection``
keys (as ComfyUI's ``clip_text_transformers_convert`` does on its side).

The conditioning is ComfyUI's SDXL one: both towers' penultimate hidden states (no final layer norm)
side by side, ``[B, 77, 768 + 1280]``, and the pooled vector is CLIP-G's projected end-token state
``[B, 1280]`` (after the final layer norm).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..checkpoint import CheckpointError
from .encoders import CONFIG_DIR, TEXT_LENGTH, _load_exact, _read_prefixed, load_clip_tokenizer
from .textfit import caption_token_mean

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_CLIP_PREFIX = "cond_stage_model.model."
#: OpenCLIP keys that are not weights of the text model (the CLIP loss's temperature, a cached mask).
OPENCLIP_UNUSED = ("logit_scale", "attn_mask")

_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}  # fmt: skip


def checkpoint_text_family(path: str | os.PathLike) -> str:
    """``sd15`` or ``sdxl`` from the text-encoder keys of a single-file checkpoint; other layouts are
    refused by name (SD2's OpenCLIP-H, or no text encoder at all). Reads only the key names."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    else:
        keys = list(_read_prefixed(path, ""))
    if any(k.startswith(CLIP_G_PREFIX) for k in keys) and any(k.startswith(CLIP_L_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith(SD15_CLIP_PREFIX) for k in keys):
        return "sd15"
    if any(k.startswith(SD2_CLIP_PREFIX) for k in keys):
        raise CheckpointError(f"{path}: an SD2.x checkpoint (OpenCLIP-H text encoder, 1024-wide tokens); the text "
                              "fit serves SD1.5 and SDXL-family checkpoints only")
    if any(k.startswith(CLIP_G_PREFIX) for k in keys):
        raise CheckpointError(f"{path}: CLIP-G alone (an SDXL refiner?); the text fit needs CLIP-L + CLIP-G (SDXL) "
                              "or CLIP-L (SD1.5)")
    raise CheckpointError(f"{path}: no text encoder found (neither {SD15_CLIP_PREFIX}* for SD1.5 nor "
                          f"{CLIP_L_PREFIX}* + {CLIP_G_PREFIX}* for SDXL)")


def openclip_to_transformers(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys (under ``prefix``) -> ``CLIPTextModelWithProjection`` keys
    (``text_model.*``, ``text_projection.weight``). Unknown keys are kept (prefix removed), so a
    strict load names them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key in OPENCLIP_UNUSED:
            continue
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.removeprefix("ln_final.")] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # x @ W -> Linear(x) = x @ weight.T
        elif key.startswith("transformer.resblocks."):
            index, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
            layer = f"text_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):  # fused q, k, v rows
                kind = rest.removeprefix("attn.in_proj_")  # weight / bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            module, kind = rest.rsplit(".", 1)
            out[f"{layer}{_BLOCK.get(module, module)}.{kind}"] = value
        else:
            out[key] = value
    return out


class SDXLTextEncoder(nn.Module):
    """Captions -> SDXL's stage-1 targets: ``(tokens [B, 2048], pooled [B, 1280])``, the mean of the
    conditioning ``[B, 77, 2048]`` over each caption's tokens and end token, and CLIP-G's pooled vector.

    CLIP's attention is causal, so the states up to each caption's end token do not depend on the
    padding after it: captions are padded to the longest in the batch, not to 77 (same values).
    """

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, tokenizer) -> None:  # noqa: ANN001
        super().__init__()
        self.clip_l = clip_l.eval().requires_grad_(False)
        self.clip_g = clip_g.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cond [B, L, 2048], pooled [B, 1280], ends [B])`` with L the longest caption's length."""
        tokens = self.tokenizer(list(captions), padding="longest", max_length=TEXT_LENGTH, truncation=True,
                                return_tensors="pt")
        ids = tokens["input_ids"].to(self.clip_g.device)
        out_l = self.clip_l(input_ids=ids, output_hidden_states=True)
        out_g = self.clip_g(input_ids=ids, output_hidden_states=True)
        # hidden_states[-2]: the penultimate layer's output, without the final layer norm (ComfyUI's
        # SDXL "penultimate" layer for both towers).
        cond = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1).float()
        ends = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)  # first end token
        return cond, out_g.text_embeds.float(), ends

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond, pooled, ends = self.conditioning(captions)
        return caption_token_mean(cond, ends), pooled


def load_sdxl_text_encoder(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> SDXLTextEncoder:
    """CLIP-L (``CLIPTextModel``) and CLIP-G (``CLIPTextModelWithProjection``) of an SDXL-family
    single-file checkpoint, fp32 on the CPU; every weight must land (shipped configs
    ``clip_l_text.json``, ``clip_g_text.json``)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    raw_l = _read_prefixed(checkpoint, CLIP_L_PREFIX)
    raw_g = _read_prefixed(checkpoint, CLIP_G_PREFIX)
    if not raw_l or not raw_g:
        raise CheckpointError(f"{checkpoint}: no {CLIP_L_PREFIX}* / {CLIP_G_PREFIX}* weights (SDXL's CLIP-L and CLIP-G)")

    config_l = CLIPTextConfig(**json.loads((CONFIG_DIR / "clip_l_text.json").read_text()))
    with init_empty_weights():
        clip_l = CLIPTextModel(config_l)
    # transformers 4.x nests CLIPTextModel's weights under ``text_model.``, 5.x does not.
    nested = any(k.startswith("text_model.") for k in clip_l.state_dict())
    state_l = {}
    for key, value in raw_l.items():
        key = key[len(CLIP_L_PREFIX):]
        state_l[key if nested else key.removeprefix("text_model.")] = value.float()
    # CLIP-L's projection is never read (SDXL takes its hidden states) and SDXL files do not ship it.
    _load_exact(clip_l, state_l, "SDXL CLIP-L text encoder", ignore=("position_ids", "text_projection.weight"))

    config_g = CLIPTextConfig(**json.loads((CONFIG_DIR / "clip_g_text.json").read_text()))
    with init_empty_weights():
        clip_g = CLIPTextModelWithProjection(config_g)
    state_g = {k: v.float() for k, v in openclip_to_transformers(raw_g, CLIP_G_PREFIX).items()}
    _load_exact(clip_g, state_g, "SDXL CLIP-G text encoder", ignore=("position_ids",))

    tok = load_clip_tokenizer(tokenizer)
    return SDXLTextEncoder(clip_l, clip_g, tok)
