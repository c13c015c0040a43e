"""The test sound of issue 19 and a stand-in CLAP whose embeddings are known.

The sound: 10 s of rain-like noise (hiss above 2 kHz), then 10 s of thunder-like bursts (rumble
below 200 Hz, 0.2 s in every 0.5 s), at equal mean power. The stand-in encoder hears a window's
share of rumble energy ``p`` and returns ``normalize((1 - p) * RAIN + p * THUNDER)``: a window
centred on the boundary is half of each, so the meaning switches at 10 s, frame 80 at 8 fps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clap2diffusion_core.audio import CLAP_SAMPLE_RATE

DIM = 16
RAIN = F.one_hot(torch.tensor(0), DIM).float()
THUNDER = F.one_hot(torch.tensor(1), DIM).float()
SWITCH_SECONDS = 10.0


def _band_noise(samples: int, sample_rate: int, low_hz: float, high_hz: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(samples, generator=gen)
    spectrum = torch.fft.rfft(noise)
    freqs = torch.fft.rfftfreq(samples, 1 / sample_rate)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    band = torch.fft.irfft(spectrum, n=samples)
    return band / band.pow(2).mean().sqrt()  # unit power


def rain_then_thunder(sample_rate: int = 16_000, seconds: float = 20.0, seed: int = 0) -> torch.Tensor:
    """``[1, 1, T]``: rain for the first half, thunder bursts for the second, both at 0.1 RMS."""
    gen = torch.Generator().manual_seed(seed)
    half = int(seconds * sample_rate / 2)
    rain = _band_noise(half, sample_rate, 2000, sample_rate / 2, gen) * 0.1
    rumble = _band_noise(half, sample_rate, 30, 200, gen)
    t = torch.arange(half) / sample_rate
    bursts = ((t % 0.5) < 0.2).float()
    thunder = rumble * bursts * (0.1 / bursts.mean().sqrt())
    return torch.cat([rain, thunder])[None, None].clamp(-1, 1)


def constant_rain(sample_rate: int = 16_000, seconds: float = 20.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (_band_noise(int(seconds * sample_rate), sample_rate, 2000, sample_rate / 2, gen) * 0.1)[None, None]


class StandInClap:
    """``encode_windows([N, 480000]) -> [N, 16]``: rain/thunder mixed by the window's rumble share."""

    def __init__(self) -> None:
        self.windows_seen = 0

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        self.windows_seen += windows.shape[0]
        spectrum = torch.fft.rfft(windows.float()).abs().pow(2)
        freqs = torch.fft.rfftfreq(windows.shape[-1], 1 / CLAP_SAMPLE_RATE)
        low = spectrum[:, freqs < 500].sum(-1)
        share = (low / spectrum.sum(-1).clamp(min=1e-12)).float()[:, None]  # [N, 1]
        return F.normalize((1 - share) * RAIN + share * THUNDER, dim=-1)


def is_thunder(embeds: torch.Tensor) -> torch.Tensor:
    """``[F, D]`` -> ``[F]`` bool: nearer THUNDER than RAIN."""
    return embeds @ THUNDER > embeds @ RAIN
