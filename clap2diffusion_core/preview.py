"""A picture of a decomposition: which tokens went to which level, and how much each level weighs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .levels import LEVELS
from .types import AudioLevels

#: One colour per level (foreground, background, ambience).
LEVEL_COLORS = ((235, 110, 60), (70, 150, 220), (150, 110, 200))


def render_levels(
    levels: AudioLevels, max_samples: int = 4, cell: int = 24
) -> torch.Tensor:
    """Render up to ``max_samples`` rows of ``levels`` as images ``[S, H, W, 3]`` in 0..1 (ComfyUI IMAGE).

    Left: the ``[K, 3]`` assignment as a heat map (one row per token, one column per level).
    Right: the effective level weights (adaptive weight x user scale) as bars.
    """
    assignment = levels.assignment.detach().float().cpu()
    weights = (
        levels.level_weights.detach().float().cpu() * levels.level_scale.float().cpu()
    ).clamp_min(0)
    k = assignment.shape[1]
    label_w, bars_w, pad = 84, 150, 8
    width = label_w + 3 * cell + pad + bars_w + pad
    height = pad + 16 + k * cell + pad
    images = []
    for b in range(min(max_samples, assignment.shape[0])):
        img = Image.new("RGB", (width, height), (24, 24, 28))
        draw = ImageDraw.Draw(img)
        for lvl, name in enumerate(LEVELS):
            draw.text(
                (label_w + lvl * cell + 6, pad), name[0].upper(), fill=LEVEL_COLORS[lvl]
            )
        for i in range(k):
            y = pad + 16 + i * cell
            draw.text((pad, y + 6), f"token {i}", fill=(200, 200, 200))
            for lvl in range(3):
                a = float(assignment[b, i, lvl])
                color = tuple(int(24 + a * (c - 24)) for c in LEVEL_COLORS[lvl])
                x = label_w + lvl * cell
                draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=color)
        top = max(float(weights[b].max()), 1e-6)
        bar_x = label_w + 3 * cell + pad
        for lvl, name in enumerate(LEVELS):
            y = pad + 16 + lvl * (cell + 22)
            draw.text(
                (bar_x, y), f"{name} {float(weights[b, lvl]):.2f}", fill=(220, 220, 220)
            )
            length = int((bars_w - 4) * float(weights[b, lvl]) / top)
            draw.rectangle(
                [bar_x, y + 14, bar_x + max(length, 1), y + 14 + cell - 6],
                fill=LEVEL_COLORS[lvl],
            )
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
    return torch.stack(images)
