"""The CLAP2Diffusion file: one safetensors with the modules' weights and their config as metadata.

Keys are ``decomposer.*``, ``projector.*``, ``pooled_head.*`` in files for families with a pooled
vector (SDXL) and, from stage 2 on, ``adapter.*``. The metadata holds ``format`` (``clap2diffusion``),
``format_version``, ``base_family``, ``context_dim``, ``clap_dim``, ``num_tokens``, ``norm_target``,
``stage``, ``config`` (the JSON of :class:`ModelConfig`) and, with a pooled head, ``pooled_dim``.
Loading checks all of it and names what was expected and what was found.

A file with a pooled head is ``format_version`` 2, so a pack from before the head says "update the
pack" instead of "unexpected weights"; every other file is written as version 1, as before.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError
from .model import BASE_FAMILIES, CLAP2DiffusionModel, ModelConfig
from .types import fingerprint

FORMAT = "clap2diffusion"
#: The newest version this code reads and writes (2: a pooled head); files without one stay version 1.
FORMAT_VERSION = 2
REQUIRED_METADATA = (
    "format", "format_version", "base_family", "context_dim", "clap_dim", "num_tokens", "norm_target",
    "stage", "config",
)  # fmt: skip
#: Conventional file names per training stage, as in the original CLAP2Diffusion.
STAGE_FILE_NAMES = {
    1: "audio_projector_stage1",
    2: "audio_projector_stage2",
    3: "audio_projector_stage3_finetuned",
}


__all__ = [
    "CheckpointError", "check_context_dim", "load_checkpoint", "read_metadata", "refuse_non_safetensors",
    "save_checkpoint",
]


def build_metadata(config: ModelConfig) -> dict[str, str]:
    pooled = {} if config.pooled_dim is None else {"pooled_dim": str(config.pooled_dim)}
    return {
        "format": FORMAT,
        "format_version": "2" if pooled else "1",
        "base_family": config.base_family,
        "context_dim": str(config.context_dim),
        "clap_dim": str(config.decomposer.clap_dim),
        "num_tokens": str(config.projector.num_tokens),
        "norm_target": str(config.projector.norm_target),
        "stage": str(config.stage),
        "config": json.dumps(config.to_dict()),
        **pooled,
    }


def save_checkpoint(model: CLAP2DiffusionModel, path: str | os.PathLike) -> None:
    """Write ``model`` (fp32, contiguous) with its metadata to ``path`` (.safetensors)."""
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, os.fspath(path), metadata=build_metadata(model.config))


def safetensors_damage(path: str | os.PathLike) -> str | None:
    """Why a file that starts like safetensors cannot be whole, naming the expected and found
    sizes (a cut download); None if its size fits its header. Reads only the header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, less than the 8-byte header length every safetensors file starts with"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return (
                f"truncated: its header alone should be {header_len} bytes, but only {size - 8} follow the "
                f"header length (file size {size} bytes)"
            )
        try:
            header = json.loads(f.read(header_len))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError) as err:
            return f"its header is not valid safetensors JSON ({err})"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated: expected {expected} bytes, found {size} ({size / expected:.0%} of the file)"
    return None


def refuse_non_safetensors(path: str, error: type[Exception] = CheckpointError, what: str = "CLAP2Diffusion") -> None:
    """Raise ``error`` naming what the file is when it is not a whole safetensors file; pickles are
    never opened. ``what`` names the kind of file expected, for the message."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise error(f"{path}: file is empty or truncated ({len(head)} bytes); download it again")
    # A safetensors header length may start with byte 0x80 too (a 128 + 256k byte header): the '{'
    # at byte 8 tells it from a pickle's protocol byte.
    if head[8:9] != b"{" and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise error(
            f"{path}: this is a PyTorch pickle (.pt/.ckpt), not safetensors. Pickles can run code when "
            f"loaded, so CLAP2Diffusion only reads .safetensors {what} files; ask for (or convert to) a "
            ".safetensors file."
        )
    if head[8:9] != b"{":
        raise error(
            f"{path}: not a safetensors file: it starts with bytes {head[:10].hex(' ')} where a safetensors "
            f"file has an 8-byte header length and '{{'. CLAP2Diffusion reads only .safetensors {what} files "
            "(never pickles); is this the right file?"
        )
    damage = safetensors_damage(path)
    if damage:
        raise error(f"{path}: {damage}; download or copy it again")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's metadata, checked for the keys and version this code understands."""
    path = os.fspath(path)
    refuse_non_safetensors(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({err}); it may be truncated"
        ) from err
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise CheckpointError(
            f"{path}: missing CLAP2Diffusion metadata {missing}. Expected a file written by "
            "clap2diffusion_core.checkpoint.save_checkpoint (the training scripts do this)."
        )
    if metadata["format"] != FORMAT:
        raise CheckpointError(
            f"{path}: format is {metadata['format']!r}, expected {FORMAT!r}"
        )
    if int(metadata["format_version"]) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {metadata['format_version']} is newer than this pack reads "
            f"({FORMAT_VERSION}); update the pack."
        )
    return metadata


def _check_state(
    state: Mapping[str, torch.Tensor], model: CLAP2DiffusionModel, path: str
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k}: expected {expected[k]}, found {found[k]}" for k in sorted(expected.keys() & found.keys())
             if expected[k] != found[k]]  # fmt: skip
    if missing or unexpected or wrong:
        lines = [f"{path}: weights do not match the config in its metadata"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if items:
                shown = ", ".join(items[:8]) + (
                    f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                )
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))


def load_checkpoint(
    path: str | os.PathLike, device: torch.device | str = "cpu", *, dtype: torch.dtype | None = None,
    operations: Any = nn,
) -> CLAP2DiffusionModel:
    """Rebuild the model a file was saved from; raises :class:`CheckpointError` naming any mismatch.

    ``dtype`` stores the weights in another dtype than the file's float32 (ComfyUI: the one model
    management picks); ``operations`` builds the layers (see :class:`CLAP2DiffusionModel`). The
    fingerprint is always the file's, whatever the dtype, so tokens saved on one server are accepted by
    another that loads the same file in another dtype.
    """
    path = os.fspath(path)
    metadata = read_metadata(path)
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: config metadata is not understood ({err})"
        ) from err
    checks = [("context_dim", config.context_dim), ("stage", config.stage)]
    if "pooled_dim" in metadata or config.pooled_dim is not None:
        checks.append(("pooled_dim", config.pooled_dim))
    for key, value in checks:
        if metadata.get(key) is None or value is None or int(metadata[key]) != value:
            raise CheckpointError(
                f"{path}: metadata {key}={metadata.get(key)} but its config says {value}"
            )
    model = CLAP2DiffusionModel(config, name=os.path.basename(path), dtype=dtype, device=device, operations=operations)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: unreadable tensors ({err}); the file may be truncated"
        ) from err
    _check_state(state, model, path)
    if any(model.state_dict()[k].dtype != v.dtype for k, v in state.items()):
        model._fingerprint = fingerprint(state)  # of the file, before the cast
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def check_context_dim(made_for: int, context_dim: int, what: str = "this model") -> None:
    """Raise unless data made for cross-attention of ``made_for`` fits ``context_dim`` (768 for SD1.5)."""
    if made_for == context_dim:
        return
    family = {v: k for k, v in BASE_FAMILIES.items()}
    raise CheckpointError(
        f"CLAP2Diffusion file made for {family.get(made_for, 'an unknown family')} (context_dim {made_for}) "
        f"but {what} expects context_dim {context_dim} ({family.get(context_dim, 'unknown family')}). "
        "Use a CLAP2Diffusion file trained for this base model."
    )
