"""A generated audio/image/caption set for smoke runs: sounds that differ, each with a caption and image.

No AudioCaps here, and the CLAP the tests use has random weights. A random HTSAT mostly sees a
sound's spectral envelope and pools over time (a rising and a falling chirp embed alike, and so do
clicks and broadband bursts), so the kinds below differ in *where their energy sits*: a low hum,
a rumble, a beep, a wavering tone, a bell, a sweep, radio static and a hiss. With the random CLAP
of ``tools/test_models.py`` their embeddings are far apart (``clap_separability`` measures it; the
smoke run reports it). Each clip is a few seconds of 48 kHz mono audio with a random pitch or band
inside its kind's range; each image a 2D pattern in its kind's colour, so both modalities carry the
kind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .manifest import ManifestEntry, write_manifest

SAMPLE_RATE = 48_000


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum[(freqs < low) | (freqs > high)] = 0
    return np.fft.irfft(spectrum, n)


def _sweep(t: np.ndarray, f0: float, f1: float, seconds: float) -> np.ndarray:
    """Exponential sine sweep from ``f0`` to ``f1`` Hz."""
    k = math.log(f1 / f0)
    return np.sin(2 * np.pi * f0 * seconds / k * (np.exp(k * t / seconds) - 1))


# Each generator: (rng, t [seconds], seconds) -> mono signal (any scale; normalised afterwards).
Generator = Callable[[np.random.Generator, np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class SoundKind:
    name: str
    caption: str
    make: Generator
    colour: tuple[int, int, int]
    pattern: str


def _tone(low: float, high: float) -> Generator:
    return lambda r, t, s: np.sin(2 * np.pi * r.uniform(low, high) * t)


def _noise(low: float, high: float) -> Generator:
    return lambda r, t, s: _band_noise(r, t.size, low, high)


def _siren(r: np.random.Generator, t: np.ndarray, s: float) -> np.ndarray:
    wobble = 0.5 + 0.5 * np.sin(2 * np.pi * r.uniform(6, 10) * t)
    return np.sin(2 * np.pi * r.uniform(450, 550) * t) * wobble


def _bell(r: np.random.Generator, t: np.ndarray, s: float) -> np.ndarray:
    f = r.uniform(1400, 1600)
    strikes = np.exp(-(t % 0.75) / 0.15)  # struck every 0.75 s, 150 ms decay
    return strikes * (np.sin(2 * np.pi * f * t) + 0.5 * np.sin(2 * np.pi * 2.76 * f * t))


def _chirp(r: np.random.Generator, t: np.ndarray, s: float) -> np.ndarray:
    return _sweep(t, r.uniform(300, 500), r.uniform(2500, 3500), s)


SOUND_KINDS: tuple[SoundKind, ...] = (
    SoundKind("hum", "a deep electrical hum in a quiet room", _tone(180, 240), (40, 60, 160), "horizontal"),
    SoundKind("rumble", "thunder rumbling far away during a storm", _noise(20, 200), (70, 70, 80), "clouds"),
    SoundKind("beep", "a steady electronic beep", _tone(800, 1000), (220, 40, 40), "vertical"),
    SoundKind("siren", "a wavering siren tone", _siren, (240, 140, 20), "rings"),
    SoundKind("bell", "a small bell ringing again and again", _bell, (230, 200, 60), "dots"),
    SoundKind("chirp", "a whistle sweeping upward in pitch", _chirp, (60, 180, 90), "diagonal"),
    SoundKind("static", "radio static crackling", _noise(1000, 2500), (150, 150, 150), "noise"),
    SoundKind("hiss", "steam hissing from a pipe", _noise(7000, 12000), (230, 230, 250), "checker"),
)


def synth_clip(kind: SoundKind, rng: np.random.Generator, seconds: float = 3.0) -> np.ndarray:
    """One clip of ``kind``: float32 ``[T]`` at 48 kHz, peak 0.5-0.9, 20 ms fades."""
    n = int(SAMPLE_RATE * seconds)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    x = kind.make(rng, t, seconds)
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)
    x = x * fade
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.5, 0.9)
    return x.astype(np.float32)


def synth_image(kind: SoundKind, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A ``[size, size, 3]`` uint8 image: the kind's pattern in its colour, random phase and jitter."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(3, 5) * 2 * np.pi
    pattern = {
        "horizontal": np.sin(freq * y + phase),
        "vertical": np.sin(freq * x + phase),
        "diagonal": np.sin(freq * (x + y) / 1.4 + phase),
        "rings": np.sin(freq * np.hypot(x - 0.5, y - 0.5) * 2 + phase),
        "dots": np.sin(freq * x + phase) * np.sin(freq * y + phase),
        "checker": np.sign(np.sin(freq * x + phase) * np.sin(freq * y)),
        "noise": rng.uniform(-1, 1, (size, size)),
        "clouds": _smooth_noise(rng, size),
    }[kind.pattern]
    colour = np.clip(np.array(kind.colour) + rng.normal(0, 8, 3), 0, 255)
    image = colour[None, None, :] * (0.65 + 0.35 * pattern[..., None])
    return np.clip(image, 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 1, 6, 6))).float()
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine[0, 0].clamp(-1, 1).numpy()


def make_synthetic_dataset(
    root: str | os.PathLike,
    per_kind: int = 4,
    seconds: float = 3.0,
    image_size: int = 64,
    seed: int = 0,
    kinds: tuple[SoundKind, ...] = SOUND_KINDS,
) -> Path:
    """Write ``per_kind`` clips of every kind (``audio/*.wav``, ``images/*.png``) and
    ``manifest.jsonl`` (all ``train``) under ``root``; return the manifest path. Deterministic in
    ``seed``; existing files are overwritten."""
    import soundfile
    from PIL import Image

    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for kind in kinds:
        for i in range(per_kind):
            name = f"{kind.name}_{i:02d}"
            audio, image = root / "audio" / f"{name}.wav", root / "images" / f"{name}.png"
            soundfile.write(str(audio), synth_clip(kind, rng, seconds), SAMPLE_RATE, subtype="PCM_16")
            Image.fromarray(synth_image(kind, rng, image_size)).save(image)
            entries.append(ManifestEntry(str(audio), str(image), kind.caption, "train", name))
    return write_manifest(entries, root / "manifest.jsonl")


def clap_separability(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of ``embeddings [N, D]`` against ``labels [N]``.

    Cosine similarity after removing the mean embedding: a random CLAP maps every sound near one
    common direction, and what tells sounds apart is the rest.
    """
    centred = torch.nn.functional.normalize(embeddings.float() - embeddings.float().mean(0), dim=-1)
    similarity = centred @ centred.T
    similarity.fill_diagonal_(-float("inf"))
    return float((labels[similarity.argmax(dim=1)] == labels).float().mean())
