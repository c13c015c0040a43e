"""A prompt schedule from per-frame label scores: words that change when the sound does, not before.

Per level (foreground, background, ambience) a set of at most ``count`` labels is carried from
frame to frame. A label joins when it is among the level's best ``count`` and scores at least the
threshold; a label in the set leaves only when a newcomer beats it by ``margin`` or it falls
``margin`` below the threshold, and never within ``min_frames`` of joining. That hysteresis keeps
words from flickering when two labels score alike.

Output formats:
- one prompt per frame (a STRING list, for nodes that take a prompt per batch item), and
- keyframe text, one line per change, as prompt-schedule nodes (FizzNodes' Batch Prompt
  Schedule and its followers) read it: ``"0": "rain", "80": "thunder"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .levels import LEVELS
from .prompt import DEFAULT_COUNTS, DEFAULT_THRESHOLD, fill_template, join_phrases
from .vocabulary import Vocabulary

#: A newcomer must beat a held label by this much cosine similarity to replace it.
DEFAULT_MARGIN = 0.02
#: A label stays at least this many frames once chosen.
DEFAULT_MIN_FRAMES = 4


@dataclass(frozen=True)
class PromptSchedule:
    """Prompts over frames.

    Attributes:
        prompts: one prompt per frame.
        labels: per frame, level -> the labels held (in the order they joined).
        keyframes: ``(frame, prompt)`` at frame 0 and wherever the prompt changes.
    """

    prompts: list[str]
    labels: list[dict[str, tuple[str, ...]]]
    keyframes: list[tuple[int, str]]

    def keyframe_text(self) -> str:
        """``"0": "...",\\n"48": "..."``: the text prompt-schedule nodes read."""
        return ",\n".join(f"{json.dumps(str(frame))}: {json.dumps(text)}" for frame, text in self.keyframes)


def hold_labels(
    scores: torch.Tensor, count: int, threshold: float, margin: float = DEFAULT_MARGIN,
    min_frames: int = DEFAULT_MIN_FRAMES,
) -> list[tuple[int, ...]]:
    """Per frame, the columns of ``scores [F, L]`` held with hysteresis (at most ``count``)."""
    if count <= 0:
        return [()] * scores.shape[0]
    held: list[int] = []
    since: dict[int, int] = {}
    out: list[tuple[int, ...]] = []
    k = min(count, scores.shape[1])
    for frame, row in enumerate(scores.tolist()):
        best = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        newcomers = [i for i in best if i not in held and row[i] >= threshold]
        # A held label that fell well under the threshold leaves (if it has been held long enough).
        for label in list(held):
            if row[label] < threshold - margin and frame - since[label] >= min_frames:
                held.remove(label)
        # Free slots take the best newcomers.
        while newcomers and len(held) < k:
            label = newcomers.pop(0)
            held.append(label)
            since[label] = frame
        # A newcomer replaces the weakest held label only when it beats it clearly.
        while newcomers:
            weakest = min(held, key=lambda i: row[i])
            label = newcomers[0]
            if row[label] <= row[weakest] + margin or frame - since[weakest] < min_frames:
                break
            newcomers.pop(0)
            held[held.index(weakest)] = label
            since[label] = frame
        out.append(tuple(held))
    return out


def prompt_schedule(
    scores: torch.Tensor,
    vocabulary: Vocabulary,
    counts: Sequence[int] = DEFAULT_COUNTS,
    threshold: float = DEFAULT_THRESHOLD,
    margin: float = DEFAULT_MARGIN,
    min_frames: int = DEFAULT_MIN_FRAMES,
    template: str = "",
) -> PromptSchedule:
    """``scores [F, L]`` (cosine similarity of each frame's embedding with each label) -> schedule.

    ``counts``, ``threshold`` and ``template`` mean what they mean for Audio to Prompt
    (:func:`prompt.describe_audio`); ``margin`` and ``min_frames`` are the hysteresis.
    """
    if scores.ndim != 2 or scores.shape[1] != len(vocabulary):
        raise ValueError(f"expected scores [F, {len(vocabulary)}], found {list(scores.shape)}")
    if len(counts) != len(LEVELS) or any(c < 0 for c in counts):
        raise ValueError(f"expected {len(LEVELS)} non-negative counts, found {list(counts)}")
    level_of_label = torch.tensor(vocabulary.level_indices)
    per_level: dict[str, list[tuple[str, ...]]] = {}
    for index, level in enumerate(LEVELS):
        columns = (level_of_label == index).nonzero().squeeze(1)
        held = hold_labels(scores[:, columns], counts[index], threshold, margin, min_frames)
        ids = columns.tolist()
        per_level[level] = [tuple(vocabulary[ids[c]].label for c in frame) for frame in held]
    phrases = {entry.label: entry.phrase for entry in vocabulary}
    prompts: list[str] = []
    labels: list[dict[str, tuple[str, ...]]] = []
    keyframes: list[tuple[int, str]] = []
    for frame in range(scores.shape[0]):
        chosen = {level: per_level[level][frame] for level in LEVELS}
        level_texts = {level: join_phrases(phrases[label] for label in chosen[level]) for level in LEVELS}
        fragment = join_phrases(phrases[label] for level in LEVELS for label in chosen[level])
        text = fill_template(template, fragment, level_texts)
        if not prompts or text != prompts[-1]:
            keyframes.append((frame, text))
        prompts.append(text)
        labels.append(chosen)
    return PromptSchedule(prompts, labels, keyframes)
