"""What flows between the pipeline's steps (and on the ComfyUI sockets): data only, never a model.

The modules that made the data are named by a *fingerprint* (:func:`fingerprint`), so a step that
needs the model (projection, the model injection) takes the model on its own wire and can refuse
data made by another file before anything is sampled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .errors import WiringError
from .levels import LEVELS, NUM_LEVELS


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Short SHA-256 of a state dict's names, dtypes, shapes and bytes: the identity of a file's weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def level_scale(foreground: float = 1.0, background: float = 1.0, ambience: float = 1.0) -> torch.Tensor:
    """``[3]`` the user's per-level weights (1 = as the model decided)."""
    return torch.tensor([foreground, background, ambience], dtype=torch.float32)


@dataclass(frozen=True)
class AudioLevels:
    """A sound decomposed into K tokens softly assigned to foreground / background / ambience.

    Attributes:
        tokens: ``[B, K, D]`` decomposer tokens.
        assignment: ``[B, K, 3]`` soft assignment of each token to the levels; rows sum to 1.
        level_weights: ``[B, 3]`` adaptive per-sample importance of each level; rows sum to 1.
        level_scale: ``[3]`` the user's per-level weights (1 = as the model decided). Not applied
            here: the tokens carry them to the injection, which applies them once.
        temperature: the softmax temperature the assignment was made with.
        source: fingerprint of the CLAP2Diffusion file that made them ("" when unknown).
    """

    tokens: torch.Tensor
    assignment: torch.Tensor
    level_weights: torch.Tensor
    level_scale: torch.Tensor
    temperature: float
    source: str = ""

    def with_level_scale(self, foreground: float, background: float, ambience: float) -> AudioLevels:
        return replace(self, level_scale=level_scale(foreground, background, ambience))

    def level_usage(self) -> torch.Tensor:
        """``[B, 3]`` share of the K tokens assigned to each level."""
        return self.assignment.mean(dim=1)


@dataclass(frozen=True)
class AudioTokens:
    """Audio as cross-attention tokens, ready for either injection; what Save Audio Tokens writes.

    Attributes:
        tokens: ``[B, N, C]`` projected audio tokens (N = 77), mean token norm = the file's
            norm_target, before the user's level weights.
        token_levels: ``[N]`` long, the level (0 fg, 1 bg, 2 ambience) each token carries.
        level_scale: ``[3]`` the user's per-level weights, applied once by the injection that uses
            the tokens (:meth:`weighted` for the conditioning, the adapter's values for the model).
        source: fingerprint of the CLAP2Diffusion file that made them; the model injection refuses
            tokens whose source is not the file it takes the adapter from.
        source_name: that file's name, for messages ("" when unknown).
        pooled: ``[B, P]`` the audio's pooled vector (SDXL: P = 1280, CLIP-G's width) from a file
            with a pooled head; None for SD1.5 files. Apply Audio to Conditioning mixes it into the
            conditioning's ``pooled_output``; the level weights do not act on it.
        pooled_weight: ``[B]`` per-row weight of the pooled mix (Scale Audio Tokens per Frame sets it
            to the frame weights that scale the token rows), None for 1.
    """

    tokens: torch.Tensor
    token_levels: torch.Tensor
    level_scale: torch.Tensor
    source: str
    source_name: str = ""
    pooled: torch.Tensor | None = None
    pooled_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"audio tokens must be [B, N, C], got {tuple(self.tokens.shape)}")
        if self.token_levels.shape != (self.tokens.shape[1],) or int(self.token_levels.max()) >= NUM_LEVELS:
            raise ValueError(
                f"token_levels {tuple(self.token_levels.shape)} does not match the tokens {tuple(self.tokens.shape)}"
            )
        if self.level_scale.shape != (NUM_LEVELS,):
            raise ValueError(f"level_scale must be [{NUM_LEVELS}] ({', '.join(LEVELS)}), got {tuple(self.level_scale.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != self.tokens.shape[0]):
            raise ValueError(f"pooled must be [B, P] with the tokens' B, got {tuple(self.pooled.shape)} "
                             f"for tokens {tuple(self.tokens.shape)}")
        if self.pooled_weight is not None and (self.pooled is None or self.pooled_weight.shape != self.pooled.shape[:1]):
            raise ValueError("pooled_weight must be [B], one per pooled row")

    @property
    def context_dim(self) -> int:
        return self.tokens.shape[-1]

    def with_level_scale(self, foreground: float, background: float, ambience: float) -> AudioTokens:
        return replace(self, level_scale=level_scale(foreground, background, ambience))

    def weighted(self) -> torch.Tensor:
        """``[B, N, C]`` the tokens with the user's level weights applied (the conditioning injection)."""
        scale = self.level_scale.to(self.tokens)[self.token_levels.to(self.tokens.device)]
        return self.tokens * scale.unsqueeze(-1)

    def describe_source(self) -> str:
        return f"{self.source_name} ({self.source})" if self.source_name else f"fingerprint {self.source}"

    def check_source(self, source: str, source_name: str = "", what: str = "this node") -> None:
        """Raise :class:`WiringError` unless these tokens were made by the file ``source``."""
        if self.source == source:
            return
        theirs = f"{source_name} ({source})" if source_name else f"fingerprint {source}"
        raise WiringError(
            f"these audio tokens were made by the CLAP2Diffusion file {self.describe_source()}, but {what} "
            f"was given {theirs}. The adapter only understands tokens from its own file: wire the same "
            "CLAP2Diffusion Loader into Audio Project (or Save Audio Tokens' source) and into this node."
        )
