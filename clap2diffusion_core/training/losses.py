"""Training objectives. Shapes: ``B`` batch, ``N`` audio tokens (77), ``C`` context (768), ``K``
decomposer tokens, ``D`` their width, ``L`` levels (3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..types import AudioLevels


def info_nce(
    audio: torch.Tensor,
    text: torch.Tensor,
    temperature: float = 0.07,
    caption_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between ``audio [B, C]`` and ``text [B, C]`` (cosine similarity / temperature).

    Rows sharing a caption (``caption_index [B]``) are not negatives of each other: with several
    clips per caption, pushing them apart would fight the positives.
    """
    logits = F.normalize(audio.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature
    if caption_index is not None:
        same = caption_index[:, None] == caption_index[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def direction_mse(audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Squared distance between the unit directions of ``audio [B, C]`` and ``text [B, C]``, mean over B.

    The projector rescales its tokens to ``norm_target``, so only their direction is free to match
    the caption; this pulls each pair together where InfoNCE only ranks it above the others.
    """
    diff = F.normalize(audio.float(), dim=-1) - F.normalize(text.float(), dim=-1)
    return diff.pow(2).sum(-1).mean()


def level_summaries(levels: AudioLevels) -> torch.Tensor:
    """``[B, L, D]``: per level, the assignment-weighted mean of the decomposer tokens."""
    weights = levels.assignment / levels.assignment.sum(dim=1, keepdim=True).clamp_min(1e-6)  # [B, K, L]
    return torch.einsum("bkl,bkd->bld", weights, levels.tokens)


def orthogonality(levels: AudioLevels) -> torch.Tensor:
    """Sum over level pairs of the mean ``|cos|`` between their summaries (CLAP2Diffusion's term):
    zero when foreground, background and ambience carry different directions."""
    s = F.normalize(level_summaries(levels).float(), dim=-1)
    gram = s @ s.transpose(1, 2)  # [B, L, L]
    upper = torch.triu(torch.ones_like(gram[0], dtype=torch.bool), diagonal=1)
    return gram[:, upper].abs().mean(dim=0).sum()


def assignment_entropy(levels: AudioLevels) -> torch.Tensor:
    """Mean entropy (nats) of the tokens' level assignments. CLAP2Diffusion *maximises* it (the loss
    adds ``-weight * entropy``) so that annealing the temperature does not collapse every token onto
    one level before the levels have learnt what to carry."""
    a = levels.assignment.float().clamp_min(1e-8)
    return -(a * a.log()).sum(-1).mean()


def prior_kl(levels: AudioLevels, prior: Sequence[float]) -> torch.Tensor:
    """``KL(prior || usage)`` of the batch's level usage (share of tokens per level) against the
    5:3:2 prior: the decomposer may route any one sound as it likes, but on average the levels
    keep their intended sizes, which the projector's 39/23/15 token split assumes."""
    return prior_kl_of_usage(levels.assignment.float().mean(dim=(0, 1)), prior)


def prior_kl_of_usage(usage: torch.Tensor, prior: Sequence[float]) -> torch.Tensor:
    """:func:`prior_kl` from the level usage ``[L]`` (the mean assignment over a batch's tokens)."""
    p = torch.as_tensor(prior, dtype=torch.float32, device=usage.device)
    p = p / p.sum()
    usage = usage.float().clamp_min(1e-8)
    return (p * (p.log() - usage.log())).sum()


def diffusion_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The epsilon (or v) loss: MSE in float32 whatever the UNet's dtype."""
    return F.mse_loss(prediction.float(), target.float())
