"""The caption corpus of the text-only fit: sound captions made from the sound vocabulary.

Stage 1 from text alone needs captions, not clips. They are written from the labels of
``data/sound_labels.json`` (what CLAP is asked to hear, with the level of each), in two kinds:

- **singles**: every label once, in a template of its level (``"the sound of dog bark"``,
  ``"heavy rain in the background"``, ``"eerie atmosphere"``), so every sound class is covered;
- **scenes**: a foreground event over a background scene, with an ambience in about half of them
  (``"dog bark with heavy rain in the background, eerie atmosphere"``), the mixtures real
  recordings are, drawn at random (labels and templates) from one seeded generator.

The corpus is a pure function of (vocabulary, size, seed, extra captions): the same inputs give the
same captions in the same order, and :func:`corpus_hash` names them. The level of every phrase in
a caption is recorded (:attr:`Caption.levels`); the fit does not use it yet.

User captions (a text file, one caption per line; blank lines and ``#`` comments skipped) come
first, before the generated ones, and count towards ``size``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import CorpusError
from ..vocabulary import Vocabulary, load_vocabulary

#: Captions in a default corpus: all 434 single labels plus 590 scenes. Their SD1.5 CLIP-L targets
#: encode in about a minute on 2 CPU cores; the fit steps take most of a fit (README figures).
DEFAULT_CORPUS_SIZE = 1024
MIN_CAPTIONS = 2

SINGLE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "foreground": ("{fg}", "the sound of {fg}", "{fg} nearby"),
    "background": ("{bg}", "the sound of {bg}", "{bg} in the background"),
    "ambience": ("{amb}", "{amb}, ambient sound"),
}
SCENE_TEMPLATES: tuple[str, ...] = (
    "{fg} with {bg}",
    "{fg} with {bg} in the background",
    "{fg} over {bg}",
    "{fg} and {bg}",
    "the sound of {fg} with {bg}",
)
AMBIENCE_SUFFIX = "{scene}, {amb}"


@dataclass(frozen=True)
class Caption:
    """One caption and the vocabulary labels in it: ``levels`` maps level -> label."""

    text: str
    levels: tuple[tuple[str, str], ...] = ()
    source: str = "generated"  # or "user"


def read_caption_file(path: str | os.PathLike) -> list[str]:
    """A user caption file: one caption per line, blank lines and ``#`` comments skipped."""
    with open(path, encoding="utf-8") as f:
        return parse_captions(f.read())


def parse_captions(text: str) -> list[str]:
    """Captions from text, one per line (as the node's multiline widget holds them)."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def build_corpus(
    size: int = DEFAULT_CORPUS_SIZE,
    seed: int = 0,
    extra: Iterable[str] = (),
    vocabulary: Vocabulary | None = None,
) -> list[Caption]:
    """``size`` distinct captions: the user's ``extra`` first, then the singles, then scenes.

    With ``size`` below the number of singles, a seeded sample of them is taken (every level
    represented in proportion). Raises :class:`CorpusError` if fewer than 2 captions result.
    """
    vocabulary = vocabulary or load_vocabulary()
    rng = random.Random(f"clap2diffusion-captions-{seed}")
    out: list[Caption] = []
    seen: set[str] = set()

    def add(caption: Caption) -> None:
        key = caption.text.casefold()
        if len(out) < size and key not in seen:
            seen.add(key)
            out.append(caption)

    for text in extra:
        text = " ".join(str(text).split())
        if text:
            add(Caption(text, (), "user"))
    singles = []
    for entry in vocabulary:
        template = rng.choice(SINGLE_TEMPLATES[entry.level])
        slot = {"foreground": "fg", "background": "bg", "ambience": "amb"}[entry.level]
        singles.append(Caption(template.format(**{slot: entry.label}), ((entry.level, entry.label),)))
    room = size - len(out)
    if room < len(singles):
        singles = rng.sample(singles, room)
    for caption in singles:
        add(caption)
    fg, bg, amb = (vocabulary.by_level(level) for level in ("foreground", "background", "ambience"))
    attempts = 0
    while len(out) < size and fg and bg and attempts < size * 20:
        attempts += 1
        f, b = rng.choice(fg), rng.choice(bg)
        scene = rng.choice(SCENE_TEMPLATES).format(fg=f.label, bg=b.label)
        levels = [("foreground", f.label), ("background", b.label)]
        if amb and rng.random() < 0.5:
            a = rng.choice(amb)
            scene = AMBIENCE_SUFFIX.format(scene=scene, amb=a.label)
            levels.append(("ambience", a.label))
        add(Caption(scene, tuple(levels)))
    check_corpus([c.text for c in out])
    return out


def check_corpus(captions: Sequence[str]) -> None:
    """Refuse a caption list the contrastive fit cannot learn from (InfoNCE needs negatives)."""
    distinct = {c.strip().casefold() for c in captions if c.strip()}
    if len(distinct) < MIN_CAPTIONS:
        found = "no captions" if not distinct else f"one caption ({next(iter(distinct))!r})"
        raise CorpusError(
            f"The text fit needs at least {MIN_CAPTIONS} different captions and got {found}: the "
            "projector learns by telling captions apart. Set the corpus size to 2 or more (the "
            "generated captions), or give more captions, one per line."
        )


def corpus_hash(captions: Sequence[str]) -> str:
    """sha256 of the captions in order (one per line): names the corpus a file was fitted on."""
    digest = hashlib.sha256()
    for text in captions:
        digest.update(text.encode("utf-8") + b"\n")
    return digest.hexdigest()


__all__ = [
    "DEFAULT_CORPUS_SIZE", "Caption", "CorpusError", "build_corpus", "check_corpus", "corpus_hash",
    "parse_captions", "read_caption_file",
]
