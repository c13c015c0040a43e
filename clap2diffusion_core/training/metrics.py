"""Evaluation: does a sound find its own caption?"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import CLAP2DiffusionModel
from .features import FeatureDataset


@torch.no_grad()
def caption_retrieval(
    model: CLAP2DiffusionModel, dataset: FeatureDataset, temperature: float | None = None
) -> dict[str, float]:
    """Top-1 / top-5 caption retrieval of every example of ``dataset`` among its distinct captions.

    A sound's query is its mean projected audio token, the caption's key its pooled CLIP text
    embedding (stage 1's InfoNCE pair); ``chance`` is 1 / number of distinct captions.
    """
    model = model.eval()
    device = model.device
    clap = dataset.stacked("clap").to(device)
    pooled_text = dataset.stacked("text_pooled")
    keys = torch.zeros(len(dataset.captions), pooled_text.shape[-1])
    keys[dataset.caption_index] = pooled_text  # every example of a caption has the same embedding
    queries = torch.cat([
        model.projector(model.decomposer(chunk, temperature)).mean(dim=1) for chunk in clap.split(256)
    ])
    scores = F.normalize(queries.float().cpu(), dim=-1) @ F.normalize(keys, dim=-1).T
    ranks = scores.argsort(dim=1, descending=True)
    target = dataset.caption_index[:, None]
    return {
        "top1": float((ranks[:, :1] == target).any(1).float().mean()),
        "top5": float((ranks[:, :5] == target).any(1).float().mean()),
        "chance": 1.0 / len(dataset.captions),
        "examples": len(dataset),
    }
