"""Conditioning injection: audio tokens appended to the text tokens of a cross-attention context,
and, for families with a pooled vector (SDXL), the audio's pooled vector mixed into the text's."""

from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointError
from .types import AudioTokens

#: Share of the sound in the pooled vector per unit of strength: strength 1 gives the midpoint of
#: the text's and the sound's pooled vectors (an equal say, as the appended tokens share the
#: cross-attention with the text); strength 2 and above the sound's own.
POOLED_SHARE_PER_STRENGTH = 0.5


def append_audio_tokens(
    text: torch.Tensor, audio: torch.Tensor, strength: float
) -> torch.Tensor:
    """``text [B, T, C]`` + ``audio [B', N, C]`` -> ``[B, T + N, C]`` (or ``[B', ...]`` when B = 1).

    The audio tokens are scaled by ``strength``; a batch of one on either side is repeated to the
    other's size (one sound for a batch of prompts, or one prompt for a batch of windows).
    Strength 0 must mean "no audio", but zero tokens would still take softmax mass; the caller
    returns the text unchanged instead of calling this.
    """
    if text.ndim != 3 or audio.ndim != 3:
        raise ValueError(
            f"expected [B, T, C] text and [B, N, C] audio, got {tuple(text.shape)}, {tuple(audio.shape)}"
        )
    if text.shape[-1] != audio.shape[-1]:
        raise ValueError(
            f"audio tokens have context size {audio.shape[-1]} but the text conditioning has {text.shape[-1]}: "
            "this CLAP2Diffusion file was made for another base model family"
        )
    b_text, b_audio = text.shape[0], audio.shape[0]
    if b_text != b_audio:
        if b_audio == 1:
            audio = audio.expand(b_text, -1, -1)
        elif b_text == 1:
            text = text.expand(b_audio, -1, -1)
        else:
            raise ValueError(
                f"batch sizes differ: {b_text} text rows, {b_audio} audio rows"
            )
    audio = audio.to(device=text.device, dtype=text.dtype) * strength
    return torch.cat([text, audio], dim=1)


def pooled_share(strength: float) -> float:
    """The sound's share of the pooled vector at ``strength``: ``clamp(strength / 2, 0, 1)``."""
    return min(1.0, max(0.0, strength * POOLED_SHARE_PER_STRENGTH))


def mix_pooled(text: torch.Tensor, audio: torch.Tensor, strength: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``text [B, P]`` (the conditioning's ``pooled_output``) and ``audio [B', P]`` ->
    ``text + share * (audio - text)`` with ``share = pooled_share(strength)``: a straight line from
    the text's pooled vector to the sound's, never past it (both have the text encoder's norm, so
    the result stays in the range SDXL was trained on). ``weight [B']`` (per-frame weights) scales
    the strength row by row. Batches of one broadcast as in :func:`append_audio_tokens`. Strength 0
    is the caller's business (it returns the input).
    """
    if text.ndim != 2 or audio.ndim != 2:
        raise ValueError(f"expected [B, P] pooled vectors, got {tuple(text.shape)}, {tuple(audio.shape)}")
    if text.shape[-1] != audio.shape[-1]:
        raise CheckpointError(
            f"the audio's pooled vector has {audio.shape[-1]} values but the conditioning's pooled_output has "
            f"{text.shape[-1]}: this CLAP2Diffusion file was made for another base model family"
        )
    if text.shape[0] != audio.shape[0] and 1 not in (text.shape[0], audio.shape[0]):
        raise ValueError(f"batch sizes differ: {text.shape[0]} pooled text rows, {audio.shape[0]} audio rows")
    audio = audio.to(device=text.device, dtype=text.dtype)
    if weight is None:
        return text + pooled_share(strength) * (audio - text)
    share = (weight.to(audio) * strength * POOLED_SHARE_PER_STRENGTH).clamp(0.0, 1.0)[:, None]  # [B', 1]
    return text + share * (audio - text)


def apply_audio_to_conditioning(conditioning: list[list[Any]], audio: AudioTokens, strength: float) -> list[list[Any]]:
    """A ComfyUI CONDITIONING (``[[text [B, T, C], options], ...]``) with the audio in every entry:
    the tokens (level weights applied) appended at ``strength``, and the audio's pooled vector mixed
    into ``options["pooled_output"]`` by :func:`mix_pooled` when both exist (SDXL). Strength 0
    returns ``conditioning`` itself, so the image is exactly the text-only one. Raises
    :class:`CheckpointError` naming both families when the file was made for another base model,
    before anything is sampled. Options are copied, never changed in place.
    """
    from .checkpoint import check_context_dim  # checkpoint imports the model, which imports types

    if strength == 0:
        return conditioning
    for text, _ in conditioning:
        # Name both base models, not only both sizes (SD2 is 1024, SDXL 2048).
        check_context_dim(audio.context_dim, text.shape[-1], "this conditioning")
    # The user's level weights act here, once (the model injection applies them in the adapter).
    tokens = audio.weighted()
    out = []
    for text, options in conditioning:
        options = options.copy()
        if audio.pooled is not None and options.get("pooled_output") is not None:
            options["pooled_output"] = mix_pooled(options["pooled_output"], audio.pooled, strength, audio.pooled_weight)
        out.append([append_audio_tokens(text, tokens, strength), options])
    return out
