"""The data manifest: one row per (audio clip, image, caption) with its split.

JSON Lines (``.jsonl``) or CSV, with the columns ``audio``, ``image``, ``caption`` and optionally
``split`` (default ``train``) and ``id``. Relative paths are relative to the manifest's folder, so a
data set folder can be moved as a whole. AudioCaps has one caption per training clip and five per
validation/test clip: each caption is its own row (same audio, different id).

    {"audio": "audio/--0w1YA1Hm4.wav", "image": "frames/--0w1YA1Hm4.jpg",
     "caption": "A vehicle driving as a man and woman are talking", "split": "train"}
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ManifestError

SPLITS = ("train", "val", "test")
COLUMNS = ("id", "audio", "image", "caption", "split")


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One training example. ``audio``/``image`` are absolute paths once read from a file."""

    audio: str
    image: str
    caption: str
    split: str = "train"
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            # Stable across runs and machines (paths relative to the manifest), unique per caption.
            digest = hashlib.sha1(f"{self.audio}\0{self.image}\0{self.caption}".encode()).hexdigest()
            object.__setattr__(self, "id", digest[:16])


def read_manifest(path: str | os.PathLike, splits: Sequence[str] | None = None) -> list[ManifestEntry]:
    """Read a ``.jsonl`` or ``.csv`` manifest; keep only ``splits`` if given.

    Ids default to a hash of the paths *as written* (so moving the folder keeps them); paths are
    then resolved against the manifest's folder. Duplicate ids are an error (they would collide in
    the feature cache).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    rows = _read_jsonl(path) if path.suffix.lower() in (".jsonl", ".json") else _read_csv(path)
    root = path.resolve().parent
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        where = f"{path}:{line}"
        missing = [k for k in ("audio", "image", "caption") if not str(row.get(k) or "").strip()]
        if missing:
            raise ManifestError(f"{where}: missing {', '.join(missing)} (columns: audio, image, caption[, split, id])")
        split = str(row.get("split") or "train").strip()
        if split not in SPLITS:
            raise ManifestError(f"{where}: split {split!r} is not one of {SPLITS}")
        entry = ManifestEntry(
            audio=str(row["audio"]).strip(),
            image=str(row["image"]).strip(),
            caption=" ".join(str(row["caption"]).split()),
            split=split,
            id=str(row.get("id") or "").strip(),
        )
        if entry.id in seen:
            raise ManifestError(f"{where}: id {entry.id!r} repeats line {seen[entry.id]}")
        seen[entry.id] = line
        entries.append(
            dataclasses.replace(entry, audio=str(root / entry.audio), image=str(root / entry.image))
        )
    if splits is not None:
        entries = [e for e in entries if e.split in splits]
    return entries


def write_manifest(entries: Iterable[ManifestEntry], path: str | os.PathLike) -> Path:
    """Write ``entries`` as JSON Lines; paths under the manifest's folder are stored relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            row = dataclasses.asdict(e)
            for key in ("audio", "image"):
                row[key] = _relative(row[key], root)
            f.write(json.dumps({k: row[k] for k in COLUMNS}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def audiocaps_manifest(
    csv_path: str | os.PathLike,
    audio_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    split: str,
    audio_ext: str = ".wav",
    image_ext: str = ".jpg",
) -> list[ManifestEntry]:
    """Rows of an AudioCaps CSV (``audiocap_id, youtube_id, start_time, caption``) as entries.

    Audio is expected at ``audio_dir/<youtube_id><audio_ext>`` and the video frame at
    ``image_dir/<youtube_id><image_ext>`` (the layout of the common AudioCaps downloaders).
    Rows whose files are missing are kept: ``prepare`` reports and skips them.
    """
    if split not in SPLITS:
        raise ManifestError(f"split {split!r} is not one of {SPLITS}")
    entries = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ytid = row["youtube_id"].strip()
            entries.append(
                ManifestEntry(
                    audio=str(Path(audio_dir).resolve() / f"{ytid}{audio_ext}"),
                    image=str(Path(image_dir).resolve() / f"{ytid}{image_ext}"),
                    caption=" ".join(row["caption"].split()),
                    split=split,
                    id=f"audiocaps-{row['audiocap_id'].strip()}",
                )
            )
    return entries


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{line}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{line}: expected an object, got {type(row).__name__}")
            rows.append((line, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"audio", "image", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise ManifestError(f"{path}: CSV header lacks {sorted(missing)} (has {reader.fieldnames})")
        return [(line, row) for line, row in enumerate(reader, start=2)]
