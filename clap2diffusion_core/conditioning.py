"""Conditioning injection: audio tokens appended to the text tokens of a cross-attention context."""

from __future__ import annotations

import torch


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
