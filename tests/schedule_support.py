"""The test sound of issue 19 (built in tools/test_sounds.py, which the benches share) and a
stand-in CLAP whose embeddings are known.

The stand-in encoder hears a window's share of rumble energy ``p`` and returns
``normalize((1 - p) * RAIN + p * THUNDER)``: a window centred on the boundary is half of each, so
the meaning switches at 10 s, frame 80 at 8 fps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clap2diffusion_core.audio import CLAP_SAMPLE_RATE
from tools.test_sounds import SWITCH_SECONDS, constant_rain, rain_then_thunder

__all__ = ["DIM", "RAIN", "SWITCH_SECONDS", "THUNDER", "StandInClap", "constant_rain", "is_thunder", "rain_then_thunder"]

DIM = 16
RAIN = F.one_hot(torch.tensor(0), DIM).float()
THUNDER = F.one_hot(torch.tensor(1), DIM).float()


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
