"""An aligned test CLAP: a random-weight CLAP whose answer is known, for the text-fit transfer test.

The random test CLAP (tools/test_models.py) hears nothing and reads nothing: its text tower puts
every caption within cosine 0.998 of every other. So both projection heads' last layers are
*solved* (least squares on the features entering them, float64, minimum norm):

- text: each caption lands on an anchor ``t_i = unit(common * u + unit(r_i))`` (``u`` shared,
  ``r_i`` random): different captions at cosine ~``common^2 / (1 + common^2)``, as a real CLAP's
  text cloud is far from isotropic;
- audio: each test sound (synthesised, 10 s, 48 kHz) lands at ``unit(t_c + shift * g + spread * e_s)``
  for its caption ``c``: ``g`` is one unit vector shared by every sound (the clouds' offset), ``e_s``
  a random unit vector per sound (the spread). With the defaults, matching audio/text pairs sit at
  cosine ~0.47 and non-matching ones at ~0.3, like a real CLAP's modality gap.

Everything else (HTSAT, RoBERTa, the mel front end) is the real random network: the sounds go
through :meth:`ClapEncoder.encode_windows` and the captions through :meth:`ClapEncoder.encode_text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clap2diffusion_core.audio import WINDOW_SAMPLES
from clap2diffusion_core.clap import ClapEncoder, load_clap

RATE = 48_000


@dataclass
class AlignedClap:
    encoder: ClapEncoder
    captions: list[str]
    windows: torch.Tensor  # [S, 480000] the test sounds
    sound_caption: torch.Tensor  # [S] row in ``captions`` of each sound's caption
    text_anchors: torch.Tensor  # [M, 512]
    audio_targets: torch.Tensor  # [S, 512]

    @property
    def matching_cosine(self) -> float:
        """Mean cosine between a sound's audio embedding and its caption's text embedding."""
        return float((self.audio_targets * self.text_anchors[self.sound_caption]).sum(-1).mean())

    @property
    def other_cosine(self) -> float:
        """Mean cosine between a sound and the captions that are not its own."""
        scores = self.audio_targets @ self.text_anchors.T
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask[torch.arange(len(scores)), self.sound_caption] = False
        return float(scores[mask].mean())


def synth_windows(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` different 10 s sounds ``[count, 480000]``: tones, noise bands, pulses, sweeps."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW_SAMPLES) / RATE
    out = []
    for i in range(count):
        kind = i % 4
        f = 80.0 * 2 ** (rng.uniform(0, 6))
        if kind == 0:  # harmonic tone
            x = sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 4))
        elif kind == 1:  # band of noise (moving-average filtered)
            width = int(rng.integers(2, 64))
            x = np.convolve(rng.standard_normal(t.size), np.ones(width) / width, mode="same")
        elif kind == 2:  # pulses
            x = np.zeros(t.size)
            x[:: int(RATE / rng.uniform(1, 20))] = 1.0
            x = np.convolve(x, np.exp(-np.arange(2000) / rng.uniform(50, 800)), mode="same")
        else:  # sweep
            f1 = f * rng.uniform(2, 8)
            x = np.sin(2 * np.pi * (f * t + (f1 - f) * t**2 / (2 * t[-1])))
        x = x * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 4) * t))  # amplitude movement
        out.append(0.7 * x / (np.abs(x).max() + 1e-9))
    return torch.tensor(np.stack(out), dtype=torch.float32)


def _solve_last_layer(layer: nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> None:
    """Set ``layer`` (``[out, in]`` + bias) so ``layer(features) == targets`` (min-norm lstsq)."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.pinv(x) @ targets.double()  # [in + 1, out]
    with torch.no_grad():
        layer.weight.copy_(solution[:-1].T.float())
        layer.bias.copy_(solution[-1].float())


def _inputs_of(layer: nn.Module, run) -> torch.Tensor:  # noqa: ANN001
    captured = []
    handle = layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(captured).float()


def aligned_clap(
    clap_folder: str | Path,
    captions: list[str],
    sounds: int,
    *,
    common: float = 1.0,
    shift: float = 1.5,
    spread: float = 1.2,
    seed: int = 0,
) -> AlignedClap:
    """The test CLAP of ``clap_folder`` with solved projections (see the module docstring);
    sound ``s`` belongs to caption ``s`` (so ``sounds <= len(captions)``)."""
    if sounds > len(captions):
        raise ValueError("one caption per sound at least")
    encoder = load_clap(clap_folder)
    gen = torch.Generator().manual_seed(seed)
    dim = encoder.embed_dim
    u = F.normalize(torch.randn(dim, generator=gen), dim=0)
    anchors = F.normalize(common * u + F.normalize(torch.randn(len(captions), dim, generator=gen), dim=-1), dim=-1)
    g = F.normalize(torch.randn(dim, generator=gen), dim=0)
    owner = torch.arange(sounds)
    e = F.normalize(torch.randn(sounds, dim, generator=gen), dim=-1)
    audio = F.normalize(anchors[owner] + shift * g + spread * e, dim=-1)

    model = encoder.model
    text_in = _inputs_of(model.text_projection.linear2, lambda: encoder.encode_text(captions))
    _solve_last_layer(model.text_projection.linear2, text_in, anchors)
    windows = synth_windows(sounds, seed)
    audio_in = _inputs_of(model.audio_projection.linear2, lambda: encoder.encode_windows(windows))
    _solve_last_layer(model.audio_projection.linear2, audio_in, audio)
    return AlignedClap(encoder, list(captions), windows, owner, anchors, audio)
