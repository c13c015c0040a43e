"""Sound -> prompt words with no trained module: CLAP zero-shot over the sound-label vocabulary.

CLAP puts audio and text in one embedding space, so the labels whose text embeddings lie nearest a
sound's embedding name what is heard. Per level (foreground, background, ambience) the best labels
above a threshold become prompt phrases, one prompt per audio embedding (per window of a long
sound, for storyboards).

Label embeddings cost one text-encoder pass over a few hundred labels, so they are computed once
per CLAP model: kept in memory per encoder object, and on disk keyed by a hash of the text
tower's weights and config, the tokenizer and the label texts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .levels import LEVELS
from .vocabulary import SoundLabel, Vocabulary, load_vocabulary

log = logging.getLogger(__name__)

#: How a label is put to CLAP's text tower; CLAP's training captions read like this.
DEFAULT_TEXT_TEMPLATES: tuple[str, ...] = ("the sound of {label}",)
#: Labels kept per level (foreground, background, ambience), in the spirit of the 5:3:2 prior.
DEFAULT_COUNTS: tuple[int, int, int] = (3, 2, 1)
#: ``cosine`` selection: minimum cosine similarity between the audio and a label's text.
DEFAULT_THRESHOLD = 0.15
#: How labels are chosen. ``relative`` (default): a label's cosine measured in standard deviations
#: above the mean over the whole vocabulary for this sound, which reads the same on CLAP models
#: whose raw cosines span different ranges (unfused, fused, music). ``cosine``: the raw cosine.
SELECTIONS: tuple[str, ...] = ("relative", "cosine")
DEFAULT_SELECTION = "relative"
#: ``relative`` selection: a label is used when it stands this many standard deviations above the
#: vocabulary's mean similarity for this sound (about the top 2 % of a few hundred labels).
DEFAULT_MIN_RELATIVE = 2.0
#: The template placeholders: the whole fragment, or one level's phrases.
PLACEHOLDERS = ("audio", *LEVELS)
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


class TextEncoder(Protocol):
    """What label embedding needs from a CLAP model (``clap.ClapEncoder`` is one)."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``texts`` -> ``[N, D]`` L2-normalised text embeddings."""
        ...


# --------------------------------------------------------------------------------------------
# Label embeddings


@dataclass(frozen=True)
class LabelBank:
    """The vocabulary's text embeddings for one CLAP model.

    Attributes:
        vocabulary: the labels; row ``i`` of ``embeddings`` belongs to ``vocabulary[i]``.
        embeddings: ``[L, D]`` float32 on the CPU, L2-normalised.
    """

    vocabulary: Vocabulary
    embeddings: torch.Tensor

    def scores(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each audio embedding with each label: ``[B, D]`` -> ``[B, L]``."""
        if audio_embeds.ndim != 2 or audio_embeds.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"expected audio embeddings [B, {self.embeddings.shape[1]}], "
                f"found {list(audio_embeds.shape)}"
            )
        audio = F.normalize(audio_embeds.detach().to("cpu", torch.float32), dim=-1)
        return audio @ self.embeddings.T


def encode_labels(
    encoder: TextEncoder,
    vocabulary: Vocabulary,
    templates: Sequence[str] = DEFAULT_TEXT_TEMPLATES,
    batch_size: int = 64,
) -> torch.Tensor:
    """Text embeddings of every label: ``[L, D]`` float32 CPU, L2-normalised.

    With several templates the embeddings are averaged and renormalised (prompt ensembling, as in
    CLIP's zero-shot classifiers). Batched so a few hundred labels never make one huge text batch.
    """
    total: torch.Tensor | None = None
    for template in templates:
        texts = [template.format(label=entry.label) for entry in vocabulary]
        chunks = [
            encoder.encode_text(texts[start : start + batch_size]).detach().to("cpu", torch.float32)
            for start in range(0, len(texts), batch_size)
        ]
        embeds = F.normalize(torch.cat(chunks), dim=-1)
        total = embeds if total is None else total + embeds
    if total is None:
        raise ValueError("at least one text template is needed")
    return F.normalize(total, dim=-1)


_TEXT_TOWER_PREFIXES = ("text_model.", "text_projection.")


def model_fingerprint(encoder: object) -> str | None:
    """A hash of what a CLAP model's text embeddings depend on, or ``None`` if it cannot tell.

    Uses ``encoder.fingerprint`` when the encoder provides one; otherwise hashes the config, the
    tokenizer's vocabulary and the weights of ``encoder.model`` (only the text tower of a
    transformers ClapModel: fine-tuning the audio tower leaves label embeddings valid). Hashing
    the 125M text-tower weights takes about a second on a CPU, where encoding the labels takes
    about a minute.
    """
    given = getattr(encoder, "fingerprint", None)
    if callable(given):
        given = given()
    if isinstance(given, str) and given:
        return given
    module = getattr(encoder, "model", None)  # clap.ClapEncoder wraps a transformers ClapModel
    if not isinstance(module, torch.nn.Module):
        module = encoder if isinstance(encoder, torch.nn.Module) else None
    if module is None:
        return None
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):
        digest.update(json.dumps(_model_settings(config.to_dict()), sort_keys=True, default=str).encode())
    tokenizer = getattr(encoder, "tokenizer", None)
    if hasattr(tokenizer, "get_vocab"):
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    state = module.state_dict()
    text_keys = [k for k in state if k.startswith(_TEXT_TOWER_PREFIXES)]
    for key in sorted(text_keys or state):
        tensor = state[key].detach()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _model_settings(config: dict) -> dict:
    """A config without what does not change the model (where it was loaded from, which
    transformers wrote it), so the same weights hash the same wherever they come from."""
    return {
        str(key): _model_settings(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if not (isinstance(key, str) and (key.startswith("_") or key == "transformers_version"))
    }


class LabelEmbeddingCache:
    """Label embeddings per CLAP model: in memory per encoder object, on disk per model hash.

    The memory cache holds encoders weakly, so unloading a CLAP model frees its entries. The disk
    cache (``cache_dir``, optional) survives restarts; a file that cannot be read is recomputed
    and a directory that cannot be written only costs the speed-up.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        templates: Sequence[str] = DEFAULT_TEXT_TEMPLATES,
        batch_size: int = 64,
    ) -> None:
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self._memory: weakref.WeakKeyDictionary[object, dict[str, LabelBank]] = (
            weakref.WeakKeyDictionary()
        )

    def get(
        self,
        encoder: TextEncoder,
        vocabulary: Vocabulary | None = None,
        model_key: str | None = None,
    ) -> LabelBank:
        """The label bank of ``vocabulary`` (default: the pack's) for ``encoder``.

        ``model_key`` overrides :func:`model_fingerprint` as the disk-cache key of the model.
        """
        vocabulary = vocabulary if vocabulary is not None else load_vocabulary()
        text_key = self._text_key(vocabulary)
        per_encoder = self._memory.setdefault(encoder, {})
        bank = per_encoder.get(text_key)
        if bank is None:
            bank = self._from_disk_or_encode(encoder, vocabulary, text_key, model_key)
            per_encoder[text_key] = bank
        return bank

    def clear(self) -> None:
        self._memory.clear()

    def _text_key(self, vocabulary: Vocabulary) -> str:
        digest = hashlib.sha256(vocabulary.text_fingerprint.encode())
        for template in self.templates:
            digest.update(b"\0" + template.encode())
        return digest.hexdigest()

    def _from_disk_or_encode(
        self,
        encoder: TextEncoder,
        vocabulary: Vocabulary,
        text_key: str,
        model_key: str | None,
    ) -> LabelBank:
        path = None
        if self.cache_dir is not None:
            model_key = model_key or model_fingerprint(encoder)
            if model_key is not None:
                name = hashlib.sha256(f"{model_key}\0{text_key}".encode()).hexdigest()[:32]
                path = os.path.join(self.cache_dir, f"labels-{name}.safetensors")
                embeddings = _read_cached(path, len(vocabulary))
                if embeddings is not None:
                    return LabelBank(vocabulary, embeddings)
        embeddings = encode_labels(encoder, vocabulary, self.templates, self.batch_size)
        if path is not None:
            _write_cached(path, embeddings, model_key or "", text_key)
        return LabelBank(vocabulary, embeddings)


def _read_cached(path: str, num_labels: int) -> torch.Tensor | None:
    if not os.path.exists(path):
        return None
    try:
        embeddings = load_file(path)["embeddings"]
    except (OSError, KeyError, SafetensorError) as err:  # torn or foreign: a miss, not a failure
        log.warning("clap2diffusion: ignoring unreadable label cache %s (%s)", path, err)
        return None
    if embeddings.ndim != 2 or embeddings.shape[0] != num_labels:
        log.warning("clap2diffusion: ignoring label cache %s of shape %s", path, embeddings.shape)
        return None
    return embeddings.float()


def _write_cached(path: str, embeddings: torch.Tensor, model_key: str, text_key: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(
            {"embeddings": embeddings.contiguous()},
            tmp,
            metadata={"model_key": model_key, "text_key": text_key},
        )
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as err:
        log.warning("clap2diffusion: cannot write label cache %s (%s)", path, err)
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# Selection and formatting


@dataclass(frozen=True)
class LabelScore:
    label: SoundLabel
    score: float  # what selection compared with its cut-off: cosine, or relative (std above the mean)
    cosine: float | None = None  # the raw cosine similarity with the audio embedding


def relative_scores(cosines: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` cosines -> how many standard deviations each stands above its row's mean.

    Any positive affine change of a model's cosine range (a model whose cosines are twice as
    spread, or shifted) leaves these unchanged, so one cut-off suits every CLAP model.
    """
    mean = cosines.mean(dim=1, keepdim=True)
    std = cosines.std(dim=1, keepdim=True).clamp(min=1e-8)
    return (cosines - mean) / std


@dataclass(frozen=True)
class AudioPrompt:
    """Prompt words for one audio embedding (a whole sound, or one window of it).

    Attributes:
        text: the template with its placeholders filled (the fragment alone without a template).
        fragment: the selected phrases of all levels, foreground first, comma-separated.
        levels: level -> that level's selected phrases, comma-separated ("" if none).
        selected: level -> the labels used, best first: above the threshold, at most the count.
        candidates: level -> the best-scoring labels whether used or not, best first (previews);
            ``max(count, num_candidates)`` of them.
    """

    text: str
    fragment: str
    levels: dict[str, str]
    selected: dict[str, tuple[LabelScore, ...]]
    candidates: dict[str, tuple[LabelScore, ...]]


def describe_audio(
    audio_embeds: torch.Tensor,
    bank: LabelBank,
    counts: Sequence[int] | Mapping[str, int] = DEFAULT_COUNTS,
    threshold: float | None = None,
    template: str = "",
    num_candidates: int = 5,
    selection: str = DEFAULT_SELECTION,
) -> list[AudioPrompt]:
    """One :class:`AudioPrompt` per row of ``audio_embeds`` ``[B, D]``.

    Args:
        counts: labels kept per level, in ``LEVELS`` order or by level name (0 turns a level off).
        threshold: a label is used only if its score is at least this: standard deviations above
            the vocabulary's mean (``relative``, default :data:`DEFAULT_MIN_RELATIVE`) or cosine
            similarity (``cosine``, default :data:`DEFAULT_THRESHOLD`).
        selection: ``relative`` or ``cosine`` (see :data:`SELECTIONS`).
        template: text with ``{audio}`` (and/or ``{foreground}``, ``{background}``,
            ``{ambience}``); see :func:`fill_template`.
        num_candidates: labels per level reported in ``candidates`` (never fewer than the count).
    """
    if isinstance(counts, Mapping):
        counts = [counts.get(level, 0) for level in LEVELS]
    if len(counts) != len(LEVELS) or any(c < 0 for c in counts):
        raise ValueError(f"expected {len(LEVELS)} non-negative counts, found {list(counts)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    if threshold is None:
        threshold = DEFAULT_MIN_RELATIVE if selection == "relative" else DEFAULT_THRESHOLD
    cosines = bank.scores(audio_embeds)  # [B, L]
    scores = relative_scores(cosines) if selection == "relative" else cosines
    level_of_label = torch.tensor(bank.vocabulary.level_indices)  # [L]

    # Per level: the top-k labels of every row at once, k = what the previews or the prompt need.
    top: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, level in enumerate(LEVELS):
        columns = (level_of_label == index).nonzero().squeeze(1)  # label ids of this level
        k = min(max(counts[index], num_candidates), len(columns))
        values, order = scores[:, columns].topk(k, dim=1)  # [B, k]
        top[level] = (values, columns[order])

    prompts = []
    for row in range(scores.shape[0]):
        candidates: dict[str, tuple[LabelScore, ...]] = {}
        selected: dict[str, tuple[LabelScore, ...]] = {}
        for index, level in enumerate(LEVELS):
            values, ids = top[level]
            ranked = tuple(
                LabelScore(bank.vocabulary[i], v, float(cosines[row, i]))
                for v, i in zip(values[row].tolist(), ids[row].tolist())
            )
            candidates[level] = ranked
            selected[level] = tuple(s for s in ranked[: counts[index]] if s.score >= threshold)
        level_texts = {
            level: join_phrases(s.label.phrase for s in selected[level]) for level in LEVELS
        }
        fragment = join_phrases(s.label.phrase for level in LEVELS for s in selected[level])
        prompts.append(
            AudioPrompt(
                text=fill_template(template, fragment, level_texts),
                fragment=fragment,
                levels=level_texts,
                selected=selected,
                candidates=candidates,
            )
        )
    return prompts


def join_phrases(phrases: Iterable[str]) -> str:
    """Comma-join phrases, dropping repeated items ("rain, storm" + "storm" -> "rain, storm")."""
    items: dict[str, str] = {}
    for phrase in phrases:
        for item in phrase.split(","):
            item = item.strip()
            if item:
                items.setdefault(item.casefold(), item)
    return ", ".join(items.values())


def fill_template(template: str, audio: str, levels: Mapping[str, str]) -> str:
    """Put the sound's words into the user's prompt.

    ``{audio}`` becomes the whole fragment and ``{foreground}``, ``{background}``, ``{ambience}``
    that level's phrases. Other braces are left alone, so wildcard syntax such as ``{red|blue}``
    survives. An empty template gives the fragment; a template without placeholders gets the
    fragment appended (``"a beach"`` -> ``"a beach, thunderstorm, rain"``). Separators left empty
    by an empty substitution are removed (``"a beach, {audio}, photo"`` -> ``"a beach, photo"``).
    """
    if not template.strip():
        return audio
    values = {"audio": audio, **levels}
    if _PLACEHOLDER.search(template) is None:
        template = template.rstrip().rstrip(",") + ", {audio}"
    text = _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)
    text = re.sub(r",[ \t]*(?=,)", "", text)  # ", ," -> ","
    return text.strip().strip(",").strip()


# --------------------------------------------------------------------------------------------
# Preview


def render_scores(
    prompts: Sequence[AudioPrompt], threshold: float, max_images: int = 16, width: int = 512,
    score_name: str = "threshold",
) -> torch.Tensor:
    """Bar charts of each prompt's best labels per level: ``[min(N, max_images), H, W, 3]`` in 0..1.

    Labels used in the prompt are drawn in their level's colour, the others grey; the dashed line
    is the threshold. All charts share one scale, so windows of one sound compare at a glance.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .preview import LEVEL_COLORS

    prompts = list(prompts)[:max_images]
    if not prompts:
        raise ValueError("nothing to render")
    font = ImageFont.load_default(size=13)
    rows = max(len(p.candidates[level]) for p in prompts for level in LEVELS)
    every = [s.score for p in prompts for ranked in p.candidates.values() for s in ranked]
    low = min(0.0, threshold, *every)
    high = max(threshold, *every, low + 1e-3)
    pad, row_h, head_h, label_w, score_w = 8, 18, 20, 190, 44
    bar_x0, bar_x1 = pad + label_w, width - pad - score_w

    def x_of(score: float) -> int:
        return round(bar_x0 + (bar_x1 - bar_x0) * (score - low) / (high - low))

    height = pad + head_h + len(LEVELS) * (head_h + rows * row_h) + pad
    images = []
    for index, prompt in enumerate(prompts):
        image = Image.new("RGB", (width, height), (24, 24, 28))
        draw = ImageDraw.Draw(image)
        title = f"window {index + 1} of {len(prompts)}" if len(prompts) > 1 else "CLAP label scores"
        heading = f"{title}   {score_name} {threshold:.2f}"
        draw.text((pad, pad), heading, fill=(220, 220, 220), font=font)
        y = pad + head_h
        for level_index, level in enumerate(LEVELS):
            color = LEVEL_COLORS[level_index]
            draw.text((pad, y + 3), level, fill=color, font=font)
            y += head_h
            used = {s.label.label for s in prompt.selected[level]}
            for entry in prompt.candidates[level]:
                chosen = entry.label.label in used
                text_color = (235, 235, 235) if chosen else (140, 140, 140)
                name = _fit(draw, entry.label.label, font, label_w - 14)
                draw.text((pad + 10, y + 2), name, fill=text_color, font=font)
                left, right = sorted((x_of(0.0), x_of(entry.score)))
                bar = [left, y + 3, max(right, left + 1), y + row_h - 3]
                draw.rectangle(bar, fill=color if chosen else (85, 85, 92))
                draw.text((bar_x1 + 6, y + 2), f"{entry.score:.2f}", fill=text_color, font=font)
                y += row_h
            y += rows * row_h - len(prompt.candidates[level]) * row_h
        top, bottom, line_x = pad + head_h, height - pad, x_of(threshold)
        for dash in range(top, bottom, 6):
            draw.line([(line_x, dash), (line_x, min(dash + 3, bottom))], fill=(240, 220, 90))
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    return torch.stack(images)


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
