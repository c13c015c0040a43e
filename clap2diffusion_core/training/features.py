"""The feature cache: frozen-encoder outputs of a manifest, in safetensors shards, filled resumably.

Training never runs CLAP, CLIP or the VAE: ``prepare`` runs them once per example and stores

    clap         [N, 512]          float32   CLAP audio embedding (L2-normalised)
    text         [N, 77, 768]      float16   CLIP-L last hidden state of the caption (UNet context)
    text_pooled  [N, 768]          float32   its mean over the caption's tokens (stage-1 target)
    latents      [N, 4, R/8, R/8]  float16   VAE latent of the image, in the UNet's latent space

in ``shard-r<rank>-<n>.safetensors`` files whose metadata lists the examples' ids, captions and
splits (and the empty caption's ``text`` in ``empty_caption.safetensors``, for caption dropout). A shard is written atomically once full, so an interrupted ``prepare`` loses at most one
shard of work and a rerun skips every id already stored. Files that cannot be read are reported
(``failures.jsonl``) and skipped, never fatal; they are tried again on the next run. ``cache.json``
records what the features were made with; a cache refuses features from other encoders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..audio import AudioError
from ..errors import FeatureCacheError
from .encoders import AudioEmbedder, ClipTextEncoder, LatentEncoder, load_image
from .manifest import ManifestEntry

log = logging.getLogger(__name__)

FORMAT = "clap2diffusion-features"
FORMAT_VERSION = 1
FIELDS = ("clap", "text", "text_pooled", "latents")
EMPTY_CAPTION = "empty_caption.safetensors"
_SHARD = re.compile(r"shard-r(\d+)-(\d+)\.safetensors$")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a cache's features were made with. Mixing features of two encoders would train on
    nonsense without any error, so every ``prepare`` into a cache must match its spec."""

    clap: str
    sd15: str
    resolution: int
    clap_mode: str

    @staticmethod
    def describe(path: str | os.PathLike) -> str:
        """``name (size bytes)`` of a model file or folder: stable across machines, cheap."""
        p = Path(path)
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        return f"{p.name} ({size} bytes)"


@dataclasses.dataclass
class PrepareReport:
    added: int = 0
    already_cached: int = 0
    failures: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        text = (f"features: {self.added} added, {self.already_cached} already cached, "
                f"{len(self.failures)} unreadable (skipped) in {self.seconds:.1f}s")
        for failure in self.failures[:20]:
            text += f"\n  {failure['id']}: {failure['file']}: {failure['error']}"
        if len(self.failures) > 20:
            text += f"\n  ... {len(self.failures) - 20} more in failures.jsonl"
        return text


class FeatureCache:
    """A folder of feature shards (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def shards(self) -> list[Path]:
        return sorted(p for p in self.root.glob("shard-r*-*.safetensors") if _SHARD.search(p.name))

    def spec(self) -> CacheSpec | None:
        path = self.root / "cache.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise FeatureCacheError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} cache")
        return CacheSpec(**data["spec"])

    def claim(self, spec: CacheSpec) -> None:
        """Record ``spec`` for a new cache, or check that it is the one already recorded."""
        self.root.mkdir(parents=True, exist_ok=True)
        current = self.spec()
        if current is None:
            _write_json(self.root / "cache.json",
                        {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec)})
        elif current != spec:
            raise FeatureCacheError(
                f"{self.root} holds features made with {current}, not {spec}. Use another cache folder "
                "(or delete this one) rather than mixing encoders."
            )

    @staticmethod
    def shard_index(path: Path) -> list[dict]:
        """The examples of one shard, from its header only: ``[{id, caption, split}]``."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        ids, captions, splits = (json.loads(meta[k]) for k in ("ids", "captions", "splits"))
        return [{"id": i, "caption": c, "split": s} for i, c, s in zip(ids, captions, splits, strict=True)]

    def empty_caption(self) -> torch.Tensor:
        """``[77, 768]`` CLIP hidden state of the empty caption (for caption dropout)."""
        path = self.root / EMPTY_CAPTION
        if not path.is_file():
            raise FeatureCacheError(f"{path} is missing: run `prepare` again to write it")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("text")[0].float()

    def ids(self) -> set[str]:
        return {row["id"] for shard in self.shards() for row in self.shard_index(shard)}

    def write_shard(self, rank: int, tensors: dict[str, torch.Tensor], rows: list[dict]) -> Path:
        """Write one shard atomically (a half-written shard must never look done)."""
        taken = [int(m.group(2)) for p in self.shards() if (m := _SHARD.search(p.name)) and int(m.group(1)) == rank]
        path = self.root / f"shard-r{rank:02d}-{max(taken, default=-1) + 1:05d}.safetensors"
        meta = {plural: json.dumps([r[key] for r in rows])
                for plural, key in (("ids", "id"), ("captions", "caption"), ("splits", "split"))}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path


def prepare_features(
    entries: Sequence[ManifestEntry],
    cache_dir: str | os.PathLike,
    spec: CacheSpec,
    audio: AudioEmbedder,
    text: ClipTextEncoder,
    images: LatentEncoder,
    *,
    batch_size: int = 16,
    shard_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> PrepareReport:
    """Encode every entry not yet in the cache and store it; see the module docstring.

    With several processes (``accelerate launch``), process ``rank`` takes every ``world_size``-th
    entry of the manifest and writes its own shards; ids already cached are skipped by all.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    cache = FeatureCache(cache_dir)
    cache.claim(spec)
    if rank == 0 and not (cache.root / EMPTY_CAPTION).is_file():
        hidden, pooled = text([""])
        tmp = cache.root / f".{EMPTY_CAPTION}.tmp-{os.getpid()}"
        save_file({"text": hidden.half().cpu().contiguous(), "text_pooled": pooled.float().cpu()}, str(tmp))
        os.replace(tmp, cache.root / EMPTY_CAPTION)
    done = cache.ids()
    mine = entries[rank::world_size]  # by manifest position: stable whatever the others have done
    todo = [e for e in mine if e.id not in done]
    report = PrepareReport(already_cached=len(mine) - len(todo))
    pending: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
    rows: list[dict] = []

    def flush() -> None:
        if rows:
            cache.write_shard(rank, {k: torch.cat(v) for k, v in pending.items()}, list(rows))
            for v in pending.values():
                v.clear()
            rows.clear()

    bar = tqdm(total=len(todo), desc=f"prepare[{rank}]", unit="clip", disable=not progress)
    for i in range(0, len(todo), batch_size):
        batch, windows, pixels = [], [], []
        for entry in todo[i:i + batch_size]:
            try:
                w = audio.load(entry.audio)
            except (AudioError, OSError, ValueError, RuntimeError) as err:
                report.failures.append({"id": entry.id, "file": entry.audio, "error": str(err).splitlines()[0]})
                continue
            try:
                p = load_image(entry.image, spec.resolution)
            except (OSError, ValueError, RuntimeError) as err:
                report.failures.append({"id": entry.id, "file": entry.image, "error": str(err).splitlines()[0]})
                continue
            batch.append(entry)
            windows.append(w)
            pixels.append(p)
        if batch:
            hidden, pooled = text([e.caption for e in batch])
            pending["clap"].append(audio.embed_windows(windows).float().cpu())
            pending["text"].append(hidden.half().cpu())
            pending["text_pooled"].append(pooled.float().cpu())
            pending["latents"].append(images(torch.stack(pixels)).half().cpu())
            rows.extend({"id": e.id, "caption": e.caption, "split": e.split} for e in batch)
            if len(rows) >= shard_size:
                flush()
        bar.update(len(todo[i:i + batch_size]))
    flush()
    bar.close()
    with open(cache.root / f"failures-r{rank:02d}.jsonl", "w", encoding="utf-8") as f:
        for failure in report.failures:
            f.write(json.dumps(failure) + "\n")
    report.added = len(todo) - len(report.failures)
    report.seconds = time.perf_counter() - start
    return report


class FeatureDataset(torch.utils.data.Dataset):
    """Examples of one split of a cache, read lazily (memory-mapped) field by field.

    ``dataset[i]`` -> ``{field: tensor (float32), "caption_index": int}``; ``caption_index`` numbers
    the split's distinct captions (``self.captions``), so a loss can tell true negatives from
    repeats of the same caption and retrieval can rank captions, not examples.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", fields: Sequence[str] = FIELDS) -> None:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise FeatureCacheError(f"unknown feature fields {sorted(unknown)}; known: {FIELDS}")
        cache = FeatureCache(root)
        if cache.spec() is None:
            raise FeatureCacheError(f"{root} is not a feature cache: run `prepare` first")
        self.fields = tuple(fields)
        self.shard_paths: list[str] = []
        self.rows: list[tuple[int, int]] = []  # (shard, row)
        self.ids: list[str] = []
        caption_of: list[str] = []
        for shard in cache.shards():
            wanted = [(row, item) for row, item in enumerate(cache.shard_index(shard)) if item["split"] == split]
            if wanted:
                self.shard_paths.append(str(shard))
            for row, item in wanted:
                self.rows.append((len(self.shard_paths) - 1, row))
                self.ids.append(item["id"])
                caption_of.append(item["caption"])
        if not self.rows:
            raise FeatureCacheError(f"{root} holds no {split!r} examples")
        self.captions = sorted(set(caption_of))
        index = {c: i for i, c in enumerate(self.captions)}
        self.caption_index = torch.tensor([index[c] for c in caption_of])
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _handle(self, shard: int):
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.shard_paths[shard], framework="pt")
        return handle

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: self._read(i, k) for k in self.fields}
        item["caption_index"] = self.caption_index[i]
        return item

    def stacked(self, field: str) -> torch.Tensor:
        """Every example's ``field`` (any stored field) as one float32 tensor, for evaluation."""
        return torch.stack([self._read(i, field) for i in range(len(self))])

    def _read(self, i: int, field: str) -> torch.Tensor:
        shard, row = self.rows[i]
        return self._handle(shard).get_slice(field)[row:row + 1][0].float()

    def __getstate__(self) -> dict:
        # DataLoader workers open their own (memory-mapped) handles.
        return {**self.__dict__, "_handles": {}}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
