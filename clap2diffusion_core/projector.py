"""Audio projection: decomposed audio -> 77 cross-attention tokens of the UNet's context size."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModuleConfig
from .levels import LEVEL_PRIOR, NUM_LEVELS, split_by_prior
from .types import AudioLevels


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(ModuleConfig):
    token_dim: int = 32
    width: int = 208
    num_layers: int = 4
    num_heads: int = 8
    ff_mult: int = 4
    num_tokens: int = 77
    context_dim: int = 768
    #: Mean L2 norm of the output tokens ("Norm 60" of the original CLAP2Diffusion).
    norm_target: float = 60.0
    level_prior: tuple[float, ...] = LEVEL_PRIOR


def cast_like(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``param`` in ``x``'s dtype and on its device (a no-op when they match, as in training)."""
    return param.to(device=x.device, dtype=x.dtype)


def rescale_to_norm(tokens: torch.Tensor, norm_target: float) -> torch.Tensor:
    """Scale each sample of ``tokens [B, N, C]`` so its mean token norm is ``norm_target``."""
    mean_norm = tokens.norm(dim=-1).mean(dim=1, keepdim=True).clamp_min(1e-6)
    return tokens * (norm_target / mean_norm).unsqueeze(-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from the output queries to the audio tokens, then a feed-forward."""

    def __init__(self, width: int, num_heads: int, ff_mult: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = nn) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        ops, kw = operations, {"dtype": dtype, "device": device}
        self.norm_q = ops.LayerNorm(width, **kw)
        self.norm_kv = ops.LayerNorm(width, **kw)
        self.to_q = ops.Linear(width, width, **kw)
        self.to_k = ops.Linear(width, width, **kw)
        self.to_v = ops.Linear(width, width, **kw)
        self.to_out = ops.Linear(width, width, **kw)
        self.norm_ff = ops.LayerNorm(width, **kw)
        self.ff = nn.Sequential(
            ops.Linear(width, width * ff_mult, **kw),
            nn.GELU(),
            ops.Linear(width * ff_mult, width, **kw),
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, context: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """``queries [B, N, W]``, ``context [B, K, W]``, ``bias [B, 1, N, K]`` -> ``[B, N, W]``."""
        q = self._heads(self.to_q(self.norm_q(queries)))
        c = self.norm_kv(context)
        k, v = self._heads(self.to_k(c)), self._heads(self.to_v(c))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        queries = queries + self.to_out(attended.transpose(1, 2).flatten(2))
        return queries + self.ff(self.norm_ff(queries))


class AudioProjector(nn.Module):
    """:class:`AudioLevels` -> audio tokens ``[B, 77, context_dim]``, mean token norm ``norm_target``.

    The 77 output tokens are split across the levels by the 5:3:2 prior (39 foreground,
    23 background, 15 ambience; ``token_levels``). A token of level ``l`` attends to the decomposer
    tokens through a bias of ``log assignment[:, :, l]``, so it carries what was assigned to its level;
    that is what lets the model injection route levels to different UNet blocks. The adaptive level
    weights set the levels' relative norms before the rescale. The user's level weights are not
    applied here: the tokens carry them to the injection (``AudioTokens.level_scale``).
    About 2.2M parameters with the defaults.

    ``operations`` builds the layers (``Linear``, ``LayerNorm``): ``torch.nn`` for training, one of
    ComfyUI's ``comfy.ops`` classes in ComfyUI (no random init at load, weights cast per call when
    offloaded); ``dtype``/``device`` are the weights'. ``forward`` computes in its input's dtype.
    """

    token_levels: torch.Tensor

    def __init__(self, config: ProjectorConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = nn) -> None:
        super().__init__()
        self.config = config
        w = config.width
        kw = {"dtype": dtype, "device": device}
        self.in_proj = operations.Linear(config.token_dim, w, **kw)
        self.level_embed = nn.Parameter(torch.randn(NUM_LEVELS, w, **kw) * 0.02)
        self.queries = nn.Parameter(torch.randn(config.num_tokens, w, **kw) * 0.02)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(w, config.num_heads, config.ff_mult, operations=operations, **kw)
            for _ in range(config.num_layers)
        )
        self.out_norm = operations.LayerNorm(w, **kw)
        self.out_proj = operations.Linear(w, config.context_dim, **kw)
        counts = split_by_prior(config.num_tokens, config.level_prior)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)]
        )
        self.register_buffer("token_levels", levels, persistent=False)

    def forward(self, levels: AudioLevels) -> torch.Tensor:
        """AudioLevels with ``B`` rows -> tokens ``[B, num_tokens, context_dim]``."""
        if levels.tokens.shape[-1] != self.config.token_dim:
            raise ValueError(
                f"expected tokens [B, K, {self.config.token_dim}], got {tuple(levels.tokens.shape)}"
            )
        b = levels.tokens.shape[0]
        # The bare parameters follow the input (a partly offloaded model keeps them where they were).
        level_embed = cast_like(self.level_embed, levels.tokens)
        context = self.in_proj(levels.tokens) + levels.assignment @ level_embed
        token_levels = self.token_levels.to(levels.tokens.device)
        queries = (cast_like(self.queries, levels.tokens) + level_embed[token_levels]).expand(b, -1, -1)
        # [B, K, 3] -> [B, 1, N, K]: each query sees the tokens through its own level's assignment.
        bias = (
            levels.assignment.clamp_min(1e-6)
            .log()
            .transpose(1, 2)[:, token_levels]
            .unsqueeze(1)
        )
        for layer in self.layers:
            queries = layer(queries, context, bias)
        tokens = self.out_proj(self.out_norm(queries))
        tokens = tokens * (
            levels.level_weights[:, token_levels] * NUM_LEVELS
        ).unsqueeze(-1)
        return rescale_to_norm(tokens, self.config.norm_target)
