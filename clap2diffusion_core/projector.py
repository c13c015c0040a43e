"""Audio projection: decomposed audio -> 77 cross-attention tokens of the UNet's context size."""

from __future__ import annotations

import dataclasses

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


def rescale_to_norm(tokens: torch.Tensor, norm_target: float) -> torch.Tensor:
    """Scale each sample of ``tokens [B, N, C]`` so its mean token norm is ``norm_target``."""
    mean_norm = tokens.norm(dim=-1).mean(dim=1, keepdim=True).clamp_min(1e-6)
    return tokens * (norm_target / mean_norm).unsqueeze(-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from the output queries to the audio tokens, then a feed-forward."""

    def __init__(self, width: int, num_heads: int, ff_mult: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, width * ff_mult),
            nn.GELU(),
            nn.Linear(width * ff_mult, width),
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
    """

    token_levels: torch.Tensor

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.in_proj = nn.Linear(config.token_dim, w)
        self.level_embed = nn.Parameter(torch.randn(NUM_LEVELS, w) * 0.02)
        self.queries = nn.Parameter(torch.randn(config.num_tokens, w) * 0.02)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(w, config.num_heads, config.ff_mult)
            for _ in range(config.num_layers)
        )
        self.out_norm = nn.LayerNorm(w)
        self.out_proj = nn.Linear(w, config.context_dim)
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
        context = self.in_proj(levels.tokens) + levels.assignment @ self.level_embed
        queries = (self.queries + self.level_embed[self.token_levels]).expand(b, -1, -1)
        # [B, K, 3] -> [B, 1, N, K]: each query sees the tokens through its own level's assignment.
        bias = (
            levels.assignment.clamp_min(1e-6)
            .log()
            .transpose(1, 2)[:, self.token_levels]
            .unsqueeze(1)
        )
        for layer in self.layers:
            queries = layer(queries, context, bias)
        tokens = self.out_proj(self.out_norm(queries))
        tokens = tokens * (
            levels.level_weights[:, self.token_levels] * NUM_LEVELS
        ).unsqueeze(-1)
        return rescale_to_norm(tokens, self.config.norm_target)
