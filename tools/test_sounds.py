"""Synthetic sounds with a known meaning over time, for the tests and the benches alike.

The sound of issue 19: 10 s of rain-like noise (hiss above 2 kHz), then 10 s of thunder-like
bursts (rumble below 200 Hz, 0.2 s in every 0.5 s), at equal mean power, so the meaning switches
at 10 s (frame 80 at 8 fps). Here in ``tools/`` because ``bench/`` uses it too, and benches never
import the tests (``make lint`` checks it).
"""

from __future__ import annotations

import torch

SWITCH_SECONDS = 10.0


def band_noise(samples: int, sample_rate: int, low_hz: float, high_hz: float, gen: torch.Generator) -> torch.Tensor:
    """``[samples]`` white noise kept to ``low_hz..high_hz``, at unit power."""
    noise = torch.randn(samples, generator=gen)
    spectrum = torch.fft.rfft(noise)
    freqs = torch.fft.rfftfreq(samples, 1 / sample_rate)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    band = torch.fft.irfft(spectrum, n=samples)
    return band / band.pow(2).mean().sqrt()


def rain_then_thunder(sample_rate: int = 16_000, seconds: float = 20.0, seed: int = 0) -> torch.Tensor:
    """``[1, 1, T]``: rain for the first half, thunder bursts for the second, both at 0.1 RMS."""
    gen = torch.Generator().manual_seed(seed)
    half = int(seconds * sample_rate / 2)
    rain = band_noise(half, sample_rate, 2000, sample_rate / 2, gen) * 0.1
    rumble = band_noise(half, sample_rate, 30, 200, gen)
    t = torch.arange(half) / sample_rate
    bursts = ((t % 0.5) < 0.2).float()
    thunder = rumble * bursts * (0.1 / bursts.mean().sqrt())
    return torch.cat([rain, thunder])[None, None].clamp(-1, 1)


def constant_rain(sample_rate: int = 16_000, seconds: float = 20.0, seed: int = 0) -> torch.Tensor:
    """``[1, 1, T]``: the rain alone, all the way through (no change point)."""
    gen = torch.Generator().manual_seed(seed)
    return (band_noise(int(seconds * sample_rate), sample_rate, 2000, sample_rate / 2, gen) * 0.1)[None, None]
