"""The distillation's command-line side: the corpus encoded with transformers' text encoders and
the diffusers UNet as the loop's :class:`.distil.DistilUNet` (training requirements: diffusers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .captions import build_corpus, read_caption_file
from .distil import CaptionSet, build_caption_set
from .settings import StageConfig

if TYPE_CHECKING:
    from .stages import FrozenUNet


def encode_captions(config: StageConfig, batch_size: int = 32) -> CaptionSet:
    """Build the corpus of ``config.distil`` and encode it with CLAP's text tower and the
    checkpoint's text encoder: SD1.5's CLIP-L, or SDXL's CLIP-L + CLIP-G with CLIP-G's pooled output."""
    from ..clap import load_clap_tower
    from ..sdxl import checkpoint_family
    from .encoders import load_text_encoder
    from .sdxl_text import load_sdxl_text_encoder

    d = config.distil
    extra = read_caption_file(d.captions) if d.captions else []
    captions = [c.text for c in build_corpus(d.corpus_size, d.corpus_seed, extra)]
    clap = load_clap_tower(d.clap, "text")
    if checkpoint_family(config.sd15) == "sdxl":
        clip = SdxlContext(load_sdxl_text_encoder(config.sd15, d.tokenizer))
        states = clip
    else:
        clip = load_text_encoder(config.sd15, d.tokenizer)

        def states(texts: list[str]) -> tuple[torch.Tensor, None]:
            return clip(texts)[0], None

    return build_caption_set(captions, lambda texts: clap.encode_text(texts), states, d.heldout, d.corpus_seed,
                             batch_size)


class SdxlContext:
    """Captions -> SDXL's UNet conditioning as ComfyUI's SDXL CLIP gives it: ``(states [B, 77, 2048],
    pooled [B, 1280])``, 77 tokens (CLIP-L padded with the end token, CLIP-G with 0), penultimate
    states of both towers side by side, CLIP-G's projected pooled vector."""

    def __init__(self, encoder) -> None:  # noqa: ANN001 (sdxl_text.SDXLTextEncoder)
        self.encoder = encoder

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.encoder
        ids = e.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt")["input_ids"].to(e.clip_g.device)
        ends = (ids == e.tokenizer.eos_token_id).int().argmax(dim=1)
        g_ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device)[None] > ends[:, None], 0)
        out_l = e.clip_l(input_ids=ids, output_hidden_states=True)
        out_g = e.clip_g(input_ids=g_ids, output_hidden_states=True)
        states = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1).float()
        return states, out_g.text_embeds.float()


class DiffusersDistilUNet:
    """:class:`.distil.DistilUNet` over the trainer's :class:`.stages.FrozenUNet` (diffusers' UNet,
    the adapter through :mod:`..diffusers_processor`'s hook)."""

    def __init__(self, frozen: FrozenUNet) -> None:
        if frozen.hook is None:
            raise ValueError("attach the audio adapter to the frozen UNet first")
        self.frozen = frozen
        self.in_channels = frozen.unet.config.in_channels
        self.sdxl = getattr(frozen.unet.config, "addition_embed_type", None) == "text_time"
        self.alphas_cumprod = frozen.scheduler.alphas_cumprod.float().clone()
        self.prediction_type = frozen.scheduler.config.prediction_type

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        f = self.frozen
        extra = {}
        if self.sdxl:
            from ..sdxl import time_ids

            side = 8 * x.shape[-1]
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(f.dtype),
                                          "time_ids": time_ids(side, side, x.shape[0]).to(x.device, f.dtype)}
        return f.unet(x.to(f.dtype), t, encoder_hidden_states=context.to(f.dtype), **extra).sample.float()

    @contextlib.contextmanager
    def audio(self, tokens: torch.Tensor, token_levels: torch.Tensor) -> Iterator[None]:
        with self.frozen.hook.audio(tokens, token_levels):
            yield


__all__ = ["DiffusersDistilUNet", "SdxlContext", "encode_captions"]
