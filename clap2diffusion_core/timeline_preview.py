"""The timeline picture: frames, the top label per level over time, loudness and change points."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .levels import LEVELS
from .preview import LEVEL_COLORS


def _runs(values: Sequence[str]) -> list[tuple[int, int, str]]:
    """``["a", "a", "b"]`` -> ``[(0, 2, "a"), (2, 3, "b")]``: (start, end, value) of equal runs."""
    runs: list[tuple[int, int, str]] = []
    for i, value in enumerate(values):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], i + 1, value)
        else:
            runs.append((i, i + 1, value))
    return runs


def render_timeline(
    fps: float,
    top_labels: dict[str, Sequence[str]],
    envelope: Sequence[float] | None = None,
    onsets: Sequence[float] | None = None,
    change_frames: Sequence[int] = (),
    width: int = 1024,
) -> torch.Tensor:
    """One image ``[1, H, W, 3]`` in 0..1 (ComfyUI IMAGE) of a clip's schedule.

    ``top_labels``: level -> the label shown per frame ("" for none). ``envelope`` / ``onsets``:
    per-frame 0..1 curves. Change points are drawn as red lines across every lane.
    """
    from PIL import Image, ImageDraw, ImageFont

    frames = max(len(v) for v in top_labels.values()) if top_labels else len(envelope or ())
    if frames < 1:
        raise ValueError("nothing to draw: no frames")
    font = ImageFont.load_default(size=12)
    pad, label_w, lane_h, curve_h, axis_h = 8, 92, 22, 60, 18
    x0, x1 = pad + label_w, width - pad
    lanes = [level for level in LEVELS if level in top_labels]
    height = pad + axis_h + len(lanes) * (lane_h + 4) + (curve_h + 4 if envelope is not None else 0) + pad
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)

    def x_of(frame: float) -> float:
        return x0 + (x1 - x0) * frame / frames

    # Frame axis: a tick per second, labelled with the frame number.
    seconds = frames / fps
    step = max(1, int(np.ceil(seconds / 10)))
    for second in range(0, int(seconds) + 1, step):
        frame = second * fps
        x = x_of(frame)
        draw.line([(x, pad + axis_h - 5), (x, pad + axis_h)], fill=(160, 160, 160))
        draw.text((x + 2, pad), f"{int(round(frame))}", fill=(160, 160, 160), font=font)
    draw.text((pad, pad), f"frame @ {fps:g} fps", fill=(200, 200, 200), font=font)

    y = pad + axis_h
    for level in lanes:
        color = LEVEL_COLORS[LEVELS.index(level)]
        draw.text((pad, y + 4), level, fill=color, font=font)
        for start, end, label in _runs(list(top_labels[level])):
            if not label:
                continue
            box = [x_of(start), y + 1, max(x_of(end) - 1, x_of(start) + 1), y + lane_h - 1]
            draw.rectangle(box, fill=tuple(c // 2 for c in color), outline=color)
            text = label
            room = box[2] - box[0] - 4
            while text and draw.textlength(text, font=font) > room:
                text = text[:-1]
            draw.text((box[0] + 3, y + 4), text, fill=(240, 240, 240), font=font)
        y += lane_h + 4

    if envelope is not None:
        draw.text((pad, y + 4), "loudness", fill=(200, 200, 200), font=font)
        top, bottom = y + 2, y + curve_h
        if onsets is not None:
            draw.text((pad, y + 20), "onsets", fill=(120, 200, 120), font=font)
            for i, value in enumerate(onsets):
                x = x_of(i + 0.5)
                draw.line([(x, bottom), (x, bottom - (bottom - top) * float(value))], fill=(70, 130, 70))
        points = [(x_of(i + 0.5), bottom - (bottom - top) * float(v)) for i, v in enumerate(envelope)]
        if len(points) > 1:
            draw.line(points, fill=(230, 230, 230), width=2)
        y += curve_h + 4

    for frame in change_frames:
        x = x_of(frame)
        draw.line([(x, pad + axis_h), (x, y)], fill=(235, 60, 60), width=2)
        draw.text((x + 3, pad + axis_h - 14), f"{frame}", fill=(235, 90, 90), font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
