"""The sound-label vocabulary of the training-free "Audio to Prompt" path.

The labels are data (``data/sound_labels.json``), written for this pack and modelled on the names
of the AudioSet ontology's classes. Each label sits in exactly one of the three levels and carries
two texts: ``label``, what CLAP is asked to hear ("dog bark"), and ``phrase``, what the image
prompt gets ("dog barking"), because the words that best name a sound are often not the words that
best draw its source.

File format (``format_version`` 1)::

    {"format": "clap2diffusion-sound-labels", "format_version": 1,
     "levels": {"foreground": {"<label>": "<phrase>", ...}, "background": {...}, "ambience": {...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from .errors import VocabularyError
from .levels import LEVELS

FORMAT = "clap2diffusion-sound-labels"
FORMAT_VERSION = 1
DEFAULT_VOCABULARY_PATH = os.path.join(os.path.dirname(__file__), "data", "sound_labels.json")


@dataclass(frozen=True)
class SoundLabel:
    """One sound class: ``label`` is what CLAP hears, ``phrase`` what the image prompt gets."""

    label: str
    level: str  # one of LEVELS
    phrase: str

    @property
    def level_index(self) -> int:
        return LEVELS.index(self.level)


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, validated set of sound labels; row ``i`` of any label tensor is ``labels[i]``."""

    labels: tuple[SoundLabel, ...]

    def __post_init__(self) -> None:
        seen: dict[str, SoundLabel] = {}
        for entry in self.labels:
            if entry.level not in LEVELS:
                raise VocabularyError(
                    f"label {entry.label!r} has level {entry.level!r}; expected one of {LEVELS}"
                )
            for name, text in (("label", entry.label), ("phrase", entry.phrase)):
                if not isinstance(text, str) or not text.strip() or text != text.strip():
                    raise VocabularyError(
                        f"{name} {text!r} of {entry.label!r} must be a non-empty string without "
                        "surrounding whitespace"
                    )
            key = entry.label.casefold()
            if key in seen:
                other = seen[key]
                raise VocabularyError(
                    f"label {entry.label!r} ({entry.level}) duplicates {other.label!r} "
                    f"({other.level}): every label belongs to exactly one level"
                )
            seen[key] = entry

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[SoundLabel]:
        return iter(self.labels)

    def __getitem__(self, index: int) -> SoundLabel:
        return self.labels[index]

    def by_level(self, level: str) -> tuple[SoundLabel, ...]:
        return tuple(entry for entry in self.labels if entry.level == level)

    def find(self, label: str) -> SoundLabel:
        """The entry named ``label`` (case-insensitive); ``KeyError`` if there is none."""
        key = label.casefold()
        for entry in self.labels:
            if entry.label.casefold() == key:
                return entry
        raise KeyError(label)

    @property
    def level_indices(self) -> tuple[int, ...]:
        """``[L]`` the level index (0 fg, 1 bg, 2 ambience) of each label, in label order."""
        return tuple(entry.level_index for entry in self.labels)

    @cached_property
    def text_fingerprint(self) -> str:
        """Hash of the label texts in order: all that the label *embeddings* depend on.

        Levels and phrases are left out on purpose, so editing a phrase keeps cached embeddings.
        """
        digest = hashlib.sha256()
        for entry in self.labels:
            digest.update(entry.label.encode("utf-8") + b"\0")
        return digest.hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Vocabulary:
        """Validate the file's JSON object (see the module docstring) and build the vocabulary."""

        def fail(message: str) -> VocabularyError:
            return VocabularyError(f"{source}: {message}")

        if not isinstance(data, Mapping):
            raise fail(f"expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise fail(
                f"expected format {FORMAT!r} version {FORMAT_VERSION}, found "
                f"{data.get('format')!r} version {data.get('format_version')!r}"
            )
        levels = data.get("levels")
        if not isinstance(levels, Mapping):
            raise fail("expected 'levels': an object of level -> {label: phrase}")
        unknown = [name for name in levels if name not in LEVELS]
        if unknown:
            raise fail(f"unknown level(s) {unknown}; expected {list(LEVELS)}")
        labels: list[SoundLabel] = []
        for level in LEVELS:  # canonical level order, whatever the file's order
            entries = levels.get(level, {})
            if not isinstance(entries, Mapping):
                raise fail(f"level {level!r} must be an object of label -> phrase")
            for label, phrase in entries.items():
                if not isinstance(phrase, str):
                    raise fail(f"phrase of {label!r} must be a string, found {phrase!r}")
                labels.append(SoundLabel(label=label, level=level, phrase=phrase))
        if not labels:
            raise fail("no labels")
        try:
            return cls(tuple(labels))
        except VocabularyError as err:
            raise fail(str(err)) from None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load silently keeps the last of two equal keys; a label written twice is a mistake.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise VocabularyError(f"key {key!r} appears twice in the same object")
        result[key] = value
    return result


def load_vocabulary(path: str | os.PathLike | None = None) -> Vocabulary:
    """Load and validate a vocabulary file; ``None`` is the one shipped with the pack (cached)."""
    if path is None:
        return _default_vocabulary()
    return _load(os.fspath(path))


@lru_cache(maxsize=1)
def _default_vocabulary() -> Vocabulary:
    return _load(DEFAULT_VOCABULARY_PATH)


def _load(path: str) -> Vocabulary:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file, object_pairs_hook=_reject_duplicate_keys)
    except VocabularyError as err:
        raise VocabularyError(f"{path}: {err}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise VocabularyError(f"{path}: cannot read the vocabulary: {err}") from err
    return Vocabulary.from_dict(data, source=path)


def parse_label_list(text: str, source: str = "label list") -> Vocabulary:
    """A user's own labels, one per line: ``level: label`` or ``level: label = phrase``.

    ``level`` is foreground, background or ambience; ``phrase`` (what the prompt gets) defaults to
    the label. Blank lines and lines starting with ``#`` are skipped. Text starting with ``{`` is
    read as a vocabulary JSON file instead (see the module docstring).
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped, object_pairs_hook=_reject_duplicate_keys)
        except json.JSONDecodeError as err:
            raise VocabularyError(f"{source}: not valid JSON: {err}") from None
        return Vocabulary.from_dict(data, source=source)
    labels: list[SoundLabel] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        level, sep, rest = line.partition(":")
        level = level.strip().lower()
        if not sep or level not in LEVELS:
            raise VocabularyError(
                f"{source}, line {number}: expected 'level: label' or 'level: label = phrase' with a level "
                f"of {', '.join(LEVELS)}, found {line!r}"
            )
        label, _, phrase = rest.partition("=")
        label, phrase = label.strip(), phrase.strip() or label.strip()
        if not label:
            raise VocabularyError(f"{source}, line {number}: the label after {level!r} is empty")
        labels.append(SoundLabel(label=label, level=level, phrase=phrase))
    if not labels:
        raise VocabularyError(f"{source}: no labels (write one 'level: label' per line)")
    try:
        return Vocabulary(tuple(labels))
    except VocabularyError as err:
        raise VocabularyError(f"{source}: {err}") from None


def load_label_list(path: str | os.PathLike) -> Vocabulary:
    """A label file: a vocabulary ``.json``, or ``.txt`` lines as :func:`parse_label_list` reads."""
    path = os.fspath(path)
    if path.endswith(".json"):
        return _load(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise VocabularyError(f"{path}: cannot read the label list: {err}") from err
    return parse_label_list(text, source=os.path.basename(path))
