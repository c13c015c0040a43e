"""The audio-tokens file: one sound's :class:`~.types.AudioTokens` as safetensors, encoded once, shared.

Tensors ``tokens [B, N, C]`` (fp32), ``token_levels [N]`` (int64), ``level_scale [3]`` (fp32) and,
from an SDXL-family file, ``pooled [B, P]`` (fp32) and, per-frame, ``pooled_weight [B]``;
metadata ``format`` (``clap2diffusion-audio-tokens``), ``format_version``, ``source`` (the
fingerprint of the CLAP2Diffusion file that made them), ``source_name``, ``context_dim`` and
``num_tokens``. Loading refuses pickles, cut files and safetensors that are not audio tokens,
naming what was found.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import refuse_non_safetensors
from .errors import TokensFileError
from .types import AudioTokens

FORMAT = "clap2diffusion-audio-tokens"
FORMAT_VERSION = 1
TENSORS = ("tokens", "token_levels", "level_scale")


def save_tokens(tokens: AudioTokens, path: str | os.PathLike) -> None:
    """Write ``tokens`` (CPU, contiguous, tokens in fp32) with their metadata to ``path``."""
    tensors = {
        "tokens": tokens.tokens.detach().to("cpu", torch.float32).contiguous(),
        "token_levels": tokens.token_levels.detach().to("cpu", torch.int64).contiguous(),
        "level_scale": tokens.level_scale.detach().to("cpu", torch.float32).contiguous(),
    }
    if tokens.pooled is not None:
        tensors["pooled"] = tokens.pooled.detach().to("cpu", torch.float32).contiguous()
    if tokens.pooled_weight is not None:
        tensors["pooled_weight"] = tokens.pooled_weight.detach().to("cpu", torch.float32).contiguous()
    save_file(
        tensors,
        os.fspath(path),
        metadata={
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "source": tokens.source,
            "source_name": tokens.source_name,
            "context_dim": str(tokens.context_dim),
            "num_tokens": str(tokens.tokens.shape[1]),
        },
    )


def load_tokens(path: str | os.PathLike) -> AudioTokens:
    """Read a file written by :func:`save_tokens`; :class:`TokensFileError` names any problem."""
    path = os.fspath(path)
    name = os.path.basename(path)
    refuse_non_safetensors(path, TokensFileError, "audio tokens")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            if metadata.get("format") != FORMAT:
                found = metadata.get("format", "no 'format' metadata")
                raise TokensFileError(
                    f"{name}: not an audio-tokens file (format: {found!r}, expected {FORMAT!r}). Load Audio "
                    "Tokens reads what Save Audio Tokens wrote; load models with their own loaders."
                )
            if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
                raise TokensFileError(
                    f"{name}: format_version {metadata['format_version']} is newer than this pack reads "
                    f"({FORMAT_VERSION}); update the pack."
                )
            missing = [k for k in TENSORS if k not in keys]
            if missing or "source" not in metadata:
                raise TokensFileError(f"{name}: audio-tokens file without {missing or ['source']}; save it again.")
            tensors = {k: f.get_tensor(k) for k in (*TENSORS, "pooled", "pooled_weight") if k in keys}
    except (SafetensorError, OSError) as err:
        raise TokensFileError(f"{name}: unreadable safetensors file ({err}); save or copy it again") from err
    try:
        return AudioTokens(
            tokens=tensors["tokens"].float(),
            token_levels=tensors["token_levels"].long(),
            level_scale=tensors["level_scale"].float(),
            source=metadata["source"],
            source_name=metadata.get("source_name", ""),
            pooled=tensors["pooled"].float() if "pooled" in tensors else None,
            pooled_weight=tensors["pooled_weight"].float() if "pooled_weight" in tensors else None,
        )
    except ValueError as err:
        raise TokensFileError(f"{name}: inconsistent audio-tokens file ({err}); save it again.") from err
